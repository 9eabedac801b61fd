"""On-demand reads split into concurrent range requests (``[blob] read_split_size``).

Fake sources here; a real FUSE mount over two js-ipfs nodes at the end."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from ipfsnap.estargz import BuildOptions, FileRangeReader, build, decompress_chunk, open_layer
from ipfsnap.estargz.errors import BadCompression, ChunkDigestMismatch
from ipfsnap.fs.cache import ChunkCache
from ipfsnap.fs.errors import FetchError
from ipfsnap.fs.fetcher import IPFS_BLOCK, split_points
from ipfsnap.fs.layer import LazyLayer
from ipfsnap.ipfs import IPFSClient
from tests.fs.layers import CHUNK, Blob, CountingSource, Item, make_tar, pseudo_random
from tests.fs.mounts import fresh_status, mounted
from tests.fs.test_ipfs import ipfs_labels, ipfs_mounter
from tests.support import require_fuse


def test_split_points_cut_on_a_grid_in_the_blob() -> None:
    k = IPFS_BLOCK
    # cuts on multiples of the piece, not every piece bytes from the start
    assert split_points(100, 3 * k, k) == [100, k, 2 * k, 3 * k, 3 * k + 100]
    assert split_points(0, 2 * k, k) == [0, k, 2 * k]
    # a piece above one block is rounded up to whole blocks: cuts stay on block boundaries
    assert split_points(0, 4 * k, k + 1) == [0, 2 * k, 4 * k]
    # below one block (small test chunks) the piece is the grid as given
    assert split_points(10, 100, 32) == [10, 32, 64, 96, 110]
    # a range inside one grid cell is one piece
    assert split_points(5, 10, 64) == [5, 15]


class TrackingSource(CountingSource):
    """Counts requests in flight; can flip one byte of, or fail, the request at an offset."""

    def __init__(self, path: Path, delay: float = 0.0) -> None:
        super().__init__(path, delay)
        self.active = 0
        self.most = 0
        self.flip_at: int | None = None
        self.fail_at: int | None = None
        self._track = threading.Lock()

    def read_at(self, offset: int, length: int) -> bytes:
        with self._track:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            data = super().read_at(offset, length)
        finally:
            with self._track:
                self.active -= 1
        if offset == self.fail_at:
            raise FetchError(f"{self.name}: injected failure at offset {offset}")
        if offset == self.flip_at:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data


BIG = pseudo_random(24 * CHUNK + 321, 77)


@pytest.fixture(scope="module")
def big_blob(tmp_path_factory: pytest.TempPathFactory) -> Blob:
    """One file of 6 incompressible 256 KiB chunks (plus a tail), and a small one."""
    path = tmp_path_factory.mktemp("split") / "big.blob"
    items = [Item("big", "file", BIG), Item("small", "file", b"small\n")]
    with open(path, "wb") as dst:
        res = build(io.BytesIO(make_tar(items)), dst,
                    BuildOptions(chunk_size=4 * CHUNK, level=1, workers=1))
    return Blob(path, res.toc_digest, res.blob_digest, res.blob_size, items)


def split_layer(blob: Blob, cache: Path, src: CountingSource, **kw: Any) -> LazyLayer:
    with open(blob.path, "rb") as f:
        index = open_layer(FileRangeReader(f), blob.size, toc_digest=blob.toc_digest)
    return LazyLayer(index, src, ChunkCache(cache), decompress=decompress_chunk, **kw)


def big_node(layer: LazyLayer) -> Any:
    node = layer.table.get(layer.table.by_path["big"])
    assert node is not None
    return node


def run_extent(layer: LazyLayer) -> tuple[int, int]:
    chunks = layer.chunk_table.of(big_node(layer).ino)
    return chunks[0].offset, max(c.end for c in chunks)


#: pieces of the fake-source tests: half a test chunk, so a 256 KiB chunk is 8 pieces
PIECE = CHUNK // 2


def split_setup(blob: Blob, tmp_path: Path) -> tuple[TrackingSource, LazyLayer, Any, int, int]:
    """A layer reading in PIECE pieces: (source, layer, the big file, its run's extent)."""
    src = TrackingSource(blob.path)
    layer = split_layer(blob, tmp_path / "c", src, read_split_size=PIECE)
    start, end = run_extent(layer)
    return src, layer, big_node(layer), start, end


def test_split_read_returns_the_bytes_in_aligned_bounded_pieces(big_blob: Blob,
                                                              tmp_path: Path) -> None:
    piece = CHUNK // 2
    src = TrackingSource(big_blob.path, delay=0.02)
    layer = split_layer(big_blob, tmp_path / "c", src, read_split_size=piece, max_concurrency=3)
    node = big_node(layer)
    assert trio.run(layer.read, node, 0, node.size) == BIG
    start, end = run_extent(layer)
    # the file's chunks are one coalesced run, fetched as pieces cut on the grid
    assert sorted(src.calls) == [(a, b - a) for a, b in
                                 zip(split_points(start, end - start, piece)[:-1],
                                     split_points(start, end - start, piece)[1:], strict=True)]
    assert len(src.calls) > 6
    assert all(off % piece == 0 for off, _ in src.calls if off != start)
    assert 1 < src.most <= 3  # concurrent, within max_concurrency
    assert src.bytes_read == end - start  # nothing fetched twice
    # cached: read again without a request
    calls = len(src.calls)
    assert trio.run(layer.read, node, 5, 1000) == BIG[5:1005]
    assert len(src.calls) == calls
    # the prefetch restores the read split, not 0
    assert layer.fetcher.split_size == piece


def test_split_off_sends_one_request_per_run(big_blob: Blob, tmp_path: Path) -> None:
    src = TrackingSource(big_blob.path)
    layer = split_layer(big_blob, tmp_path / "c", src)
    node = big_node(layer)
    assert trio.run(layer.read, node, 0, node.size) == BIG
    start, end = run_extent(layer)
    assert src.calls == [(start, end - start)]


def test_a_failing_piece_fails_the_read_and_caches_nothing(big_blob: Blob,
                                                          tmp_path: Path) -> None:
    src, layer, node, start, end = split_setup(big_blob, tmp_path)
    src.fail_at = split_points(start, end - start, PIECE)[3]
    with pytest.raises(FetchError, match=f"injected failure at offset {src.fail_at}"):
        trio.run(layer.read, node, 0, node.size)
    assert layer.cache.digests() == set() and not layer._have
    assert not layer.fetcher._inflight  # no fetch left pending for later readers
    # the daemon is back: the same read works and fetches everything once more
    src.fail_at = None
    before = src.bytes_read
    assert trio.run(layer.read, node, 0, node.size) == BIG
    assert src.bytes_read - before == end - start


def test_verification_catches_a_flipped_byte_in_one_piece(big_blob: Blob,
                                                          tmp_path: Path) -> None:
    src, layer, node, start, end = split_setup(big_blob, tmp_path)
    chunks = layer.chunk_table.of(node.ino)
    # a piece inside the second chunk: that chunk fails, the others verify
    src.flip_at = next(p for p in split_points(start, end - start, PIECE)
                       if chunks[1].offset < p < chunks[1].end)
    # caught by gzip's CRC or by the chunk digest, whichever sees it first: never served
    with pytest.raises((BadCompression, ChunkDigestMismatch)):
        trio.run(layer.read, node, 0, node.size)
    assert chunks[1].chunk_digest not in layer.cache.digests()
    assert chunks[1].chunk_digest not in layer._have
    # a read of the first chunk alone is served from the cache (it verified)
    calls = len(src.calls)
    assert trio.run(layer.read, node, 0, 100) == BIG[:100]
    assert len(src.calls) == calls
    src.flip_at = None
    assert trio.run(layer.read, node, 0, node.size) == BIG


def test_a_second_reader_waits_for_the_split_fetch(big_blob: Blob, tmp_path: Path) -> None:
    src = TrackingSource(big_blob.path, delay=0.05)
    layer = split_layer(big_blob, tmp_path / "c", src, read_split_size=CHUNK // 2)
    node = big_node(layer)
    got: list[bytes] = []

    async def main() -> None:
        async def reader(off: int) -> None:
            got.append(await layer.read(node, off, 4096))

        async with trio.open_nursery() as n:
            n.start_soon(reader, 0)
            n.start_soon(reader, 10)

    trio.run(main)
    assert sorted(got) == sorted([BIG[:4096], BIG[10:4106]])
    chunk = layer.chunk_table.of(node.ino)[0]
    assert src.bytes_read == chunk.end - chunk.offset  # one fetch of the chunk, in pieces


def test_split_reads_through_fuse_from_a_second_ipfs_node(ipfs_pair: Any,
                                                         tmp_path: Path) -> None:
    """A 3 MiB file in 1 MiB chunks, added on node A, read through a mount fetching from
    node B over bitswap with reads split into 256 KiB pieces: the right bytes, in pieces."""
    require_fuse()
    data = pseudo_random(3 * (1 << 20) + 4321, 91)
    items = [Item("big", "file", data), Item("small", "file", b"small\n")]
    path = tmp_path / "split.blob"
    with open(path, "wb") as dst:
        res = build(io.BytesIO(make_tar(items)), dst,
                    BuildOptions(chunk_size=1 << 20, level=1, workers=1))
    blob = Blob(path, res.toc_digest, res.blob_digest, res.blob_size, items)
    with IPFSClient(ipfs_pair.a.api_url) as a:
        cid = a.add(blob.path).cid
    ipfs_pair.connect()
    m = ipfs_mounter(tmp_path / "state", ipfs_pair.b.api_url, background=False)
    m.config.blob.read_split_size = IPFS_BLOCK
    m.config.max_concurrency = 4
    mp = tmp_path / "mp"
    with mounted(m, mp, ipfs_labels(blob, cid)):
        before = fresh_status(m, mp)["source_calls"]
        assert (mp / "big").read_bytes() == data
        st = fresh_status(m, mp)
        # ~3 MiB of incompressible chunks in 256 KiB pieces: at least 12 requests, where
        # an unsplit read sends one per coalesced run (up to 8 MiB)
        assert st["source_calls"] - before >= 12
        assert st["last_error"] == ""
        assert (mp / "small").read_bytes() == b"small\n"


def test_config_keys_reach_the_worker_spec(tmp_path: Path) -> None:
    """``[blob] read_split_size`` / ``readahead_chunks`` in a config file end up in the
    layer worker's spec (which builds the LazyLayer with them, see fs/worker.py)."""
    from ipfsnap.config import Config, load_config
    from ipfsnap.fs import LOCAL_PATH_LABEL, LayerMounter
    from tests.fs.mounts import labels_for

    conf = tmp_path / "config.toml"
    conf.write_text("[blob]\nread_split_size = 524288\nreadahead_chunks = 2\n")
    cfg = load_config(conf, state_dir=tmp_path / "state", environ={})
    blob = Blob(tmp_path / "b", "sha256:" + "cd" * 32, "sha256:" + "ab" * 32, 10, [])
    labels = labels_for(blob)
    assert labels[LOCAL_PATH_LABEL]
    spec = LayerMounter(cfg).spec_for(tmp_path / "mp", labels)
    assert (spec.read_split_size, spec.readahead) == (524288, 2)
    default = LayerMounter(Config(state_dir=tmp_path / "s2"))
    spec = default.spec_for(tmp_path / "mp", labels)
    assert (spec.read_split_size, spec.readahead) == (0, 0)
    assert spec.neighbour_span == 262144  # one IPFS block by default
