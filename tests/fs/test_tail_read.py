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
from ipfsnap.estargz import FileRangeReader, open_layer
from ipfsnap.estargz.errors import BadFooter
from ipfsnap.estargz.footer import (
    GZIP_FOOTER_SIZE,
    TAIL_READ_SIZE,
    TOC_TAIL_ENV,
    tail_read_size,
    tail_start,
)
from ipfsnap.fs.errors import FetchError
from ipfsnap.fs.layer import LayerTables
from ipfsnap.fs.mounter import SIZE_LABEL, LayerMounter
from ipfsnap.fs.source import TailReader
from ipfsnap.fs.worker import load_tables
from ipfsnap.ipfs import IPFSClient
from ipfsnap.ipfs.unixfs import CHUNK_SIZE
from tests.fs.layers import Blob, CountingSource, Item, build_blob
from tests.fs.test_ipfs import ipfs_labels

MIB = 1 << 20


def counting(tmp_path: Path, data: bytes, name: str = "blob") -> CountingSource:
    path = tmp_path / name
    path.write_bytes(data)
    return CountingSource(path)


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
    assert tail_start(100, 1000) == 0  # smaller than the span: the whole blob
    size = 10 * CHUNK_SIZE + 123
    for span in (0, 1 << 20):
        start = tail_start(size, span, CHUNK_SIZE)
        assert start % CHUNK_SIZE == 0 and size - start >= max(span, GZIP_FOOTER_SIZE)
        assert size - start < max(span, GZIP_FOOTER_SIZE) + CHUNK_SIZE
    # the default: the block holding the footer
    assert tail_start(size, TAIL_READ_SIZE, CHUNK_SIZE) == 10 * CHUNK_SIZE
    assert tail_start(size, 1000) == size - 1000
    # never less than the longest footer, whatever span is asked for
    assert size - tail_start(size, 0) >= GZIP_FOOTER_SIZE


@pytest.mark.parametrize("value, want", [
    (None, TAIL_READ_SIZE), ("", TAIL_READ_SIZE), ("junk", TAIL_READ_SIZE),
    ("1.5", TAIL_READ_SIZE), ("0", 0), ("4096", 4096), (" 1048576 ", MIB), ("-5", 0),
])
def test_tail_read_size_from_the_environment(value: str | None, want: int) -> None:
    environ = {} if value is None else {TOC_TAIL_ENV: value}
    assert tail_read_size(environ) == want


def test_tail_read_size_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPFSNAP_TOC_TAIL", "12345")
    assert tail_read_size() == 12345
    monkeypatch.delenv("IPFSNAP_TOC_TAIL")
    assert tail_read_size() == TAIL_READ_SIZE


def test_toc_in_the_tail_is_one_request(big_blob: Blob, tmp_path: Path) -> None:
    data = big_blob.path.read_bytes()
    src = counting(tmp_path, data)
    reader = TailReader(src, len(data), MIB)
    index = open_layer(reader, len(data), toc_digest=big_blob.toc_digest, name=src.name)
    start = tail_start(len(data), MIB, CHUNK_SIZE)
    assert start > 0 and start % CHUNK_SIZE == 0
    assert src.calls == [(start, len(data) - start)] and reader.requests == 1
    assert index.toc_offset >= start
    plain = open_layer(counting(tmp_path, data), len(data), toc_digest=big_blob.toc_digest)
    assert listing(index) == listing(plain) and len(listing(index)) > 300


def test_default_reads_the_footers_block_then_the_blocks_before(big_blob: Blob,
                                                                tmp_path: Path) -> None:
    """The blocks a footer read and then a TOC read fetch, no more; one request when the
    TOC lies in the footer's block."""
    data = big_blob.path.read_bytes()
    src = counting(tmp_path, data)
    reader = TailReader(src, len(data))
    index = open_layer(reader, len(data), toc_digest=big_blob.toc_digest, name=src.name)
    block = (len(data) - GZIP_FOOTER_SIZE) // CHUNK_SIZE * CHUNK_SIZE
    want = [(block, len(data) - block)]
    if index.toc_offset < block:
        want.append((index.toc_offset, block - index.toc_offset))
    assert src.calls == want
    # a blob whose TOC lies in its last block: one request
    small = counting(tmp_path, data, "again")
    small_reader = TailReader(small, len(data), 0, align=len(data))
    open_layer(small_reader, len(data), toc_digest=big_blob.toc_digest)
    assert small.calls == [(0, len(data))]


