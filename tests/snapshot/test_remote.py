"""Remote (lazy) snapshots through the RemoteFileSystem protocol, with a fake filesystem
that bind-mounts a prepared directory read-only (the FUSE one plugs in the same way)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pytest

from ipfsnap.errors import AlreadyExistsError, MountError, NotFoundError
from ipfsnap.snapshot import (
    REMOTE_LABEL,
    REMOTE_LABEL_VALUE,
    TARGET_SNAPSHOT_LABEL,
    Kind,
    Mount,
    RemoteFileSystem,
    SnapshotStore,
    Usage,
    mount_all,
    unmount,
)
from ipfsnap.snapshot.errors import SnapshotUnavailable
from ipfsnap.snapshot.mount import is_mountpoint, mounts_under
from tests.support import require_root

SOURCE_LABEL = "containerd.io/snapshot/remote/fake.source"


class FakeRemote:
    """Mounts ``labels[SOURCE_LABEL]`` read-only at the mountpoint."""

    def __init__(self) -> None:
        self.mounted: dict[Path, str] = {}
        self.calls: list[tuple[str, Path]] = []
        self.fail = False
        self.fail_after_mount = False
        self.broken = False

    def mount(self, mountpoint: Path, labels: Mapping[str, str]) -> None:
        self.calls.append(("mount", mountpoint))
        if self.fail:
            raise MountError(f"fake: cannot mount layer at {mountpoint}")
        src = labels[SOURCE_LABEL]
        mount_all([Mount("bind", src, ["ro", "rbind"])], mountpoint)
        self.mounted[mountpoint] = src
        if self.fail_after_mount:
            raise MountError(f"fake: layer at {mountpoint} mounted, then prefetch failed")

    def check(self, mountpoint: Path, labels: Mapping[str, str]) -> None:
        self.calls.append(("check", mountpoint))
        if self.broken or mountpoint not in self.mounted or not is_mountpoint(mountpoint):
            raise MountError(f"fake: layer at {mountpoint} is not served")

    def unmount(self, mountpoint: Path) -> None:
        self.calls.append(("unmount", mountpoint))
        self.mounted.pop(mountpoint, None)
        unmount(mountpoint)


def _source(tmp_path: Path, name: str, files: dict[str, bytes]) -> Path:
    src = tmp_path / "sources" / name
    src.mkdir(parents=True)
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    return src


def _labels(target: str, src: Path) -> dict[str, str]:
    return {TARGET_SNAPSHOT_LABEL: target, SOURCE_LABEL: str(src)}


def _remote_layer(store: SnapshotStore, key: str, parent: str, target: str, src: Path) -> None:
    with pytest.raises(AlreadyExistsError, match=f"'{target}'"):
        store.prepare(key, parent, _labels(target, src))


def test_protocol_is_satisfied() -> None:
    fake: RemoteFileSystem = FakeRemote()  # mypy checks the structural match
    assert callable(fake.mount)


def test_remote_prepare_commits_and_reports_exists(store_root: Path, tmp_path: Path) -> None:
    require_root()
    fake = FakeRemote()
    store = SnapshotStore(store_root, remote=fake)
    src1 = _source(tmp_path, "l1", {"a": b"lazy-a", "b": b"lazy-b"})
    src2 = _source(tmp_path, "l2", {"b": b"lazy-b2"})
    _remote_layer(store, "extract-1", "", "sha256:c1", src1)
    info = store.stat("sha256:c1")
    assert info.kind is Kind.COMMITTED and info.parent == ""
    assert info.labels[REMOTE_LABEL] == REMOTE_LABEL_VALUE
    assert info.labels[TARGET_SNAPSHOT_LABEL] == "sha256:c1"
    with pytest.raises(NotFoundError):
        store.stat("extract-1")  # the key became the committed target
    mp1 = store.path("sha256:c1")
    assert fake.calls[0] == ("mount", mp1) and is_mountpoint(mp1)
    assert store.usage("sha256:c1") == Usage(0, 0)  # lazy: nothing counted
    _remote_layer(store, "extract-2", "sha256:c1", "sha256:c2", src2)
    assert store.stat("sha256:c2").parent == "sha256:c1"

    # a container's rootfs on top of the two lazy layers
    target = tmp_path / "rootfs"
    target.mkdir()
    mounts = store.prepare("container", "sha256:c2")
    mount_all(mounts, target)
    try:
        assert (target / "a").read_bytes() == b"lazy-a"
        assert (target / "b").read_bytes() == b"lazy-b2"
        (target / "new").write_bytes(b"rw")
    finally:
        unmount(target)
    assert (store.path("container") / "new").read_bytes() == b"rw"
    assert sorted(os_name for os_name in (p.name for p in src1.iterdir())) == ["a", "b"]

    # removal: children first; a remote snapshot is unmounted before its dir goes
    store.remove("container")
    mp2 = store.path("sha256:c2")
    store.remove("sha256:c2")
    assert ("unmount", mp2) in fake.calls and not mp2.exists()
    store.remove("sha256:c1")
    assert not mp1.exists()
    assert mounts_under(store_root) == []
    assert (src1 / "a").read_bytes() == b"lazy-a"  # the source was never touched


def test_remote_mount_failure_falls_back(
    store_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_root()
    fake = FakeRemote()
    fake.fail = True
    store = SnapshotStore(store_root, remote=fake)
    src = _source(tmp_path, "l1", {"a": b"x"})
    with caplog.at_level(logging.WARNING, logger="ipfsnap.snapshot"):
        mounts = store.prepare("extract-1", "", _labels("sha256:c1", src))
    assert "falling back" in caplog.text and "sha256:c1" in caplog.text
    assert mounts == [Mount("bind", str(store.path("extract-1")), ["rw", "rbind"])]
    info = store.stat("extract-1")
    assert info.kind is Kind.ACTIVE and REMOTE_LABEL not in info.labels
    assert not is_mountpoint(store.path("extract-1"))
    # the normal path continues: unpack (here: write) and commit
    (store.path("extract-1") / "a").write_bytes(b"full")
    store.commit("sha256:c1", "extract-1")
    assert REMOTE_LABEL not in store.stat("sha256:c1").labels


def test_no_remote_configured_is_a_normal_snapshot(store_root: Path, tmp_path: Path) -> None:
    store = SnapshotStore(store_root)
    src = _source(tmp_path, "l1", {"a": b"x"})
    mounts = store.prepare("extract-1", "", _labels("sha256:c1", src))
    assert mounts[0].type == "bind" and store.stat("extract-1").kind is Kind.ACTIVE


def test_target_already_committed(store_root: Path, tmp_path: Path) -> None:
    require_root()
    fake = FakeRemote()
    store = SnapshotStore(store_root, remote=fake)
    src = _source(tmp_path, "l1", {"a": b"x"})
    _remote_layer(store, "extract-1", "", "sha256:c1", src)
    _remote_layer(store, "extract-again", "", "sha256:c1", src)
    assert [i.name for i in store.walk()] == ["sha256:c1"]
    # only the first mount is left
    assert mounts_under(store_root / "snapshots") == [str(store.path("sha256:c1"))]


def test_restore_on_reopen(store_root: Path, tmp_path: Path) -> None:
    require_root()
    fake = FakeRemote()
    store = SnapshotStore(store_root, remote=fake)
    src1 = _source(tmp_path, "l1", {"a": b"one"})
    src2 = _source(tmp_path, "l2", {"b": b"two"})
    _remote_layer(store, "x1", "", "sha256:c1", src1)
    _remote_layer(store, "x2", "sha256:c1", "sha256:c2", src2)
    store.prepare("container", "sha256:c2")
    mp1, mp2 = store.path("sha256:c1"), store.path("sha256:c2")
    store.close()

    # 1. same filesystem still serving: checked, not mounted again
    n_mounts = sum(1 for c in fake.calls if c[0] == "mount")
    store = SnapshotStore(store_root, remote=fake)
    assert ("check", mp1) in fake.calls and ("check", mp2) in fake.calls
    assert sum(1 for c in fake.calls if c[0] == "mount") == n_mounts
    store.close()

    # 2. the snapshotter restarted: a new filesystem instance, the old mounts are gone
    unmount(mp1)
    fresh = FakeRemote()
    store = SnapshotStore(store_root, remote=fresh)
    assert ("mount", mp1) in fresh.calls and is_mountpoint(mp1)
    # mp2 was still mounted, but this instance does not serve it: remounted too
    assert ("mount", mp2) in fresh.calls and is_mountpoint(mp2)
    assert len(mounts_under(mp2)) == 1  # not stacked on the stale one
    target = tmp_path / "rootfs"
    target.mkdir()
    mount_all(store.mounts("container"), target)
    try:
        assert (target / "a").read_bytes() == b"one" and (target / "b").read_bytes() == b"two"
    finally:
        unmount(target)
    store.close()

    # 3. the layer cannot be mounted: reported, and snapshots over it are unavailable
    unmount(mp1)
    broken = FakeRemote()
    broken.fail = True
    store = SnapshotStore(store_root, remote=broken, restore=False)
    failures = store.restore_remote()
    # c1 cannot be mounted; c2's stale mount fails its check and cannot be mounted either
    assert sorted(failures) == ["sha256:c1", "sha256:c2"]
    assert "fake: cannot mount" in failures["sha256:c1"]
    assert not is_mountpoint(mp2)  # the stale mount was taken down, not left serving
    with pytest.raises(SnapshotUnavailable, match=r"'sha256:c\d'.*'container'"):
        store.mounts("container")


def test_mounts_report_unavailable_layers(store_root: Path, tmp_path: Path) -> None:
    require_root()
    fake = FakeRemote()
    store = SnapshotStore(store_root, remote=fake)
    _remote_layer(store, "x1", "", "sha256:c1", _source(tmp_path, "l1", {"a": b"1"}))
    store.prepare("container", "sha256:c1")
    fake.broken = True
    with pytest.raises(SnapshotUnavailable, match="'sha256:c1'"):
        store.mounts("container")
    with pytest.raises(SnapshotUnavailable, match="'sha256:c1'"):
        store.view("v", "sha256:c1")
    fake.broken = False
    assert store.mounts("container")[0].type == "overlay"
    mp = store.path("sha256:c1")
    store.close(unmount_remote=True)  # the snapshotter stopping
    assert ("unmount", mp) in fake.calls and not is_mountpoint(mp)


def test_half_done_remote_mount_is_undone_on_fallback(store_root: Path, tmp_path: Path) -> None:
    require_root()
    fake = FakeRemote()
    fake.fail_after_mount = True
    store = SnapshotStore(store_root, remote=fake)
    src = _source(tmp_path, "l1", {"a": b"x"})
    mounts = store.prepare("extract-1", "", _labels("sha256:c1", src))
    upper = store.path("extract-1")
    assert mounts[0].source == str(upper)
    assert not is_mountpoint(upper) and ("unmount", upper) in fake.calls
    (upper / "unpacked").write_bytes(b"full")  # lands in the real dir, not the lazy mount
    assert not (src / "unpacked").exists()
