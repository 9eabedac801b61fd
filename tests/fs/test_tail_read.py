"""Opening a layer's TOC with one request for the blob's end (fs.source.TailReader,
estargz.footer.tail_start), instead of the footer and then the TOC.

A counting fake source checks the request pattern (one request when the TOC fits in the
tail; a second one for exactly what lies before it when it does not; a corrupt footer is a
clear error after one request) and that every byte served equals the blob's; then a real
IPFS node (a layer added on node A, read through node B) checks the worker opens it the
same way with and without the tail read."""

from __future__ import annotations

import logging
import os
import pickle
import random
from pathlib import Path
from typing import Any

import pytest

from ipfsnap.config import Config
from ipfsnap.estargz import open_layer
from ipfsnap.estargz.errors import BadFooter
from ipfsnap.estargz.footer import GZIP_FOOTER_SIZE, TAIL_READ_SIZE, tail_start
from ipfsnap.fs.errors import FetchError
from ipfsnap.fs.layer import LayerTables
from ipfsnap.fs.mounter import SIZE_LABEL, LayerMounter
from ipfsnap.fs.source import TailReader
from ipfsnap.fs.worker import load_tables
from ipfsnap.ipfs import IPFSClient
from ipfsnap.ipfs.unixfs import CHUNK_SIZE
from tests.fs.counting import CountingSource
from tests.fs.layers import Blob, Item, build_blob
from tests.fs.test_ipfs import ipfs_labels


def listing(index: Any) -> list[tuple[str, str, int, int]]:
    return [(path, e.type, e.size, e.offset) for path, e in index.walk()]


