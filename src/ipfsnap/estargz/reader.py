"""Opening a blob: footer detection, TOC parsing under limits, the validated lookup index,
bounded and verified chunk decompression, and ranged reads of files."""

from __future__ import annotations

import bisect
import collections
import hashlib
import io
import logging
import os
import types
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from types import MappingProxyType

import zstandard

from ipfsnap.estargz.errors import (
    BadCompression,
    BadFooter,
    BadTar,
    ChunkDigestMismatch,
    ChunkTooLarge,
    InvalidTOC,
    NameTooLong,
    TOCDigestMismatch,
    TOCTooLarge,
    TruncatedBlob,
    UnsafeEntry,
)
from ipfsnap.estargz.footer import (
    GZIP_FOOTER_SIZE,
    LEGACY_FOOTER_SIZE,
    SKIPPABLE_HEADER_SIZE,
    ZSTD_FOOTER_SIZE,
    parse_gzip_footer,
    parse_legacy_footer,
    parse_zstd_footer,
)
from ipfsnap.estargz.tario import BLOCK, iter_headers
from ipfsnap.estargz.toc import parse_toc_json
from ipfsnap.estargz.types import (
    DEFAULT_LIMITS,
    LANDMARKS,
    PREFETCH_LANDMARK,
    TOC_TAR_NAME,
    Chunk,
    Limits,
    RangeReader,
    TOCEntry,
)

log = logging.getLogger(__name__)

# zlib-ng inflates ~1.7x faster than zlib; same results, so use it when installed.
_inflate: types.ModuleType
try:
    from zlib_ng import zlib_ng as _inflate
except ImportError:  # pragma: no cover - zlib-ng is a dependency; keep working without it
    _inflate = zlib
_INFLATE_ERRORS = (zlib.error, _inflate.error)

COMPRESSIONS = ("gzip", "legacy-gzip", "zstd")
#: a directory the TOC does not list but whose children it does (as the reference: 0755)
IMPLICIT_DIR_MODE = 0o755
#: the TOC member holds the TOC's tar header (plus PAX headers, if a writer adds them)
#: and the end-of-archive blocks around the JSON; allow this much beyond the JSON itself
_TOC_TAR_SLACK = 64 * BLOCK


def clean_path(path: str) -> str:
    """A lookup path in the index's form: relative, no ``.``/empty components."""
    return "/".join(p for p in path.split("/") if p not in ("", "."))


