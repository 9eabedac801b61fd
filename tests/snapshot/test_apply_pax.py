"""The unpacker's own PAX header reading: the same members as tarfile for every kind of
PAX header writers produce (so nothing changes for real layers), and the hostile headers
tarfile's parser mishandles refused or read in one pass (issue 8, found reading the code
after the CI fuzz campaign's PAX mtime hang)."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipfsnap.oci.tarheaders import (
    MAX_EMPTY_READS,
    MAX_SPECIAL_CHAIN,
    BoundedTarInfo,
    EndGuard,
    _pax_records,
)
from ipfsnap.snapshot import apply_layer
from ipfsnap.snapshot.errors import LayerFormatError
from tests.snapshot.tarbuild import BLOCK, END, pad, pax_record, special_header, ustar_member
from tests.support import require_root


def _members(raw: bytes, tarinfo: type[tarfile.TarInfo]) -> list[dict[str, Any]]:
    """What a stream reader makes of ``raw``: every field the unpacker reads."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|", encoding="utf-8",
                      errors="surrogateescape", tarinfo=tarinfo) as tf:
        for m in tf:
            data = tf.extractfile(m).read() if m.isreg() else None  # type: ignore[union-attr]
            out.append({**m.get_info(), "pax": dict(m.pax_headers), "sparse": m.sparse,
                        "offset": m.offset, "offset_data": m.offset_data, "data": data})
    return out


def _sparse_10(name: str, extents: list[tuple[int, int]], realsize: int) -> bytes:
    """A GNU sparse 1.0 member: the map as text lines at the start of its data."""
    text = f"{len(extents)}\n" + "".join(f"{o}\n{n}\n" for o, n in extents)
    data = pad(text.encode()) + b"".join(bytes([65 + i]) * n for i, (_, n) in
                                          enumerate(extents))
    pax = (pax_record(b"GNU.sparse.major", b"1") + pax_record(b"GNU.sparse.minor", b"0")
           + pax_record(b"GNU.sparse.name", name.encode())
           + pax_record(b"GNU.sparse.realsize", str(realsize).encode()))
    return special_header(tarfile.XHDTYPE, pax) + ustar_member(f"GNUSparseFile.0/{name}", data)


def _sparse_00(name: str, extents: list[tuple[int, int]], realsize: int) -> bytes:
    pax = pax_record(b"GNU.sparse.size", str(realsize).encode())
    pax += pax_record(b"GNU.sparse.numblocks", str(len(extents)).encode())
    for o, n in extents:
        pax += pax_record(b"GNU.sparse.offset", str(o).encode())
        pax += pax_record(b"GNU.sparse.numbytes", str(n).encode())
    data = b"".join(bytes([97 + i]) * n for i, (_, n) in enumerate(extents))
    return special_header(tarfile.XHDTYPE, pax) + ustar_member(name, data)


def _written_by_tarfile() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("dir/" + "long-name-" * 20)  # over 100 bytes: a PAX path
        ti.size = 3
        ti.mtime = 1_700_000_000.5
        ti.uid = 1 << 22  # over the octal field: a PAX uid
        ti.pax_headers = {"SCHILY.xattr.user.k": "v=1\n2", "mtime": "1700000000.123456789"}
        tf.addfile(ti, io.BytesIO(b"abc"))
        link = tarfile.TarInfo("l")
        link.type = tarfile.SYMTYPE
        link.linkname = "t/" * 60  # a PAX linkpath
        tf.addfile(link)
    return buf.getvalue()


def _binary_charset() -> bytes:
    # hdrcharset=BINARY: the path is raw bytes in the tar's encoding, not UTF-8
    pax = pax_record(b"hdrcharset", b"BINARY") + pax_record(b"path", b"caf\xe9")
    return special_header(tarfile.XHDTYPE, pax) + ustar_member("x", b"1")


def _pax_size() -> bytes:
    # a PAX size overriding the ustar field: the next header is found after that many bytes
    pax = pax_record(b"size", b"700")
    ti = tarfile.TarInfo("big")
    ti.size = 0
    return (special_header(tarfile.XHDTYPE, pax) + ti.tobuf(format=tarfile.USTAR_FORMAT)
            + pad(b"z" * 700) + ustar_member("after", b"ok"))


def _nul_padded() -> bytes:
    # records followed by NUL padding inside the stated size (some writers do this)
    pax = pax_record(b"path", b"padded") + bytes(20)
    return special_header(tarfile.XHDTYPE, pax) + ustar_member("x", b"1")


