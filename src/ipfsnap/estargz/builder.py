"""Building eStargz (gzip) and zstd:chunked blobs from a tar stream.

Layout: the decompressed blob is the input tar (each entry's header blocks re-emitted
byte for byte), optionally re-ordered for prioritized files, with a landmark entry and the
TOC entry added. Every regular file's data chunk starts a new compression member; headers
and padding share a member with the data before them. Members are compressed
independently on a thread pool (zlib and zstd release the GIL) and written in order, so the
output is the same bytes whatever the number of workers.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import io
import logging
import math
import os
import shutil
import tempfile
import threading
import types
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import BinaryIO

import zstandard

from ipfsnap.estargz.errors import BadCompression, BadTar, PrioritizedFileNotFound
from ipfsnap.estargz.footer import gzip_footer, skippable_frame, zstd_footer
from ipfsnap.estargz.reader import clean_path
from ipfsnap.estargz.tario import (
    END_OF_ARCHIVE,
    REG_TYPES,
    Readable,
    TarHeader,
    iter_headers,
    padding,
    read_exact,
    ustar_header,
)
from ipfsnap.estargz.toc import toc_json
from ipfsnap.estargz.types import (
    DEFAULT_CHUNK_SIZE,
    LANDMARK_CONTENTS,
    LANDMARKS,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_DIGEST_ANNOTATION,
    TOC_TAR_NAME,
    UNCOMPRESSED_SIZE_ANNOTATION,
    ZSTD_MANIFEST_CHECKSUM_ANNOTATION,
    ZSTD_MANIFEST_POSITION_ANNOTATION,
    TOCEntry,
)
from ipfsnap.progress import Progress

log = logging.getLogger(__name__)

# zlib-ng deflates 2-3x faster than zlib at level 9 for the same ratio; its output differs
# from zlib's, but a given installation always produces the same bytes.
_deflate: types.ModuleType
try:
    from zlib_ng import zlib_ng as _deflate
except ImportError:  # pragma: no cover - zlib-ng is a dependency; keep working without it
    _deflate = zlib
# and inflates a gzip input ~2.5x faster (a 170 MB layer: 1.1 s vs 2.8 s); the stream is
# the same bytes either way
_gunzip: types.ModuleType
try:
    from zlib_ng import gzip_ng as _gunzip
except ImportError:  # pragma: no cover
    _gunzip = gzip
#: what a corrupt compressed input raises (zlib-ng's error is not zlib's)
_INFLATE_ERRORS = (OSError, EOFError, zlib.error, _deflate.error, zstandard.ZstdError)

#: gzip level 9 is what the reference's ipfs-push uses; zstd level 3 is zstd's own default
DEFAULT_GZIP_LEVEL = 9
DEFAULT_ZSTD_LEVEL = 3
#: header-only runs (many dirs/symlinks in a row) are cut into members of about this size
#: so no member grows without bound; readers decompress across member boundaries anyway
MIN_MEMBER_CAP = 1 << 20
_COPY = 1 << 20

_TYPES = {
    b"1": "hardlink",
    b"2": "symlink",
    b"3": "char",
    b"4": "block",
    b"5": "dir",
    b"6": "fifo",
}


@dataclass
class BuildOptions:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    #: compression level; None = 9 for gzip, 3 for zstd
    level: int | None = None
    compression: str = "gzip"  # "gzip" | "zstd"
    prioritize: Sequence[str] = ()
    #: with prioritize: skip prioritized paths missing from the tar instead of failing
    allow_missing_prioritized: bool = False
    #: compression threads; 0 = one per CPU
    workers: int = 0
    #: members compressed or waiting at once (bounds memory to ~this x chunk_size);
    #: 0 = 2 x workers + 2
    max_pending: int = 0
    #: where to spool the tar when prioritizing (default: the system temp dir)
    spool_dir: str | None = None


@dataclass(frozen=True)
class BuildResult:
    toc_digest: str
    blob_digest: str
    blob_size: int
    #: sha256 of the decompressed blob (landmark and TOC entries included): the diffID
    diff_id: str
    uncompressed_size: int
    compression: str
    entries: int
    missing_prioritized: tuple[str, ...] = ()
    extra_annotations: dict[str, str] = field(default_factory=dict)

    def annotations(self) -> dict[str, str]:
        """The layer descriptor annotations the reference sets for this blob."""
        out = {
            TOC_DIGEST_ANNOTATION: self.toc_digest,
            UNCOMPRESSED_SIZE_ANNOTATION: str(self.uncompressed_size),
        }
        out.update(self.extra_annotations)
        return out


def format_modtime(mtime: float) -> str:
    """RFC 3339 UTC, rounded to the second; empty for the epoch (as the reference)."""
    if math.isnan(mtime) or math.isinf(mtime) or math.floor(mtime) == 0:
        return ""
    sec = math.floor(mtime + 0.5)
    try:
        dt = datetime.fromtimestamp(sec, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return ""
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}Z"
    )


# -- input -------------------------------------------------------------------------------
class _Prefixed:
    """A stream with its first bytes (read for magic detection) put back."""

    def __init__(self, head: bytes, rest: Readable) -> None:
        self._head = head
        self._rest = rest

    def read(self, n: int = -1, /) -> bytes:
        if self._head:
            if n < 0:
                out, self._head = self._head + self._rest.read(), b""
                return out
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._rest.read(n)

    def readinto(self, buf: bytearray | memoryview, /) -> int:  # zlib-ng's reader wants it
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)


class _Decoded:
    """Maps decompressor errors of the input stream to BadCompression."""

    def __init__(self, inner: Readable, kind: str) -> None:
        self._inner = inner
        self._kind = kind

    def read(self, n: int = -1, /) -> bytes:
        try:
            return self._inner.read(n)
        except _INFLATE_ERRORS as exc:
            raise BadCompression(f"input tar: corrupt {self._kind} stream: {exc}") from None


def open_tar_stream(src: BinaryIO) -> Readable:
    """The uncompressed tar from a plain, gzip or zstd stream (detected by magic)."""
    head = b""
    while len(head) < 4:
        piece = src.read(4 - len(head))
        if not piece:
            break
        head += piece
    raw = _Prefixed(head, src)
    if head[:3] == b"\x1f\x8b\x08":
        return _Decoded(_gunzip.GzipFile(fileobj=raw, mode="rb"), "gzip")
    if head == b"\x28\xb5\x2f\xfd":
        dctx = zstandard.ZstdDecompressor()
        reader = dctx.stream_reader(raw, read_across_frames=True)  # type: ignore[arg-type]
        return _Decoded(reader, "zstd")
    return raw


class _Payload:
    """Reads one entry's payload from a sequential tar stream."""

    def __init__(self, src: Readable, size: int, what: str) -> None:
        self._src = src
        self.remaining = size
        self._pad = padding(size)
        self._what = what

    def read(self, n: int) -> bytes:
        n = min(n, self.remaining)
        data = read_exact(self._src, n, self._what)
        self.remaining -= n
        return data

    def finish(self) -> None:
        left = self.remaining + self._pad
        while left:
            left -= len(read_exact(self._src, min(left, _COPY), self._what))
        self.remaining = 0