def _checked_name(name: str, what: str, limits: Limits) -> str:
    """The cleaned form of an untrusted entry name, or raise."""
    if len(name.encode("utf-8", "surrogatepass")) > limits.max_name_length:
        raise NameTooLong(
            f"{what}: name of {len(name)} characters exceeds {limits.max_name_length}"
        )
    if "\x00" in name:
        raise UnsafeEntry(f"{what}: name {name[:200]!r} contains a NUL byte")
    if name.startswith("/"):
        raise UnsafeEntry(f"{what}: absolute name {name[:200]!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeEntry(f"{what}: name {name[:200]!r} has a '..' component")
    return "/".join(parts)


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


class LayerIndex:
    """The validated TOC of one blob: lookups by path, children, chunks, link counts."""

    def __init__(
        self,
        *,
        compression: str,
        toc_digest: str,
        toc_offset: int,
        blob_size: int,
        payload_end: int,
        toc_entries: list[TOCEntry],
        limits: Limits,
        name: str,
    ) -> None:
        self.compression = compression
        self.toc_digest = toc_digest
        self.toc_offset = toc_offset
        self.blob_size = blob_size
        self.name = name
        #: the TOC as parsed, names as written (``estargz ls``)
        self.toc_entries = toc_entries
        self.prefetch_end = 0
        self._payload_end = payload_end
        self._entries: dict[str, TOCEntry] = {}
        self._links: dict[str, str] = {}  # hardlink path -> final target path
        self._chunks: dict[str, tuple[Chunk, ...]] = {}
        self._children: dict[str, dict[str, TOCEntry]] = {}
        self._nlink: dict[int, int] = {}
        #: every data chunk in the TOC, landmarks and overridden duplicates included
        self.all_chunks: list[tuple[str, Chunk]] = []
        self._build(limits)

    # -- construction -------------------------------------------------------------------
    def _build(self, limits: Limits) -> None:
        blob = self.name
        offsets = sorted(
            {e.offset for e in self.toc_entries if e.type in ("reg", "chunk") and e.offset}
        )
        offsets.append(self._payload_end)

        def end_of(offset: int) -> int:
            return offsets[bisect.bisect_right(offsets, offset)]

        last_reg: TOCEntry | None = None
        last_pieces: list[TOCEntry] = []
        regs: list[tuple[TOCEntry, list[TOCEntry]]] = []
        # Writers omit a user/group name equal to the last one written for the same id;
        # carry the names forward so every entry has them.
        users: dict[int, str] = {}
        groups: dict[int, str] = {}
        for i, raw in enumerate(self.toc_entries):
            what = f"{blob}: TOC entry #{i} {raw.name[:200]!r}"
            name = _checked_name(raw.name, what, limits)
            e = replace(raw, name=name, xattrs=dict(raw.xattrs))
            if e.type == "chunk":
                if last_reg is None or name != last_reg.name:
                    raise InvalidTOC(f"{what}: chunk entry does not follow its file's entry")
                last_pieces.append(e)
                continue
            if e.user_name:
                users[e.uid] = e.user_name
            else:
                e.user_name = users.get(e.uid, "")
            if e.group_name:
                groups[e.gid] = e.group_name
            else:
                e.group_name = groups.get(e.gid, "")
            if e.type == "reg":
                last_reg, last_pieces = e, [e]
                regs.append((e, last_pieces))
            else:
                last_reg = None
            if name == "" and e.type != "dir":
                raise InvalidTOC(f"{what}: the root must be a directory, not {e.type}")
            if e.type in ("hardlink", "symlink"):
                if len(e.link_name.encode("utf-8", "surrogatepass")) > limits.max_name_length:
                    raise NameTooLong(f"{what}: link target exceeds {limits.max_name_length}")
                if "\x00" in e.link_name or not e.link_name:
                    raise UnsafeEntry(f"{what}: empty link target or one with a NUL byte")
            if e.type == "hardlink":
                e.link_name = _checked_name(e.link_name, f"{what} (hardlink target)", limits)
            self._entries[name] = e
        for reg, pieces in regs:
            self._add_chunks(reg, pieces, end_of, limits)
        # Landmarks are format markers, not files: keep them out of the tree.
        for lm in LANDMARKS:
            mark = self._entries.pop(lm, None)
            if lm == PREFETCH_LANDMARK and mark is not None and mark.type == "reg":
                self.prefetch_end = mark.offset
        self._resolve_links()
        self._make_tree()

    def _add_chunks(
        self, reg: TOCEntry, pieces: list[TOCEntry], end_of: Callable[[int], int], limits: Limits
    ) -> None:
        what = f"{self.name}: file {reg.name!r}"
        chunks: list[Chunk] = []
        expect = 0
        for n, p in enumerate(pieces):
            size = p.chunk_size
            if size == 0:
                size = reg.size - p.chunk_offset if n == len(pieces) - 1 else 0
            if p.chunk_offset != expect or (size <= 0 and reg.size > 0):
                raise InvalidTOC(
                    f"{what}: chunk #{n} at file offset {p.chunk_offset} does not continue "
                    f"the previous chunk (expected offset {expect})"
                )
            if reg.size == 0:
                break
            if size > limits.max_chunk_size:
                raise ChunkTooLarge(
                    f"{what}: chunk of {size} bytes exceeds the limit {limits.max_chunk_size}"
                )
            digest = p.chunk_digest or (reg.digest if len(pieces) == 1 else "")
            if not digest:
                raise InvalidTOC(f"{what}: chunk at file offset {expect} has no digest")
            if p.offset >= self._payload_end or (p.offset == 0 and p.inner_offset == 0):
                raise InvalidTOC(
                    f"{what}: chunk offset {p.offset} is outside the blob's payload "
                    f"(0..{self._payload_end})"
                )
            chunks.append(Chunk(p.offset, end_of(p.offset), expect, size, digest, p.inner_offset))
            expect += size
        if expect != reg.size:
            raise InvalidTOC(f"{what}: chunks cover {expect} bytes of a {reg.size}-byte file")
        if reg.chunk_size == 0 and reg.size:
            reg.chunk_size = chunks[0].chunk_size if chunks else 0
        self._chunks[reg.name] = tuple(chunks)
        self.all_chunks.extend((reg.name, c) for c in chunks)

    def _resolve_links(self) -> None:
        for name, e in self._entries.items():
            if e.type != "hardlink":
                continue
            seen = {name}
            target = e.link_name
            while True:
                t = self._entries.get(target)
                if t is None:
                    raise UnsafeEntry(
                        f"{self.name}: hardlink {name!r} points to {e.link_name!r}, "
                        "which is not in the layer"
                    )
                if t.type != "hardlink":
                    break
                if target in seen:
                    raise InvalidTOC(f"{self.name}: hardlink {name!r} is part of a cycle")
                seen.add(target)
                target = t.link_name
            if t.type == "dir":
                raise UnsafeEntry(f"{self.name}: hardlink {name!r} points to a directory")
            self._links[name] = target

    def _make_tree(self) -> None:
        if "" not in self._entries:
            self._entries[""] = TOCEntry(name="", type="dir", mode=IMPLICIT_DIR_MODE)
        for name in list(self._entries):
            child = name
            while child:
                parent = _parent(child)
                p = self._entries.get(parent)
                if p is None:
                    p = TOCEntry(name=parent, type="dir", mode=IMPLICIT_DIR_MODE)
                    self._entries[parent] = p
                elif p.type != "dir":
                    raise InvalidTOC(
                        f"{self.name}: {name!r} lies under {parent!r}, which is a {p.type}"
                    )
                kids = self._children.setdefault(parent, {})
                base = child.rpartition("/")[2]
                if base in kids:
                    break  # this parent chain is already linked
                kids[base] = self._resolved(child)
                child = parent
        for name, e in self._entries.items():
            target = self._resolved(name)
            if e.type == "dir":
                subdirs = sum(1 for c in self._children.get(name, {}).values() if c.type == "dir")
                self._nlink[id(e)] = 2 + subdirs
            else:
                self._nlink[id(target)] = self._nlink.get(id(target), 0) + 1

    def _resolved(self, path: str) -> TOCEntry:
        return self._entries[self._links.get(path, path)]

    # -- the stable interface -----------------------------------------------------------
    def entry(self, path: str) -> TOCEntry | None:
        p = clean_path(path)
        if p not in self._entries:
            return None
        return self._resolved(p)

    def children(self, path: str) -> Mapping[str, TOCEntry]:
        return MappingProxyType(self._children.get(clean_path(path), {}))

    def chunks(self, path: str) -> Sequence[Chunk]:
        p = clean_path(path)
        return self._chunks.get(self._links.get(p, p), ())

    def walk(self) -> Iterator[tuple[str, TOCEntry]]:
        stack = [""]
        while stack:
            path = stack.pop()
            yield path, self._resolved(path)
            kids = self._children.get(path, {})
            prefix = f"{path}/" if path else ""
            stack.extend(prefix + k for k in sorted(kids, reverse=True))

    def nlink(self, path: str) -> int:
        e = self.entry(path)
        return 0 if e is None else self._nlink.get(id(e), 1)

    def __len__(self) -> int:
        return len(self.toc_entries)


# -- opening -----------------------------------------------------------------------------
def _gunzip_bounded(data: bytes, limit: int, what: str) -> bytes:
    """Inflate gzip members from ``data`` (as many as needed) to at most ``limit`` bytes."""
    out = bytearray()
    buf = data
    while len(out) < limit and buf:
        d = _inflate.decompressobj(31)
        try:
            out += d.decompress(buf, limit - len(out))
            while len(out) < limit and d.unconsumed_tail and not d.eof:
                out += d.decompress(d.unconsumed_tail, limit - len(out))
        except _INFLATE_ERRORS as exc:
            raise BadCompression(f"{what}: corrupt gzip data: {exc}") from None
        if not d.eof:
            if len(out) >= limit:
                break
            raise TruncatedBlob(f"{what}: gzip data ends in the middle of a member")
        buf = d.unused_data
    return bytes(out)


def _unzstd_bounded(data: bytes, limit: int, what: str) -> bytes:
    """Decompress zstd frames from ``data`` to at most ``limit`` bytes."""
    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(data), read_across_frames=True
        )
        while len(out) < limit:
            piece = reader.read(limit - len(out))
            if not piece:
                break
            out += piece
    except zstandard.ZstdError as exc:
        raise BadCompression(f"{what}: corrupt zstd data: {exc}") from None
    return bytes(out)


