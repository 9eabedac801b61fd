"""Opening a blob: footer detection, TOC parsing under limits, the validated lookup index,
bounded and verified chunk decompression, and ranged reads of files."""

from __future__ import annotations

import bisect
import collections
import gc
import hashlib
import io
import json
import logging
import os
import types
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import MappingProxyType

import msgspec
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
from ipfsnap.estargz.toc import decode_entries, decode_entries_fast
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
    # nearly every lookup (the FUSE layer's, one per file at mount) is clean already: a few
    # substring tests instead of a split and join (~3x faster)
    if (path and path[0] != "/" and path[-1] != "/" and "//" not in path
            and path != "." and not path.startswith("./") and "/./" not in path
            and not path.endswith("/.")):
        return path
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


def _fast_name(name: str, short: int) -> str | None:
    """The cleaned form of an already clean name (``a/b`` or a directory's ``a/b/``), or
    None when the name needs :func:`_checked_name` (odd, unsafe or possibly too long).

    ``short`` is the longest name (in characters) that cannot exceed the byte limit: a
    character takes at most 4 bytes in UTF-8, so ``max_name_length // 4``."""
    if name.endswith("/"):
        name = name[:-1]
    if (
        not name
        or len(name) > short
        or name[0] == "/"
        or name[-1] == "/"
        or "//" in name
        or "\x00" in name
        # "." and ".." components (and, conservatively, any hidden name)
        or name[0] == "."
        or "/." in name
    ):
        return None
    return name