class _SpooledPayload:
    def __init__(self, f: BinaryIO, offset: int, size: int, what: str) -> None:
        self._f = f
        self._pos = offset
        self.remaining = size
        self._what = what

    def read(self, n: int) -> bytes:
        n = min(n, self.remaining)
        data = os.pread(self._f.fileno(), n, self._pos)
        if len(data) != n:
            raise BadTar(f"{self._what}: spooled tar is truncated")
        self._pos += n
        self.remaining -= n
        return data

    def finish(self) -> None:
        self.remaining = 0


_AnyPayload = _Payload | _SpooledPayload


def _skip(h: TarHeader) -> bool:
    name = clean_path(h.name)
    return name == TOC_TAR_NAME or name in LANDMARKS


def _landmark(name: str) -> tuple[TarHeader, _AnyPayload]:
    hdr = TarHeader(raw=ustar_header(name, 1), name=name, typeflag=b"0", size=1)
    return hdr, _Payload(io.BytesIO(LANDMARK_CONTENTS + bytes(padding(1))), 1, name)


def _stream_entries(stream: Readable) -> Iterator[tuple[TarHeader, _AnyPayload]]:
    yield _landmark(NO_PREFETCH_LANDMARK)
    for h in iter_headers(stream, "input tar"):
        p = _Payload(stream, h.size, f"input tar entry {h.name!r}")
        if not _skip(h):
            yield h, p
        p.finish()


