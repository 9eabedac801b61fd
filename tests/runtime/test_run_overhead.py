"""What ``run --rm`` skips to start and end quickly, and that it still leaves nothing behind:
the volatile overlay of a thrown-away snapshot, the one-request path over existing layer
snapshots, one snapshotter connection per run, the client's label names."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipfsnap.cli import run as run_mod
from ipfsnap.cli.common import Context
from ipfsnap.cli.main import build_parser, main
from ipfsnap.content import ImageStore, ResolvedImage
from ipfsnap.content.archive import import_image
from ipfsnap.content.sample import SampleImage
from ipfsnap.image.snapshotters import OVERLAYFS, STARGZ
from ipfsnap.image.unpack import chain_ids
from ipfsnap.runtime import ContainerRecord
from ipfsnap.service.errors import ServiceUnavailable
from ipfsnap.snapshot import (
    VOLATILE_LABEL,
    Kind,
    Mount,
    SnapshotStore,
    Snapshotter,
    mount,
)
from ipfsnap.snapshot.errors import SnapshotMountError, SnapshotNotFound
from ipfsnap.snapshot.mount import VOLATILE, mount_all, unmount
from tests.runtime.test_image_run import ipfsnap, no_mounts, snapshots
from tests.support import require_root, require_tool

DIFF_IDS = ["sha256:" + c * 64 for c in "abc"]


# -- pure parts --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_top_chain_id_is_the_unpackers_top_name(n: int) -> None:
    expected = chain_ids(DIFF_IDS[:n])
    assert run_mod.top_chain_id(DIFF_IDS[:n]) == (expected[-1] if expected else "")


def test_client_label_names_are_the_layer_filesystems() -> None:
    from ipfsnap.fs import mounter
    from ipfsnap.service import client

    assert client.URLS_LABEL == mounter.URLS_LABEL
    assert client.IPFS_API_LABEL == mounter.IPFS_API_LABEL


def test_volatile_only_for_writable_overlays(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[Mount]] = []
    monkeypatch.setattr(mount, "_mount_list", lambda ms, target: calls.append(list(ms)))
    rw = Mount("overlay", "overlay", ["lowerdir=/a:/b", "upperdir=/u", "workdir=/w"])
    ro = Mount("overlay", "overlay", ["lowerdir=/a:/b"])
    bind = Mount("bind", "/x", ["rbind", "rw"])
    mount_all([rw], "/t", volatile=True)
    mount_all([ro, bind], "/t", volatile=True)
    mount_all([rw], "/t")
    assert calls == [
        [Mount(rw.type, rw.source, [*rw.options, VOLATILE])],
        [ro, bind],
        [rw],
    ]


def test_volatile_refused_mounts_without(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel without the option (before 5.10) answers EINVAL: mount as before."""
    calls: list[list[str]] = []

    def fake(ms: list[Mount], target: str) -> None:
        calls.append(ms[0].options)
        if VOLATILE in ms[0].options:
            raise SnapshotMountError(f"mount overlay on {target} failed: Invalid argument")

    monkeypatch.setattr(mount, "_mount_list", fake)
    rw = Mount("overlay", "overlay", ["upperdir=/u", "workdir=/w", "lowerdir=/a"])
    mount_all([rw], "/t", volatile=True)
    assert calls == [[*rw.options, VOLATILE], rw.options]


class FakeSnaps:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail
        self.removed: list[str] = []

    def remove(self, key: str) -> None:
        if self.fail is not None:
            raise self.fail
        self.removed.append(key)


def _ctx(state: Path) -> Context:
    return Context(build_parser().parse_args(["--state-dir", str(state), "ps"]))