def test_toc_bigger_than_the_tail_is_a_second_request(big_blob: Blob, tmp_path: Path) -> None:
    data = big_blob.path.read_bytes()
    src = counting(tmp_path, data)
    # a guess covering the footer and 10 bytes of the TOC only
    reader = TailReader(src, len(data), GZIP_FOOTER_SIZE + 10, align=1)
    index = open_layer(reader, len(data), toc_digest=big_blob.toc_digest, name=src.name)
    start = len(data) - GZIP_FOOTER_SIZE - 10
    assert src.calls == [(start, GZIP_FOOTER_SIZE + 10),
                         (index.toc_offset, start - index.toc_offset)]
    plain = open_layer(counting(tmp_path, data), len(data), toc_digest=big_blob.toc_digest)
    assert listing(index) == listing(plain)


def test_small_blob_is_read_whole_once(every_type_blob: Blob, tmp_path: Path) -> None:
    data = every_type_blob.path.read_bytes()
    assert len(data) < MIB
    src = counting(tmp_path, data)
    open_layer(TailReader(src, len(data), MIB), len(data),
               toc_digest=every_type_blob.toc_digest)
    assert src.calls == [(0, len(data))]


def test_corrupt_footer_is_a_clear_error_after_one_request(big_blob: Blob, tmp_path: Path) -> None:
    data = bytearray(big_blob.path.read_bytes())
    data[-20] ^= 0xFF  # inside the footer's STARGZ magic / offset digits
    src = counting(tmp_path, bytes(data), "corrupt-footer.blob")
    with pytest.raises(BadFooter, match=r"corrupt-footer\.blob: no eStargz"):
        open_layer(TailReader(src, len(data)), len(data), name=src.name)
    assert len(src.calls) == 1


def test_footer_pointing_outside_the_blob_is_refused(big_blob: Blob, tmp_path: Path) -> None:
    from ipfsnap.estargz.footer import gzip_footer

    data = big_blob.path.read_bytes()
    bad = data[:-GZIP_FOOTER_SIZE] + gzip_footer(len(data) + 5)
    src = counting(tmp_path, bad)
    with pytest.raises(BadFooter, match="outside the"):
        open_layer(TailReader(src, len(bad)), len(bad), name=src.name)
    assert len(src.calls) == 1


def test_every_byte_served_is_the_blobs(tmp_path: Path) -> None:
    rnd = random.Random(61)
    data = rnd.randbytes(5 * CHUNK_SIZE + 777)
    for span, align in ((TAIL_READ_SIZE, CHUNK_SIZE), (MIB, CHUNK_SIZE), (1000, 1),
                        (3 * CHUNK_SIZE, 4096)):
        src = counting(tmp_path, data)
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
    default path (the footer's block, then the blocks before it), and with a 1 MiB tail the
    worker logs one request."""
    with IPFSClient(ipfs_pair.a.api_url) as a:
        cid = a.add(big_blob.path).cid
    ipfs_pair.connect()
    m = LayerMounter(Config(state_dir=tmp_path / "state", ipfs_api=ipfs_pair.b.api_url),
                     spare=False)
    labels = {**ipfs_labels(big_blob, cid), SIZE_LABEL: str(big_blob.size)}
    spec = m.spec_for(tmp_path / "mp", labels)
    assert spec.toc_tail == TAIL_READ_SIZE and spec.blob_size == big_blob.size
    spec.toc_tail = MIB
    with caplog.at_level(logging.INFO, logger="ipfsnap.fs.worker"):
        tail = load_tables(spec)
    assert f"ipfs://{cid}: footer and TOC read in 1 request(s)" in caplog.text
    caplog.clear()
    spec.toc_tail = 0
    block = (big_blob.size - GZIP_FOOTER_SIZE) // CHUNK_SIZE * CHUNK_SIZE
    with open(big_blob.path, "rb") as f:
        toc_offset = open_layer(FileRangeReader(f), big_blob.size).toc_offset
    with caplog.at_level(logging.INFO, logger="ipfsnap.fs.worker"):
        two = load_tables(spec)
    n = 2 if toc_offset < block else 1
    assert f"ipfs://{cid}: footer and TOC read in {n} request(s)" in caplog.text
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
