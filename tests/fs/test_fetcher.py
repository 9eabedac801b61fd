"""Chunk mapping, coalescing, merged fetches, the verified cache and failure handling."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pyfuse3
import pytest
import trio

from ipfsnap.errors import IpfsnapError, LimitExceeded, NotFoundError
from ipfsnap.estargz import Chunk, FileRangeReader, decompress_chunk, open_layer
from ipfsnap.estargz.errors import ChunkDigestMismatch
from ipfsnap.fs.cache import ChunkCache, sha256_digest
from ipfsnap.fs.errors import FetchError, FetchTimeout
from ipfsnap.fs.fetcher import coalesce
from ipfsnap.fs.layer import LazyLayer, chunks_for_range
from ipfsnap.fs.ops import errno_for
from tests.fs.layers import CHUNK, Blob, CountingSource, build_blob, every_type_items


def C(offset: int, end: int, coff: int = 0, size: int = 10, d: str = "") -> Chunk:
    return Chunk(offset=offset, end=end, chunk_offset=coff, chunk_size=size,
                 chunk_digest=d or f"sha256:{offset:064x}")


def make_layer(blob: Blob, cache_dir: Path, source: CountingSource | None = None,
               **kw: float) -> tuple[LazyLayer, CountingSource]:
    src = source or CountingSource(blob.path)
    with open(blob.path, "rb") as f:
        index = open_layer(FileRangeReader(f), blob.size, toc_digest=blob.toc_digest)
    layer = LazyLayer(index, src, ChunkCache(cache_dir), decompress=decompress_chunk,
                      **kw)  # type: ignore[arg-type]
    layer.index = index  # type: ignore[attr-defined]  # the layer itself keeps no index
    return layer, src


def data_of(name: str) -> bytes:
    return next(it.data for it in every_type_items() if it.name == name)


def extents(layer: LazyLayer, path: str) -> list[tuple[int, int]]:
    return [(c.offset, c.end) for c in layer.index.chunks(path)]


def test_chunks_for_range() -> None:
    chunks = [C(0, 5, 0, 10), C(5, 9, 10, 10), C(9, 12, 20, 5)]
    assert chunks_for_range(chunks, 0, 1) == chunks[:1]
    assert chunks_for_range(chunks, 9, 11) == chunks[:2]
    assert chunks_for_range(chunks, 10, 20) == chunks[1:2]
    assert chunks_for_range(chunks, 19, 25) == chunks[1:]
    assert chunks_for_range(chunks, 24, 25) == chunks[2:]
    assert chunks_for_range(chunks, 0, 25) == chunks
    assert chunks_for_range([], 0, 5) == []


def test_coalesce_adjacent_bounded() -> None:
    a, b, c, far = C(0, 10), C(10, 20), C(20, 30), C(100, 110)
    assert coalesce([c, far, a, b], max_span=100) == [[a, b, c], [far]]
    assert coalesce([a, b, c], max_span=20) == [[a, b], [c]]
    big = C(200, 500)
    assert coalesce([big], max_span=10) == [[big]]
    # two chunks in one compressed member (same extent) go in one request
    s1, s2 = C(0, 10, d="sha256:" + "1" * 64), C(0, 10, d="sha256:" + "2" * 64)
    assert coalesce([s1, s2], max_span=10) == [[s1, s2]]


def test_read_fetches_only_the_files_chunks_in_one_request(
    every_type_blob: Blob, tmp_path: Path
) -> None:
    layer, src = make_layer(every_type_blob, tmp_path)
    node = layer.table.get(layer.table.by_path["data/big"])
    assert node is not None

    async def main() -> bytes:
        return await layer.read(node, 0, node.size)

    assert trio.run(main) == data_of("data/big")
    ext = extents(layer, "data/big")
    assert len(ext) == 6
    # adjacent chunks coalesced: one request covering exactly the file's chunks
    assert src.calls == [(ext[0][0], ext[-1][1] - ext[0][0])]


def test_partial_read_touches_only_overlapping_chunk(every_type_blob: Blob, tmp_path: Path) -> None:
    layer, src = make_layer(every_type_blob, tmp_path)
    node = layer.table.get(layer.table.by_path["data/big"])
    assert node is not None
    got = trio.run(layer.read, node, 2 * CHUNK + 5, 100)
    assert got == data_of("data/big")[2 * CHUNK + 5 : 2 * CHUNK + 105]
    start, end = extents(layer, "data/big")[2]
    assert src.calls == [(start, end - start)]
    # straddling a chunk boundary: the next chunk only
    got = trio.run(layer.read, node, 3 * CHUNK - 10, 20)
    assert got == data_of("data/big")[3 * CHUNK - 10 : 3 * CHUNK + 10]
    s3, e3 = extents(layer, "data/big")[3]
    assert src.calls[1:] == [(s3, e3 - s3)]
    # beyond the end: nothing
    assert trio.run(layer.read, node, node.size + 10, 100) == b""


def test_concurrent_reads_of_one_chunk_are_merged(every_type_blob: Blob, tmp_path: Path) -> None:
    layer, src = make_layer(every_type_blob, tmp_path, CountingSource(every_type_blob.path, 0.3))
    node = layer.table.get(layer.table.by_path["data/exact"])
    assert node is not None
    results: list[bytes] = []

    async def reader(off: int) -> None:
        results.append(await layer.read(node, off, 1000))

    async def main() -> None:
        async with trio.open_nursery() as n:
            for i in range(6):
                n.start_soon(reader, i * 100)

    trio.run(main)
    want = data_of("data/exact")
    assert sorted(results) == sorted(want[i * 100 : i * 100 + 1000] for i in range(6))
    assert len(src.calls) == 1


def test_cache_survives_new_layer_and_is_atomic(every_type_blob: Blob, tmp_path: Path) -> None:
    layer, _src = make_layer(every_type_blob, tmp_path / "cache")
    node = layer.table.get(layer.table.by_path["data/exact"])
    assert node is not None
    trio.run(layer.read, node, 0, node.size)
    names = sorted(os.listdir(tmp_path / "cache"))
    digests = sorted(c.chunk_digest.split(":")[1] for c in layer.index.chunks("data/exact"))
    assert names == digests  # named by digest, no temp files left
    for c in layer.index.chunks("data/exact"):
        assert sha256_digest((tmp_path / "cache" / c.chunk_digest[7:]).read_bytes()) == \
            c.chunk_digest
    layer2, src2 = make_layer(every_type_blob, tmp_path / "cache")
    assert layer2.cached_bytes == sum(e - s for s, e in extents(layer2, "data/exact"))
    assert trio.run(layer2.read, node, 0, node.size) == data_of("data/exact")
    assert src2.calls == []


def test_corrupt_cache_entry_is_refetched(every_type_blob: Blob, tmp_path: Path) -> None:
    layer, _ = make_layer(every_type_blob, tmp_path / "cache")
    node = layer.table.get(layer.table.by_path["data/exact"])
    assert node is not None
    trio.run(layer.read, node, 0, node.size)
    first = layer.index.chunks("data/exact")[0]
    path = tmp_path / "cache" / first.chunk_digest[7:]
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0xFF
    path.write_bytes(bytes(raw))
    layer2, src2 = make_layer(every_type_blob, tmp_path / "cache")
    assert trio.run(layer2.read, node, 0, node.size) == data_of("data/exact")
    assert src2.calls == [(first.offset, first.end - first.offset)]
    assert layer2.cache.corrupt == 1
    assert sha256_digest(path.read_bytes()) == first.chunk_digest


def test_corrupt_blob_raises_and_serves_nothing(every_type_blob: Blob, tmp_path: Path) -> None:
    bad = tmp_path / "bad.blob"
    raw = bytearray(every_type_blob.path.read_bytes())
    layer, _ = make_layer(every_type_blob, tmp_path / "c0")
    chunk = layer.index.chunks("data/exact")[1]
    raw[(chunk.offset + chunk.end) // 2] ^= 0x55
    bad.write_bytes(bytes(raw))
    layer, _src = make_layer(every_type_blob, tmp_path / "cache", CountingSource(bad))
    node = layer.table.get(layer.table.by_path["data/exact"])
    assert node is not None
    # the intact first chunk reads fine; the damaged one raises an integrity/format error
    assert trio.run(layer.read, node, 0, 100) == data_of("data/exact")[:100]
    # gzip CRC or chunkDigest check, either way an ipfsnap error, never bytes
    with pytest.raises(IpfsnapError) as info:
        trio.run(layer.read, node, CHUNK, 100)
    assert errno_for(info.value) == errno.EIO
    assert not (tmp_path / "cache" / chunk.chunk_digest[7:]).exists()


def test_source_failure_then_recovery(every_type_blob: Blob, tmp_path: Path) -> None:
    layer, src = make_layer(every_type_blob, tmp_path)
    node = layer.table.get(layer.table.by_path["etc/hostname"])
    assert node is not None
    src.fail_next = 1
    with pytest.raises(FetchError):
        trio.run(layer.read, node, 0, 100)
    assert layer.fetcher.stats.last_error
    assert trio.run(layer.read, node, 0, 100) == b"lazy\n"


def test_hanging_source_times_out(every_type_blob: Blob, tmp_path: Path) -> None:
    layer, src = make_layer(every_type_blob, tmp_path, timeout=0.5)
    node = layer.table.get(layer.table.by_path["etc/hostname"])
    assert node is not None
    src.stall.set()
    try:
        with pytest.raises(FetchTimeout):
            trio.run(layer.read, node, 0, 100)
    finally:
        src.release.set()
    src.stall.clear()
    assert trio.run(layer.read, node, 0, 100) == b"lazy\n"


def test_background_fetch_completes_and_yields_to_foreground(
    every_type_blob: Blob, tmp_path: Path
) -> None:
    layer, src = make_layer(every_type_blob, tmp_path, max_span=CHUNK)
    node = layer.table.get(layer.table.by_path["etc/one"])
    assert node is not None

    async def main() -> None:
        src.stall.set()
        async with trio.open_nursery() as n:
            n.start_soon(layer.read, node, 0, 1)
            await trio.sleep(0.1)
            n.start_soon(layer.background_fetch)
            await trio.sleep(0.5)
            # the foreground read is stuck in the source: background sent nothing meanwhile
            assert len(src.calls) == 1
            src.stall.clear()
            src.release.set()

    trio.run(main)
    assert layer.complete
    st = layer.update_status()
    assert st.cached_bytes == st.chunk_bytes == layer.chunk_bytes > 0
    assert st.percent == 100.0
    # background coalesced by max_span and fetched every chunk exactly once
    assert len(set(os.listdir(tmp_path))) == layer._unique


def test_errno_mapping() -> None:
    assert errno_for(NotFoundError("x")) == errno.ENOENT
    assert errno_for(ChunkDigestMismatch("x")) == errno.EIO
    assert errno_for(FetchError("x")) == errno.EIO
    assert errno_for(FetchTimeout("x")) == errno.EIO
    assert errno_for(LimitExceeded("x")) == errno.EIO
    assert errno_for(OSError(errno.EACCES, "x")) == errno.EACCES
    assert errno_for(RuntimeError("bug")) == errno.EIO
    assert errno_for(pyfuse3.FUSEError(errno.ENODATA)) == errno.ENODATA


def test_prefetch_is_bounded_by_its_timeout(every_type_blob: Blob, tmp_path: Path) -> None:
    layer, src = make_layer(every_type_blob, tmp_path)
    src.stall.set()
    try:
        assert trio.run(layer.prefetch, layer.blob_size, 0.3) is False
    finally:
        src.release.set()
    src.stall.clear()
    # nothing half-done is left behind: a later read works
    node = layer.table.get(layer.table.by_path["etc/hostname"])
    assert node is not None
    assert trio.run(layer.read, node, 0, 100) == b"lazy\n"
    assert trio.run(layer.prefetch, layer.blob_size, 30.0) is True
    assert layer.complete


def test_zstd_chunked_layer_reads_every_file(tmp_path: Path) -> None:
    blob = build_blob(every_type_items(), tmp_path / "z.blob", compression="zstd")
    layer, src = make_layer(blob, tmp_path / "cache")
    assert layer.compression == "zstd"
    for it in every_type_items():
        if it.kind != "file" or "/.wh." in "/" + it.name:
            continue
        node = layer.table.get(layer.table.by_path[it.name])
        assert node is not None
        assert trio.run(layer.read, node, 0, node.size + 1) == it.data, it.name
    assert src.bytes_read <= blob.size


class GatedCache(ChunkCache):
    """Storing a neighbour chunk (``remember=False`` on a foreground read) waits for
    ``gate``; it records what it stored."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.stored: list[str] = []

    def put(self, digest: str, data: bytes, remember: bool = True) -> bool:
        if not remember:
            assert self.gate.wait(30), "gate never opened"
        self.stored.append(digest)
        return super().put(digest, data, remember)


