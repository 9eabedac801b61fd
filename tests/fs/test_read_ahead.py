"""Kernel read-ahead of layer mounts: found through mountinfo, set on the first open, and
what it changes (FUSE read requests of up to 1 MiB instead of 128 KiB)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from ipfsnap.estargz import FileRangeReader, decompress_chunk, open_layer
from ipfsnap.fs import ops as ops_mod
from ipfsnap.fs.cache import ChunkCache
from ipfsnap.fs.layer import LazyLayer
from ipfsnap.fs.ops import LayerOperations, fuse_device, set_read_ahead
from ipfsnap.fs.spec import DEFAULT_READ_AHEAD_KB
from tests.fs.layers import Blob, CountingSource, Item, build_blob, pseudo_random
from tests.fs.mounts import fresh_status, labels_for, make_mounter, mounted
from tests.support import require_fuse

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:39 / /var/tmp/a\\040b rw,nosuid,nodev,relatime shared:20 - fuse.ipfsnap ipfsnap rw
41 22 0:40 / /var/tmp/plain rw,relatime shared:21 - ext4 /dev/sdb1 rw
42 22 0:41 / /var/tmp/stacked rw,relatime shared:22 - fuse.ipfsnap ipfsnap rw
43 42 0:42 / /var/tmp/stacked rw,relatime shared:23 - fuse.ipfsnap ipfsnap rw
"""


def test_fuse_device_from_mountinfo() -> None:
    assert fuse_device("/var/tmp/a b", MOUNTINFO) == "0:39"  # octal escape undone
    assert fuse_device("/var/tmp/stacked", MOUNTINFO) == "0:42"  # the topmost mount
    assert fuse_device("/var/tmp/plain", MOUNTINFO) is None  # not FUSE
    assert fuse_device("/var/tmp/none", MOUNTINFO) is None


def test_set_read_ahead_writes_the_bdi(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                       ) -> None:
    (tmp_path / "0:39").mkdir()
    (tmp_path / "0:39" / "read_ahead_kb").write_text("128\n")
    assert set_read_ahead("/var/tmp/a b", 2048, bdi_root=tmp_path, mountinfo=MOUNTINFO)
    assert (tmp_path / "0:39" / "read_ahead_kb").read_text() == "2048\n"
    with caplog.at_level(logging.WARNING, logger="ipfsnap.fs.ops"):
        # no such mount, and a bdi that cannot be written: logged, never raised
        assert not set_read_ahead("/var/tmp/none", 2048, bdi_root=tmp_path,
                                  mountinfo=MOUNTINFO)
        assert not set_read_ahead("/var/tmp/stacked", 2048, bdi_root=tmp_path,
                                  mountinfo=MOUNTINFO)
    assert "/var/tmp/none: no FUSE mount found" in caplog.text
    assert "cannot set read-ahead to 2048 KiB" in caplog.text


def test_first_open_sets_read_ahead_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         every_type_blob: Blob) -> None:
    calls: list[tuple[str, int]] = []

    def record(mountpoint: str, kib: int, **_: Any) -> bool:
        calls.append((mountpoint, kib))
        return True

    monkeypatch.setattr(ops_mod, "set_read_ahead", record)
    with open(every_type_blob.path, "rb") as f:
        index = open_layer(FileRangeReader(f), every_type_blob.size)
    layer = LazyLayer(index, CountingSource(every_type_blob.path), ChunkCache(tmp_path),
                      decompress=decompress_chunk)
    ino = next(n.ino for n in layer.table.inodes if n is not None and n.is_reg)
    o = LayerOperations(layer, mountpoint="/mnt/x", read_ahead_kb=1024)
    for _ in range(3):
        trio.run(o.open, ino, os.O_RDONLY, None)
    assert calls == [("/mnt/x", 1024)]
    calls.clear()
    trio.run(LayerOperations(layer, mountpoint="/mnt/x", read_ahead_kb=0).open, ino,
             os.O_RDONLY, None)
    trio.run(LayerOperations(layer).open, ino, os.O_RDONLY, None)  # no mountpoint known
    assert calls == []


# -- real mounts --------------------------------------------------------------------------

#: 8 MiB: 8 requests of 1 MiB with the read-ahead raised, 64 of 128 KiB without
SIZE = 8 << 20


def bdi_kb(mp: Path) -> int:
    dev = fuse_device(str(mp))
    assert dev is not None, f"{mp} is not a FUSE mount"
    return int(Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text())


def cold_read_requests(m: Any, mp: Path, data: bytes) -> int:
    """FUSE read requests of one sequential 1 MiB-read pass with the file's pages dropped."""
    path = mp / "big"
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    before = int(fresh_status(m, mp)["read_requests"])
    with open(path, "rb", buffering=0) as f:
        got = b"".join(iter(lambda: f.read(1 << 20), b""))
    assert got == data
    return int(fresh_status(m, mp)["read_requests"]) - before


def test_mount_reads_in_large_requests(tmp_path: Path) -> None:
    require_fuse()
    data = pseudo_random(SIZE, seed=11)
    blob = build_blob([Item("big", "file", data)], tmp_path / "big.blob")
    counts = {}
    for kib in (DEFAULT_READ_AHEAD_KB, 0):
        m = make_mounter(tmp_path / f"state{kib}", background=False, read_ahead_kb=kib)
        with mounted(m, tmp_path / f"mp{kib}", labels_for(blob)) as mp:
            before = bdi_kb(mp)
            assert (mp / "big").read_bytes() == data  # first open: read-ahead set
            after = bdi_kb(mp)
            if kib:
                assert after == kib
            else:
                assert after == before  # 0 leaves the kernel's default alone
            counts[kib] = cold_read_requests(m, mp, data)
    # 1 MiB requests (libfuse's max_pages) vs the kernel's default 128 KiB ones; a page
    # dropped meanwhile by another process can only add requests to the first pass
    assert counts[DEFAULT_READ_AHEAD_KB] <= SIZE // (1 << 20) + 2, counts
    assert counts[0] >= SIZE // (128 << 10), counts