def _shared_name(names: dict[int, str], key: int, name: str) -> str:
    """The owner name to keep for an entry: an equal name seen before for the same id is
    shared (the decoder makes a string per entry: ~10 MB for 100k entries), an empty one
    takes the name seen for that id, a new one is remembered."""
    if name:
        known = names.get(key)
        if known == name:
            return known
        names[key] = name
        return name
    return names.get(key, "") if names else name


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
        raw_toc: Callable[[], list[TOCEntry]] | None = None,
    ) -> None:
        """Index ``toc_entries``. With ``raw_toc`` (which parses the TOC again) the index
        takes ownership of ``toc_entries`` and rewrites them in place, and
        :attr:`toc_entries` is parsed again on demand; without it the entries are copied."""
        self.compression = compression
        self.toc_digest = toc_digest
        self.toc_offset = toc_offset
        self.blob_size = blob_size
        self.name = name
        self.prefetch_end = 0
        self._payload_end = payload_end
        self._toc_len = len(toc_entries)
        self._raw_toc = raw_toc
        self._toc_entries: list[TOCEntry] | None = None
        if raw_toc is None:
            self._toc_entries = toc_entries
            toc_entries = [msgspec.structs.replace(e, xattrs=dict(e.xattrs))
                           for e in toc_entries]
        self._entries: dict[str, TOCEntry] = {}
        self._links: dict[str, str] = {}  # hardlink path -> final target path
        self._link_count: dict[str, int] = {}  # target path -> hardlinks resolving to it
        self._chunks: dict[str, tuple[Chunk, ...]] = {}
        #: chunks of files a later entry of the same name replaced (still in the blob)
        self._shadowed: list[tuple[str, tuple[Chunk, ...]]] = []
        self._children: dict[str, dict[str, TOCEntry]] = {}
        self._build(toc_entries, limits)

    @property
    def toc_entries(self) -> list[TOCEntry]:
        """The TOC as parsed, names as written (``estargz ls``); parsed again on first use,
        so the index itself does not keep a second copy of every entry."""
        if self._toc_entries is None:
            assert self._raw_toc is not None
            self._toc_entries = self._raw_toc()
        return self._toc_entries

    @property
    def all_chunks(self) -> list[tuple[str, Chunk]]:
        """Every data chunk in the TOC, landmarks and overridden duplicates included."""
        out = [(p, c) for p, cs in self._chunks.items() for c in cs]
        out.extend((p, c) for p, cs in self._shadowed for c in cs)
        return out

    # -- construction -------------------------------------------------------------------
    def _build(self, toc_entries: list[TOCEntry], limits: Limits) -> None:
        blob = self.name
        short = limits.max_name_length // 4
        entries = self._entries
        offsets: list[int] = []
        last_reg: TOCEntry | None = None
        regs: list[TOCEntry] = []
        #: regs index -> all pieces of a file split into chunk entries
        pieces_of: dict[int, list[TOCEntry]] = {}
        hardlinks: list[str] = []
        # Writers omit a user/group name equal to the last one written for the same id;
        # carry the names forward so every entry has them.
        users: dict[int, str] = {}
        groups: dict[int, str] = {}
        for i, e in enumerate(toc_entries):
            raw_name = e.name
            name = _fast_name(raw_name, short)
            if name is None:
                what = f"{blob}: TOC entry #{i} {raw_name[:200]!r}"
                name = _checked_name(raw_name, what, limits)
            e.name = name
            typ = e.type
            if typ == "chunk":
                if last_reg is None or name != last_reg.name:
                    what = f"{blob}: TOC entry #{i} {raw_name[:200]!r}"
                    raise InvalidTOC(f"{what}: chunk entry does not follow its file's entry")
                k = len(regs) - 1
                pieces = pieces_of.get(k)
                if pieces is None:
                    pieces = pieces_of[k] = [last_reg]
                pieces.append(e)
                if e.offset:
                    offsets.append(e.offset)
                continue
            if not name and typ != "dir":
                what = f"{blob}: TOC entry #{i} {raw_name[:200]!r}"
                raise InvalidTOC(f"{what}: the root must be a directory, not {typ}")
            e.user_name = _shared_name(users, e.uid, e.user_name)
            e.group_name = _shared_name(groups, e.gid, e.group_name)
            if typ == "reg":
                if e.chunk_digest == e.digest:
                    e.chunk_digest = e.digest  # one string for both (single-chunk files)
                last_reg = e
                regs.append(e)
                if e.offset:
                    offsets.append(e.offset)
            else:
                last_reg = None
                if typ == "hardlink" or typ == "symlink":
                    what = f"{blob}: TOC entry #{i} {raw_name[:200]!r}"
                    link = e.link_name
                    if len(link.encode("utf-8", "surrogatepass")) > limits.max_name_length:
                        raise NameTooLong(f"{what}: link target exceeds {limits.max_name_length}")
                    if "\x00" in link or not link:
                        raise UnsafeEntry(f"{what}: empty link target or one with a NUL byte")
                    if typ == "hardlink":
                        e.link_name = _checked_name(link, f"{what} (hardlink target)", limits)
                        hardlinks.append(name)
            entries[name] = e
        offsets.sort()
        # an offset past the payload (a hostile TOC: an empty file has no chunk that would
        # reject it) must not become the end of another file's chunk extent
        while offsets and offsets[-1] >= self._payload_end:
            offsets.pop()
        offsets.append(self._payload_end)
        self._index_chunks(regs, pieces_of, offsets, limits)
        # Landmarks are format markers, not files: keep them out of the tree.
        for lm in LANDMARKS:
            mark = entries.pop(lm, None)
            if lm == PREFETCH_LANDMARK and mark is not None and mark.type == "reg":
                self.prefetch_end = mark.offset
        self._resolve_links(hardlinks)
        self._make_tree()

    def _index_chunks(
        self,
        regs: list[TOCEntry],
        pieces_of: dict[int, list[TOCEntry]],
        offsets: list[int],
        limits: Limits,
    ) -> None:
        payload_end = self._payload_end
        max_chunk = limits.max_chunk_size
        table = self._chunks
        bisect_right = bisect.bisect_right
        for k, reg in enumerate(regs):
            pieces = pieces_of.get(k) if pieces_of else None
            size = reg.size
            if pieces is not None or reg.chunk_offset or reg.inner_offset:
                chunks = self._file_chunks(reg, pieces or [reg], offsets, limits)
            elif size == 0:
                chunks = ()
            else:
                # the common case, one entry holding the whole file: the same checks as
                # _file_chunks, inline
                digest = reg.chunk_digest or reg.digest
                off = reg.offset
                if (
                    (reg.chunk_size and reg.chunk_size != size)
                    or size > max_chunk
                    or not digest
                    or not 0 < off < payload_end
                ):
                    chunks = self._file_chunks(reg, [reg], offsets, limits)
                else:
                    end = offsets[bisect_right(offsets, off)]
                    chunks = (Chunk(off, end, 0, size, digest, 0),)
                    reg.chunk_size = size
            old = table.get(reg.name)
            if old is not None:
                self._shadowed.append((reg.name, old))
            table[reg.name] = chunks

    def _file_chunks(
        self, reg: TOCEntry, pieces: list[TOCEntry], offsets: list[int], limits: Limits
    ) -> tuple[Chunk, ...]:
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
            # reading the chunk inflates its member up to inner_offset + size bytes
            if p.inner_offset + size > limits.max_chunk_size:
                raise ChunkTooLarge(
                    f"{what}: chunk at inner offset {p.inner_offset} of its member inflates "
                    f"past the limit {limits.max_chunk_size}"
                )
            digest = p.chunk_digest or (reg.digest if len(pieces) == 1 else "")
            if not digest:
                raise InvalidTOC(f"{what}: chunk at file offset {expect} has no digest")
            if p.offset >= self._payload_end or (p.offset == 0 and p.inner_offset == 0):
                raise InvalidTOC(
                    f"{what}: chunk offset {p.offset} is outside the blob's payload "
                    f"(0..{self._payload_end})"
                )
            end = offsets[bisect.bisect_right(offsets, p.offset)]
            chunks.append(Chunk(p.offset, end, expect, size, digest, p.inner_offset))
            expect += size
        if expect != reg.size:
            raise InvalidTOC(f"{what}: chunks cover {expect} bytes of a {reg.size}-byte file")
        if reg.chunk_size == 0 and reg.size:
            reg.chunk_size = chunks[0].chunk_size if chunks else 0
        return tuple(chunks)

    def _resolve_links(self, hardlinks: list[str]) -> None:
        """Each hardlink's final target (through links to links). Every hardlink on a
        walked chain takes that chain's target, so each is walked once: walking each
        chain from its own start took 14.6 s for a 0.5 MB TOC of 8000 hardlinks in a row
        (quadratic; found reading the code, issue 8)."""
        entries = self._entries
        links = self._links
        for name in dict.fromkeys(hardlinks):  # a name may repeat; count it once
            e = entries.get(name)
            if e is None or e.type != "hardlink" or name in links:
                continue  # replaced by a later entry of the same name, or resolved already
            chain = [name]
            seen = {name}
            target = e.link_name
            while True:
                if target in links:  # the rest of this chain is resolved
                    target = links[target]
                found: TOCEntry | None = entries.get(target)
                if found is None:
                    raise UnsafeEntry(
                        f"{self.name}: hardlink {name!r} points to {e.link_name!r}, "
                        "which is not in the layer"
                    )
                t = found
                if t.type != "hardlink":
                    break
                if target in seen:
                    raise InvalidTOC(f"{self.name}: hardlink {name!r} is part of a cycle")
                seen.add(target)
                chain.append(target)
                target = t.link_name
            if t.type == "dir":
                raise UnsafeEntry(f"{self.name}: hardlink {name!r} points to a directory")
            for link in chain:
                links[link] = target
            self._link_count[target] = self._link_count.get(target, 0) + len(chain)

    def _make_tree(self) -> None:
        entries = self._entries
        children = self._children
        links = self._links
        if "" not in entries:
            entries[""] = TOCEntry(name="", type="dir", mode=IMPLICIT_DIR_MODE)
        for name in list(entries):
            child = name
            while child:
                parent, _, base = child.rpartition("/")
                kids = children.get(parent)
                if kids is None:
                    # first child seen: check (or create) the parent directory once
                    p = entries.get(parent)
                    if p is None:
                        entries[parent] = TOCEntry(name=parent, type="dir", mode=IMPLICIT_DIR_MODE)
                    elif p.type != "dir":
                        raise InvalidTOC(
                            f"{self.name}: {name!r} lies under {parent!r}, which is a {p.type}"
                        )
                    kids = children[parent] = {}
                else:
                    if base not in kids:
                        kids[base] = entries[links.get(child, child)]
                    # a parent with children was linked to its own parent when it got them
                    break
                kids[base] = entries[links.get(child, child)]
                child = parent

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

    @property
    def has_hardlinks(self) -> bool:
        """Whether :meth:`walk` may yield one entry under several paths."""
        return bool(self._links)

    def chunk_lookup(self) -> Callable[[str], Sequence[Chunk]]:
        """:meth:`chunks` for paths already in the index's form (as :meth:`walk` yields
        them), without cleaning each: for building tables over every file."""
        table = self._chunks
        links = self._links
        none: tuple[Chunk, ...] = ()

        def lookup(path: str) -> Sequence[Chunk]:
            return table.get(links.get(path, path), none)

        return lookup

    def walk(self) -> Iterator[tuple[str, TOCEntry]]:
        stack = [""]
        entries = self._entries
        links = self._links
        children = self._children
        while stack:
            path = stack.pop()
            yield path, entries[links.get(path, path)]
            kids = children.get(path)
            if kids:
                prefix = f"{path}/" if path else ""
                stack.extend([prefix + k for k in sorted(kids, reverse=True)])

    def walk_named(self) -> Iterator[tuple[str, str, str, TOCEntry]]:
        """:meth:`walk` with each path's parent path and base name: ``(path, parent, name,
        entry)``, in the same order (the root as ``("", "", "", entry)``)."""
        stack = [("", "", "")]
        entries = self._entries
        links = self._links
        children = self._children
        while stack:
            path, parent, name = stack.pop()
            yield path, parent, name, entries[links.get(path, path)]
            kids = children.get(path)
            if kids:
                prefix = f"{path}/" if path else ""
                stack.extend([(prefix + k, path, k) for k in sorted(kids, reverse=True)])

    def nlink(self, path: str) -> int:
        """Link count as a filesystem shows it: 2 + subdirectories for a directory, the
        number of names (hardlinks included) for anything else; 0 if there is no entry."""
        p = clean_path(path)
        if p not in self._entries:
            return 0
        target = self._links.get(p, p)
        e = self._entries[target]
        if e.type == "dir":
            kids = self._children.get(target, {})
            return 2 + sum(1 for c in kids.values() if c.type == "dir")
        return 1 + self._link_count.get(target, 0)

    def __len__(self) -> int:
        return self._toc_len


