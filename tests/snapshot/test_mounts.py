"""Real overlay and bind mounts of store snapshots (root)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from ipfsnap.snapshot import SnapshotStore, mount_all, unmount
from ipfsnap.snapshot.mount import PAGE_SIZE, compact_overlay_options, is_mountpoint
from tests.support import require_root


def _tree(root: Path) -> dict[str, bytes | None]:
    """Relative path -> file content (None for directories)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


def test_three_snapshot_chain_overlay(store_root: Path, tmp_path: Path) -> None:
    require_root()
    store = SnapshotStore(store_root)
    target = tmp_path / "mnt"
    target.mkdir()

    # layer 1: written through its rw bind mount
    mount_all(store.prepare("l1"), target)
    (target / "keep").write_bytes(b"keep")
    (target / "gone").write_bytes(b"gone")
    (target / "dir").mkdir()
    (target / "dir" / "old").write_bytes(b"old")
    unmount(target)
    assert not is_mountpoint(target)
    store.commit("L1", "l1")

    # layer 2: delete a file, replace a directory's content, modify a file
    mount_all(store.prepare("l2", "L1"), target)
    assert _tree(target) == {"keep": b"keep", "gone": b"gone", "dir": None, "dir/old": b"old"}
    (target / "gone").unlink()
    (target / "dir" / "old").unlink()
    (target / "dir" / "new").write_bytes(b"new")
    (target / "keep").write_bytes(b"changed")
    unmount(target)
    l2_upper = store.path("l2")
    st = os.lstat(l2_upper / "gone")
    # overlayfs recorded the deletion as a whiteout in the upper dir
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    store.commit("L2", "l2")

    # layer 3 on top: the merged view shows the whole history
    mount_all(store.prepare("l3", "L2"), target)
    assert _tree(target) == {"keep": b"changed", "dir": None, "dir/new": b"new"}
    (target / "top").write_bytes(b"top")
    unmount(target)
    assert (store.path("l3") / "top").read_bytes() == b"top"  # writes land in the upper
    assert not (store.path("L2") / "top").exists()
    assert (store.path("L1") / "gone").read_bytes() == b"gone"  # lowers untouched


def test_views_are_read_only(store_root: Path, tmp_path: Path) -> None:
    require_root()
    store = SnapshotStore(store_root)
    store.prepare("a")
    (store.path("a") / "f").write_bytes(b"A")
    store.commit("A", "a")
    store.prepare("b", "A")
    (store.path("b") / "g").write_bytes(b"B")
    store.commit("B", "b")
    for key, parent, expect in [("v1", "A", {"f": b"A"}), ("v2", "B", {"f": b"A", "g": b"B"})]:
        target = tmp_path / key
        target.mkdir()
        mounts = store.view(key, parent)
        assert mounts[0].type == ("bind" if key == "v1" else "overlay")
        mount_all(mounts, target)
        try:
            assert _tree(target) == expect
            with pytest.raises(OSError) as ei:
                (target / "new").write_bytes(b"x")
            assert ei.value.errno == errno.EROFS
            with pytest.raises(OSError) as ei:
                (target / "f").unlink()
            assert ei.value.errno == errno.EROFS
        finally:
            unmount(target)
    assert _tree(store.path("A")) == {"f": b"A"}


def test_many_layers_exceed_one_page_of_options(store_root: Path, tmp_path: Path) -> None:
    """A chain whose absolute lowerdir list is longer than a page still mounts."""
    require_root()
    # A long store path makes every lowerdir long, so few layers exceed the page.
    root = store_root / ("long-" + "x" * 150)
    store = SnapshotStore(root)
    parent = ""
    n = 40
    for i in range(n):
        store.prepare(f"k{i}", parent)
        (store.path(f"k{i}") / f"f{i}").write_bytes(str(i).encode())
        if i:
            (store.path(f"k{i}") / "top").write_bytes(str(i).encode())
        store.commit(f"L{i}", f"k{i}", {})
        parent = f"L{i}"
    mounts = store.prepare("work", parent)
    assert len(",".join(mounts[0].options)) > PAGE_SIZE
    target = tmp_path / "mnt"
    target.mkdir()
    mount_all(mounts, target)
    try:
        assert (target / "f0").read_bytes() == b"0"
        assert (target / f"f{n - 1}").read_bytes() == str(n - 1).encode()
        assert (target / "top").read_bytes() == str(n - 1).encode()  # nearest layer wins
        (target / "w").write_bytes(b"w")
    finally:
        unmount(target)
    assert (store.path("work") / "w").read_bytes() == b"w"


def test_compact_overlay_options() -> None:
    common, opts = compact_overlay_options(
        [
            "index=off",
            "workdir=/r/snapshots/3/work",
            "upperdir=/r/snapshots/3/fs",
            "lowerdir=/r/snapshots/2/fs:/r/snapshots/1/fs",
        ]
    )
    assert common == "/r/snapshots"
    assert opts == ["index=off", "workdir=3/work", "upperdir=3/fs", "lowerdir=2/fs:1/fs"]
