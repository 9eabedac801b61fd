"""The chunk cache's size limit: accounting, LRU eviction, processes sharing a root, full disks.

Real FUSE mounts with a limit are in test_cache_mount.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from ipfsnap.estargz import FileRangeReader, decompress_chunk, open_layer
from ipfsnap.fs import cache as cachemod
from ipfsnap.fs.cache import USAGE_FILE, CacheAccounting, ChunkCache, sha256_digest
from ipfsnap.fs.layer import LazyLayer
from tests.fs.layers import CHUNK, Blob, CountingSource, Item, build_blob, pseudo_random
from tests.support import ROOT, require_root, require_tool


def chunk(i: int, size: int = 1000) -> tuple[str, bytes]:
    data = pseudo_random(size, i)
    return sha256_digest(data), data


def disk_total(root: Path) -> int:
    """Bytes of every chunk file under a cache root, by walking it (not via the accounting)."""
    total = 0
    for layer in root.iterdir():
        if layer.is_dir():
            for f in layer.iterdir():
                if len(f.name) == 64:
                    total += f.stat().st_size
    return total


def recorded_total(root: Path) -> int:
    return int((root / USAGE_FILE).read_text().split()[0])


def set_mtime(cache: ChunkCache, digest: str, t: float) -> None:
    os.utime(cache.path(digest), (t, t))


# -- accounting -------------------------------------------------------------------------------

def test_unlimited_cache_keeps_no_accounting(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path / "root" / "layer")
    assert c.account is None and c.max_entry is None
    for i in range(5):
        assert c.put(*chunk(i))
    assert not (tmp_path / "root" / USAGE_FILE).exists()
    assert c.background_room(10**12)


def test_accounting_follows_puts_across_layers_and_rescans(tmp_path: Path) -> None:
    root = tmp_path / "root"
    a = ChunkCache(root / "a", limit=100_000)
    b = ChunkCache(root / "b", limit=100_000)
    for i in range(10):
        assert a.put(*chunk(i, 1000 + i))
        assert b.put(*chunk(100 + i, 2000))
    expected = sum(1000 + i for i in range(10)) + 10 * 2000
    assert disk_total(root) == expected
    assert recorded_total(root) == expected
    assert a.account is not None and a.account.usage() == expected
    # storing an entry again (a refetch after corruption) replaces, it does not add
    assert a.put(*chunk(3, 1003))
    assert recorded_total(root) == expected
    # drift (a layer directory removed behind our back) is fixed by a rescan
    for f in (root / "b").iterdir():
        f.unlink()
    assert recorded_total(root) == expected
    assert a.account.resync() == expected - 10 * 2000
    assert recorded_total(root) == expected - 10 * 2000
    # a garbled accounting file is rebuilt, not trusted
    (root / USAGE_FILE).write_text("garbage\n")
    assert a.account.usage() == expected - 10 * 2000
    # and a stale one too
    (root / USAGE_FILE).write_text(f"{5:20d} {1.0:20.3f}\n")
    assert a.account.usage() == expected - 10 * 2000


def test_a_new_cache_resyncs_and_enforces_a_lowered_limit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    c = ChunkCache(root / "a")
    for i in range(20):
        c.put(*chunk(i))
    assert disk_total(root) == 20_000
    ChunkCache(root / "b", limit=10_000)  # a worker started with a (new) limit
    assert disk_total(root) <= 10_000 * cachemod.EVICT_TO
    assert recorded_total(root) == disk_total(root)


def test_scan_removes_stale_temp_files_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    c = ChunkCache(root / "a", limit=10_000)
    old = root / "a" / ".x.1.2.tmp"
    new = root / "a" / ".y.1.2.tmp"
    old.write_bytes(b"partial")
    new.write_bytes(b"in progress")
    os.utime(old, (1, 1))
    assert c.account is not None
    c.account.resync()
    assert not old.exists() and new.exists()


def test_limit_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size limit"):
        CacheAccounting(tmp_path, 0)


# -- eviction ---------------------------------------------------------------------------------

def test_eviction_removes_least_recently_used_first(tmp_path: Path) -> None:
    root = tmp_path / "root"
    limit = 10_000
    a = ChunkCache(root / "a", limit=limit)
    b = ChunkCache(root / "b", limit=limit)
    chunks = [chunk(i) for i in range(10)]
    for i, (d, data) in enumerate(chunks):
        cache = a if i % 2 == 0 else b
        assert cache.put(d, data)
        # a distinct, known recency per entry: entry i was last used at 1000 + i
        set_mtime(cache, d, 1000.0 + i)
    assert disk_total(root) == limit  # at the limit, not over: nothing evicted
    # entry 0 is used again (by a new worker, which has not touched it yet): most recent now
    reader = ChunkCache(root / "a", limit=limit)
    assert reader.get(chunks[0][0]) == chunks[0][1]
    assert os.stat(a.path(chunks[0][0])).st_mtime > 1009
    # one more entry: over the limit, evicts down to EVICT_TO (8000) in LRU order:
    # 11000 -> drop entries 1, 2, 3 (the oldest; 0 was used recently)
    d_new, data_new = chunk(99)
    assert b.put(d_new, data_new)
    on_disk = {f.name for f in (root / "a").iterdir()} | {f.name for f in (root / "b").iterdir()}
    gone = {chunks[i][0].split(":")[1] for i in (1, 2, 3)}
    kept = {chunks[i][0].split(":")[1] for i in (0, 4, 5, 6, 7, 8, 9)} | {d_new.split(":")[1]}
    assert not (gone & on_disk)
    assert kept <= on_disk
    assert disk_total(root) == recorded_total(root) == 8000
    assert b.account is not None and b.account.evicted == 3
    # an evicted entry is a disk miss (the caller refetches), never wrong bytes
    assert ChunkCache(root / "b", memory_entries=0, limit=limit).get(chunks[1][0]) is None


def test_hits_touch_at_most_once_per_interval(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path / "root" / "a", limit=10_000)
    d, data = chunk(1)
    c.put(d, data)
    set_mtime(c, d, 1000.0)
    # just written by this cache: the hit does not touch again within TOUCH_INTERVAL
    assert c.get(d) == data
    assert os.stat(c.path(d)).st_mtime == 1000.0
    c._touched.clear()  # as if TOUCH_INTERVAL had passed
    assert c.get_memory(d) == data  # a RAM hit counts as a use too
    assert os.stat(c.path(d)).st_mtime > 1000.0


def test_chunk_larger_than_the_cache_may_keep_is_served_not_stored(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path / "root" / "a", limit=10_000)
    assert c.max_entry == 8000
    d, data = chunk(1, 9000)
    assert c.put(d, data) is False
    assert not c.path(d).exists()
    assert c.get(d) == data  # from RAM


def test_background_room_stops_at_ninety_percent(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path / "root" / "a", limit=10_000)
    for i in range(8):
        c.put(*chunk(i))
    assert c.background_room(1000)  # 9000 <= 9000
    assert not c.background_room(1001)
    c.put(*chunk(8))
    assert not c.background_room(1)


# -- processes sharing a root -----------------------------------------------------------------

WRITER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from ipfsnap.fs.cache import ChunkCache, sha256_digest
    from tests.fs.layers import pseudo_random

    root, layer = sys.argv[1], sys.argv[2]
    seed, n, limit = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    go = Path(root).parent / "go"
    while not go.exists():  # start together, so that the two really interleave
        time.sleep(0.01)
    cache = ChunkCache(Path(root) / layer, memory_entries=0, limit=limit)
    wrong = stored = hits = 0
    written = []
    for i in range(n):
        data = pseudo_random(500 + (i * 7919 + seed) % 4000, seed * 100000 + i)
        d = sha256_digest(data)
        stored += cache.put(d, data)
        written.append((d, data))
        # read back an earlier entry: a hit must be exact, a miss (evicted) is fine
        if i >= 5:
            d2, data2 = written[i - 5]
            got = cache.get(d2)
            if got is not None:
                hits += 1
                wrong += got != data2
    print(json.dumps({"stored": stored, "wrong": wrong, "hits": hits,
                      "bytes": sum(len(x) for _, x in written),
                      "evicted": cache.account.evicted}))
""")


