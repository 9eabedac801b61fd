"""CIDs: parsing, normalisation, and the offline ``compute_cid`` on independently built vectors."""

from __future__ import annotations

import base64
import hashlib
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipfsnap.errors import IPFSError, UsageError
from ipfsnap.ipfs.cid import (
    b32encode,
    b58encode,
    cid_from_bytes,
    normalize_cid,
    parse_cid,
    raw_cid,
)
from ipfsnap.ipfs.errors import BadCID
from ipfsnap.ipfs.unixfs import CHUNK_SIZE, MAX_LINKS, compute_cid, compute_dag


def b32(data: bytes) -> str:
    return base64.b32encode(data).decode().lower().rstrip("=")


def mh(data: bytes) -> bytes:
    return b"\x12\x20" + hashlib.sha256(data).digest()


def test_empty_file_is_the_well_known_empty_raw_block() -> None:
    # the CID Kubo prints for an empty file with --cid-version=1
    assert compute_cid(b"") == "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"


@pytest.mark.parametrize("size", [1, 100, CHUNK_SIZE - 1, CHUNK_SIZE])
def test_single_chunk_is_a_raw_leaf(size: int) -> None:
    data = bytes((i * 7) & 0xFF for i in range(size))
    # CIDv1 raw: 0x01 0x55 + multihash; multibase 'b' base32
    expected = "b" + b32(b"\x01\x55" + mh(data))
    assert compute_cid(data) == expected
    assert raw_cid(data) == expected
    assert expected.startswith("bafkrei")


def _pb_varint(n: int) -> bytes:
    out = b""
    while n >= 0x80:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


def test_two_chunks_make_one_dag_pb_node_built_by_hand() -> None:
    data = bytes(range(256)) * (CHUNK_SIZE // 256) + b"tail"
    a, b = data[:CHUNK_SIZE], data[CHUNK_SIZE:]
    links = b""
    for chunk in (a, b):
        cid = b"\x01\x55" + mh(chunk)
        # PBLink {Hash=1 (len 36), Name=2 "", Tsize=3}
        link = b"\x0a\x24" + cid + b"\x12\x00" + b"\x18" + _pb_varint(len(chunk))
        links += b"\x12" + _pb_varint(len(link)) + link
    # UnixFS Data {Type=File(2), filesize, blocksizes x2}
    unixfs = (b"\x08\x02" + b"\x18" + _pb_varint(len(data)) + b"\x20" + _pb_varint(len(a))
              + b"\x20" + _pb_varint(len(b)))
    node = links + b"\x0a" + _pb_varint(len(unixfs)) + unixfs
    expected = "b" + b32(b"\x01\x70" + mh(node))
    info = compute_dag(io.BytesIO(data))
    assert info.cid == expected
    assert info.cid.startswith("bafybei")
    assert info.size == len(data)
    assert info.dag_size == len(node) + len(data)
    assert info.blocks == 3


def test_tree_shape_depth_and_block_count() -> None:
    # 174 chunks fit one node; one more chunk needs a second level: 175 leaves,
    # 2 level-1 nodes, 1 root. Use 1-byte chunks through pieces to keep this fast.
    info = compute_dag(iter([b"x" * CHUNK_SIZE] * MAX_LINKS))
    assert info.blocks == MAX_LINKS + 1
    info = compute_dag(iter([b"x" * CHUNK_SIZE] * MAX_LINKS + [b"y"]))
    assert info.blocks == MAX_LINKS + 1 + 2 + 1
    assert info.size == MAX_LINKS * CHUNK_SIZE + 1


def test_streaming_piece_boundaries_do_not_matter() -> None:
    data = bytes(range(251)) * 4000  # ~1 MiB, not a multiple of the chunk size
    whole = compute_cid(data)
    pieces = [data[i:i + 12345] for i in range(0, len(data), 12345)]
    assert compute_cid(iter(pieces)) == whole
    assert compute_cid(io.BytesIO(data)) == whole


def test_normalize_v0_and_other_bases() -> None:
    v0 = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"
    v1 = normalize_cid(v0)
    assert v1.startswith("bafybei")
    parsed = parse_cid(v1)
    assert parsed.codec == 0x70 and parsed.v0() == v0
    # the same CIDv1 in base58btc ('z') and base36 ('k') and upper-case base32
    raw = parsed.to_bytes()
    assert normalize_cid("z" + b58encode(raw)) == v1
    n = int.from_bytes(raw, "big")
    digits = ""
    while n:
        n, r = divmod(n, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[r] + digits
    assert normalize_cid("k" + digits) == v1
    assert normalize_cid(v1.upper()) == v1
    assert normalize_cid(f"  {v1}\n") == v1


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "Qm" + "1" * 44,  # base58 of a non-multihash
        "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyk",  # truncated
        "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvykuaa",  # too long digest
        "b" + b32(b"\x02\x55" + mh(b"x")),  # CID version 2
        "b" + b32(b"\x01\x99\x01" + mh(b"x")),  # unknown codec
        "b" + b32(b"\x01\x55\x11\x14" + bytes(20)),  # sha1: unsupported hash
        "b" + b32(b"\x01\x55\x12\x10" + bytes(16)),  # sha2-256 of the wrong length
        "m" + "AAAA",  # base64 multibase: unsupported
        "bafkrei!!!",
        "b" + "a" * 600,
    ],
)
def test_bad_cids_raise_badcid(text: str) -> None:
    with pytest.raises(BadCID) as info:
        normalize_cid(text)
    assert isinstance(info.value, IPFSError) and isinstance(info.value, UsageError)
    assert "\n" not in str(info.value)


@settings(max_examples=500, deadline=None)
@given(st.one_of(
    st.text(max_size=80),
    st.binary(max_size=60).map(lambda b: "b" + b32encode(b)),
    st.binary(max_size=60).map(lambda b: "z" + b58encode(b)),
    st.binary(min_size=4, max_size=40).map(lambda b: "b" + b32encode(b"\x01\x55\x12\x20" + b)),
))
def test_parser_only_ever_raises_badcid(text: str) -> None:
    try:
        cid = parse_cid(text)
    except BadCID:
        return
    # whatever parses round-trips through its normal form
    assert parse_cid(cid.v1_base32()) == cid or cid.version == 0
    assert cid_from_bytes(cid.to_bytes()).v1_base32() == cid.v1_base32()