def _spooled_entries(
    stream: Readable, opts: BuildOptions, missing: list[str]
) -> Iterator[tuple[TarHeader, _AnyPayload]]:
    with tempfile.TemporaryFile(dir=opts.spool_dir, prefix="ipfsnap-estargz-") as spool:
        shutil.copyfileobj(stream, spool, _COPY)
        spool.seek(0)
        # name -> (header, payload offset); a later entry of the same name replaces an
        # earlier one, as extraction would
        index: dict[str, tuple[TarHeader, int]] = {}
        # a dict as an ordered set: list.remove of a replaced name scanned the list, which
        # made 20,000 names written twice take 24 s (quadratic; found reading the code)
        order: dict[str, None] = {}
        for h in iter_headers(spool, "input tar"):
            start = spool.tell()
            spool.seek(h.size + padding(h.size), os.SEEK_CUR)
            if _skip(h):
                continue
            key = clean_path(h.name)
            if key in index:
                del order[key]
            index[key] = (h, start)
            order[key] = None
        first: list[str] = []
        moved: set[str] = set()

        def move(name: str) -> bool:
            """Put ``name`` in ``first`` after its parent directories and the targets of
            its hardlinks (recursively); False when the tar has no such entry. A stack, not
            recursion: a chain of 1500 hardlinks overflowed Python's (RecursionError)."""
            name = clean_path(name)
            if name not in index and name != "":
                return False
            # (entry, its dependencies are queued); "" is the root, written when present
            stack = [(name, False)]
            pending: set[str] = set()
            while stack:
                n, ready = stack.pop()
                if n in moved:
                    continue
                if ready:
                    pending.discard(n)
                    moved.add(n)
                    first.append(n)
                    continue
                if n in pending:
                    raise BadTar(f"input tar: hardlink cycle through {n!r}")
                if n == "":
                    if "" in index:
                        stack.append(("", True))
                    continue
                pending.add(n)
                stack.append((n, True))
                h = index[n][0]
                # pushed last, done first: the parent, then the hardlink's target
                if h.typeflag == b"1":
                    target = clean_path(h.linkname)
                    if target in index:
                        stack.append((target, False))
                parent = n.rpartition("/")[0]
                if parent in index or parent == "":
                    stack.append((parent, False))
            return True

        for p in opts.prioritize:
            if not move(p):
                if not opts.allow_missing_prioritized:
                    raise PrioritizedFileNotFound(f"prioritized file {p!r} is not in the tar")
                missing.append(p)
        for name in first:
            h, off = index[name]
            yield h, _SpooledPayload(spool, off, h.size, f"input tar entry {h.name!r}")
        yield _landmark(PREFETCH_LANDMARK)
        for name in order:
            if name not in moved:
                h, off = index[name]
                yield h, _SpooledPayload(spool, off, h.size, f"input tar entry {h.name!r}")


# -- output ------------------------------------------------------------------------------
def _gzip_member(level: int) -> Callable[[bytes], bytes]:
    def compress(data: bytes) -> bytes:
        c = _deflate.compressobj(level, zlib.DEFLATED, 31)  # 31: gzip wrapper, 32 KiB window
        out: bytes = c.compress(data) + c.flush()
        return out

    return compress


def _zstd_member(level: int) -> Callable[[bytes], bytes]:
    local = threading.local()

    def compress(data: bytes) -> bytes:
        cctx = getattr(local, "cctx", None)
        if cctx is None:
            cctx = local.cctx = zstandard.ZstdCompressor(level=level)
        out: bytes = cctx.compress(data)
        return out

    return compress