def test_two_processes_sharing_a_root_stay_under_the_limit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    limit = 200_000
    n = 600
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(root), f"layer{k}", str(k + 1),
                          str(n), str(limit)], stdout=subprocess.PIPE, env=env, cwd=ROOT)
        for k in range(2)
    ]
    (tmp_path / "go").touch()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        results.append(json.loads(out))
    for r in results:
        assert r["stored"] == n and r["wrong"] == 0
        assert r["bytes"] > limit  # each alone would overflow the cache
        assert r["hits"] > 0
    # both evicted (each other's entries too); the total respects the limit and the shared
    # accounting agrees with what is on disk
    assert sum(r["evicted"] for r in results) > 0
    total = disk_total(root)
    assert 0 < total <= limit
    assert recorded_total(root) == total
    assert {p.name for p in root.iterdir() if p.is_dir()} == {"layer0", "layer1"}


# -- layer: background fetch under a limit ----------------------------------------------------

@pytest.fixture(scope="module")
def big_blob(tmp_path_factory: pytest.TempPathFactory) -> Blob:
    d = tmp_path_factory.mktemp("cacheblob")
    items = [Item("big", "file", pseudo_random(24 * CHUNK + 77, 5)),
             Item("small", "file", b"small\n")]
    return build_blob(items, Path(d) / "big.blob")