CASES: dict[str, Callable[[], bytes]] = {
    "tarfile-pax": _written_by_tarfile,
    "binary-charset": _binary_charset,
    "pax-size": _pax_size,
    "nul-padded": _nul_padded,
    "gnu-long-and-pax": lambda: (
        special_header(tarfile.GNUTYPE_LONGNAME, b"n" * 300 + b"\0", "././@LongLink")
        + special_header(tarfile.XHDTYPE, pax_record(b"uid", b"77")) + ustar_member("short", b"d")
    ),
    "sparse-0.0": lambda: _sparse_00("s0", [(0, 3), (4096, 5)], 10000),
    "sparse-0.1": lambda: (
        special_header(tarfile.XHDTYPE, pax_record(b"GNU.sparse.map", b"0,2,8192,3")
                 + pax_record(b"GNU.sparse.size", b"9000"))
        + ustar_member("s1", b"xxyyy")
    ),
    "sparse-1.0": lambda: _sparse_10("s10", [(0, 4), (5000, 2)], 6000),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pax_members_as_tarfile_reads_them(case: str) -> None:
    raw = CASES[case]() + END
    assert _members(raw, BoundedTarInfo) == _members(raw, tarfile.TarInfo)


def test_global_headers_are_ignored() -> None:
    # as containerd's unpacker does; tarfile merged them into every later member, which
    # a 1 MiB one made cost ~40,000 records per member (37 s for 1000 members)
    local = special_header(tarfile.XHDTYPE, pax_record(b"gname", b"h")) + ustar_member("a", b"1")
    rest = local + ustar_member("b", b"2") + END
    glob = special_header(tarfile.XGLTYPE, pax_record(b"uname", b"g") + pax_record(b"c", b"d"))
    got = _members(glob + rest, BoundedTarInfo)
    want = _members(rest, tarfile.TarInfo)
    for m in want:  # the same members, one header block later in the archive
        m["offset"] += 2 * BLOCK
        m["offset_data"] += 2 * BLOCK
    assert got == want
    assert [m["uname"] for m in got] == ["", ""]


def _apply(tmp_path: Path, raw: bytes, compress: bool = True) -> Path:
    dest = tmp_path / "fs"
    dest.mkdir()
    apply_layer(dest, io.BytesIO(gzip.compress(raw) if compress else raw), layer="L")
    return dest


def _refused(tmp_path: Path, raw: bytes, match: str) -> None:
    with pytest.raises(LayerFormatError, match=match):
        _apply(tmp_path, raw)
    assert os.listdir(tmp_path / "fs") == []


def test_sparse_members_unpack(tmp_path: Path) -> None:
    require_root()
    dest = _apply(tmp_path, _sparse_10("s10", [(0, 4), (5000, 2)], 6000)
                  + _sparse_00("s0", [(0, 3), (4096, 5)], 10000) + END)
    assert (dest / "s10").read_bytes() == b"AAAA" + bytes(4996) + b"BB" + bytes(998)
    assert (dest / "s0").read_bytes() == b"aaa" + bytes(4093) + b"bbbbb" + bytes(5899)


def test_backtracking_record_header_refused(tmp_path: Path) -> None:
    # "2 2 2 ... =": tarfile's regex scanned to the "=" from every record, quadratic in
    # the header (a 1 MiB one, ~1 KiB of gzip: ~14 minutes); not records, so refused
    require_root()
    body = b"2 " * ((1 << 19) - 1) + b"="
    _refused(tmp_path, special_header(tarfile.XHDTYPE, body) + ustar_member("a") + END,
             r"layer L: unreadable tar stream: malformed PAX record at byte 0")


def test_million_digit_value_is_read(tmp_path: Path) -> None:
    # a well-formed record whose value is a million digits: tarfile's hdrcharset search
    # backtracked from every digit (64 Ki digits: 11 s); read in one pass now
    require_root()
    pax = pax_record(b"comment", b"1" * 1_000_000) + pax_record(b"path", b"named")
    dest = _apply(tmp_path, special_header(tarfile.XHDTYPE, pax) + ustar_member("a", b"x") + END)
    assert os.listdir(dest) == ["named"]


@pytest.mark.parametrize("body", [
    b"10 a=bbbbb\n",  # stated length past the end
    b"5 a=b\n",  # stated length short of the newline
    b"7 =bcd\n",  # empty key
    b"7 abcd\n",  # no "="
    b"x7 a=bc\n",  # not a number
    b"00000000009 a=bcd\n",  # more length digits than a 1 MiB header needs
    b"\xb2 a=bcd\n",  # a superscript two is not an ASCII digit
    # a good record, then one with no space: the parser looped on it forever (found by
    # the fuzz campaign: tests/fuzz/crashes/snapshot_apply/finding-timeout-4ff06d76bd952a2b)
    b"8 a=bcd\nabc",
    b"8 a=bcd\n77",
])
def test_malformed_pax_records_refused(tmp_path: Path, body: bytes) -> None:
    require_root()
    _refused(tmp_path, special_header(tarfile.XHDTYPE, body) + ustar_member("a") + END,
             r"layer L: unreadable tar stream: (malformed PAX record|PAX record at)")


@pytest.mark.parametrize("typeflag", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME])
def test_long_chains_of_special_headers_refused(tmp_path: Path, typeflag: bytes) -> None:
    # tarfile reads a chain recursively: 500 in a row (2 KiB of gzip) were a RecursionError
    require_root()
    body = pax_record(b"a", b"b") if typeflag == tarfile.XHDTYPE else b"name\0"
    chain = special_header(typeflag, body) * 500
    _refused(tmp_path, chain + ustar_member("a") + END,
             rf"more than {MAX_SPECIAL_CHAIN} PAX or GNU long-name headers in a row")
    # as many as writers put (global, local and a GNU long name) are fine
    ok = tmp_path / "ok"
    ok.mkdir()
    fine = (special_header(tarfile.XGLTYPE, pax_record(b"a", b"b"))
            + special_header(tarfile.XHDTYPE, pax_record(b"b", b"c"))
            + special_header(tarfile.GNUTYPE_LONGNAME, b"long\0", "././@LongLink")
            + ustar_member("x"))
    apply_layer(ok, io.BytesIO(fine + END), layer="ok")
    assert os.listdir(ok) == ["long"]