# -- opening -----------------------------------------------------------------------------
def _gunzip_bounded(data: bytes, limit: int, what: str) -> bytes:
    """Inflate gzip members from ``data`` (as many as needed) to at most ``limit`` bytes."""
    return bytes(_gunzip_into(data, limit, what))


def _gunzip_into(data: bytes, limit: int, what: str) -> bytearray:
    """:func:`_gunzip_bounded` without the final copy (a TOC can be tens of MiB)."""
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
    return out


def _unzstd_bounded(data: bytes, limit: int, what: str) -> bytes:
    """Decompress zstd frames from ``data`` to at most ``limit`` bytes."""
    return bytes(_unzstd_into(data, limit, what))


def _unzstd_into(data: bytes, limit: int, what: str) -> bytearray:
    """:func:`_unzstd_bounded` without the final copy."""
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
    return out


def _toc_from_tar(plain: bytearray, blob: str, limits: Limits) -> tuple[int, int]:
    """Where the TOC JSON lies in the inflated TOC member (start, end)."""
    # the headers lie within the slack; do not copy the whole TOC into a BytesIO
    src = io.BytesIO(bytes(memoryview(plain)[:_TOC_TAR_SLACK]))
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
    have = max(0, min(len(plain), start + hdr.size) - start)
    if have != hdr.size:
        raise TruncatedBlob(f"{blob}: TOC JSON ends after {have} of {hdr.size} bytes")
    return start, start + hdr.size


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
    zstd_size = zf.toc_size if zf is not None else None
    plain, start, end, digest = _toc_json(comp, zstd_size, name, limits)
    if toc_digest is not None and digest != toc_digest:
        # a TOC that is not text at all was reported as such before its digest was checked
        _toc_text(plain, start, end, name)
        raise TOCDigestMismatch(f"{name}: TOC digest is {digest}, expected {toc_digest}")

    def raw_toc() -> list[TOCEntry]:
        # the compressed TOC was verified above; parse it again for `toc_entries`
        again, a, b, _ = _toc_json(comp, zstd_size, name, limits)
        return _parse_toc(again, a, b, name, limits)

    # Parsing allocates several objects per entry and keeps nearly all of them: the
    # cyclic GC would scan the growing heap again and again for nothing (~20% of the CPU
    # time for 100k entries). Nothing here makes cycles; restore the caller's setting.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        entries = _parse_toc(plain, start, end, name, limits)
        del plain
        index = LayerIndex(
            compression=compression,
            toc_digest=digest,
            toc_offset=toc_off,
            blob_size=size,
            payload_end=payload_end,
            toc_entries=entries,
            limits=limits,
            name=name,
            raw_toc=raw_toc,
        )
    finally:
        if gc_was_enabled:
            gc.enable()
    log.debug("%s: %s TOC with %d entries at %d", name, compression, len(index), toc_off)
    return index


