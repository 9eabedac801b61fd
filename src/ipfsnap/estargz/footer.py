"""The three footers that end a blob and say where its TOC starts.

gzip eStargz (51 bytes): an empty gzip member whose header carries an RFC 1952 FEXTRA field
with one subfield ``SG`` of 22 bytes, ``%016x`` of the TOC offset then ``STARGZ``.
10 (gzip header) + 2 (XLEN) + 4 (subfield id + length) + 22 + 5 (empty stored deflate
block) + 8 (CRC32 + ISIZE) = 51.

legacy stargz (47 bytes): the same, but the 22 bytes are the whole extra field, no subfield
header: 51 - 4 = 47.

zstd:chunked (40 bytes): the payload of the last skippable frame: little-endian u64 TOC
offset, compressed TOC size, uncompressed TOC size, manifest type (1), then ``GnUlInUx``.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from ipfsnap.estargz.errors import BadFooter

log = logging.getLogger(__name__)

GZIP_FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
ZSTD_FOOTER_SIZE = 40
#: a skippable frame's header: 4-byte magic + 4-byte little-endian length
SKIPPABLE_HEADER_SIZE = 8
SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
ZSTD_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_CHUNKED_MAGIC = b"GnUlInUx"
ZSTD_MANIFEST_TYPE_CRFS = 1

_MAGIC = b"STARGZ"
_OFFSET_HEX = 16  # the TOC offset as 16 lower-case hex digits
_SUBFIELD_LEN = _OFFSET_HEX + len(_MAGIC)  # 22
_GZIP_ID = b"\x1f\x8b\x08"
_FEXTRA = 0x04
#: an empty final stored deflate block (BFINAL=1, BTYPE=00, LEN=0, NLEN=0xffff)
_EMPTY_STORED_BLOCK = b"\x01\x00\x00\xff\xff"
#: OS byte 255 ("unknown") as Go's gzip writer sets it
_OS_UNKNOWN = 0xFF


def _gzip_member_with_extra(extra: bytes) -> bytes:
    header = _GZIP_ID + bytes([_FEXTRA]) + b"\x00\x00\x00\x00" + bytes([0, _OS_UNKNOWN])
    crc_and_size = struct.pack("<II", 0, 0)  # CRC32 and ISIZE of no data
    return header + struct.pack("<H", len(extra)) + extra + _EMPTY_STORED_BLOCK + crc_and_size


def gzip_footer(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer pointing at ``toc_offset``."""
    payload = f"{toc_offset:016x}".encode() + _MAGIC
    extra = b"SG" + struct.pack("<H", len(payload)) + payload
    out = _gzip_member_with_extra(extra)
    assert len(out) == GZIP_FOOTER_SIZE
    return out


def legacy_footer(toc_offset: int) -> bytes:
    """The 47-byte legacy stargz footer (only written by tests)."""
    out = _gzip_member_with_extra(f"{toc_offset:016x}".encode() + _MAGIC)
    assert len(out) == LEGACY_FOOTER_SIZE
    return out


def _gzip_extra(footer: bytes, what: str) -> bytes:
    """The FEXTRA payload of a footer that must be one empty gzip member."""
    if footer[:3] != _GZIP_ID or not footer[3] & _FEXTRA:
        raise BadFooter(f"{what}: not a gzip member with an extra field")
    (xlen,) = struct.unpack_from("<H", footer, 10)
    if 12 + xlen > len(footer):
        raise BadFooter(f"{what}: extra field of {xlen} bytes overruns the footer")
    try:
        d = zlib.decompressobj(31)
        data = d.decompress(footer)
    except zlib.error as exc:
        raise BadFooter(f"{what}: corrupt gzip member: {exc}") from None
    if data or not d.eof or d.unused_data:
        raise BadFooter(f"{what}: not exactly one empty gzip member")
    return footer[12 : 12 + xlen]


def _parse_offset(text: bytes, what: str) -> int:
    if text[_OFFSET_HEX:] != _MAGIC:
        raise BadFooter(f"{what}: STARGZ magic missing")
    digits = text[:_OFFSET_HEX]
    if not all(c in b"0123456789abcdefABCDEF" for c in digits):
        raise BadFooter(f"{what}: TOC offset {digits!r} is not hex")
    return int(digits, 16)


def parse_gzip_footer(footer: bytes) -> int:
    """TOC offset from a 51-byte eStargz footer, or :class:`BadFooter`."""
    what = "eStargz footer"
    if len(footer) != GZIP_FOOTER_SIZE:
        raise BadFooter(f"{what}: {len(footer)} bytes, want {GZIP_FOOTER_SIZE}")
    extra = _gzip_extra(footer, what)
    if len(extra) != 4 + _SUBFIELD_LEN or extra[:2] != b"SG":
        raise BadFooter(f"{what}: no SG subfield")
    if struct.unpack_from("<H", extra, 2)[0] != _SUBFIELD_LEN:
        raise BadFooter(f"{what}: SG subfield length is not {_SUBFIELD_LEN}")
    return _parse_offset(extra[4:], what)


