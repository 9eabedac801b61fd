"""Warm reads stay in the page cache; sequential cold reads fetch chunks ahead (real mounts)."""

from __future__ import annotations

from pathlib import Path

from ipfsnap.estargz import FileRangeReader, open_layer
from tests.fs.layers import CHUNK, Blob, Item, build_blob, pseudo_random
from tests.fs.mounts import fresh_status, labels_for, make_mounter, mounted, wait_status
from tests.support import require_fuse

#: 24 chunks of the tests' 64 KiB: several kernel read requests (128 KiB each) and chunks
#: beyond every request, so a read-ahead has something to fetch
SIZE = 24 * CHUNK


def one_file_blob(tmp_path: Path) -> tuple[Blob, bytes]:
    data = pseudo_random(SIZE, seed=5)
    return build_blob([Item("big", "file", data)], tmp_path / "big.blob"), data


def extents(blob: Blob, path: str) -> int:
    with open(blob.path, "rb") as f:
        index = open_layer(FileRangeReader(f), blob.size)
        return sum(c.end - c.offset for c in index.chunks(path))


def test_second_read_never_reaches_the_worker(tmp_path: Path) -> None:
    require_fuse()
    blob, data = one_file_blob(tmp_path)
    m = make_mounter(tmp_path / "state", background=False)
    with mounted(m, tmp_path / "mp", labels_for(blob)) as mp:
        assert (mp / "big").read_bytes() == data
        cold = fresh_status(m, mp)["read_requests"]
        assert cold > 0  # the counter counts: the cold read went through the worker
        # a new open of unchanged content keeps the page cache (keep_cache), so the warm
        # read sends no request. Another process on the machine dropping the page cache
        # (benchmarks write /proc/sys/vm/drop_caches) between two reads would send some:
        # one of three attempts must be clean.
        extra = []
        for _ in range(3):
            before = fresh_status(m, mp)["read_requests"]
            assert (mp / "big").read_bytes() == data
            extra.append(fresh_status(m, mp)["read_requests"] - before)
            if extra[-1] == 0:
                break
        assert 0 in extra, f"warm reads sent {extra} FUSE read requests (cold: {cold})"


def test_sequential_read_fetches_ahead_once(tmp_path: Path) -> None:
    require_fuse()
    blob, data = one_file_blob(tmp_path)
    m = make_mounter(tmp_path / "state", background=False, readahead=2)
    with mounted(m, tmp_path / "mp", labels_for(blob)) as mp:
        with open(mp / "big", "rb", buffering=0) as f:
            got = b"".join(iter(lambda: f.read(1 << 20), b""))
        assert got == data
        st = wait_status(m, mp, lambda s: s["readahead_runs"] > 0)
        # chunks read ahead are the reader's next ones: none is fetched twice, none extra
        assert fresh_status(m, mp)["fetched_bytes"] == extents(blob, "big")
        assert st["read_requests"] > 0


def test_readahead_off_fetches_on_demand_only(tmp_path: Path) -> None:
    require_fuse()
    blob, data = one_file_blob(tmp_path)
    m = make_mounter(tmp_path / "state", background=False, readahead=0)
    with mounted(m, tmp_path / "mp", labels_for(blob)) as mp:
        assert (mp / "big").read_bytes() == data
        st = fresh_status(m, mp)
        assert st["readahead_runs"] == 0
        assert st["fetched_bytes"] == extents(blob, "big")
