"""Fetch, verify and cache chunks of one layer blob (trio).

- Only the chunks a read needs are fetched; adjacent missing chunks are coalesced into one
  source request of at most ``max_span`` bytes (one ``cat`` instead of many round trips).
- One fetch per chunk is ever in flight: a second reader of the same chunk waits for the
  first one's result (keyed by chunk digest, which also names the cache entry).
- Every chunk goes through ``estargz.decompress_chunk``, which checks ``chunkDigest``,
  before it is cached or served; a mismatch is an error, never data.
- Foreground reads take priority: :meth:`wait_foreground_idle` lets the background fetcher
  pause while any foreground read of this layer is waiting, and :class:`BackgroundGate`
  (over an :class:`ActivityBoard` shared by every layer worker of a state dir) holds every
  layer's background requests until no layer has served a foreground read for
  ``silence_period`` seconds, runs one background request at a time machine-wide, and
  leaves at least ``fetch_period`` seconds between two of them.
- A foreground request may carry ``extra`` chunks (neighbours in the blob, chosen by the
  layer): they are fetched, verified and cached with the request but never fail it.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from ipfsnap.errors import IpfsnapError
from ipfsnap.estargz.types import Chunk
from ipfsnap.fs.cache import ChunkCache
from ipfsnap.fs.errors import FetchError, FetchTimeout
from ipfsnap.fs.source import BlobSource

log = logging.getLogger(__name__)

#: default bound of one coalesced request: two default-size (4 MiB) eStargz chunks; big
#: enough to amortise a round trip, small enough that one read never waits on a huge range
DEFAULT_MAX_SPAN = 8 << 20
#: the leaf size of a blob added with ``ipfs add``'s default fixed-size chunker (what
#: ipfs-push uses): the unit bitswap moves
IPFS_BLOCK = 256 << 10

Decompressor = Callable[[str, bytes, Chunk], bytes]


@dataclass
class RequestCounts:
    """Where a layer's requests went (fetcher stats, and the status file shows them)."""

    #: foreground requests (reads and prefetch), their bytes, and the seconds they took
    #: (summed, and the longest): where a cold start waits
    foreground_calls: int = 0
    foreground_bytes: int = 0
    foreground_seconds: float = 0.0
    foreground_max_seconds: float = 0.0
    #: background requests and their bytes
    background_calls: int = 0
    background_bytes: int = 0
    #: neighbour chunks fetched with foreground reads (see ``ChunkFetcher.get``'s extra)
    neighbour_chunks: int = 0


@dataclass
class FetchStats(RequestCounts):
    #: compressed bytes read from the source
    fetched_bytes: int = 0
    #: requests sent to the source
    source_calls: int = 0
    #: chunks verified and cached
    chunks_fetched: int = 0
    #: chunks served from the disk cache
    cache_hits: int = 0
    last_error: str = ""


