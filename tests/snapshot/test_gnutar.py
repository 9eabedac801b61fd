"""Differential test: apply_layer of a GNU tar archive gives the same tree as GNU tar's own
extraction (modes, owners, nanosecond mtimes, links, hardlink groups, devices, xattrs)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

from ipfsnap.snapshot import apply_layer
from tests.support import require_root, require_tool

XATTR_OPTS = ["--xattrs", "--xattrs-include=*"]


def _state(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    inode_group: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames]:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                content: object = hashlib.sha256(p.read_bytes()).hexdigest()
                # hardlinked files: name the group by its first path
                group = inode_group.setdefault((st.st_dev, st.st_ino), rel)
            elif stat.S_ISLNK(st.st_mode):
                content, group = os.readlink(p), rel
            else:
                content, group = st.st_rdev, rel
            xattrs = {
                k: os.getxattr(p, k, follow_symlinks=False)
                for k in sorted(os.listxattr(p, follow_symlinks=False))
            }
            out[rel] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                st.st_mtime_ns,
                content,
                group,
                xattrs,
            )
    return out


def test_same_tree_as_gnu_tar(tmp_path: Path) -> None:
    require_root()
    tar = require_tool("tar")
    src = tmp_path / "src"
    # a real tree ...
    shutil.copytree("/etc", src / "etc", symlinks=True)
    # ... plus what /etc lacks
    special = src / "special"
    special.mkdir()
    (special / "suid").write_bytes(b"s")
    os.chmod(special / "suid", 0o4755)
    (special / "sticky").mkdir(mode=0o1777)
    os.chmod(special / "sticky", 0o1777)
    (special / "f").write_bytes(b"x" * 10000)
    os.link(special / "f", special / "f-hard")
    os.symlink("/nonexistent/abs", special / "dangling")
    os.mkfifo(special / "fifo", 0o640)
    os.mknod(special / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chown(special / "f", 1234, 5678)
    os.setxattr(special / "f", "user.test", b"value")
    os.setxattr(special / "f", "trusted.bin", b"\xff\x00\x01")
    os.utime(special / "f", ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))

    archive = tmp_path / "layer.tar"
    subprocess.run(
        [tar, "--format=pax", *XATTR_OPTS, "-C", str(src), "-cf", str(archive), "."],
        check=True,
    )
    ref = tmp_path / "ref"
    ref.mkdir()
    subprocess.run(
        [tar, *XATTR_OPTS, "--same-owner", "-xpf", str(archive), "-C", str(ref)],
        check=True,
    )
    ours = tmp_path / "ours"
    ours.mkdir()
    with archive.open("rb") as f:
        res = apply_layer(ours, f)
    assert res.size == archive.stat().st_size
    assert res.diff_id == "sha256:" + hashlib.sha256(archive.read_bytes()).hexdigest()
    want, got = _state(ref), _state(ours)
    assert len(want) > 500
    assert sorted(want) == sorted(got)
    diffs = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
    assert diffs == {}