def parse_legacy_footer(footer: bytes) -> int:
    """TOC offset from a 47-byte legacy stargz footer, or :class:`BadFooter`."""
    what = "legacy stargz footer"
    if len(footer) != LEGACY_FOOTER_SIZE:
        raise BadFooter(f"{what}: {len(footer)} bytes, want {LEGACY_FOOTER_SIZE}")
    extra = _gzip_extra(footer, what)
    if len(extra) != _SUBFIELD_LEN:
        raise BadFooter(f"{what}: extra field is {len(extra)} bytes, want {_SUBFIELD_LEN}")
    return _parse_offset(extra, what)


@dataclass(frozen=True)
class ZstdFooter:
    toc_offset: int
    toc_compressed_size: int
    toc_size: int
    manifest_type: int


def zstd_footer(toc_offset: int, compressed_size: int, raw_size: int) -> bytes:
    """The 40-byte zstd:chunked footer payload (the caller wraps it in a skippable frame)."""
    return (
        struct.pack("<QQQQ", toc_offset, compressed_size, raw_size, ZSTD_MANIFEST_TYPE_CRFS)
        + ZSTD_CHUNKED_MAGIC
    )


def skippable_frame(payload: bytes) -> bytes:
    return SKIPPABLE_MAGIC + struct.pack("<I", len(payload)) + payload


def parse_zstd_footer(footer: bytes) -> ZstdFooter:
    what = "zstd:chunked footer"
    if len(footer) != ZSTD_FOOTER_SIZE:
        raise BadFooter(f"{what}: {len(footer)} bytes, want {ZSTD_FOOTER_SIZE}")
    if footer[32:] != ZSTD_CHUNKED_MAGIC:
        raise BadFooter(f"{what}: GnUlInUx magic missing")
    off, csize, rsize, mtype = struct.unpack_from("<QQQQ", footer)
    if mtype != ZSTD_MANIFEST_TYPE_CRFS:
        raise BadFooter(f"{what}: manifest type {mtype}, only {ZSTD_MANIFEST_TYPE_CRFS} known")
    return ZstdFooter(off, csize, rsize, mtype)


#: bytes of a blob's end that a reader over a network source should fetch in one request
#: when it opens a layer, beyond the footer: with ``tail_start``'s alignment to the store's
#: blocks, 0 means the block holding the footer, whole (a range inside a block fetches that
#: whole block anyway), which also holds the TOC when the TOC fits there; a TOC that does
#: not fit costs one more request, for the blocks before. A bigger guess (e.g. 1 MiB: the
#: hello-bench python layers' gzip TOCs are 131-526 KB) saves that request but fetches
#: blocks no TOC needs, and between two js-ipfs nodes the blocks cross bitswap one after
#: the other (~25-45 ms per 256 KiB block idle) while the next layers' warm-ups fetch
#: theirs: the first layer's mount took longer with 1 MiB (docs/benchmarks.md, "TOC in one
#: request")
TAIL_READ_SIZE = 0
#: environment variable overriding :data:`TAIL_READ_SIZE` (benchmarks, e.g. hello-bench's
#: ``-tail1m``): the snapshotter's layer workers (fs.mounter) and rpull's TOC-ahead fetch
#: (image.rpull) both read it through :func:`tail_read_size`, so they read the same range
#: and the blocks rpull fetched ahead are the ones the worker asks for
TOC_TAIL_ENV = "IPFSNAP_TOC_TAIL"
#: bytes every format's footer needs at the blob's end (the zstd:chunked footer and its
#: skippable frame header are the longest: 40 + 8; gzip's is 51)
_MIN_TAIL = max(GZIP_FOOTER_SIZE, ZSTD_FOOTER_SIZE + SKIPPABLE_HEADER_SIZE)


def tail_read_size(environ: Mapping[str, str] | None = None) -> int:
    """The tail read size: ``$IPFSNAP_TOC_TAIL`` (:data:`TOC_TAIL_ENV`) in bytes, a negative
    value read as 0; :data:`TAIL_READ_SIZE` when it is unset, empty or not an integer.

    The two parsers this replaces agreed on every value but spelled the fallback
    differently: rpull used :data:`TAIL_READ_SIZE` itself, the mounter kept None ("leave the
    WorkerSpec default", which is :data:`TAIL_READ_SIZE` too). rpull's explicit form is kept:
    one int, the same for every caller. A bad value is ignored silently, as before (a
    benchmark switch; rpull reads it for each layer it warms, so a warning would repeat)."""
    env = os.environ if environ is None else environ
    try:
        return max(0, int(env.get(TOC_TAIL_ENV, "") or TAIL_READ_SIZE))
    except ValueError:
        return TAIL_READ_SIZE


def tail_start(size: int, span: int = TAIL_READ_SIZE, align: int = 1) -> int:
    """Where one read of the last ``span`` bytes of a ``size``-byte blob should start.

    Rounded down to a multiple of ``align`` (a store's block size, e.g. IPFS's 256 KiB
    leaves): a range that starts inside a block fetches that whole block anyway, so the
    bytes before the range come for free. At least the longest footer is covered."""
    if size <= 0:
        return 0
    start = max(0, size - max(span, _MIN_TAIL))
    if align > 1:
        start -= start % align
    return start
