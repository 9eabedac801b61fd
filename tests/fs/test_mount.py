"""Real FUSE mounts of lazy layers (root, /dev/fuse) through LayerMounter and its workers."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ipfsnap.estargz import FileRangeReader, open_layer
from ipfsnap.fs import TOC_DIGEST_LABEL
from ipfsnap.fs.errors import LayerMountError, WorkerSpecError
from ipfsnap.fs.mounter import is_mountpoint, pid_alive
from tests.fs.layers import (
    CHUNK,
    Blob,
    Item,
    build_blob,
    every_type_items,
    expected_tree,
    pseudo_random,
    snapshot_tree,
)
from tests.fs.mounts import fresh_status, labels_for, make_mounter, mounted, wait_status
from tests.support import require_fuse


def chunk_extents(blob: Blob, path: str) -> list[tuple[int, int]]:
    with open(blob.path, "rb") as f:
        index = open_layer(FileRangeReader(f), blob.size)
        return [(c.offset, c.end) for c in index.chunks(path)]


def test_mounted_tree_equals_the_layer(every_type_blob: Blob, tmp_path: Path) -> None:
    require_fuse()
    m = make_mounter(tmp_path / "state")
    mp = tmp_path / "mp"
    with mounted(m, mp, labels_for(every_type_blob)):
        st = m.status(mp)
        assert st is not None and st["state"] in ("ready", "complete")
        pid = st["pid"]
        m.check(mp, {})
        assert snapshot_tree(mp) == expected_tree(every_type_items())
        # the hidden things stay hidden
        assert not (mp / ".no.prefetch.landmark").exists()
        assert not (mp / "stargz.index.json").exists()
        assert not (mp / "dirx" / ".wh.gone").exists()
        assert not (mp / "opaque" / ".wh..wh..opq").exists()
        # background fetch completes the layer and says so
        st = wait_status(m, mp, lambda s: s["state"] == "complete")
        assert st["percent"] == 100.0 and st["cached_bytes"] == st["chunk_bytes"]
        # read-only
        with pytest.raises(OSError) as info:
            (mp / "etc" / "new").write_bytes(b"x")
        assert info.value.errno == errno.EROFS
        mounts = Path("/proc/self/mounts").read_text()
        line = next(ln for ln in mounts.splitlines() if f" {mp} " in ln)
        assert line.startswith("ipfsnap ") and " fuse.ipfsnap " in line
        assert "ro," in line and "allow_other" in line and "nosuid" not in line
    # unmount cleaned up: worker gone, mountpoint empty
    assert not pid_alive(pid)
    assert os.listdir(mp) == []
    st = m.status(mp)
    assert st is not None and st["state"] == "unmounted"


def test_reading_one_file_fetches_only_its_chunks(every_type_blob: Blob, tmp_path: Path) -> None:
    require_fuse()
    m = make_mounter(tmp_path / "state", background=False)
    mp = tmp_path / "mp"
    with mounted(m, mp, labels_for(every_type_blob)):
        assert fresh_status(m, mp)["fetched_bytes"] == 0
        # metadata alone fetches nothing
        snapshot_tree_meta = sorted(os.listdir(mp / "data"))
        assert snapshot_tree_meta == ["big", "exact", "xattr", "zeros"]
        assert fresh_status(m, mp)["fetched_bytes"] == 0
        want = next(it.data for it in every_type_items() if it.name == "data/exact")
        assert (mp / "data" / "exact").read_bytes() == want
        ext = chunk_extents(every_type_blob, "data/exact")
        st = fresh_status(m, mp)
        assert st["fetched_bytes"] == sum(e - s for s, e in ext)
        assert st["source_calls"] == 1  # adjacent chunks coalesced
        # the second read is served by the page cache / chunk cache: nothing more fetched
        assert (mp / "data" / "exact").read_bytes() == want
        assert fresh_status(m, mp)["fetched_bytes"] == sum(e - s for s, e in ext)
        # a read in the middle of another file fetches that one chunk
        with open(mp / "data" / "big", "rb") as f:
            f.seek(3 * CHUNK + 7)
            f.read(10)
        # the kernel reads ahead within the file (128 KiB windows), never before the offset
        big = chunk_extents(every_type_blob, "data/big")
        grown = fresh_status(m, mp)["fetched_bytes"] - sum(e - s for s, e in ext)
        assert big[3][1] - big[3][0] <= grown <= sum(e - s for s, e in big[3:])
        cache = m.cache_root / every_type_blob.digest[7:]
        with open(every_type_blob.path, "rb") as f:
            index = open_layer(FileRangeReader(f), every_type_blob.size)
        cached = set(os.listdir(cache))
        chunks = index.chunks("data/big")
        assert chunks[3].chunk_digest[7:] in cached
        assert not {c.chunk_digest[7:] for c in chunks[:3]} & cached


def test_corrupt_chunk_gives_eio_then_recovers(every_type_blob: Blob, tmp_path: Path) -> None:
    require_fuse()
    blob_copy = tmp_path / "copy.blob"
    shutil.copy(every_type_blob.path, blob_copy)
    s, e = chunk_extents(every_type_blob, "data/exact")[1]
    good = blob_copy.read_bytes()[s:e]
    m = make_mounter(tmp_path / "state", background=False)
    mp = tmp_path / "mp"
    want = next(it.data for it in every_type_items() if it.name == "data/exact")
    with mounted(m, mp, labels_for(every_type_blob, blob_copy)):
        with open(blob_copy, "r+b") as f:  # damage the source in place, after the mount
            f.seek(s)
            f.write(bytes(b ^ 0xA5 for b in good))
        with open(mp / "data" / "exact", "rb") as f:
            assert f.read(100) == want[:100]  # the intact first chunk
            f.seek(CHUNK)
            with pytest.raises(OSError) as info:
                f.read(100)
            assert info.value.errno == errno.EIO
        st = fresh_status(m, mp)
        assert st["last_error"]
        assert (mp / "etc" / "hostname").read_bytes() == b"lazy\n"
        with open(blob_copy, "r+b") as f:  # the source comes back
            f.seek(s)
            f.write(good)
        assert (mp / "data" / "exact").read_bytes() == want
    log = (m.worker_dir(mp) / "worker.log").read_text()
    assert "EIO" in log


def test_cache_survives_remount(every_type_blob: Blob, tmp_path: Path) -> None:
    require_fuse()
    m = make_mounter(tmp_path / "state", background=False)
    mp = tmp_path / "mp"
    want = next(it.data for it in every_type_items() if it.name == "data/big")
    with mounted(m, mp, labels_for(every_type_blob)):
        assert (mp / "data" / "big").read_bytes() == want
        assert fresh_status(m, mp)["fetched_bytes"] > 0
    m2 = make_mounter(tmp_path / "state", background=False)
    with mounted(m2, mp, labels_for(every_type_blob)):
        st = fresh_status(m2, mp)
        assert st["cached_bytes"] == sum(e - s for s, e in chunk_extents(every_type_blob,
                                                                         "data/big"))
        assert (mp / "links" / "hard").read_bytes() == want
        assert fresh_status(m2, mp)["fetched_bytes"] == 0


def test_mount_refuses_unverifiable_layers(every_type_blob: Blob, tmp_path: Path) -> None:
    require_fuse()
    m = make_mounter(tmp_path / "state")
    mp = tmp_path / "mp"
    labels = labels_for(every_type_blob)
    labels[TOC_DIGEST_LABEL] = "sha256:" + "0" * 64
    with pytest.raises(LayerMountError, match="TOC digest"):
        m.mount(mp, labels)
    assert not is_mountpoint(mp)
    del labels[TOC_DIGEST_LABEL]
    with pytest.raises(WorkerSpecError, match=r"toc\.digest"):
        m.mount(mp, labels)
    not_estargz = tmp_path / "plain.bin"
    not_estargz.write_bytes(pseudo_random(10000, 5))
    labels = labels_for(every_type_blob, not_estargz)
    labels["ipfsnap.io/layer.size"] = "10000"
    with pytest.raises(LayerMountError, match="footer"):
        m.mount(mp, labels)
    assert not is_mountpoint(mp)


def test_check_detects_dead_worker(every_type_blob: Blob, tmp_path: Path) -> None:
    require_fuse()
    m = make_mounter(tmp_path / "state", background=False)
    mp = tmp_path / "mp"
    m.mount(mp, labels_for(every_type_blob))
    try:
        m.check(mp, {})
        st = m.status(mp)
        assert st is not None
        os.kill(st["pid"], signal.SIGKILL)
        wait_status(m, mp, lambda s: not pid_alive(s["pid"]), timeout=10)
        with pytest.raises(LayerMountError, match="not running"):
            m.check(mp, {})
    finally:
        m.unmount(mp)
    assert not is_mountpoint(mp)


def test_worker_survives_mounter_and_sigterm_unmounts(every_type_blob: Blob,
                                                      tmp_path: Path) -> None:
    require_fuse()
    m = make_mounter(tmp_path / "state")
    mp = tmp_path / "mp"
    m.mount(mp, labels_for(every_type_blob))
    try:
        del m  # the snapshotter "restarts": a new mounter finds the worker by its status
        m2 = make_mounter(tmp_path / "state")
        m2.check(mp, {})
        m2.mount(mp, labels_for(every_type_blob))  # idempotent: adopts the running worker
        pid = m2.status(mp)["pid"]  # type: ignore[index]
        assert os.getsid(pid) == pid  # its own session
        os.kill(pid, signal.SIGTERM)
        wait_status(m2, mp, lambda s: s["state"] == "unmounted", timeout=10)
        assert not is_mountpoint(mp)
    finally:
        if is_mountpoint(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)


def test_prefetch_landmark_range_fetched_before_ready(tmp_path: Path) -> None:
    require_fuse()
    items = [Item("hot", "file", pseudo_random(3 * CHUNK, 7)),
             Item("cold", "file", pseudo_random(3 * CHUNK, 8))]
    blob = build_blob(items, tmp_path / "prio.blob", prioritize=("hot",))
    m = make_mounter(tmp_path / "state", background=False)
    mp = tmp_path / "mp"
    with mounted(m, mp, labels_for(blob)):
        st = m.status(mp)
        assert st is not None
        hot = sum(e - s for s, e in chunk_extents(blob, "hot"))
        assert st["cached_bytes"] == hot  # prefetched, and only the prioritized file
        assert (mp / "hot").read_bytes() == items[0].data
        assert fresh_status(m, mp)["fetched_bytes"] == hot


def test_busy_mount_is_detached_and_worker_exits_after_last_close(
    every_type_blob: Blob, tmp_path: Path
) -> None:
    require_fuse()
    m = make_mounter(tmp_path / "state", background=False)
    mp = tmp_path / "mp"
    m.mount(mp, labels_for(every_type_blob))
    st = m.status(mp)
    assert st is not None
    pid = st["pid"]
    f = open(mp / "data" / "exact", "rb")  # noqa: SIM115 - held open across the unmount
    try:
        m.unmount(mp)  # busy: lazily detached, returns at once
        assert not is_mountpoint(mp)
        want = next(it.data for it in every_type_items() if it.name == "data/exact")
        assert f.read() == want  # the open file keeps working
        assert pid_alive(pid)
    finally:
        f.close()
    wait_status(m, mp, lambda s: s["state"] == "unmounted", timeout=15)
    deadline = time.monotonic() + 15
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    m.reap()
    assert not pid_alive(pid)


def test_toc_entry_limit_refuses_the_mount(every_type_blob: Blob, tmp_path: Path) -> None:
    require_fuse()
    m = make_mounter(tmp_path / "state", max_entries=5)
    mp = tmp_path / "mp"
    with pytest.raises(LayerMountError, match="entries"):
        m.mount(mp, labels_for(every_type_blob))
    assert not is_mountpoint(mp)
    st = m.status(mp)
    assert st is not None and st["state"] == "failed" and "entries" in st["last_error"]
