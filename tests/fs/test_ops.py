"""FUSE operations called directly on the Operations object (no mount), under trio."""

from __future__ import annotations

import errno
import stat
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from ipfsnap.estargz import FileRangeReader, decompress_chunk, open_layer
from ipfsnap.fs.cache import ChunkCache
from ipfsnap.fs.layer import LazyLayer
from ipfsnap.fs.ops import LayerOperations
from tests.fs.layers import Blob, CountingSource, every_type_items


@pytest.fixture
def ops(every_type_blob: Blob, tmp_path: Path) -> LayerOperations:
    with open(every_type_blob.path, "rb") as f:
        index = open_layer(FileRangeReader(f), every_type_blob.size,
                           toc_digest=every_type_blob.toc_digest)
    layer = LazyLayer(index, CountingSource(every_type_blob.path), ChunkCache(tmp_path),
                      decompress=decompress_chunk)
    return LayerOperations(layer, attr_timeout=2.0, entry_timeout=3.0)


def run(fn: Any, *args: Any) -> Any:
    return trio.run(fn, *args)


def lookup_path(ops: LayerOperations, path: str) -> pyfuse3.EntryAttributes:
    ino = pyfuse3.ROOT_INODE
    attr = run(ops.getattr, ino, None)
    for part in path.split("/"):
        attr = run(ops.lookup, ino, part.encode(), None)
        ino = attr.st_ino
    return attr


def fuse_errno(fn: Any, *args: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        run(fn, *args)
    return int(info.value.errno)


def readdir(ops: LayerOperations, ino: int, monkeypatch: pytest.MonkeyPatch,
            limit: int = 1000) -> list[tuple[bytes, int]]:
    """All entries, resuming like the kernel does when a reply buffer is full."""
    out: list[tuple[bytes, int]] = []

    def reply(token: Any, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if len(token) >= limit:
            return False
        token.append((name, attr.st_ino, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    fh = run(ops.opendir, ino, None)
    start = 0
    while True:
        token: list[tuple[bytes, int, int]] = []
        run(ops.readdir, fh, start, token)
        if not token:
            break
        out.extend((n, i) for n, i, _ in token)
        start = token[-1][2]
    run(ops.releasedir, fh)
    return out


def test_lookup_getattr(ops: LayerOperations) -> None:
    a = lookup_path(ops, "data/big")
    assert stat.S_ISREG(a.st_mode) and stat.S_IMODE(a.st_mode) == 0o644
    assert (a.st_uid, a.st_gid, a.st_nlink) == (70000, 70001, 3)
    assert a.entry_timeout == 3.0 and a.attr_timeout == 2.0
    assert lookup_path(ops, "links/hard").st_ino == a.st_ino
    assert run(ops.getattr, a.st_ino, None).st_size == a.st_size
    d = lookup_path(ops, "data")
    assert stat.S_ISDIR(d.st_mode) and (d.st_uid, d.st_gid) == (100000, 100001)
    dev = lookup_path(ops, "dev/sda")
    assert stat.S_ISBLK(dev.st_mode) and dev.st_rdev != 0
    assert run(ops.lookup, d.st_ino, b".", None).st_ino == d.st_ino
    assert run(ops.lookup, d.st_ino, b"..", None).st_ino == pyfuse3.ROOT_INODE


def test_lookup_errors(ops: LayerOperations) -> None:
    assert fuse_errno(ops.lookup, pyfuse3.ROOT_INODE, b"nope", None) == errno.ENOENT
    assert fuse_errno(ops.lookup, pyfuse3.ROOT_INODE, b".no.prefetch.landmark", None) == \
        errno.ENOENT
    assert fuse_errno(ops.lookup, pyfuse3.ROOT_INODE, b"stargz.index.json", None) == \
        errno.ENOENT
    f = lookup_path(ops, "etc/one")
    assert fuse_errno(ops.lookup, f.st_ino, b"x", None) == errno.ENOTDIR
    assert fuse_errno(ops.getattr, 10**9, None) == errno.ENOENT


def test_readdir_resumes(ops: LayerOperations, monkeypatch: pytest.MonkeyPatch) -> None:
    root = readdir(ops, pyfuse3.ROOT_INODE, monkeypatch, limit=3)
    names = sorted(n.decode() for n, _ in root)
    assert names == sorted({it.name.split("/")[0] for it in every_type_items()})
    dirx = lookup_path(ops, "dirx")
    assert [n for n, _ in readdir(ops, dirx.st_ino, monkeypatch)] == [b"gone"]


def test_open_read_release(ops: LayerOperations) -> None:
    want = next(it.data for it in every_type_items() if it.name == "data/big")
    a = lookup_path(ops, "data/big")
    fi = run(ops.open, a.st_ino, 0, None)
    assert fi.keep_cache
    got = b""
    off = 0
    while True:
        piece = run(ops.read, fi.fh, off, 131072)
        if not piece:
            break
        got += piece
        off += len(piece)
    assert got == want
    run(ops.release, fi.fh)
    import os

    assert fuse_errno(ops.open, a.st_ino, os.O_WRONLY, None) == errno.EROFS
    assert fuse_errno(ops.open, pyfuse3.ROOT_INODE, 0, None) == errno.EISDIR


def test_read_error_becomes_eio(ops: LayerOperations) -> None:
    src = ops.layer.source
    assert isinstance(src, CountingSource)
    a = lookup_path(ops, "etc/hostname")
    src.fail_next = 1
    assert fuse_errno(ops.read, a.st_ino, 0, 100) == errno.EIO
    assert run(ops.read, a.st_ino, 0, 100) == b"lazy\n"


def test_readlink_xattrs_statfs(ops: LayerOperations) -> None:
    s = lookup_path(ops, "bin/sh")
    assert run(ops.readlink, s.st_ino, None) == b"/bin/busybox"
    f = lookup_path(ops, "etc/one")
    assert fuse_errno(ops.readlink, f.st_ino, None) == errno.EINVAL
    x = lookup_path(ops, "data/xattr")
    assert sorted(run(ops.listxattr, x.st_ino, None)) == [b"user.empty", b"user.k"]
    assert run(ops.getxattr, x.st_ino, b"user.k", None) == b"v1"
    assert run(ops.getxattr, x.st_ino, b"user.empty", None) == b""
    assert fuse_errno(ops.getxattr, x.st_ino, b"user.none", None) == errno.ENODATA
    o = lookup_path(ops, "opaque")
    assert run(ops.listxattr, o.st_ino, None) == [b"trusted.overlay.opaque"]
    assert run(ops.getxattr, o.st_ino, b"trusted.overlay.opaque", None) == b"y"
    assert run(ops.listxattr, f.st_ino, None) == []
    st = run(ops.statfs, None)
    assert st.f_files == len(ops.table) and st.f_bavail == 0 and st.f_blocks > 0