def _toc_from_tar(plain: bytes, blob: str, limits: Limits) -> bytes:
    src = io.BytesIO(plain)
    try:
        hdr = next(iter_headers(src, f"{blob} TOC"), None)
    except BadTar as exc:
        raise InvalidTOC(f"{blob}: TOC member is not a tar entry: {exc}") from None
    if hdr is None or clean_path(hdr.name) != TOC_TAR_NAME:
        got = None if hdr is None else hdr.name
        raise InvalidTOC(f"{blob}: TOC tar entry is named {got!r}, not {TOC_TAR_NAME!r}")
    if hdr.size > limits.max_toc_size:
        raise TOCTooLarge(f"{blob}: TOC JSON is {hdr.size} bytes, limit is {limits.max_toc_size}")
    start = len(hdr.raw)
    data = plain[start : start + hdr.size]
    if len(data) != hdr.size:
        raise TruncatedBlob(f"{blob}: TOC JSON ends after {len(data)} of {hdr.size} bytes")
    return data


def open_layer(
    reader: RangeReader,
    size: int,
    *,
    toc_digest: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    name: str = "blob",
) -> LayerIndex:
    """Detect the format by footer, read and check the TOC, and index it."""
    if size < ZSTD_FOOTER_SIZE:
        raise TruncatedBlob(f"{name}: {size} bytes is smaller than any footer")
    tail_len = min(size, GZIP_FOOTER_SIZE)
    tail = reader.read_at(size - tail_len, tail_len)
    problems: list[str] = []
    found: tuple[str, int, int, int] | None = None  # compression, toc off, toc end, payload end
    if tail_len >= GZIP_FOOTER_SIZE:
        try:
            off = parse_gzip_footer(tail)
            found = ("gzip", off, size - GZIP_FOOTER_SIZE, off)
        except BadFooter as exc:
            problems.append(str(exc))
    if found is None and tail_len >= LEGACY_FOOTER_SIZE:
        try:
            off = parse_legacy_footer(tail[-LEGACY_FOOTER_SIZE:])
            found = ("legacy-gzip", off, size - LEGACY_FOOTER_SIZE, off)
        except BadFooter as exc:
            problems.append(str(exc))
    zf = None
    if found is None:
        try:
            zf = parse_zstd_footer(tail[-ZSTD_FOOTER_SIZE:])
            # TOC frame, then the footer's own skippable frame header, then the footer
            toc_end = zf.toc_offset + zf.toc_compressed_size
            found = ("zstd", zf.toc_offset, toc_end, zf.toc_offset - SKIPPABLE_HEADER_SIZE)
        except BadFooter as exc:
            problems.append(str(exc))
    if found is None:
        raise BadFooter(f"{name}: no eStargz/stargz/zstd:chunked footer ({'; '.join(problems)})")
    compression, toc_off, toc_end, payload_end = found
    footer_start = size - (
        ZSTD_FOOTER_SIZE + SKIPPABLE_HEADER_SIZE
        if zf
        else (GZIP_FOOTER_SIZE if compression == "gzip" else LEGACY_FOOTER_SIZE)
    )
    if not 0 <= payload_end <= toc_off < toc_end <= footer_start:
        raise BadFooter(
            f"{name}: footer puts the TOC at {toc_off}..{toc_end}, outside the {size}-byte blob"
        )
    if toc_end - toc_off > limits.max_toc_size:
        raise TOCTooLarge(
            f"{name}: compressed TOC is {toc_end - toc_off} bytes, limit is {limits.max_toc_size}"
        )
    comp = reader.read_at(toc_off, toc_end - toc_off)
    if zf is not None:
        if zf.toc_size > limits.max_toc_size:
            raise TOCTooLarge(
                f"{name}: TOC JSON is {zf.toc_size} bytes, limit is {limits.max_toc_size}"
            )
        toc_json = _unzstd_bounded(comp, zf.toc_size + 1, f"{name} TOC")
        if len(toc_json) != zf.toc_size:
            raise InvalidTOC(
                f"{name}: TOC decompresses to {len(toc_json)} bytes, footer says {zf.toc_size}"
            )
    else:
        plain = _gunzip_bounded(comp, limits.max_toc_size + _TOC_TAR_SLACK, f"{name} TOC")
        toc_json = _toc_from_tar(plain, name, limits)
    digest = "sha256:" + hashlib.sha256(toc_json).hexdigest()
    if toc_digest is not None and digest != toc_digest:
        raise TOCDigestMismatch(f"{name}: TOC digest is {digest}, expected {toc_digest}")
    entries = parse_toc_json(toc_json, name, limits.max_entries)
    log.debug("%s: %s TOC with %d entries at %d", name, compression, len(entries), toc_off)
    return LayerIndex(
        compression=compression,
        toc_digest=digest,
        toc_offset=toc_off,
        blob_size=size,
        payload_end=payload_end,
        toc_entries=entries,
        limits=limits,
        name=name,
    )