def test_sparse_10_map_is_bounded(tmp_path: Path) -> None:
    # a GNU sparse 1.0 map claiming 10**9 extents, fed by a stream of "0\n" lines: tarfile
    # reads lines until the stream ends (memory grows with the layer): stopped at 1 MiB
    require_root()
    pax = pax_record(b"GNU.sparse.major", b"1") + pax_record(b"GNU.sparse.minor", b"0")
    hdr = tarfile.TarInfo("GNUSparseFile.0/s")
    hdr.size = 4 << 20
    lines = b"1000000000\n" + b"0\n" * (2 << 20)
    raw = special_header(tarfile.XHDTYPE, pax) + hdr.tobuf(format=tarfile.USTAR_FORMAT)
    raw += pad(lines)[: 4 << 20] + END
    dest = tmp_path / "fs"
    dest.mkdir()
    with pytest.raises(LayerFormatError, match="over the 1048576-byte limit"):
        apply_layer(dest, io.BytesIO(gzip.compress(raw, 1)), layer="L")


_PIECES = st.sampled_from([b"1", b"8", b"12", b" ", b"=", b"\n", b"a", b"\0", b"\xb2"])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(_PIECES, st.builds(pax_record, st.binary(max_size=5),
                                            st.binary(max_size=5))), max_size=12))
def test_pax_record_parser_ends_and_reads_what_it_is_given(pieces: list[bytes]) -> None:
    # any bytes: the records read, which written back are the header up to its end or
    # padding, or ReadError (the loop that never ended was one of these)
    buf = b"".join(pieces)
    try:
        records = _pax_records(buf)
    except tarfile.ReadError:
        return
    again = b"".join(pax_record(k, v) for k, v in records)
    # records end at the header's end or at a NUL (padding: what follows is not read)
    assert buf.startswith(again) and buf[len(again):len(again) + 1] in (b"", b"\0")
    assert all(k and b"=" not in k for k, _ in records)


def test_end_guard_passes_a_stream_through_and_stops_endless_reads_past_its_end() -> None:
    data = bytes(range(256)) * 40
    guard = EndGuard(io.BytesIO(data))
    assert guard.read(1000) + guard.read(-1) == data and guard.count == len(data)
    for _ in range(MAX_EMPTY_READS):
        assert guard.read(512) == b""  # a few reads at the end are normal
    with pytest.raises(EOFError, match=f"ended {len(data)} bytes in, inside an entry"):
        guard.read(512)
    # the same stream through tarfile, as a whole archive: the same members as without it
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in ("a", "b/c"):
            ti = tarfile.TarInfo(name)
            ti.size = 3
            tf.addfile(ti, io.BytesIO(b"xyz"))
    with tarfile.open(fileobj=EndGuard(io.BytesIO(raw.getvalue())), mode="r|") as tf:
        assert [m.name for m in tf] == ["a", "b/c"]