@pytest.fixture(scope="module")
def big_blob(tmp_path_factory: pytest.TempPathFactory) -> Blob:
    """A layer of ~1.5 MiB (random, incompressible data) and 300 small files: its end lies
    beyond the first IPFS leaves, and its TOC is ~20 KB."""
    rnd = random.Random(6)
    items = [Item("big.bin", "file", rnd.randbytes(3 * CHUNK_SIZE // 2 * 4))]
    items += [Item(f"d{i % 7}/f{i:04d}.txt", "file", f"file {i}\n".encode() * (i % 5))
              for i in range(300)]
    d = tmp_path_factory.mktemp("tailblob")
    return build_blob(items, Path(d) / "big.blob")


def test_tail_start_is_aligned_and_covers_the_span() -> None:
    assert tail_start(0) == 0
    assert tail_start(100) == 0  # smaller than the span: the whole blob
    size = 10 * CHUNK_SIZE + 123
    start = tail_start(size, TAIL_READ_SIZE, CHUNK_SIZE)
    assert start % CHUNK_SIZE == 0 and size - start >= TAIL_READ_SIZE
    assert size - start < TAIL_READ_SIZE + CHUNK_SIZE
    assert tail_start(size, 1000) == size - 1000
    # never less than the longest footer, whatever span is asked for
    assert size - tail_start(size, 0) >= GZIP_FOOTER_SIZE


def test_toc_in_the_tail_is_one_request(big_blob: Blob) -> None:
    data = big_blob.path.read_bytes()
    src = CountingSource(data)
    reader = TailReader(src, len(data))
    index = open_layer(reader, len(data), toc_digest=big_blob.toc_digest, name=src.name)
    start = tail_start(len(data), TAIL_READ_SIZE, CHUNK_SIZE)
    assert start > 0 and start % CHUNK_SIZE == 0
    assert src.calls == [(start, len(data) - start)] and reader.requests == 1
    assert index.toc_offset >= start
    plain = open_layer(CountingSource(data), len(data), toc_digest=big_blob.toc_digest)
    assert listing(index) == listing(plain) and len(listing(index)) > 300


def test_toc_bigger_than_the_tail_is_a_second_request(big_blob: Blob) -> None:
    data = big_blob.path.read_bytes()
    src = CountingSource(data)
    # a guess covering the footer and 10 bytes of the TOC only
    reader = TailReader(src, len(data), GZIP_FOOTER_SIZE + 10, align=1)
    index = open_layer(reader, len(data), toc_digest=big_blob.toc_digest, name=src.name)
    start = len(data) - GZIP_FOOTER_SIZE - 10
    assert src.calls == [(start, GZIP_FOOTER_SIZE + 10),
                         (index.toc_offset, start - index.toc_offset)]
    plain = open_layer(CountingSource(data), len(data), toc_digest=big_blob.toc_digest)
    assert listing(index) == listing(plain)


def test_small_blob_is_read_whole_once(every_type_blob: Blob) -> None:
    data = every_type_blob.path.read_bytes()
    assert len(data) < TAIL_READ_SIZE
    src = CountingSource(data)
    open_layer(TailReader(src, len(data)), len(data), toc_digest=every_type_blob.toc_digest)
    assert src.calls == [(0, len(data))]


def test_corrupt_footer_is_a_clear_error_after_one_request(big_blob: Blob) -> None:
    data = bytearray(big_blob.path.read_bytes())
    data[-20] ^= 0xFF  # inside the footer's STARGZ magic / offset digits
    src = CountingSource(bytes(data), name="ipfs://bafy-test-blob")
    with pytest.raises(BadFooter, match="ipfs://bafy-test-blob: no eStargz"):
        open_layer(TailReader(src, len(data)), len(data), name=src.name)
    assert len(src.calls) == 1


def test_footer_pointing_outside_the_blob_is_refused(big_blob: Blob) -> None:
    from ipfsnap.estargz.footer import gzip_footer

    data = big_blob.path.read_bytes()
    bad = data[:-GZIP_FOOTER_SIZE] + gzip_footer(len(data) + 5)
    src = CountingSource(bad)
    with pytest.raises(BadFooter, match="outside the"):
        open_layer(TailReader(src, len(bad)), len(bad), name=src.name)
    assert len(src.calls) == 1


def test_every_byte_served_is_the_blobs() -> None:
    rnd = random.Random(61)
    data = rnd.randbytes(5 * CHUNK_SIZE + 777)
    for span, align in ((TAIL_READ_SIZE, CHUNK_SIZE), (1000, 1), (3 * CHUNK_SIZE, 4096)):
        src = CountingSource(data)
        reader = TailReader(src, len(data), span, align=align)
        assert reader.read_at(len(data) - 1, 1) == data[-1:]
        for _ in range(300):
            offset = rnd.randrange(len(data) + 1)
            length = rnd.randrange(len(data) - offset + 1)
            assert reader.read_at(offset, length) == data[offset:offset + length]
        # the tail was fetched once; a read never asked the source for tail bytes again
        tail_reads = [c for c in src.calls if c[0] + c[1] > reader.start]
        assert tail_reads == [(reader.start, len(data) - reader.start)]
        for offset, length in ((len(data) - 5, 6), (-1, 2), (0, len(data) + 1)):
            with pytest.raises(FetchError, match="outside the"):
                reader.read_at(offset, length)


def test_worker_opens_the_toc_through_ipfs_in_one_request(
    big_blob: Blob, ipfs_pair: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Added on node A, read through node B (bitswap): the tables are those of the
    footer-then-TOC path, and the worker logs one request."""
    with IPFSClient(ipfs_pair.a.api_url) as a:
        cid = a.add(big_blob.path).cid
    ipfs_pair.connect()
    m = LayerMounter(Config(state_dir=tmp_path / "state", ipfs_api=ipfs_pair.b.api_url),
                     spare=False)
    labels = {**ipfs_labels(big_blob, cid), SIZE_LABEL: str(big_blob.size)}
    spec = m.spec_for(tmp_path / "mp", labels)
    assert spec.toc_tail == TAIL_READ_SIZE and spec.blob_size == big_blob.size
    with caplog.at_level(logging.INFO, logger="ipfsnap.fs.worker"):
        tail = load_tables(spec)
    assert f"ipfs://{cid}: footer and TOC read in 1 request(s)" in caplog.text
    spec.toc_tail = 0
    two = load_tables(spec)
    assert isinstance(tail, LayerTables) and tail.blob_size == two.blob_size == big_blob.size
    assert len(tail.table) == len(two.table) > 300
    assert pickle.dumps(tail) == pickle.dumps(two)


def test_mounter_takes_the_tail_size_from_the_environment(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          every_type_blob: Blob) -> None:
    from tests.fs.mounts import labels_for

    for value, want in (("0", 0), ("4096", 4096), ("junk", TAIL_READ_SIZE)):
        monkeypatch.setenv("IPFSNAP_TOC_TAIL", value)
        m = LayerMounter(Config(state_dir=tmp_path / "s"), spare=False)
        assert m.spec_for(tmp_path / "mp", labels_for(every_type_blob)).toc_tail == want
    assert os.environ["IPFSNAP_TOC_TAIL"] == "junk"
