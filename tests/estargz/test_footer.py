"""Footers: sizes, round trips, and rejection of anything else."""

from __future__ import annotations

import gzip

import pytest

from ipfsnap.estargz import BadFooter
from ipfsnap.estargz.footer import (
    GZIP_FOOTER_SIZE,
    LEGACY_FOOTER_SIZE,
    ZSTD_FOOTER_SIZE,
    gzip_footer,
    legacy_footer,
    parse_gzip_footer,
    parse_legacy_footer,
    parse_zstd_footer,
    zstd_footer,
)


@pytest.mark.parametrize("offset", [0, 1, 0x1234_5678_9ABC, (1 << 63) - 1])
def test_gzip_footer_round_trip(offset: int) -> None:
    f = gzip_footer(offset)
    assert len(f) == GZIP_FOOTER_SIZE == 51
    assert parse_gzip_footer(f) == offset
    # it is a valid, empty gzip member carrying the offset as lower-case hex
    assert gzip.decompress(f) == b""
    assert f"{offset:016x}STARGZ".encode() in f


@pytest.mark.parametrize("offset", [0, 987654321])
def test_legacy_footer_round_trip(offset: int) -> None:
    f = legacy_footer(offset)
    assert len(f) == LEGACY_FOOTER_SIZE == 47
    assert parse_legacy_footer(f) == offset
    with pytest.raises(BadFooter):
        parse_gzip_footer(f)


def test_zstd_footer_round_trip() -> None:
    f = zstd_footer(1000, 200, 3000)
    assert len(f) == ZSTD_FOOTER_SIZE == 40
    z = parse_zstd_footer(f)
    assert (z.toc_offset, z.toc_compressed_size, z.toc_size, z.manifest_type) == (
        1000,
        200,
        3000,
        1,
    )
    assert f.endswith(b"GnUlInUx")


def test_gzip_footer_rejects_corruption() -> None:
    good = gzip_footer(4096)
    cases = {
        "magic": good.replace(b"STARGZ", b"STARGX"),
        "subfield id": good.replace(b"SG", b"XG", 1),
        "hex": good.replace(b"0000000000001000", b"000000000000100g"),
        "not gzip": b"\x00" * 51,
        "crc": good[:-8] + b"\x01" + good[-7:],
    }
    for what, bad in cases.items():
        with pytest.raises(BadFooter):
            parse_gzip_footer(bad)
        assert what
    with pytest.raises(BadFooter):
        parse_gzip_footer(good[:-1])


def test_zstd_footer_rejects_bad_magic_and_type() -> None:
    f = zstd_footer(1, 2, 3)
    with pytest.raises(BadFooter):
        parse_zstd_footer(f[:-1] + b"y")
    with pytest.raises(BadFooter):
        parse_zstd_footer(f[:24] + (2).to_bytes(8, "little") + f[32:])