class _Pending:
    __slots__ = ("data", "error", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None

    def resolve(self, data: bytes | None, error: BaseException | None = None) -> None:
        if self.event.is_set():
            return
        self.data = data
        self.error = error
        self.event.set()

#: file names in the activity directory (shared by every layer worker of one state dir);
#: dot-names so that a scan of the cache root for layer directories skips them
FOREGROUND_STAMP = ".foreground"
BACKGROUND_LOCK = ".background.lock"
#: a worker refreshes the foreground stamp at most this often (seconds): one utime per
#: 100 ms of reading at most, 50x finer than the default silence period
MARK_INTERVAL = 0.1
#: how often a background fetcher that lost the race for the machine-wide slot retries
SLOT_POLL = 0.05


class ActivityBoard:
    """Machine-wide foreground activity and background slot, as files in ``directory``.

    - ``.foreground``: its mtime is the last time any worker served a foreground read
      (:meth:`mark`). Files, not sockets: every worker and the mounter only touch it, no
      process has to be up for the others to work, and a crashed worker leaves nothing
      held.
    - ``.background.lock``: a background request holds an exclusive ``flock`` of it while it
      runs (:meth:`try_acquire`), so one runs at a time across processes; its mtime is when
      the last one ended (:meth:`release`). The kernel drops the lock of a dead process.

    Every method is a few syscalls on a local directory (microseconds): called directly
    from the trio loop. ``clock`` is wall-clock seconds (mtimes are wall clock)."""

    def __init__(self, directory: Path, *, clock: Callable[[], float] = time.time,
                 mark_interval: float = MARK_INTERVAL) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.mark_interval = mark_interval
        self._foreground = directory / FOREGROUND_STAMP
        self._background = directory / BACKGROUND_LOCK
        self._marked = -math.inf
        self._fd = -1

    def _stamp(self, path: Path, when: float) -> None:
        try:
            os.utime(path, (when, when))
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
                os.utime(path, (when, when))
        except OSError as exc:
            log.debug("activity stamp %s: %s", path, exc)

    def _mtime(self, path: Path) -> float:
        try:
            return os.stat(path).st_mtime
        except OSError:
            return -math.inf

    def mark(self) -> None:
        """Record foreground activity now (rate limited to one write per mark_interval)."""
        now = self.clock()
        if now - self._marked < self.mark_interval:
            return
        self._marked = now
        self._stamp(self._foreground, now)

    def last_foreground(self) -> float:
        return self._mtime(self._foreground)

    def last_background(self) -> float:
        return self._mtime(self._background)

    def try_acquire(self) -> bool:
        """Take the machine-wide background slot if free (never blocks)."""
        if self._fd >= 0:
            return False
        try:
            fd = os.open(self._background, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = os.open(self._background, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            # a new file's mtime would read as "a background request just ended"
            os.utime(fd, (0, 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self, ended: float | None = None) -> None:
        """Give the slot back; ``ended`` (a background request ended then) starts the
        fetch period, None (nothing was fetched) does not."""
        if self._fd < 0:
            return
        try:
            if ended is not None:
                self._stamp(self._background, ended)
        finally:
            os.close(self._fd)  # releases the flock
            self._fd = -1


@dataclass
class BackgroundPacing:
    """``[background_fetch]`` in seconds (see docs/configuration.md)."""

    #: no background request starts until no foreground read happened for this long
    silence_period: float = 5.0
    #: at least this long between the end of one background request and the next (any layer)
    fetch_period: float = 0.25


class BackgroundGate:
    """When a background request may run: after ``silence_period`` without foreground
    activity on any layer (the board) or this one (``local_busy``), at least
    ``fetch_period`` after the previous background request ended (any layer), and only
    while holding the machine-wide slot."""

    def __init__(self, board: ActivityBoard, pacing: BackgroundPacing, *,
                 local_busy: Callable[[], bool] = lambda: False,
                 sleep: Callable[[float], Awaitable[object]] = trio.sleep) -> None:
        self.board = board
        self.pacing = pacing
        self.local_busy = local_busy
        self._sleep = sleep
        #: seconds spent waiting for a turn, and turns taken (status, tests)
        self.waited = 0.0
        self.turns = 0

    def delay(self) -> float:
        """Seconds to wait before a background request may start (0: now)."""
        now = self.board.clock()
        if self.local_busy():
            return max(self.pacing.silence_period, SLOT_POLL)
        quiet = now - self.board.last_foreground()
        since = now - self.board.last_background()
        return max(0.0, self.pacing.silence_period - quiet, self.pacing.fetch_period - since)

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait for a turn and hold the slot for one background request."""
        while True:
            wait = self.delay()
            if wait > 0:
                self.waited += wait
                await self._sleep(wait)
                continue
            if not self.board.try_acquire():
                self.waited += SLOT_POLL
                await self._sleep(SLOT_POLL)
                continue
            if self.delay() > 0:  # a foreground read came between the check and the lock
                self.board.release(None)
                continue
            break
        self.turns += 1
        try:
            yield
        finally:
            self.board.release(self.board.clock())


def coalesce(chunks: Sequence[Chunk], max_span: int) -> list[list[Chunk]]:
    """Group chunks (any order) into runs contiguous in the blob, each spanning <= max_span.

    A chunk larger than ``max_span`` forms its own run. Overlapping extents (two chunks in
    one compressed member) are contiguous too.
    """
    ordered = sorted(chunks, key=lambda c: (c.offset, c.end))
    runs: list[list[Chunk]] = []
    start = end = 0
    for c in ordered:
        if runs and c.offset <= end and max(end, c.end) - start <= max_span:
            runs[-1].append(c)
            end = max(end, c.end)
        else:
            runs.append([c])
            start, end = c.offset, c.end
    return runs


def split_points(offset: int, length: int, piece: int) -> list[int]:
    """Where ``[offset, offset + length)`` is cut into pieces: the range's ends and every
    multiple of ``piece`` inside it (``piece`` rounded up to whole IPFS blocks when it is
    larger than one).

    Cutting on a fixed grid in the blob rather than every ``piece`` bytes from ``offset``
    keeps the cuts on IPFS block boundaries (``ipfs add`` cuts a blob into leaves of
    ``IPFS_BLOCK`` bytes), so no two pieces need the same block; a piece at either end of
    the range may be shorter."""
    grid = piece if piece <= IPFS_BLOCK else -(-piece // IPFS_BLOCK) * IPFS_BLOCK
    end = offset + length
    first = (offset // grid + 1) * grid
    return [offset, *range(first, end, grid), end]


class ChunkFetcher:
    def __init__(
        self,
        source: BlobSource,
        compression: str,
        cache: ChunkCache,
        *,
        decompress: Decompressor,
        max_concurrency: int = 2,
        timeout: float = 300.0,
        max_span: int = DEFAULT_MAX_SPAN,
    ) -> None:
        self.source = source
        self.compression = compression
        self.cache = cache
        self._decompress = decompress
        self._limiter = trio.CapacityLimiter(max(1, max_concurrency))
        self.timeout = timeout
        self.max_span = max_span
        self._inflight: dict[str, _Pending] = {}
        self._foreground = 0
        self._idle = trio.Event()
        self._idle.set()
        self.stats = FetchStats()
        #: called with each chunk newly verified and cached (status accounting)
        self.on_fetched: Callable[[Chunk], None] | None = None
        #: called when a foreground request starts and ends (machine-wide activity stamp)
        self.on_foreground: Callable[[], None] | None = None
        #: > 0: a foreground request longer than this is sent as concurrent pieces of about
        #: this size (each takes a concurrency slot), cut on multiples of it in the blob;
        #: the prefetch sets it (a 4 MiB chunk cannot be split into smaller runs, but its
        #: bytes can be fetched in parallel ranges), ``[blob] read_split_size`` sets it for
        #: on-demand reads
        self.split_size = 0
        #: set while the layer is mounted (the worker's nursery ``start_soon``): chunks that
        #: came only as neighbours of a request are decompressed, verified and cached after
        #: the requested ones are answered, in a task of their own. A 256 KiB window can
        #: hold hundreds of tiny files (/usr/share/zoneinfo): storing them all first made a
        #: 114-byte read wait 0.26 s after its fetch (docs/benchmarks.md, hello-bench).
        #: None: stored before the call returns (prefetch, tests)
        self.spawn: Callable[[Callable[[], Awaitable[None]]], None] | None = None

    # -- priority -------------------------------------------------------------------------
    async def wait_foreground_idle(self) -> None:
        """Return once no foreground read is waiting for chunks."""
        while self._foreground:
            await self._idle.wait()

    @property
    def foreground_active(self) -> bool:
        """Whether a foreground read is waiting for chunks."""
        return self._foreground > 0

    def set_concurrency(self, n: int) -> None:
        """Allow ``n`` source requests at once from now on."""
        self._limiter.total_tokens = max(1, n)

    def busy(self, digest: str) -> bool:
        """Whether a fetch of chunk ``digest`` is in flight."""
        return digest in self._inflight

    # -- public ---------------------------------------------------------------------------
    async def get(self, chunks: Sequence[Chunk], *, background: bool = False,
                  extra: Sequence[Chunk] = ()) -> list[bytes]:
        """The verified uncompressed bytes of each chunk, in order; raises on any failure.

        ``extra`` chunks (not cached, not being fetched: the caller checks) ride along in
        the same requests when they are contiguous with the missing ones; they are cached
        but neither returned nor allowed to fail the call."""
        if not background:
            self._foreground += 1
            if self._foreground == 1:
                self._idle = trio.Event()
        try:
            return await self._get(chunks, background, extra)
        finally:
            if not background:
                self._foreground -= 1
                if self._foreground == 0:
                    self._idle.set()

    async def _get(self, chunks: Sequence[Chunk], background: bool,
                   extra: Sequence[Chunk] = ()) -> list[bytes]:
        results: dict[str, bytes] = {}
        waiting: dict[str, _Pending] = {}
        mine: dict[str, tuple[Chunk, _Pending]] = {}
        for c in chunks:
            d = c.chunk_digest
            if d in results or d in waiting or d in mine:
                continue
            data = self.cache.get_memory(d)
            if data is not None:
                results[d] = data
            elif d in self._inflight:
                waiting[d] = self._inflight[d]
            else:
                pending = _Pending()
                self._inflight[d] = pending
                mine[d] = (c, pending)
        requested = set(mine)
        if mine:
            try:
                await self._load(mine, background, requested, extra)
            finally:
                self._release(mine)
            waiting.update({d: p for d, (_, p) in mine.items() if d in requested})
        for d, pending in waiting.items():
            await pending.event.wait()
            if pending.error is not None:
                raise pending.error
            assert pending.data is not None
            results[d] = pending.data
        return [results[c.chunk_digest] for c in chunks]

    async def _load(self, mine: dict[str, tuple[Chunk, _Pending]], background: bool,
                    requested: set[str], extra: Sequence[Chunk] = ()) -> None:
        digests = list(mine)

        def from_disk() -> list[bytes | None]:
            return [self.cache.get(d) for d in digests]

        missing: list[Chunk] = []
        for d, data in zip(digests, await trio.to_thread.run_sync(from_disk), strict=True):
            if data is not None:
                self.stats.cache_hits += 1
                mine[d][1].resolve(data)
            else:
                missing.append(mine[d][0])
        if not missing:
            return
        # extras are claimed now (no await until the runs are chosen), and only those in a
        # run with a requested chunk are kept: an extra never costs a request of its own
        claimed: set[str] = set()
        for c in extra:
            d = c.chunk_digest
            if d in mine or d in self._inflight or self.cache.get_memory(d) is not None:
                continue
            mine[d] = (c, _Pending())
            self._inflight[d] = mine[d][1]
            claimed.add(d)
            missing.append(c)
        runs = coalesce(missing, self.max_span)
        if claimed:
            kept = []
            for run in runs:
                if any(c.chunk_digest in requested for c in run):
                    kept.append(run)
                    continue
                for c in run:
                    d = c.chunk_digest
                    del self._inflight[d]
                    del mine[d]
            runs = kept
        async with trio.open_nursery() as nursery:
            for run in runs:
                nursery.start_soon(self._fetch_run, run, mine, background, requested)

    async def _fetch_run(
        self, run: list[Chunk], mine: dict[str, tuple[Chunk, _Pending]], background: bool,
        requested: set[str],
    ) -> None:
        start = run[0].offset
        end = max(c.end for c in run)
        try:
            blob = await self._read_split(start, end - start, background)
        except IpfsnapError as exc:
            self.stats.last_error = str(exc)
            log.debug("%s", exc)
            for c in run:
                mine[c.chunk_digest][1].resolve(None, exc)
            return

        wanted = [c for c in run if c.chunk_digest in requested]
        others = [c for c in run if c.chunk_digest not in requested]
        await self._store(wanted, blob, start, mine, background, requested)
        if not others:
            return
        if self.spawn is None:
            await self._store(others, blob, start, mine, background, requested)
            return
        # the neighbours' waiters move to a task of their own: this call (and the read
        # waiting on it) ends now
        owned = {c.chunk_digest: mine.pop(c.chunk_digest) for c in others}
        self.spawn(partial(self._store_later, others, blob, start, owned, background,
                           requested))

    async def _store_later(self, chunks: list[Chunk], blob: bytes, start: int,
                           owned: dict[str, tuple[Chunk, _Pending]], background: bool,
                           requested: set[str]) -> None:
        try:
            await self._store(chunks, blob, start, owned, background, requested)
        except Exception:  # in the worker's nursery it would end the mount
            # only chunks nobody asked for are lost; their waiters get the error below
            log.exception("%s: storing %d neighbour chunks failed", self.source.name,
                          len(chunks))
        finally:
            self._release(owned)

    def _release(self, table: dict[str, tuple[Chunk, _Pending]]) -> None:
        """Fail the waiters of ``table``'s chunks still unanswered (a fetch that ended
        without them) and forget the fetches: a later read fetches them again."""
        for d, (_, pending) in table.items():
            pending.resolve(None, FetchError(f"{self.source.name}: fetch of {d} aborted"))
            if self._inflight.get(d) is pending:
                del self._inflight[d]

    async def _store(self, chunks: list[Chunk], blob: bytes, start: int,
                     mine: dict[str, tuple[Chunk, _Pending]], background: bool,
                     requested: set[str]) -> None:
        """Decompress and verify ``chunks`` (their bytes in ``blob``, which starts at blob
        offset ``start``), cache them and answer their waiters."""

        def verify_and_store() -> list[tuple[Chunk, bytes | None, IpfsnapError | None, bool]]:
            out: list[tuple[Chunk, bytes | None, IpfsnapError | None, bool]] = []
            for c in chunks:
                try:
                    data = self._decompress(
                        self.compression, blob[c.offset - start : c.end - start], c
                    )
                except IpfsnapError as exc:
                    out.append((c, None, exc, False))
                    continue
                # neighbours stay out of the RAM LRU (a few entries): they must not push
                # out the chunks readers are in
                stored = self.cache.put(c.chunk_digest, data,
                                        remember=not background and c.chunk_digest in requested)
                out.append((c, data, None, stored))
            return out

        for c, data, error, stored in await trio.to_thread.run_sync(verify_and_store):
            if error is not None:
                self.stats.last_error = str(error)
                log.debug("%s: chunk %s at blob offset %d: %s",
                          self.source.name, c.chunk_digest, c.offset, error)
            else:
                self.stats.chunks_fetched += 1
                if c.chunk_digest not in requested:
                    self.stats.neighbour_chunks += 1
                # a chunk served but not cached (full disk, over the size limit) is not
                # "fetched" for status and background planning: it will be fetched again
                if self.on_fetched is not None and stored:
                    self.on_fetched(c)
            mine[c.chunk_digest][1].resolve(data, error)

    async def _read_split(self, offset: int, length: int, background: bool) -> bytes:
        """One range, as concurrent pieces of ``split_size`` bytes when that is set."""
        piece = self.split_size
        if background or piece <= 0 or length <= piece:
            return await self._read(offset, length, background)
        cuts = split_points(offset, length, piece)
        parts: dict[int, bytes] = {}
        errors: list[IpfsnapError] = []

        async def one(at: int, n: int) -> None:
            try:
                parts[at] = await self._read(at, n)
            except IpfsnapError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for at, end in itertools.pairwise(cuts):
                nursery.start_soon(one, at, end - at)
        if errors:
            raise errors[0]
        return b"".join(parts[at] for at in sorted(parts))

    async def _read(self, offset: int, length: int, background: bool = False) -> bytes:
        """One source request, bounded by ``timeout`` (the thread is abandoned on timeout;
        the IPFS client's own per-call timeout ends it later). The deadline runs from the
        call, so a read queued behind ``max_concurrency`` stalled requests fails in time too."""
        timeout = self.timeout if self.timeout > 0 else math.inf
        deadline = trio.current_time() + timeout
        async with self._limiter:
            self.stats.source_calls += 1
            if not background and self.on_foreground is not None:
                self.on_foreground()
            t0 = time.monotonic()
            try:
                with trio.fail_at(deadline):
                    data = await trio.to_thread.run_sync(
                        self.source.read_at, offset, length, abandon_on_cancel=True
                    )
            except trio.TooSlowError:
                raise FetchTimeout(
                    f"{self.source.name}: reading {length} bytes at offset {offset} took "
                    f"longer than {timeout:g}s"
                ) from None
            finally:
                took = time.monotonic() - t0
                # foreground requests are what a cold start waits for: one line each (a
                # network round trip of tens of ms at least, so a line costs nothing)
                log.log(logging.DEBUG if background else logging.INFO,
                        "%s: %s request of %d bytes at offset %d took %.3f s",
                        self.source.name, "background" if background else "foreground",
                        length, offset, took)
                if background:
                    self.stats.background_calls += 1
                else:
                    self.stats.foreground_calls += 1
                    self.stats.foreground_seconds += took
                    self.stats.foreground_max_seconds = max(
                        self.stats.foreground_max_seconds, took)
                    if self.on_foreground is not None:
                        self.on_foreground()
        self.stats.fetched_bytes += len(data)
        if background:
            self.stats.background_bytes += len(data)
        else:
            self.stats.foreground_bytes += len(data)
        return data
