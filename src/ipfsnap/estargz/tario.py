"""A minimal tar header reader that keeps every header byte, and a ustar header writer.

The builder re-emits each input entry's header blocks (PAX, GNU long names and the ustar
block) unchanged, so the decompressed eStargz blob is the input tar, re-ordered at most.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from ipfsnap.estargz.errors import BadTar

log = logging.getLogger(__name__)

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
#: two zero blocks end a tar archive
END_OF_ARCHIVE = bytes(2 * BLOCK)
#: PAX and GNU long-name payloads are metadata; bound them so a hostile tar cannot make us
#: buffer gigabytes before the first real entry
MAX_EXTENSION_SIZE = 16 << 20

REG_TYPES = (b"0", b"\x00", b"7")
_XATTR_PREFIX = "SCHILY.xattr."


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def padding(size: int) -> int:
    return -size % BLOCK


def read_exact(src: Readable, n: int, what: str) -> bytes:
    out = bytearray()
    while len(out) < n:
        piece = src.read(n - len(out))
        if not piece:
            raise BadTar(f"{what}: tar stream ends inside an entry ({len(out)} of {n} bytes)")
        out += piece
    return bytes(out)


@dataclass
class TarHeader:
    """One tar entry's metadata plus the exact header bytes that precede its payload."""

    raw: bytes
    name: str
    typeflag: bytes
    size: int
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime: float = 0.0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _parse_pax(data: bytes, what: str) -> dict[str, bytes]:
    """PAX extended header records ``"%d %s=%s\\n"``; values stay bytes (xattrs are binary)."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # some writers pad the record area with NULs
            break
        sp = data.find(b" ", pos)
        if sp < 0:
            raise BadTar(f"{what}: malformed PAX record")
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise BadTar(f"{what}: malformed PAX record length") from None
        rec = data[sp + 1 : pos + length]
        if length <= sp - pos or pos + length > len(data) or not rec.endswith(b"\n"):
            raise BadTar(f"{what}: malformed PAX record")
        key, eq, value = rec[:-1].partition(b"=")
        if not eq:
            raise BadTar(f"{what}: PAX record without '='")
        out[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return out


def _pax_int(pax: dict[str, bytes], key: str, default: int, what: str) -> int:
    if key not in pax:
        return default
    try:
        v = int(pax[key])
    except ValueError:
        raise BadTar(f"{what}: PAX {key} {pax[key]!r} is not an integer") from None
    if v < 0:
        raise BadTar(f"{what}: PAX {key} is negative")
    return v


def _raw_name(block: bytes) -> str:
    name = block[:100].split(b"\x00", 1)[0]
    if block[257:263] == b"ustar\x00":  # POSIX ustar/pax: the prefix field extends the name
        prefix = block[345:500].split(b"\x00", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def iter_headers(src: Readable, what: str) -> Iterator[TarHeader]:
    """Headers of a tar stream. The caller must consume each entry's payload and padding
    (``size + padding(size)`` bytes) from ``src`` before asking for the next header."""
    raw = bytearray()
    pax: dict[str, bytes] = {}
    longname: bytes | None = None
    longlink: bytes | None = None
    while True:
        block = src.read(BLOCK)
        if len(block) < BLOCK:
            block += read_exact(src, BLOCK - len(block), what) if block else b""
        if not block:
            if raw:
                raise BadTar(f"{what}: tar stream ends after an extension header")
            return  # no end-of-archive marker: accepted, as GNU tar and Go do
        if block == ZERO_BLOCK:
            if raw:
                raise BadTar(f"{what}: end of archive right after an extension header")
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise BadTar(f"{what}: bad tar header: {exc}") from None
        typeflag = block[156:157]
        if typeflag in (b"x", b"g", b"L", b"K"):
            if info.size > MAX_EXTENSION_SIZE:
                raise BadTar(f"{what}: {info.size}-byte extension header is too large")
            data = read_exact(src, info.size + padding(info.size), what)[: info.size]
            raw += block + data + bytes(padding(info.size))
            if typeflag == b"x":
                pax.update(_parse_pax(data, what))
            elif typeflag == b"g":
                # checked, then ignored, as Go's archive/tar reader (so the reference's
                # builder and containerd's unpacker) does: merged into every later entry, a
                # 1 MiB one cost ~40,000 records per entry (21 s for 1000 entries; issue 8)
                _parse_pax(data, what)
            elif typeflag == b"L":
                longname = data.split(b"\x00", 1)[0]
            else:
                longlink = data.split(b"\x00", 1)[0]
            continue
        if typeflag in (b"S",) or any(k.startswith("GNU.sparse") for k in pax):
            raise BadTar(f"{what}: sparse file {info.name!r} is not supported")
        merged = pax
        # The name as written (tarfile strips a directory's trailing slash; the reference
        # keeps it, and so do we, so TOC names match the tar's)
        name = _raw_name(block)
        if longname is not None:
            name = longname.decode("utf-8", "surrogateescape")
        if "path" in merged:
            name = merged["path"].decode("utf-8", "surrogateescape")
        linkname = info.linkname
        if longlink is not None:
            linkname = longlink.decode("utf-8", "surrogateescape")
        if "linkpath" in merged:
            linkname = merged["linkpath"].decode("utf-8", "surrogateescape")
        mtime: float = info.mtime
        if "mtime" in merged:
            try:
                mtime = float(merged["mtime"])
            except ValueError:
                raise BadTar(f"{what}: PAX mtime of {name!r} is not a number") from None
        hdr = TarHeader(
            raw=bytes(raw + block),
            name=name,
            typeflag=typeflag,
            size=_pax_int(merged, "size", info.size, what),
            mode=info.mode,
            uid=_pax_int(merged, "uid", info.uid, what),
            gid=_pax_int(merged, "gid", info.gid, what),
            uname=merged["uname"].decode("utf-8", "replace") if "uname" in merged else info.uname,
            gname=merged["gname"].decode("utf-8", "replace") if "gname" in merged else info.gname,
            mtime=mtime,
            linkname=linkname,
            devmajor=info.devmajor,
            devminor=info.devminor,
            xattrs={
                k[len(_XATTR_PREFIX) :]: v for k, v in merged.items() if k.startswith(_XATTR_PREFIX)
            },
        )
        if typeflag == b"\x00" and name.endswith("/"):
            hdr.typeflag = b"5"  # old V7 tars mark directories by a trailing slash only
        raw.clear()
        pax = {}
        longname = longlink = None
        yield hdr


def ustar_header(name: str, size: int) -> bytes:
    """A plain ustar header for a synthesised regular file (landmarks, the TOC): mode 0,
    owner 0, mtime 0, as the reference writes them."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0
    info.mtime = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