class _Sink:
    """Compresses members on a pool and writes them to ``dst`` strictly in order."""

    def __init__(
        self, dst: BinaryIO, compress: Callable[[bytes], bytes], workers: int, pending: int
    ) -> None:
        self._dst = dst
        self._compress = compress
        self._pool = ThreadPoolExecutor(workers, "estargz") if workers > 1 else None
        self._pending: collections.deque[Future[bytes]] = collections.deque()
        self._max_pending = pending
        self.offsets: list[int] = []
        self.count = 0
        self.pos = 0
        self.hash = hashlib.sha256()

    def _write(self, data: bytes) -> None:
        self._dst.write(data)
        self.hash.update(data)
        self.pos += len(data)

    def submit(self, data: bytes) -> None:
        self.count += 1
        if self._pool is None:
            self.offsets.append(self.pos)
            self._write(self._compress(data))
            return
        self._pending.append(self._pool.submit(self._compress, data))
        while len(self._pending) > self._max_pending or (self._pending and self._pending[0].done()):
            self._retire()

    def _retire(self) -> None:
        data = self._pending.popleft().result()
        self.offsets.append(self.pos)
        self._write(data)

    def drain(self) -> None:
        while self._pending:
            self._retire()

    def write_raw(self, data: bytes) -> None:
        self.drain()
        self._write(data)

    def close(self) -> None:
        if self._pool is not None:
            for f in self._pending:
                f.cancel()
            self._pool.shutdown(wait=True)


class _Writer:
    def __init__(self, sink: _Sink, chunk_size: int) -> None:
        self.sink = sink
        self.chunk_size = chunk_size
        self.member_cap = max(chunk_size, MIN_MEMBER_CAP)
        self._cur: list[bytes] = []
        self._cur_len = 0
        self.diff = hashlib.sha256()
        self.uncompressed = 0
        self.entries: list[TOCEntry] = []
        self._member_of: list[tuple[TOCEntry, int]] = []
        self._last_user: dict[int, str] = {}
        self._last_group: dict[int, str] = {}

    def add(self, data: bytes) -> None:
        if data:
            self._cur.append(data)
            self._cur_len += len(data)
            self.diff.update(data)
            self.uncompressed += len(data)

    def cut(self) -> None:
        if self._cur:
            data = b"".join(self._cur)
            self._cur, self._cur_len = [], 0
            self.sink.submit(data)

    def _if_changed(self, cache: dict[int, str], ident: int, name: str) -> str:
        # The reference writes a user/group name only when it differs from the last one
        # written for that id; readers carry it forward.
        if not name or cache.get(ident) == name:
            return ""
        cache[ident] = name
        return name

    def entry(self, h: TarHeader, payload: _AnyPayload) -> None:
        if h.typeflag in REG_TYPES:
            typ = "reg"
        elif h.typeflag in _TYPES:
            typ = _TYPES[h.typeflag]
        else:
            raise BadTar(f"input tar: entry {h.name!r} has unsupported type {h.typeflag!r}")
        e = TOCEntry(
            name=h.name,
            type=typ,
            mode=h.mode,
            uid=h.uid,
            gid=h.gid,
            user_name=self._if_changed(self._last_user, h.uid, h.uname),
            group_name=self._if_changed(self._last_group, h.gid, h.gname),
            modtime=format_modtime(h.mtime),
            xattrs=dict(h.xattrs),
        )
        if typ in ("hardlink", "symlink"):
            e.link_name = h.linkname
        elif typ in ("char", "block"):
            e.dev_major, e.dev_minor = h.devmajor, h.devminor
        if self._cur_len >= self.member_cap:
            self.cut()
        self.add(h.raw)
        if typ != "reg":
            self.entries.append(e)
            while payload.remaining:  # odd tars give links or devices a payload: keep it
                self.add(payload.read(_COPY))
            self.add(bytes(padding(h.size)))
            return
        e.size = h.size
        file_hash = hashlib.sha256()
        written = 0
        cur = e
        while written < h.size or h.size == 0:
            if h.size == 0:
                cur.digest = "sha256:" + file_hash.hexdigest()
                self.entries.append(cur)
                break
            n = min(self.chunk_size, h.size - written)
            if n == self.chunk_size:
                cur.chunk_size = n  # as the reference: set unless the chunk is a short tail
            cur.chunk_offset = written
            data = payload.read(n)
            self.cut()
            self._member_of.append((cur, self.sink.count))
            self.add(data)
            cur.chunk_digest = "sha256:" + hashlib.sha256(data).hexdigest()
            if n != h.size:
                file_hash.update(data)
            self.entries.append(cur)
            written += n
            cur = TOCEntry(name=h.name, type="chunk")
        if h.size:
            e.digest = e.chunk_digest if n == h.size else "sha256:" + file_hash.hexdigest()
        self.add(bytes(padding(h.size)))

    def resolve_offsets(self) -> None:
        for e, member in self._member_of:
            e.offset = self.sink.offsets[member]