# -- chunks ------------------------------------------------------------------------------
def decompress_chunk(compression: str, data: bytes, chunk: Chunk, *, name: str = "") -> bytes:
    """Exactly ``chunk.chunk_size`` verified bytes of a chunk from ``blob[offset:end]``.

    Inflates at most ``inner_offset + chunk_size`` bytes, so a hostile member that
    expands without bound (a "gzip bomb") costs no more than the chunk it claims to be."""
    what = (
        f"{name or 'blob'}: chunk at blob offset {chunk.offset} (file offset "
        f"{chunk.chunk_offset}, {chunk.chunk_size} bytes)"
    )
    need = chunk.inner_offset + chunk.chunk_size
    if compression in ("gzip", "legacy-gzip"):
        plain = _gunzip_bounded(data, need, what)
    elif compression == "zstd":
        plain = _unzstd_bounded(data, need, what)
    else:
        raise BadCompression(f"{what}: unknown compression {compression!r}")
    if len(plain) < need:
        raise TruncatedBlob(f"{what}: decompresses to only {len(plain)} of {need} bytes")
    out = plain[chunk.inner_offset : need]
    got = "sha256:" + hashlib.sha256(out).hexdigest()
    if got != chunk.chunk_digest:
        raise ChunkDigestMismatch(f"{what}: digest is {got}, TOC says {chunk.chunk_digest}")
    return out