def lazy_layer(blob: Blob, cache: ChunkCache) -> tuple[LazyLayer, CountingSource]:
    src = CountingSource(blob.path)
    with open(blob.path, "rb") as f:
        index = open_layer(FileRangeReader(f), blob.size, toc_digest=blob.toc_digest)
    return LazyLayer(index, src, cache, decompress=decompress_chunk, max_span=2 * CHUNK), src


def test_background_fetch_stops_filling_near_the_limit(big_blob: Blob, tmp_path: Path) -> None:
    root = tmp_path / "root"
    limit = 8 * CHUNK
    layer, src = lazy_layer(big_blob, ChunkCache(root / "a", limit=limit))

    async def main() -> None:
        with trio.move_on_after(3):
            await layer.background_fetch(pause_delay=0.05)

    trio.run(main)
    assert not layer.complete
    assert "background fetch paused: cache size limit" in layer.status.last_error
    # stopped at BACKGROUND_FILL (one writer: never above it), fetched nothing twice
    assert 0 < disk_total(root) <= limit * cachemod.BACKGROUND_FILL
    assert layer.cache.account is not None and layer.cache.account.evicted == 0
    assert src.bytes_read <= big_blob.size
    # foreground reads still work past the limit, evicting
    node = layer.table.get(layer.table.by_path["big"])
    assert node is not None
    data = next(it.data for it in big_blob.items if it.name == "big")
    assert trio.run(layer.read, node, 0, node.size) == data
    assert disk_total(root) <= limit
    assert layer.cache.account.evicted > 0


# -- full disk (a small tmpfs) ----------------------------------------------------------------

@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    require_root()
    require_tool("mount")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.parametrize("limit", [0, 10 << 20])
def test_full_disk_skips_caching_serves_from_memory_and_backs_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, limit: int
) -> None:
    with small_tmpfs(tmp_path / "root", "256k") as root:
        c = ChunkCache(root / "a", limit=limit)
        caplog.set_level(logging.WARNING, logger="ipfsnap.fs.cache")
        results = []
        chunks = [chunk(i, 32 * 1024) for i in range(20)]  # 640 KiB into 256 KiB
        for d, data in chunks:
            results.append(c.put(d, data))
        assert results[0] is True and results[-1] is False
        assert c.write_failures >= 10
        assert "No space left" in c.last_write_error
        # every chunk that was verified is still served (the recent ones from RAM)
        for d, data in chunks[-cachemod.DEFAULT_MEMORY_ENTRIES:]:
            assert c.get(d) == data
        for d, data in chunks:
            assert c.get(d) in (data, None)
        # rate limited: one warning for all these failures
        warnings = [r for r in caplog.records if "cannot write" in r.getMessage()]
        assert len(warnings) == 1 and "disk full" in warnings[0].getMessage()
        # background fetch backs off; no temp files are left behind
        assert not c.background_room(1)
        assert not [f for f in (root / "a").iterdir() if f.name.endswith(".tmp")]
        if limit:
            # the accounting still matches the disk (its file is rewritten in place)
            assert recorded_total(root) == disk_total(root)