def build(
    src: BinaryIO,
    dst: BinaryIO,
    options: BuildOptions | None = None,
    *,
    progress: Progress | None = None,
) -> BuildResult:
    """Convert the tar stream ``src`` (plain, gzip or zstd) to an eStargz or zstd:chunked
    blob written to ``dst`` (sequentially; ``dst`` need not be seekable)."""
    opts = options or BuildOptions()
    if opts.compression not in ("gzip", "zstd"):
        raise ValueError(f"unknown compression {opts.compression!r}")
    if opts.chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    if opts.level is not None and opts.compression == "gzip" and not 0 <= opts.level <= 9:
        raise ValueError(f"gzip level {opts.level} is not in 0..9")
    zstd = opts.compression == "zstd"
    level = (
        opts.level
        if opts.level is not None
        else (DEFAULT_ZSTD_LEVEL if zstd else DEFAULT_GZIP_LEVEL)
    )
    workers = opts.workers or len(os.sched_getaffinity(0))
    pending = opts.max_pending or 2 * workers + 2
    compress = _zstd_member(level) if zstd else _gzip_member(level)
    sink = _Sink(dst, compress, workers, pending)
    w = _Writer(sink, opts.chunk_size)
    missing: list[str] = []
    stream = open_tar_stream(src)
    try:
        entries = (
            _spooled_entries(stream, opts, missing) if opts.prioritize else _stream_entries(stream)
        )
        for h, payload in entries:
            w.entry(h, payload)
            if progress is not None:
                progress.update("estargz", "building", w.uncompressed)
        extra: dict[str, str] = {}
        if zstd:
            w.add(END_OF_ARCHIVE)
            w.cut()
            sink.drain()
            w.resolve_offsets()
            toc = toc_json(w.entries)
            ctoc = zstandard.ZstdCompressor(level=level).compress(toc)
            toc_offset = sink.pos + 8  # past the skippable frame's magic and length
            sink.write_raw(skippable_frame(ctoc))
            sink.write_raw(skippable_frame(zstd_footer(toc_offset, len(ctoc), len(toc))))
            extra[ZSTD_MANIFEST_CHECKSUM_ANNOTATION] = "sha256:" + hashlib.sha256(ctoc).hexdigest()
            extra[ZSTD_MANIFEST_POSITION_ANNOTATION] = f"{toc_offset}:{len(ctoc)}:{len(toc)}:1"
        else:
            w.cut()
            sink.drain()
            w.resolve_offsets()
            toc = toc_json(w.entries)
            toc_offset = sink.pos
            w.add(ustar_header(TOC_TAR_NAME, len(toc)) + toc + bytes(padding(len(toc))))
            w.add(END_OF_ARCHIVE)
            w.cut()
            sink.drain()
            sink.write_raw(gzip_footer(toc_offset))
    finally:
        sink.close()
    if progress is not None:
        progress.finish("estargz", f"built {sink.pos} bytes")
    return BuildResult(
        toc_digest="sha256:" + hashlib.sha256(toc).hexdigest(),
        blob_digest="sha256:" + sink.hash.hexdigest(),
        blob_size=sink.pos,
        diff_id="sha256:" + w.diff.hexdigest(),
        uncompressed_size=w.uncompressed,
        compression=opts.compression,
        entries=len(w.entries),
        missing_prioritized=tuple(missing),
        extra_annotations=extra,
    )
