"""Opening blobs: the index, and every way a hostile or broken blob is refused."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import tracemalloc
from typing import Any

import pytest

from ipfsnap.errors import FormatError, IntegrityError, IpfsnapError, LimitExceeded
from ipfsnap.estargz import (
    BadCompression,
    BadFooter,
    BytesRangeReader,
    Chunk,
    ChunkDigestMismatch,
    ChunkTooLarge,
    InvalidTOC,
    LayerReader,
    Limits,
    NameTooLong,
    TOCDigestMismatch,
    TOCTooLarge,
    TooManyEntries,
    TruncatedBlob,
    UnsafeEntry,
    decompress_chunk,
    verify_blob,
)
from ipfsnap.estargz.footer import legacy_footer, parse_gzip_footer
from tests.estargz.helpers import Item, build_bytes, make_tar, mutate_toc, open_bytes, with_toc

C = 1024


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def sample() -> tuple[bytes, Any]:
    items = [
        Item("a", "dir"),
        Item("a/f", data=bytes(range(256)) * 20),  # 5120 bytes: 5 chunks
        Item("a/g", data=b"small"),
        Item("link", "hardlink", link="a/g"),
        Item("sym", "symlink", link="/abs/target"),
        Item("deep/x/y", data=b"implicit parents"),
    ]
    return build_bytes(make_tar(items), chunk_size=C)


def test_index_lookups(sample: tuple[bytes, Any]) -> None:
    blob, res = sample
    idx = open_bytes(blob, toc_digest=res.toc_digest)
    assert idx.compression == "gzip" and idx.toc_digest == res.toc_digest
    assert idx.blob_size == len(blob) and idx.toc_offset == parse_gzip_footer(blob[-51:])
    assert [p for p, _ in idx.walk()] == [
        "",
        "a",
        "a/f",
        "a/g",
        "deep",
        "deep/x",
        "deep/x/y",
        "link",
        "sym",
    ]
    assert idx.entry("./a/f") is idx.entry("a/f") is idx.entry("/a/f/")
    assert idx.entry("missing") is None
    assert idx.entry("sym").link_name == "/abs/target"  # type: ignore[union-attr]
    assert idx.entry("link") is idx.entry("a/g") and idx.nlink("a/g") == 2
    assert idx.nlink("a") == 2 and idx.nlink("") == 4  # root: ., .., a, deep
    assert idx.children("")["link"] is idx.entry("a/g")
    assert idx.entry("deep/x").mode == 0o755  # type: ignore[union-attr]
    chunks = idx.chunks("a/f")
    assert [c.chunk_offset for c in chunks] == [0, 1024, 2048, 3072, 4096]
    # each chunk's extent ends where the next member starts; the last file's at the TOC
    for c, nxt in itertools.pairwise(chunks):
        assert c.end == nxt.offset
    assert idx.chunks("deep/x/y")[-1].end == idx.toc_offset
    assert idx.chunks("link") == idx.chunks("a/g")
    assert len(idx) == len(idx.toc_entries)


def test_legacy_footer_blob_is_read(sample: tuple[bytes, Any]) -> None:
    blob, res = sample
    off = parse_gzip_footer(blob[-51:])
    legacy = blob[:-51] + legacy_footer(off)
    idx = open_bytes(legacy, toc_digest=res.toc_digest)
    assert idx.compression == "legacy-gzip"
    assert LayerReader(idx, BytesRangeReader(legacy)).read("a/f") == bytes(range(256)) * 20


def test_bad_footer_and_truncation(sample: tuple[bytes, Any]) -> None:
    blob, _ = sample
    with pytest.raises(BadFooter):
        open_bytes(b"\x00" * 1000)
    with pytest.raises(BadFooter):
        open_bytes(blob[:-1])
    with pytest.raises(TruncatedBlob):
        open_bytes(blob[:20])
    # footer pointing past the end of the blob
    off = parse_gzip_footer(blob[-51:])
    from ipfsnap.estargz.footer import gzip_footer

    with pytest.raises(BadFooter):
        open_bytes(blob[:-51] + gzip_footer(len(blob) + 10))
    # a range reader that cannot deliver what the blob size promises
    with pytest.raises(TruncatedBlob):
        from ipfsnap.estargz import open_layer

        open_layer(BytesRangeReader(blob[off:]), len(blob))
    # TOC member cut short
    with pytest.raises((TruncatedBlob, BadCompression, InvalidTOC)):
        open_bytes(blob[: off + 20] + blob[-51:])


def test_toc_digest_mismatch(sample: tuple[bytes, Any]) -> None:
    blob, _ = sample
    with pytest.raises(TOCDigestMismatch, match="expected sha256:0000"):
        open_bytes(blob, toc_digest="sha256:" + "0" * 64)
    assert issubclass(TOCDigestMismatch, IntegrityError)


def test_chunk_digest_mismatch(sample: tuple[bytes, Any]) -> None:
    blob, _ = sample

    def bad_digest(entries: list[dict[str, Any]]) -> None:
        for e in entries:
            if e["name"] == "a/f" and e.get("chunkOffset") == 2048:
                e["chunkDigest"] = "sha256:" + "1" * 64

    bad = mutate_toc(blob, bad_digest)
    idx = open_bytes(bad)
    lr = LayerReader(idx, BytesRangeReader(bad))
    assert lr.read("a/f", 0, 100) == (bytes(range(256)) * 20)[:100]  # other chunks still fine
    with pytest.raises(ChunkDigestMismatch, match="file offset 2048"):
        lr.read("a/f", 2000, 100)
    with pytest.raises(ChunkDigestMismatch):
        verify_blob(BytesRangeReader(bad), len(bad))


def test_corrupt_payload_never_returns_wrong_data(sample: tuple[bytes, Any]) -> None:
    blob, _res = sample
    idx = open_bytes(blob)
    c = idx.chunks("a/f")[1]
    for pos in range(c.offset, c.end):
        bad = bytearray(blob)
        bad[pos] ^= 0x55
        data = bytes(bad[c.offset : c.end])
        try:
            out = decompress_chunk("gzip", data, c)
        except (BadCompression, ChunkDigestMismatch, TruncatedBlob):
            continue
        assert out == (bytes(range(256)) * 20)[1024:2048]  # e.g. a flipped header byte


def _craft(members: list[bytes], entries: list[dict[str, Any]]) -> bytes:
    """A gzip blob from explicit members; ``offset`` fields given as member indexes."""
    offsets = []
    pos = 0
    for m in members:
        offsets.append(pos)
        pos += len(m)
    for e in entries:
        if "member" in e:
            e["offset"] = offsets[e.pop("member")]
    from ipfsnap.estargz.footer import gzip_footer

    payload = b"".join(members)
    return with_toc(payload + gzip_footer(len(payload)), {"version": 1, "entries": entries})


def test_gzip_bomb_chunk_is_bounded() -> None:
    bomb = gzip.compress(b"\0" * (256 << 20), compresslevel=9)  # ~250 KiB -> 256 MiB
    claimed = b"\0" * 10
    blob = _craft(
        [gzip.compress(b"hdr"), bomb],
        [{"name": "f", "type": "reg", "size": 10, "member": 1, "digest": sha(claimed)}],
    )
    idx = open_bytes(blob)
    tracemalloc.start()
    try:
        assert LayerReader(idx, BytesRangeReader(blob)).read("f") == claimed
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    # a chunk that claims to be huge is refused before anything is inflated
    big = _craft(
        [gzip.compress(b"hdr"), bomb],
        [{"name": "f", "type": "reg", "size": 256 << 20, "member": 1, "digest": sha(b"")}],
    )
    with pytest.raises(ChunkTooLarge):
        open_bytes(big, limits=Limits(max_chunk_size=64 << 20))


def test_inner_offset_chunks_share_a_member() -> None:
    blob = _craft(
        [gzip.compress(b"hdr"), gzip.compress(b"AAAABBBBB")],
        [
            {"name": "a", "type": "reg", "size": 4, "member": 1, "digest": sha(b"AAAA")},
            {
                "name": "b",
                "type": "reg",
                "size": 5,
                "member": 1,
                "innerOffset": 4,
                "digest": sha(b"BBBBB"),
            },
        ],
    )
    idx = open_bytes(blob)
    lr = LayerReader(idx, BytesRangeReader(blob))
    assert (lr.read("a"), lr.read("b"), lr.read("b", 1, 2)) == (b"AAAA", b"BBBBB", b"BB")
    assert idx.chunks("a")[0].end == idx.toc_offset
    assert verify_blob(BytesRangeReader(blob), len(blob)).chunks == 2


def test_limits(sample: tuple[bytes, Any]) -> None:
    blob, _ = sample
    with pytest.raises(TOCTooLarge):
        open_bytes(blob, limits=Limits(max_toc_size=200))
    with pytest.raises(TooManyEntries):
        open_bytes(blob, limits=Limits(max_entries=3))
    with pytest.raises(NameTooLong):
        open_bytes(blob, limits=Limits(max_name_length=5))
    assert all(issubclass(c, LimitExceeded) for c in (TOCTooLarge, TooManyEntries, NameTooLong))
    # an uncompressed TOC far larger than its member is caught while inflating
    huge = {"version": 1, "entries": [{"name": "d", "type": "dir", "pad": " " * (1 << 20)}]}
    with pytest.raises(TOCTooLarge):
        open_bytes(with_toc(blob, huge), limits=Limits(max_toc_size=1 << 19))


def _single(entries: list[dict[str, Any]], blob: bytes) -> bytes:
    doc = {"version": 1, "entries": entries}
    return with_toc(blob, doc)


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "../x", "type": "dir"},
        {"name": "a/../../x", "type": "dir"},
        {"name": "/abs", "type": "dir"},
        {"name": "nul\u0000", "type": "dir"},
        {"name": "h", "type": "hardlink", "linkName": "../etc/passwd"},
        {"name": "h", "type": "hardlink", "linkName": "/etc/passwd"},
        {"name": "h", "type": "hardlink", "linkName": "missing"},
        {"name": "h", "type": "hardlink", "linkName": "d"},
        {"name": "h", "type": "hardlink", "linkName": ".no.prefetch.landmark"},
    ],
)
def test_unsafe_entries(sample: tuple[bytes, Any], entry: dict[str, Any]) -> None:
    blob, _ = sample
    with pytest.raises(UnsafeEntry):
        open_bytes(_single([{"name": "d", "type": "dir"}, entry], blob))


def test_hardlink_cycle_and_chain(sample: tuple[bytes, Any]) -> None:
    blob, _ = sample
    cyc = [
        {"name": "x", "type": "hardlink", "linkName": "y"},
        {"name": "y", "type": "hardlink", "linkName": "x"},
    ]
    with pytest.raises(InvalidTOC, match="cycle"):
        open_bytes(_single(cyc, blob))
    chain = [
        {"name": "t", "type": "symlink", "linkName": "/x"},
        {"name": "x", "type": "hardlink", "linkName": "./t"},
        {"name": "y", "type": "hardlink", "linkName": "x"},
    ]
    idx = open_bytes(_single(chain, blob))
    assert idx.entry("y") is idx.entry("t") and idx.nlink("t") == 3


def test_structural_errors(sample: tuple[bytes, Any]) -> None:
    blob, _ = sample
    toc_off = parse_gzip_footer(blob[-51:])
    d = sha(b"x")
    cases: list[list[dict[str, Any]]] = [
        [{"name": "c", "type": "chunk", "offset": 10, "chunkDigest": d}],
        [{"name": "f", "type": "reg", "size": 2, "offset": 10, "chunkSize": 1, "chunkDigest": d}],
        [
            {"name": "f", "type": "reg", "size": 2, "offset": 10, "chunkSize": 1, "chunkDigest": d},
            {"name": "g", "type": "chunk", "offset": 20, "chunkOffset": 1, "chunkDigest": d},
        ],
        [
            {"name": "f", "type": "reg", "size": 2, "offset": 10, "chunkSize": 1, "chunkDigest": d},
            {"name": "f", "type": "chunk", "offset": 20, "chunkOffset": 5, "chunkDigest": d},
        ],
        [{"name": "f", "type": "reg", "size": 1, "offset": toc_off + 5, "digest": d}],
        [{"name": "f", "type": "reg", "size": 1, "offset": 0, "digest": d}],
        [{"name": "f", "type": "reg", "size": 1, "offset": 10}],
        [{"name": "f", "type": "reg"}, {"name": "f/under", "type": "reg"}],
        [{"name": "./", "type": "reg"}],
    ]
    for entries in cases:
        with pytest.raises(InvalidTOC):
            open_bytes(_single(entries, blob))


def test_later_duplicate_wins(sample: tuple[bytes, Any]) -> None:
    blob, _ = sample
    idx = open_bytes(
        _single(
            [{"name": "x", "type": "dir", "mode": 1}, {"name": "./x/", "type": "dir", "mode": 2}],
            blob,
        )
    )
    assert idx.entry("x").mode == 2  # type: ignore[union-attr]


def test_decompress_chunk_truncated_input() -> None:
    data = b"0123456789" * 100
    comp = gzip.compress(data)
    c = Chunk(offset=0, end=len(comp), chunk_offset=0, chunk_size=len(data), chunk_digest=sha(data))
    assert decompress_chunk("gzip", comp, c) == data
    with pytest.raises(TruncatedBlob):
        decompress_chunk("gzip", comp[: len(comp) // 2], c)
    with pytest.raises(BadCompression):
        decompress_chunk("gzip", b"\x1f\x8b\x08\x00garbage-garbage", c)
    with pytest.raises(BadCompression):
        decompress_chunk("lz4", comp, c)


def test_every_error_is_one_line_and_in_the_tree(sample: tuple[bytes, Any]) -> None:
    blob, _ = sample
    for bad in (b"\x00" * 100, blob[:-3]):
        with pytest.raises(FormatError) as ei:
            open_bytes(bad, name="layer-x")
        assert isinstance(ei.value, IpfsnapError)
        assert "layer-x" in str(ei.value) and "\n" not in str(ei.value)


@pytest.fixture(scope="module")
def zsample() -> tuple[bytes, Any]:
    items = [Item("a", data=bytes(range(256)) * 20), Item("b", data=b"bee")]
    return build_bytes(make_tar(items), chunk_size=C, compression="zstd")


def _zstd_with_footer(blob: bytes, off: int, csize: int, rsize: int) -> bytes:
    from ipfsnap.estargz.footer import skippable_frame, zstd_footer

    return blob[:-48] + skippable_frame(zstd_footer(off, csize, rsize))


def test_zstd_hostile_footers_and_tocs(zsample: tuple[bytes, Any]) -> None:
    from ipfsnap.estargz.footer import parse_zstd_footer

    blob, res = zsample
    f = parse_zstd_footer(blob[-40:])
    assert open_bytes(blob, toc_digest=res.toc_digest).compression == "zstd"
    with pytest.raises(BadFooter):
        open_bytes(_zstd_with_footer(blob, len(blob) + 5, f.toc_compressed_size, f.toc_size))
    with pytest.raises(BadFooter):
        open_bytes(_zstd_with_footer(blob, f.toc_offset, len(blob), f.toc_size))
    with pytest.raises(InvalidTOC):
        open_bytes(_zstd_with_footer(blob, f.toc_offset, f.toc_compressed_size, f.toc_size - 1))
    with pytest.raises(TOCTooLarge):
        open_bytes(blob, limits=Limits(max_toc_size=f.toc_size - 1))
    with pytest.raises(TOCDigestMismatch):
        open_bytes(blob, toc_digest="sha256:" + "0" * 64)
    bad = bytearray(blob)
    bad[f.toc_offset + 6] ^= 0xFF
    with pytest.raises((BadCompression, InvalidTOC)):
        open_bytes(bytes(bad))


def test_zstd_corrupt_chunk_never_returns_wrong_data(zsample: tuple[bytes, Any]) -> None:
    blob, _ = zsample
    idx = open_bytes(blob)
    c = idx.chunks("a")[2]
    assert c.end - c.offset > 8
    for pos in range(c.offset, c.end):
        bad = bytearray(blob)
        bad[pos] ^= 0x21
        try:
            out = decompress_chunk("zstd", bytes(bad[c.offset : c.end]), c)
        except (BadCompression, ChunkDigestMismatch, TruncatedBlob):
            continue
        assert out == (bytes(range(256)) * 20)[2048:3072]