@pytest.mark.parametrize("deferred", [True, False])
def test_a_read_is_answered_before_its_neighbours_are_stored(
        every_type_blob: Blob, tmp_path: Path, deferred: bool) -> None:
    """With a nursery to spawn into (a mounted layer), a read returns once its own chunks
    are verified; the neighbours that came in the same request are cached afterwards, and a
    read of one of them meanwhile waits for it instead of fetching it again. Without one
    (prefetch), the read returns only once every chunk is stored."""
    with open(every_type_blob.path, "rb") as f:
        index = open_layer(FileRangeReader(f), every_type_blob.size,
                           toc_digest=every_type_blob.toc_digest)
    src = CountingSource(every_type_blob.path)
    cache = GatedCache(tmp_path / "cache")
    layer = LazyLayer(index, src, cache, decompress=decompress_chunk, neighbour_span=1 << 20)
    one = layer.table.get(layer.table.by_path["etc/one"])
    host = layer.table.get(layer.table.by_path["etc/hostname"])
    assert one is not None and host is not None
    order: list[str] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if deferred:
                layer.fetcher.spawn = nursery.start_soon
            else:
                # nothing may be answered before the gate opens: open it a bit later
                nursery.start_soon(trio.to_thread.run_sync, lambda: (time.sleep(0.3),
                                                                     order.append("gate"),
                                                                     cache.gate.set()))
            assert await layer.read(one, 0, 10) == b"x"
            order.append("read")
            if deferred:
                assert not cache.gate.is_set() and layer.fetcher.busy(
                    index.chunks("etc/hostname")[0].chunk_digest)
                # the neighbour is in flight: this read waits for it (no second request)
                nursery.start_soon(trio.to_thread.run_sync, cache.gate.set)
            assert await layer.read(host, 0, 100) == data_of("etc/hostname")
            layer.fetcher.spawn = None

    trio.run(main)
    assert len(src.calls) == 1
    assert order == (["read"] if deferred else ["gate", "read"])
    assert not layer.fetcher._inflight
    for path in ("etc/hostname", "etc/one"):
        assert cache.get(index.chunks(path)[0].chunk_digest) is not None