def test_release_reuses_the_runs_connection_and_reconnects_once_lost(
    monkeypatch: pytest.MonkeyPatch, state_dir: Path
) -> None:
    opened: list[FakeSnaps] = []
    plan = [FakeSnaps(ServiceUnavailable("snapshotter s: connection closed during remove")),
            FakeSnaps(), FakeSnaps(SnapshotNotFound("snapshot 'k' not found"))]

    @contextlib.contextmanager
    def fake_open(ctx: Context, name: str = OVERLAYFS) -> Iterator[FakeSnaps]:
        opened.append(plan[len(opened)])
        yield opened[-1]

    monkeypatch.setattr(run_mod, "open_snapshots", fake_open)
    ctx = _ctx(state_dir)
    session = run_mod.SnapshotSession(ctx, STARGZ)
    session.get()  # the mount opened it
    record = ContainerRecord(id="c1", snapshot_key="ipfsnap-container c1", snapshotter=STARGZ)
    run_mod.release_for(ctx, session)(record)
    # the held connection was lost: the removal went through a new one
    assert len(opened) == 2 and opened[1].removed == ["ipfsnap-container c1"]
    # another snapshotter's record opens its own; already removed is not an error
    run_mod.release_for(ctx, session)(
        ContainerRecord(id="c2", snapshot_key="k", snapshotter=OVERLAYFS))
    assert len(opened) == 3
    session.close()


# -- with runc ---------------------------------------------------------------------------------


@pytest.fixture
def imported(runtime_state: Path, busybox_image: SampleImage) -> str:
    require_root()
    require_tool("runc")
    records = import_image(ImageStore(runtime_state), busybox_image.layout)
    return records[0].name


def _volatile(super_options: str) -> bool:
    """Whether overlay superblock options say volatile (Linux 6.x shows ``fsync=volatile``)."""
    return bool({VOLATILE, "fsync=volatile"} & set(super_options.split(",")))


def _root_volatile(mountinfo: str) -> bool:
    """Whether the container's ``/`` (its mountinfo line's last field) is volatile."""
    for line in mountinfo.splitlines():
        fields = line.split()
        if fields[4] == "/":
            return _volatile(fields[-1])
    raise AssertionError(f"no / in {mountinfo!r}")


@pytest.mark.integration
@pytest.mark.parametrize("snapshotter", [OVERLAYFS, STARGZ])
def test_rm_run_is_volatile_and_leaves_nothing(
    runtime_state: Path, imported: str, snapshotter: str
) -> None:
    p = ipfsnap(runtime_state, "run", "--rm", "--snapshotter", snapshotter, imported, "c1",
                "cat", "/proc/self/mountinfo")
    assert p.returncode == 0, p.stderr
    assert _root_volatile(p.stdout)
    # once the command returned: no mount, no container, no active snapshot
    assert not [m for m in _mounts(runtime_state) if "/containers/" in m]
    if snapshotter == OVERLAYFS:  # (the stargz service may keep its own mounts)
        assert no_mounts(runtime_state)
    assert not (runtime_state / "containers" / "c1").exists()
    with SnapshotStore(runtime_state / "snapshots" / snapshotter, restore=False) as s:
        assert {i.kind for i in s.walk()} == {Kind.COMMITTED}
    # a kept container's snapshot is not volatile (it may be mounted again after a crash)
    p = ipfsnap(runtime_state, "run", "--snapshotter", snapshotter, imported, "c2",
                "cat", "/proc/self/mountinfo")
    assert p.returncode == 0, p.stderr
    assert not _root_volatile(p.stdout)
    assert ipfsnap(runtime_state, "rm", "c2").returncode == 0


def _mounts(state: Path) -> list[str]:
    from ipfsnap.runtime.containers import mountinfo_targets

    return [m for m in mountinfo_targets() if m.startswith(str(state) + "/")]


