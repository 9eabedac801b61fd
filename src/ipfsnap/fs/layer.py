"""One lazily fetched layer: its inode table, chunk reads, prefetch and background fetch."""

from __future__ import annotations

import bisect
import contextlib
import gc
import logging
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Protocol

import trio

from ipfsnap.errors import FormatError, IpfsnapError
from ipfsnap.estargz.reader import LayerIndex
from ipfsnap.estargz.types import Chunk
from ipfsnap.fs.cache import ChunkCache
from ipfsnap.fs.chunks import ChunkTable, digest_key
from ipfsnap.fs.fetcher import (
    DEFAULT_MAX_SPAN,
    ActivityBoard,
    BackgroundGate,
    BackgroundPacing,
    ChunkFetcher,
    Decompressor,
    RequestCounts,
    coalesce,
)
from ipfsnap.fs.inodes import IndexView, Inode, InodeTable
from ipfsnap.fs.source import BlobSource

log = logging.getLogger(__name__)

#: the file-type bits of a mode (stat.S_IFMT as a mask, for an inline test)
_S_IFMT, _S_IFREG = stat.S_IFMT(0o177777), stat.S_IFREG

#: chunks a sequential reader gets fetched ahead; off by default: in lazy_bench (100 MiB over
#: bitswap, 2026-11-28) 2 chunks did not raise the cold rate (0.54-0.61x of a plain cat, vs
#: 0.61-0.67x without), and a read at offset 0 that stops early (ld.so reading an ELF
#: header, ``file``) would fetch up to 2 chunks (8 MiB) it never needs. hello-bench (fourth
#: session, ``[blob] readahead_chunks = 1``): python's second binary chunk came with the
#: first, but the run medians did not move at load 5-7 (docs/benchmarks.md)
DEFAULT_READAHEAD = 0
#: how far a read may start from where the file's previous read ended and still count as
#: sequential: 1 MiB, the split of a typical 1 MiB read(2) into concurrent 128 KiB requests
READAHEAD_SLACK = 1 << 20
#: read-ahead runs waiting at most (more are dropped: the reader fetches on demand)
READAHEAD_QUEUE = 4
#: bound of one background request: 8 IPFS blocks (256 KiB each), ~0.1 s at the 20-30 MB/s
#: of bitswap over loopback, so a foreground read that starts meanwhile shares the link
#: with it for at most about that long (a single bigger chunk is still one request)
BACKGROUND_SPAN = 2 << 20
#: on-demand reads also fetch the uncached chunks next to them in the blob, up to the
#: boundaries of the aligned windows of this many bytes they touch (0 = off). 256 KiB is
#: the IPFS block size (add's fixed chunker): those bytes cross bitswap in any case, so the
#: neighbours cost no network transfer, only a local cat, inflate and sha256. The requests
#: it saves are those whose blocks the IPFS node already holds (~10-30 ms each, but a
#: python start makes hundreds: hello-bench imports 289 -> 58 requests, run 13.7 -> 8.7 s;
#: docs/benchmarks.md). Off for a layer built directly; the mounter passes
#: ``[blob] neighbour_span``, whose default is one IPFS block
DEFAULT_NEIGHBOUR_SPAN = 0
#: prefetch of the prioritized range: requests of at most this many bytes (the
#: reference's ``prefetch_chunk_size``), this many at once
DEFAULT_PREFETCH_SPAN = 1 << 20
DEFAULT_PREFETCH_CONCURRENCY = 4
#: on-demand reads longer than this are sent as concurrent range requests of about this
#: many bytes (0 = one request per coalesced run); see ``[blob] read_split_size``
DEFAULT_READ_SPLIT_SIZE = 0
#: while a foreground fetch is in flight the machine-wide activity stamp is refreshed this
#: often (seconds), so other layers see the activity even during one long request
HEARTBEAT = 0.5


class LayerIndexView(IndexView, Protocol):
    """What a lazy layer needs of an ``estargz.LayerIndex``."""

    compression: str
    blob_size: int
    prefetch_end: int

    def chunks(self, path: str) -> Sequence[Chunk]: ...