def test_a_failure_storing_neighbours_spares_the_mount(every_type_blob: Blob,
                                                       tmp_path: Path) -> None:
    """An unexpected error while the neighbours are stored in the background is logged: the
    read that fetched them was answered, the nursery (the mount) goes on, and a later read
    of a neighbour fetches it again."""

    class BrokenCache(ChunkCache):
        def put(self, digest: str, data: bytes, remember: bool = True) -> bool:
            if not remember:
                raise RuntimeError("disk on fire")
            return super().put(digest, data, remember)

    with open(every_type_blob.path, "rb") as f:
        index = open_layer(FileRangeReader(f), every_type_blob.size,
                           toc_digest=every_type_blob.toc_digest)
    src = CountingSource(every_type_blob.path)
    layer = LazyLayer(index, src, BrokenCache(tmp_path / "cache"), decompress=decompress_chunk,
                      neighbour_span=1 << 20)
    one = layer.table.get(layer.table.by_path["etc/one"])
    host = layer.table.get(layer.table.by_path["etc/hostname"])
    assert one is not None and host is not None

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            layer.fetcher.spawn = nursery.start_soon
            assert await layer.read(one, 0, 10) == b"x"
            await trio.sleep(0.5)  # the neighbours' task has failed by now
            assert not layer.fetcher._inflight
            layer.neighbour_span = 0
            assert await layer.read(host, 0, 100) == data_of("etc/hostname")
            layer.fetcher.spawn = None

    trio.run(main)
    assert len(src.calls) == 2
