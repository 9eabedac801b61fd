"""Build test layer tars entry by entry (bytes of an uncompressed PAX tar)."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from typing import Any


@dataclass
class E:
    """One tar entry: ``kind`` is f(ile), d(ir), l(symlink), h(ardlink), c(har), b(lock),
    p (fifo)."""

    name: str
    kind: str = "f"
    data: bytes = b""
    mode: int | None = None  # default: 0o755 for dirs, 0o777 symlinks, else 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 1_600_000_000
    link: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, str] = field(default_factory=dict)


_TYPES = {
    "f": tarfile.REGTYPE,
    "d": tarfile.DIRTYPE,
    "l": tarfile.SYMTYPE,
    "h": tarfile.LNKTYPE,
    "c": tarfile.CHRTYPE,
    "b": tarfile.BLKTYPE,
    "p": tarfile.FIFOTYPE,
}


def tarinfo(e: E) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(e.name)
    ti.type = _TYPES[e.kind]
    ti.mode = e.mode if e.mode is not None else {"d": 0o755, "l": 0o777}.get(e.kind, 0o644)
    ti.uid, ti.gid = e.uid, e.gid
    ti.mtime = e.mtime
    ti.linkname = e.link
    ti.devmajor, ti.devminor = e.dev
    ti.size = len(e.data) if e.kind == "f" else 0
    if e.xattrs:
        ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items()}
    return ti


def make_tar(entries: list[E]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf,
        mode="w",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
    ) as tf:
        for e in entries:
            ti = tarinfo(e)
            tf.addfile(ti, io.BytesIO(e.data) if e.kind == "f" else None)
    return buf.getvalue()


def raw_header(e: E, claimed_size: int) -> bytes:
    """A lone ustar/PAX header claiming ``claimed_size`` bytes of data (none follow)."""
    ti = tarinfo(e)
    ti.size = claimed_size
    return ti.tobuf(format=tarfile.PAX_FORMAT)


# -- raw headers, byte by byte (for hostile or unusual PAX / GNU headers) ---------------
BLOCK = 512


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def pax_record(key: bytes, value: bytes) -> bytes:
    """One ``"%d key=value\\n"`` record, its length counting its own digits."""
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def special_header(typeflag: bytes, body: bytes, name: str = "././@PaxHeader") -> bytes:
    ti = tarfile.TarInfo(name)
    ti.type = typeflag
    ti.size = len(body)
    return ti.tobuf(format=tarfile.USTAR_FORMAT) + pad(body)


def ustar_member(name: str, data: bytes = b"", **kw: Any) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti.tobuf(format=tarfile.USTAR_FORMAT) + pad(data)


END = bytes(2 * BLOCK)
