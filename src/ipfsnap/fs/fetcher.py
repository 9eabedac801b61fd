"""Fetch, verify and cache chunks of one layer blob (trio).

- Only the chunks a read needs are fetched; adjacent missing chunks are coalesced into one
  source request of at most ``max_span`` bytes (one ``cat`` instead of many round trips).
- One fetch per chunk is ever in flight: a second reader of the same chunk waits for the
  first one's result (keyed by chunk digest, which also names the cache entry).
- Every chunk goes through ``estargz.decompress_chunk``, which checks ``chunkDigest``,
  before it is cached or served; a mismatch is an error, never data.
- Foreground reads take priority: :meth:`wait_foreground_idle` lets the background fetcher
  pause while any foreground read is waiting.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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

Decompressor = Callable[[str, bytes, Chunk], bytes]


@dataclass
class FetchStats:
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

    # -- priority -------------------------------------------------------------------------
    async def wait_foreground_idle(self) -> None:
        """Return once no foreground read is waiting for chunks."""
        while self._foreground:
            await self._idle.wait()

    def busy(self, digest: str) -> bool:
        """Whether a fetch of chunk ``digest`` is in flight."""
        return digest in self._inflight

    # -- public ---------------------------------------------------------------------------
    async def get(self, chunks: Sequence[Chunk], *, background: bool = False) -> list[bytes]:
        """The verified uncompressed bytes of each chunk, in order; raises on any failure."""
        if not background:
            self._foreground += 1
            if self._foreground == 1:
                self._idle = trio.Event()
        try:
            return await self._get(chunks, background)
        finally:
            if not background:
                self._foreground -= 1
                if self._foreground == 0:
                    self._idle.set()

    async def _get(self, chunks: Sequence[Chunk], background: bool) -> list[bytes]:
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
        if mine:
            try:
                await self._load(mine, background)
            finally:
                for d, (_, pending) in mine.items():
                    pending.resolve(None, FetchError(f"{self.source.name}: fetch of {d} aborted"))
                    if self._inflight.get(d) is pending:
                        del self._inflight[d]
            waiting.update({d: p for d, (_, p) in mine.items()})
        for d, pending in waiting.items():
            await pending.event.wait()
            if pending.error is not None:
                raise pending.error
            assert pending.data is not None
            results[d] = pending.data
        return [results[c.chunk_digest] for c in chunks]

    async def _load(self, mine: dict[str, tuple[Chunk, _Pending]], background: bool) -> None:
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
        async with trio.open_nursery() as nursery:
            for run in coalesce(missing, self.max_span):
                nursery.start_soon(self._fetch_run, run, mine, background)

    async def _fetch_run(
        self, run: list[Chunk], mine: dict[str, tuple[Chunk, _Pending]], background: bool
    ) -> None:
        start = run[0].offset
        end = max(c.end for c in run)
        try:
            blob = await self._read(start, end - start)
        except IpfsnapError as exc:
            self.stats.last_error = str(exc)
            log.debug("%s", exc)
            for c in run:
                mine[c.chunk_digest][1].resolve(None, exc)
            return

        def verify_and_store() -> list[tuple[Chunk, bytes | None, IpfsnapError | None, bool]]:
            out: list[tuple[Chunk, bytes | None, IpfsnapError | None, bool]] = []
            for c in run:
                try:
                    data = self._decompress(
                        self.compression, blob[c.offset - start : c.end - start], c
                    )
                except IpfsnapError as exc:
                    out.append((c, None, exc, False))
                    continue
                stored = self.cache.put(c.chunk_digest, data, remember=not background)
                out.append((c, data, None, stored))
            return out

        for c, data, error, stored in await trio.to_thread.run_sync(verify_and_store):
            if error is not None:
                self.stats.last_error = str(error)
                log.debug("%s: chunk %s at blob offset %d: %s",
                          self.source.name, c.chunk_digest, c.offset, error)
            else:
                self.stats.chunks_fetched += 1
                # a chunk served but not cached (full disk, over the size limit) is not
                # "fetched" for status and background planning: it will be fetched again
                if self.on_fetched is not None and stored:
                    self.on_fetched(c)
            mine[c.chunk_digest][1].resolve(data, error)

    async def _read(self, offset: int, length: int) -> bytes:
        """One source request, bounded by ``timeout`` (the thread is abandoned on timeout;
        the IPFS client's own per-call timeout ends it later)."""
        timeout = self.timeout if self.timeout > 0 else math.inf
        async with self._limiter:
            self.stats.source_calls += 1
            try:
                with trio.fail_after(timeout):
                    data = await trio.to_thread.run_sync(
                        self.source.read_at, offset, length, abandon_on_cancel=True
                    )
            except trio.TooSlowError:
                raise FetchTimeout(
                    f"{self.source.name}: reading {length} bytes at offset {offset} took "
                    f"longer than {timeout:g}s"
                ) from None
        self.stats.fetched_bytes += len(data)
        return data
