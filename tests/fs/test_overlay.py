"""Two lazy layers stacked with overlayfs give the image's rootfs (whiteouts applied)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.fs.layers import Item, build_blob, snapshot_tree
from tests.fs.mounts import labels_for, make_mounter, mounted
from tests.support import require_fuse, require_tool


def test_two_layers_under_overlayfs(tmp_path: Path) -> None:
    require_fuse()
    mount = require_tool("mount")
    lower_items = [
        Item("a", "file", b"a from lower"),
        Item("b", "file", b"b from lower", mode=0o600, uid=1000, gid=1000),
        Item("d", "dir", mode=0o755),
        Item("d/x", "file", b"x"),
        Item("d/sub/y", "file", b"y"),
        Item("e", "dir", mode=0o700),
        Item("e/z", "file", b"z"),
        Item("e/keep", "symlink", link="../b", mode=0o777),
        Item("f", "file", b"replaced later"),
    ]
    upper_items = [
        Item(".wh.a", "file", b""),
        Item("d", "dir", mode=0o755),
        Item("d/.wh..wh..opq", "file", b""),
        Item("d/new", "file", b"new in upper"),
        Item("e", "dir", mode=0o700),
        Item("e/.wh.z", "file", b""),
        Item("f", "file", b"f from upper", mode=0o640),
        Item("c", "file", b"c from upper"),
    ]
    lower = build_blob(lower_items, tmp_path / "lower.blob")
    upper = build_blob(upper_items, tmp_path / "upper.blob")
    m = make_mounter(tmp_path / "state", background=False)
    lmp, ump, merged = tmp_path / "l", tmp_path / "u", tmp_path / "merged"
    merged.mkdir()
    with mounted(m, lmp, labels_for(lower)), mounted(m, ump, labels_for(upper)):
        subprocess.run([mount, "-t", "overlay", "overlay", "-o",
                        f"ro,lowerdir={ump}:{lmp}", str(merged)], check=True)
        try:
            tree = snapshot_tree(merged)
        finally:
            subprocess.run(["umount", str(merged)], check=True)
    got = {k: v for k, v in tree.items() if not k.endswith("#xattrs")}
    assert got == {
        "": ("dir", 0o755, 0, 0),
        "b": ("file", 0o600, 1000, 1000, b"b from lower", 1),
        "c": ("file", 0o644, 0, 0, b"c from upper", 1),
        "d": ("dir", 0o755, 0, 0),
        "d/new": ("file", 0o644, 0, 0, b"new in upper", 1),
        "e": ("dir", 0o700, 0, 0),
        "e/keep": ("symlink", 0o777, 0, 0, "../b"),
        "f": ("file", 0o640, 0, 0, b"f from upper", 1),
    }