@dataclass
class LayerStatus(RequestCounts):
    """What ``ipfsnap snapshot status`` shows for one layer (the worker's status file)."""

    state: str = "starting"  # starting|prefetching|ready|complete|failed|unmounted
    mountpoint: str = ""
    layer: str = ""
    source: str = ""
    pid: int = 0
    #: blob size in bytes
    size: int = 0
    #: compressed bytes of all chunks / of the chunks verified in the cache
    chunk_bytes: int = 0
    cached_bytes: int = 0
    percent: float = 0.0
    #: bytes this worker read from the source (all requests)
    fetched_bytes: int = 0
    source_calls: int = 0
    #: runs of chunks fetched ahead of sequential readers
    readahead_runs: int = 0
    #: FUSE read requests served (reads the page cache answered never get here)
    read_requests: int = 0
    #: seconds background fetch waited for its turn (the request counts: RequestCounts)
    background_waited: float = 0.0
    #: prefetch: bytes of the prioritized range fetched, seconds it took
    prefetch_bytes: int = 0
    prefetch_seconds: float = 0.0
    entries: int = 0
    last_error: str = ""
    #: cache writes skipped because they failed (full disk ...), and cache entries this
    #: worker evicted (any layer's: the size limit is shared), since the worker started
    cache_write_failures: int = 0
    cache_evicted: int = 0
    updated: float = 0.0

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class LayerTables:
    """Everything a mounted layer keeps of its TOC: compact, picklable, index-free."""

    compression: str
    blob_size: int
    prefetch_end: int
    table: InodeTable
    chunk_table: ChunkTable

    @classmethod
    def from_index(cls, index: LayerIndexView) -> LayerTables:
        # as open_layer: building allocates ~2 objects per entry and frees none, so the
        # cyclic GC would rescan the growing heap for nothing (nothing here makes cycles)
        with _gc_paused():
            table = InodeTable.build(index)
            # inode paths are in the index's form: skip cleaning each
            chunks = index.chunk_lookup() if isinstance(index, LayerIndex) else index.chunks
            chunk_table = ChunkTable.from_files(
                (node.ino, chunks(node.path)) for node in table.inodes
                if node is not None and node.size > 0 and node.path
                and node.mode & _S_IFMT == _S_IFREG
            )
        return cls(index.compression, index.blob_size, index.prefetch_end, table, chunk_table)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class LazyLayer:
    def __init__(
        self,
        index: LayerIndexView | LayerTables,
        source: BlobSource,
        cache: ChunkCache,
        *,
        decompress: Decompressor,
        max_concurrency: int = 2,
        timeout: float = 300.0,
        max_span: int = DEFAULT_MAX_SPAN,
        readahead: int = DEFAULT_READAHEAD,
        neighbour_span: int = DEFAULT_NEIGHBOUR_SPAN,
        prefetch_span: int = DEFAULT_PREFETCH_SPAN,
        prefetch_concurrency: int = DEFAULT_PREFETCH_CONCURRENCY,
        read_split_size: int = DEFAULT_READ_SPLIT_SIZE,
        board: ActivityBoard | None = None,
        pacing: BackgroundPacing | None = None,
    ) -> None:
        # keep compact tables only: the caller may drop the (much larger) index
        tables = index if isinstance(index, LayerTables) else LayerTables.from_index(index)
        self.compression = tables.compression
        self.blob_size = tables.blob_size
        self.prefetch_end = tables.prefetch_end
        self.source = source
        self.cache = cache
        self.table = tables.table
        self.chunk_table = tables.chunk_table
        self.fetcher = ChunkFetcher(
            source, tables.compression, cache, decompress=decompress,
            max_concurrency=max_concurrency, timeout=timeout, max_span=max_span,
        )
        self.fetcher.on_fetched = self._fetched
        self.read_split_size = max(0, read_split_size)
        self.fetcher.split_size = self.read_split_size
        self.max_concurrency = max(1, max_concurrency)
        self.neighbour_span = neighbour_span
        self.prefetch_span = prefetch_span
        self.prefetch_concurrency = max(1, prefetch_concurrency)
        #: machine-wide coordination of background fetch (None: this layer alone)
        self.board = board
        self.gate: BackgroundGate | None = None
        if board is not None:
            self.fetcher.on_foreground = board.mark
            self.gate = BackgroundGate(board, pacing or BackgroundPacing(),
                                       local_busy=lambda: self.fetcher.foreground_active)
        self.prefetch_bytes = 0
        self.prefetch_seconds = 0.0
        self._file_chunks: dict[int, Sequence[Chunk]] = {}
        #: chunks fetched ahead of a sequential reader (0: none); needs :meth:`readahead_loop`
        self.readahead = readahead
        self._ra_send: trio.MemorySendChannel[list[Chunk]] | None = None
        self._ra_queued: set[str] = set()
        #: per inode, where the last read ended (sequential detection), recent files only
        self._last_end: dict[int, int] = {}
        self.readahead_runs = 0
        self.read_requests = 0
        # status accounting: compressed bytes of the distinct chunks, and of those cached
        on_disk = cache.digests()
        table = self.chunk_table
        with _gc_paused():
            # the distinct chunks in blob order (their rows in the chunk table), for
            # neighbour lookups and background planning; the first row of each digest
            self._order, firsts = table.distinct()
        self._order_offsets = table.offsets_of(self._order)
        self.chunk_bytes = table.extents(self._order)
        self._unique = len(self._order)
        self._have: set[str] = set()
        self.cached_bytes = 0
        for d in on_disk:
            row = firsts.get(digest_key(d))
            if row is not None:
                self._have.add(d)
                self.cached_bytes += table.extent(row)
        del firsts
        self.status = LayerStatus(
            size=tables.blob_size, source=source.name, entries=len(self.table),
            chunk_bytes=self.chunk_bytes,
        )

    # -- chunks ---------------------------------------------------------------------------
    def _regular_files(self) -> Iterable[Inode]:
        for node in self.table.inodes:
            if node is not None and node.is_reg and node.size > 0 and node.path:
                yield node

    def chunks_of(self, node: Inode) -> Sequence[Chunk]:
        chunks = self._file_chunks.get(node.ino)
        if chunks is None:
            chunks = self.chunk_table.of(node.ino)
            # keep the lists of recently read files only
            if len(self._file_chunks) >= 1024:
                self._file_chunks.pop(next(iter(self._file_chunks)))
            self._file_chunks[node.ino] = chunks
        return chunks

    def _fetched(self, chunk: Chunk) -> None:
        d = chunk.chunk_digest
        if d not in self._have:
            self._have.add(d)
            self.cached_bytes += chunk.end - chunk.offset

    @property
    def complete(self) -> bool:
        return len(self._have) >= self._unique

    # -- reads ----------------------------------------------------------------------------
    async def read(self, node: Inode, offset: int, size: int) -> bytes:
        self.read_requests += 1
        if self.board is not None:
            self.board.mark()
        if offset >= node.size or size <= 0:
            return b""
        end = min(node.size, offset + size)
        chunks = self.chunks_of(node)
        needed = chunks_for_range(chunks, offset, end)
        if self._ra_send is not None and needed:
            self._read_ahead(node, chunks, needed[-1], offset, end)
        extra = self.neighbours(needed) if self.neighbour_span > 0 else []
        datas = await self.fetcher.get(needed, extra=extra)
        out = bytearray()
        for c, data in zip(needed, datas, strict=True):
            lo = max(offset, c.chunk_offset) - c.chunk_offset
            hi = min(end, c.chunk_offset + c.chunk_size) - c.chunk_offset
            out += data[lo:hi]
        if len(out) != end - offset:
            raise FormatError(
                f"layer file {node.path!r}: chunks cover {len(out)} of the {end - offset} "
                f"bytes at offset {offset}"
            )
        return bytes(out)

    def _fetchable(self, c: Chunk) -> bool:
        d = c.chunk_digest
        return d not in self._have and not self.fetcher.busy(d)

    def neighbours(self, needed: Sequence[Chunk]) -> list[Chunk]:
        """Uncached chunks next to the missing ones of ``needed`` in the blob, contiguous
        with them and inside the aligned ``neighbour_span`` windows they touch.

        Only for a read whose missing chunks form one contiguous run (the small-file case);
        a cached or in-flight chunk ends the walk, so everything stays one request."""
        missing = [c for c in needed if self._fetchable(c)]
        if not missing or len(coalesce(missing, self.fetcher.max_span)) != 1:
            return []
        span = self.neighbour_span
        lo = min(c.offset for c in missing)
        hi = max(c.end for c in missing)
        wlo = lo // span * span
        whi = -(-hi // span) * span
        seen = {c.chunk_digest for c in missing}
        out: list[Chunk] = []
        # left: chunks ending where the run starts
        j = bisect.bisect_left(self._order_offsets, lo) - 1
        edge = lo
        while j >= 0:
            c = self.chunk_table.chunk(self._order[j])
            if c.offset < wlo or c.end < edge or not self._fetchable(c):
                break
            if c.chunk_digest not in seen:
                seen.add(c.chunk_digest)
                out.append(c)
            edge = c.offset
            j -= 1
        # right: chunks starting where the run ends
        j = bisect.bisect_left(self._order_offsets, hi)
        edge = hi
        while j < len(self._order_offsets):
            c = self.chunk_table.chunk(self._order[j])
            if c.offset > edge or c.end > whi or not self._fetchable(c):
                break
            if c.chunk_digest not in seen:
                seen.add(c.chunk_digest)
                out.append(c)
            edge = max(edge, c.end)
            j += 1
        return out

    def _read_ahead(self, node: Inode, chunks: Sequence[Chunk], last: Chunk, offset: int,
                    end: int) -> None:
        """Queue the ``readahead`` chunks after ``last`` when ``node`` is read sequentially.

        Without it a sequential cold read waits for one chunk fetch per chunk, with the
        source idle while the reader consumes each chunk; fetching the next ones meanwhile
        overlaps both (the kernel's own readahead stays within the current chunk: it asks for
        at most a few 128 KiB requests past the reader)."""
        prev = self._last_end.pop(node.ino, None)
        if len(self._last_end) >= 1024:
            self._last_end.pop(next(iter(self._last_end)))
        self._last_end[node.ino] = end
        # the kernel splits one read(2) into 128 KiB requests served concurrently, so
        # "sequential" allows for requests arriving a little out of order
        if offset != 0 and (prev is None or abs(offset - prev) > READAHEAD_SLACK):
            return
        i = bisect.bisect_right(chunks, last.chunk_offset, key=lambda c: c.chunk_offset)
        run: list[Chunk] = []
        for c in chunks[i : i + self.readahead]:
            d = c.chunk_digest
            if d in self._ra_queued or self.fetcher.busy(d) or \
                    self.cache.get_memory(d) is not None:
                continue
            run.append(c)
        if not run or self._ra_send is None:
            return
        try:
            self._ra_send.send_nowait(run)
        except trio.WouldBlock:
            return  # enough already queued: the reader will fetch on demand
        self._ra_queued.update(c.chunk_digest for c in run)

    async def readahead_loop(self) -> None:
        """Serve the read-ahead queue (one run at a time, so at most one source request
        beyond the foreground ones) until cancelled."""
        if self.readahead <= 0:
            return
        send, recv = trio.open_memory_channel[list[Chunk]](READAHEAD_QUEUE)
        self._ra_send = send
        try:
            async for run in recv:
                try:
                    await self.fetcher.get(run)
                    self.readahead_runs += 1
                except IpfsnapError as exc:
                    # a foreground read of these chunks fetches them again and reports
                    log.debug("%s: read-ahead of %d chunks: %s", self.source.name, len(run),
                              exc)
                finally:
                    self._ra_queued.difference_update(c.chunk_digest for c in run)
                self.update_status()
        finally:
            self._ra_send = None
            self._ra_queued.clear()

    # -- prefetch and background ----------------------------------------------------------
    def _chunks_in_blob_order(self, limit: int | None = None) -> list[Chunk]:
        n = len(self._order_offsets) if limit is None else \
            bisect.bisect_left(self._order_offsets, limit)
        chunk = self.chunk_table.chunk
        return [chunk(row) for row in self._order[:n]]

    def _todo(self, end: int, background: bool) -> list[Chunk]:
        todo = [c for c in self._chunks_in_blob_order(end) if c.chunk_digest not in self._have]
        limit = self.cache.max_entry
        if background and limit is not None:
            # a chunk the cache may not keep is fetched on demand only, never in background
            todo = [c for c in todo if c.chunk_size <= limit]
        return todo

    async def fetch_range(self, end: int, *, background: bool,
                          pause: Callable[[], object] | None = None) -> bool:
        """Fetch every chunk starting before blob offset ``end`` that is not cached.

        In background, stops before a request the cache has no room for (size limit nearly
        reached, or a write failed recently: see ``ChunkCache.background_room``) and returns
        False; True when every chunk was fetched."""
        todo = self._todo(end, background)
        span = min(BACKGROUND_SPAN, self.fetcher.max_span) if background else \
            self.fetcher.max_span
        for run in coalesce(todo, span):
            if not background:
                await self.fetcher.get(run)
                self.update_status()
                continue
            await self.fetcher.wait_foreground_idle()
            room = sum(c.chunk_size for c in run)
            if not await trio.to_thread.run_sync(self.cache.background_room, room):
                return False
            if self.gate is None:
                await self.fetcher.get(run, background=True)
            else:
                async with self.gate.turn():
                    # foreground reads may have fetched some of these while we waited
                    run = [c for c in run if c.chunk_digest not in self._have]
                    if run:
                        await self.fetcher.get(run, background=True)
            self.update_status()
        return True

    async def prefetch(self, end: int, timeout: float) -> bool:
        """Fetch the prioritized range (the chunks starting before blob offset ``end``) in
        requests of at most ``prefetch_span`` bytes (a bigger chunk as concurrent pieces of
        that size), ``prefetch_concurrency`` at once;
        False (logged) if it did not finish in ``timeout`` seconds. Raises the first
        fetch error after the other requests have finished."""
        if end <= 0:
            return True
        todo = self._todo(end, background=False)
        runs = coalesce(todo, self.prefetch_span or self.fetcher.max_span)
        errors: list[IpfsnapError] = []
        before = self.fetcher.stats.foreground_bytes
        t0 = time.monotonic()
        # the mount is not up yet: no reader competes, so the prefetch may use more
        # connections than reads do later
        self.fetcher.set_concurrency(max(self.max_concurrency, self.prefetch_concurrency))
        self.fetcher.split_size = self.prefetch_span

        slots = trio.Semaphore(self.prefetch_concurrency)

        async def one(run: list[Chunk]) -> None:
            try:
                await self.fetcher.get(run)
            except IpfsnapError as exc:
                errors.append(exc)
            finally:
                slots.release()
            self.update_status()

        try:
            with trio.move_on_after(timeout if timeout > 0 else float("inf")) as scope:
                async with trio.open_nursery() as nursery:
                    for run in runs:
                        await slots.acquire()
                        nursery.start_soon(one, run)
        finally:
            self.fetcher.set_concurrency(self.max_concurrency)
            self.fetcher.split_size = self.read_split_size
            self.prefetch_bytes += self.fetcher.stats.foreground_bytes - before
            self.prefetch_seconds += time.monotonic() - t0
        log.info("%s: prefetched %d bytes of the prioritized range in %d requests, %.2f s",
                 self.source.name, self.prefetch_bytes, len(runs), self.prefetch_seconds)
        if scope.cancelled_caught:
            log.warning("%s: prefetch of %d bytes did not finish in %gs; continuing lazily",
                        self.source.name, end, timeout)
            return False
        if errors:
            raise errors[0]
        return True

    async def activity_loop(self) -> None:
        """Refresh the machine-wide activity stamp while a foreground fetch is in flight
        (until cancelled); a no-op without a board."""
        if self.board is None:
            return
        while True:
            await trio.sleep(HEARTBEAT)
            if self.fetcher.foreground_active:
                self.board.mark()

    async def background_fetch(self, retry_delay: float = 5.0, max_delay: float = 300.0,
                               pause_delay: float = 30.0) -> None:
        """Fetch everything not cached yet, yielding to foreground reads. Failed ranges are
        retried after ``retry_delay`` seconds, doubling up to ``max_delay``, until the layer
        is complete (a daemon that comes back is used again).

        When the cache has no room (size limit: it is at ``BACKGROUND_FILL`` of its limit;
        or a cache write failed, e.g. a full disk) it checks again every ``pause_delay``
        seconds. Each chunk is fetched in background at most once while cached: evicted
        chunks are not fetched again (they would only evict others)."""
        end = self.blob_size + 1
        delay = retry_delay
        paused = False
        while self._todo(end, background=True):
            try:
                done = await self.fetch_range(end, background=True)
            except IpfsnapError as exc:
                self.status.last_error = str(exc)
                log.warning("%s: background fetch: %s (retrying in %gs)",
                            self.source.name, exc, delay)
                await trio.sleep(delay)
                delay = min(max_delay, delay * 2)
                continue
            delay = retry_delay
            if done:
                paused = False
                continue  # chunks not stored by a failed write are still to do
            if not paused:
                why = self.cache.last_write_error if self.cache.write_failures else \
                    "cache size limit nearly reached"
                log.info("%s: background fetch paused: %s", self.source.name, why)
                self.status.last_error = f"background fetch paused: {why}"
            paused = True
            await trio.sleep(pause_delay)
        self.update_status()
        if self.complete:
            log.info("%s: all %d bytes of chunks cached", self.source.name, self.chunk_bytes)
        else:
            log.info("%s: background fetch done; chunks larger than the cache may keep are "
                     "fetched on demand only", self.source.name)

    # -- status ---------------------------------------------------------------------------
    def update_status(self) -> LayerStatus:
        st = self.status
        st.chunk_bytes = self.chunk_bytes
        st.cached_bytes = self.cached_bytes
        st.percent = round(100.0 * self.cached_bytes / self.chunk_bytes, 1) if self.chunk_bytes \
            else 100.0
        st.fetched_bytes = self.fetcher.stats.fetched_bytes
        st.source_calls = self.fetcher.stats.source_calls
        st.readahead_runs = self.readahead_runs
        st.read_requests = self.read_requests
        fs = self.fetcher.stats
        for f in fields(RequestCounts):
            value = getattr(fs, f.name)
            setattr(st, f.name, round(value, 3) if isinstance(value, float) else value)
        st.background_waited = round(self.gate.waited, 1) if self.gate is not None else 0.0
        st.prefetch_bytes = self.prefetch_bytes
        st.prefetch_seconds = round(self.prefetch_seconds, 3)
        if self.fetcher.stats.last_error:
            st.last_error = self.fetcher.stats.last_error
        st.cache_write_failures = self.cache.write_failures
        st.cache_evicted = self.cache.account.evicted if self.cache.account else 0
        if st.state == "ready" and self.complete:
            st.state = "complete"
        st.updated = time.time()
        return st


def chunks_for_range(chunks: Sequence[Chunk], start: int, end: int) -> list[Chunk]:
    """The chunks (sorted by ``chunk_offset``) overlapping file bytes ``[start, end)``."""
    lo, hi = 0, len(chunks)
    while lo < hi:  # last chunk with chunk_offset <= start
        mid = (lo + hi) // 2
        if chunks[mid].chunk_offset <= start:
            lo = mid + 1
        else:
            hi = mid
    i = max(0, lo - 1)
    out: list[Chunk] = []
    while i < len(chunks) and chunks[i].chunk_offset < end:
        c = chunks[i]
        if c.chunk_offset + c.chunk_size > start:
            out.append(c)
        i += 1
    return out