@pytest.mark.integration
def test_existing_layers_skip_the_unpacker(
    runtime_state: Path, imported: str, busybox_image: SampleImage,
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:
    calls: list[str] = []
    real = run_mod.LAYER_PROVIDERS[OVERLAYFS]

    def counting(ctx: Context, snaps: Snapshotter, image: ResolvedImage) -> str:
        calls.append("unpack")
        return real(ctx, snaps, image)

    monkeypatch.setitem(run_mod.LAYER_PROVIDERS, OVERLAYFS, counting)
    argv = ["--state-dir", str(runtime_state), "run", "--rm", imported]
    assert main([*argv, "c1", "cat", "/hello.txt"]) == 0
    assert calls == ["unpack"]  # first run: the layers become snapshots
    assert main([*argv, "c2", "cat", "/hello.txt"]) == 0
    assert calls == ["unpack"]  # second: prepared on the existing top layer at once
    # the top layer snapshot gone (e.g. removed by a clean-up): unpacked again
    top = chain_ids(busybox_image.diff_ids)[-1]
    with SnapshotStore(runtime_state / "snapshots" / OVERLAYFS, restore=False) as s:
        s.remove(top)
    assert main([*argv, "c3", "cat", "/hello.txt"]) == 0
    assert calls == ["unpack", "unpack"]
    out = capfd.readouterr().out
    assert out == busybox_image.files["hello.txt"].decode() * 3
    assert set(snapshots(runtime_state).values()) == {Kind.COMMITTED}
    assert no_mounts(runtime_state)


@pytest.mark.integration
def test_volatile_overlay_mounts_and_unmounts(tmp_path: Path) -> None:
    require_root()
    for d in ("lower", "upper", "work", "merged"):
        (tmp_path / d).mkdir()
    (tmp_path / "lower" / "f").write_text("below")
    m = Mount("overlay", "overlay", [f"lowerdir={tmp_path / 'lower'}",
                                     f"upperdir={tmp_path / 'upper'}",
                                     f"workdir={tmp_path / 'work'}"])
    mount_all([m], tmp_path / "merged", volatile=True)
    try:
        (tmp_path / "merged" / "g").write_text("written")
        assert (tmp_path / "merged" / "f").read_text() == "below"
        opts = [ln.split()[-1] for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                if ln.split()[4] == str(tmp_path / "merged")]
        assert opts and _volatile(opts[0])
    finally:
        unmount(tmp_path / "merged")
    assert (tmp_path / "upper" / "g").read_text() == "written"


def test_volatile_snapshot_commits_are_not_synced(tmp_path: Path) -> None:
    """The active snapshot of a ``run --rm`` is created and removed without an fdatasync
    (sqlite WAL, synchronous=NORMAL for those two transactions); every other commit stays
    synced."""
    statements: list[str] = []
    with SnapshotStore(tmp_path / "store") as s:
        s._db.set_trace_callback(statements.append)
        s.prepare("base-active", "")
        s.commit("base", "base-active")
        normal = list(statements)
        statements.clear()
        s.prepare("c1", "base", {VOLATILE_LABEL: "true"})
        assert s.stat("c1").labels == {VOLATILE_LABEL: "true"}
        s.remove("c1")
        volatile = list(statements)
        statements.clear()
        s.remove("base")
        (sync,) = s._db.execute("PRAGMA synchronous").fetchone()
    assert not [x for x in normal if "synchronous=" in x]
    assert not [x for x in statements if "synchronous=" in x]
    lowered = [i for i, x in enumerate(volatile) if x == "PRAGMA synchronous=NORMAL"]
    assert len(lowered) == 2  # the insert's and the delete's transactions
    for i in lowered:
        rest = volatile[i:]
        commit = rest.index("COMMIT")
        assert rest[commit + 1] == "PRAGMA synchronous=FULL"
    assert sync == 2  # FULL again afterwards


@pytest.mark.integration
def test_stale_snapshot_of_the_id_is_replaced(
    runtime_state: Path, imported: str, busybox_image: SampleImage
) -> None:
    """A crash may leave the snapshot of a container whose record is gone (a volatile
    removal forgotten): the next container with that id replaces it."""
    p = ipfsnap(runtime_state, "run", "--rm", imported, "c1", "true")
    assert p.returncode == 0, p.stderr
    top = chain_ids(busybox_image.diff_ids)[-1]
    with SnapshotStore(runtime_state / "snapshots" / OVERLAYFS, restore=False) as s:
        s.prepare("ipfsnap-container c1", top, {VOLATILE_LABEL: "true"})
    p = ipfsnap(runtime_state, "run", "--rm", imported, "c1", "cat", "/hello.txt")
    assert p.returncode == 0, p.stderr
    assert "earlier container" in p.stderr
    assert set(snapshots(runtime_state).values()) == {Kind.COMMITTED}
    assert no_mounts(runtime_state)