class LayerReader:
    """Reads byte ranges of files, fetching and verifying only the chunks they touch."""

    def __init__(self, index: LayerIndex, reader: RangeReader) -> None:
        self.index = index
        self.reader = reader

    def read_chunk(self, chunk: Chunk) -> bytes:
        data = self.reader.read_at(chunk.offset, chunk.end - chunk.offset)
        return decompress_chunk(self.index.compression, data, chunk, name=self.index.name)

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        e = self.index.entry(path)
        if e is None:
            from ipfsnap.errors import NotFoundError

            raise NotFoundError(f"{self.index.name}: no file {path!r} in the layer")
        if e.type != "reg":
            raise InvalidTOC(f"{self.index.name}: {path!r} is a {e.type}, not a regular file")
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("negative offset or length")
        stop = e.size if length is None else min(e.size, offset + length)
        if offset >= stop:
            return b""
        chunks = self.index.chunks(path)
        i = bisect.bisect_right([c.chunk_offset for c in chunks], offset) - 1
        out = bytearray()
        while i < len(chunks) and chunks[i].chunk_offset < stop:
            c = chunks[i]
            data = self.read_chunk(c)
            lo = max(offset, c.chunk_offset) - c.chunk_offset
            hi = min(stop, c.chunk_offset + c.chunk_size) - c.chunk_offset
            out += data[lo:hi]
            i += 1
        return bytes(out)


@dataclass(frozen=True)
class VerifyResult:
    toc_digest: str
    entries: int
    compression: str
    chunks: int


def verify_blob(
    reader: RangeReader,
    size: int,
    *,
    toc_digest: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    name: str = "blob",
    workers: int = 0,
) -> VerifyResult:
    """Open the blob (checking the TOC digest if given) and verify every chunk's digest."""
    index = open_layer(reader, size, toc_digest=toc_digest, limits=limits, name=name)
    # Chunks that share a compressed extent (innerOffset) are checked from one read.
    groups: dict[tuple[int, int], list[Chunk]] = {}
    for _path, c in index.all_chunks:
        groups.setdefault((c.offset, c.end), []).append(c)

    def check(extent: tuple[int, int]) -> None:
        data = reader.read_at(extent[0], extent[1] - extent[0])
        for c in groups[extent]:
            decompress_chunk(index.compression, data, c, name=name)

    n = workers or len(os.sched_getaffinity(0))
    if n <= 1:
        for extent in groups:
            check(extent)
    else:
        # inflate and sha256 release the GIL; keep a bounded number of extents in flight
        with ThreadPoolExecutor(n, "estargz-verify") as pool:
            pending: collections.deque[Future[None]] = collections.deque()
            for extent in groups:
                pending.append(pool.submit(check, extent))
                if len(pending) > 2 * n:
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
    return VerifyResult(
        index.toc_digest, len(index.toc_entries), index.compression, len(index.all_chunks)
    )