def _toc_json(comp: bytes, zstd_toc_size: int | None, name: str, limits: Limits
              ) -> tuple[bytearray, int, int, str]:
    """The inflated TOC member, where its JSON lies in it (start, end), and the JSON's
    digest (the JSON bytes are held once: a 100k-entry TOC is ~37 MB)."""
    if zstd_toc_size is not None:
        if zstd_toc_size > limits.max_toc_size:
            raise TOCTooLarge(
                f"{name}: TOC JSON is {zstd_toc_size} bytes, limit is {limits.max_toc_size}"
            )
        plain = _unzstd_into(comp, zstd_toc_size + 1, f"{name} TOC")
        if len(plain) != zstd_toc_size:
            raise InvalidTOC(
                f"{name}: TOC decompresses to {len(plain)} bytes, footer says {zstd_toc_size}"
            )
        start, end = 0, len(plain)
    else:
        plain = _gunzip_into(comp, limits.max_toc_size + _TOC_TAR_SLACK, f"{name} TOC")
        start, end = _toc_from_tar(plain, name, limits)
    with memoryview(plain)[start:end] as data:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return plain, start, end, digest


def _parse_toc(plain: bytearray, start: int, end: int, name: str, limits: Limits
               ) -> list[TOCEntry]:
    """The entries of the TOC JSON ``plain[start:end]``: msgspec's decoder for the usual
    document, the stdlib path (exact messages, other encodings) for anything else."""
    entries = decode_entries_fast(plain, limits.max_entries, start, end)
    if entries is not None:
        return entries
    return decode_entries(_toc_text(plain, start, end, name), name, limits.max_entries)


def _toc_text(plain: bytearray, start: int, end: int, name: str) -> str:
    with memoryview(plain)[start:end] as data:
        try:
            # as json.loads does with bytes: UTF-8, or UTF-16/32 by detection
            return str(data, json.detect_encoding(bytes(data[:4])), "surrogatepass")
        except (UnicodeDecodeError, LookupError) as exc:
            raise InvalidTOC(f"{name}: TOC is not valid JSON: {exc}") from None


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
