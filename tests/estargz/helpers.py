"""Helpers for the eStargz tests: tar fixtures, builds in memory, TOC surgery."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ipfsnap.estargz import BuildOptions, BuildResult, BytesRangeReader, build, open_layer
from ipfsnap.estargz.footer import gzip_footer, parse_gzip_footer
from ipfsnap.estargz.reader import LayerIndex
from ipfsnap.estargz.tario import END_OF_ARCHIVE, padding, ustar_header


@dataclass
class Item:
    """One tar entry to put in a fixture."""

    name: str
    type: str = "reg"  # reg dir symlink hardlink char block fifo
    data: bytes = b""
    link: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime: float = 1_600_000_000
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)


_TYPES = {
    "reg": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def make_tar(
    items: Iterable[Item], *, end_marker: bool = True, fmt: int = tarfile.PAX_FORMAT
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for it in items:
            ti = tarfile.TarInfo(it.name)
            ti.type = _TYPES[it.type]
            ti.mode = it.mode
            ti.uid, ti.gid, ti.uname, ti.gname = it.uid, it.gid, it.uname, it.gname
            ti.mtime = it.mtime
            ti.linkname = it.link
            ti.devmajor, ti.devminor = it.devmajor, it.devminor
            if it.xattrs:
                ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in it.xattrs.items()}
            if it.type == "reg":
                ti.size = len(it.data)
                tf.addfile(ti, io.BytesIO(it.data))
            else:
                tf.addfile(ti)
    data = buf.getvalue()
    if not end_marker:
        data = data.rstrip(b"\x00")
        data += bytes(padding(len(data)))
    return data


def build_bytes(tar: bytes, **kw: Any) -> tuple[bytes, BuildResult]:
    kw.setdefault("level", 1)
    out = io.BytesIO()
    res = build(io.BytesIO(tar), out, BuildOptions(**kw))
    return out.getvalue(), res


def open_bytes(blob: bytes, **kw: Any) -> LayerIndex:
    return open_layer(BytesRangeReader(blob), len(blob), **kw)


def toc_of(blob: bytes) -> dict[str, Any]:
    """The TOC JSON document of a gzip eStargz blob, parsed."""
    off = parse_gzip_footer(blob[-51:])
    plain = zlib.decompressobj(31).decompress(blob[off:-51])
    size = int(plain[124:136].rstrip(b"\x00 ") or b"0", 8)
    doc: dict[str, Any] = json.loads(plain[512 : 512 + size])
    return doc


def with_toc(blob: bytes, doc_or_json: dict[str, Any] | bytes) -> bytes:
    """``blob`` with its TOC replaced (gzip eStargz): same payload, new TOC member/footer."""
    off = parse_gzip_footer(blob[-51:])
    raw = (
        doc_or_json
        if isinstance(doc_or_json, bytes)
        else json.dumps(doc_or_json, indent="\t").encode()
    )
    member = gzip.compress(
        ustar_header("stargz.index.json", len(raw))
        + raw
        + bytes(padding(len(raw)))
        + END_OF_ARCHIVE,
        mtime=0,
    )
    return blob[:off] + member + gzip_footer(off)


def mutate_toc(blob: bytes, fn: Callable[[list[dict[str, Any]]], None]) -> bytes:
    doc = toc_of(blob)
    fn(doc["entries"])
    return with_toc(blob, doc)


def tar_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getnames()


def tar_members(data: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    out: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            f = tf.extractfile(m) if m.isreg() else None
            out[m.name] = (m, f.read() if f is not None else None)
    return out
