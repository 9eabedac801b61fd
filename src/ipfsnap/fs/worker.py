"""One lazy layer served by one process: ``python -m ipfsnap.fs.worker SPEC.json``.

pyfuse3 has a single FUSE session per process, so each layer gets its own worker. The
worker opens and verifies the layer (TOC digest), prefetches the prioritized range, mounts
read-only, reports ``state: ready`` in its status file (the readiness signal the mounter
waits for), then fetches the rest in the background and serves reads until the filesystem
is unmounted (``fusermount3 -u``) or it gets SIGTERM/SIGINT (it then unmounts itself).

Mount options, and why:
- ``ro``, ``default_permissions``: the kernel checks modes/owners from the TOC.
- ``allow_other``: containers run as any uid, and overlayfs accesses lower layers with the
  mounter's credentials only for some operations; without it other uids get EACCES. The
  mountpoints live under the root-only (0700) state dir, so other users cannot reach the
  mount except through a container's rootfs that was given to them.
- ``suid`` (as the reference does): setuid binaries in images (su, ping, sudo) keep working
  when the FUSE mount is used directly; ``nodev`` stays (libfuse's default), device nodes in
  a layer cannot be opened through this mount. Whiteouts (char 0/0) still work for overlayfs,
  which looks at the inode, not at the mount flags.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import select
import signal
import sys
import time
from pathlib import Path

import pyfuse3
import trio

from ipfsnap.errors import IpfsnapError
from ipfsnap.estargz.reader import decompress_chunk, open_layer
from ipfsnap.estargz.types import DEFAULT_LIMITS, Chunk, Limits
from ipfsnap.fs.cache import ChunkCache
from ipfsnap.fs.errors import LayerMountError
from ipfsnap.fs.fetcher import ActivityBoard, BackgroundPacing
from ipfsnap.fs.layer import LayerStatus, LayerTables, LazyLayer
from ipfsnap.fs.ops import LayerOperations
from ipfsnap.fs.source import BlobSource, IPFSSource, LocalFileSource, TailReader
from ipfsnap.fs.spec import WorkerSpec, write_json_atomic
from ipfsnap.fs.tablecache import TableCache, TableKey, limits_key

log = logging.getLogger(__name__)

#: "0": a mounted layer stores neighbour chunks before answering the read that fetched them
NEIGHBOURS_LATER_ENV = "IPFSNAP_NEIGHBOURS_LATER"

FSNAME = "ipfsnap"
#: uncompressed bytes one chunk of a lazy layer may claim: 16x the 4 MiB chunks writers make
#: by default (the reference's and ipfsnap's builders). A read inflates and hashes the
#: whole chunk in this process: a hostile TOC with 1 GiB chunks (the format's own limit)
#: cost ~2 GiB of RAM and ~45 s of CPU per 10-byte read here (issue 8). A layer with
#: bigger chunks is refused and unpacked fully instead.
LAZY_MAX_CHUNK_SIZE = 64 << 20


def make_source(spec: WorkerSpec) -> BlobSource:
    src = spec.source
    if src.kind == "file":
        return LocalFileSource(Path(src.path))
    return IPFSSource(src.api, src.cid, timeout=spec.fetching_timeout_sec,
                      retries=spec.max_retries, auth=src.auth or None, size=spec.blob_size)


def limits_of(spec: WorkerSpec) -> Limits:
    return Limits(
        max_toc_size=spec.max_toc_size or DEFAULT_LIMITS.max_toc_size,
        max_entries=spec.max_entries or DEFAULT_LIMITS.max_entries,
        max_name_length=spec.max_name_length or DEFAULT_LIMITS.max_name_length,
        max_chunk_size=min(LAZY_MAX_CHUNK_SIZE, DEFAULT_LIMITS.max_chunk_size),
    )


def mount_options(spec: WorkerSpec) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts |= {f"fsname={FSNAME}", f"subtype={FSNAME}", "ro", "default_permissions",
             "allow_other", "suid"}
    opts |= set(spec.fuse_options)
    return opts


def load_tables(spec: WorkerSpec) -> LayerTables:
    """Open and verify the layer's TOC and build the compact tables the mount keeps."""
    source = make_source(spec)
    try:
        t0 = time.monotonic()
        size = spec.blob_size if spec.blob_size is not None else source.size()
        reader = TailReader(source, size, spec.toc_tail)
        index = open_layer(reader, size, toc_digest=spec.toc_digest, limits=limits_of(spec),
                           name=source.name)
        t1 = time.monotonic()
        tables = LayerTables.from_index(index)
        log.info("%s: footer and TOC read in %d request(s), %.2f s; verified and parsed in "
                 "%.2f s; tables built in %.2f s", source.name, reader.requests,
                 reader.seconds, t1 - t0 - reader.seconds, time.monotonic() - t1)
        return tables
    finally:
        source.close()


def table_cache_of(spec: WorkerSpec) -> tuple[TableCache, TableKey] | None:
    """The parsed-TOC cache of the spec's layer (fs/tablecache.py), None when it is off."""
    if spec.toc_cache == "off" or not spec.layer:
        return None
    try:
        cache = TableCache(Path(spec.cache_dir).parent)
        key = TableKey(spec.layer, spec.toc_digest, limits_key(limits_of(spec)))
        cache.path(key.layer, key.toc_digest)  # both digests well formed
    except ValueError as exc:
        log.warning("layer %s: no parsed-TOC cache: %s", spec.layer, exc)
        return None
    return cache, key


def adopt_tables(spec: WorkerSpec) -> LayerTables | None:
    """The tables a warm-up of this layer stored, or None (then the caller parses).

    With ``toc_cache = "wait"`` a warm-up still running is waited for (see tablecache's
    module doc for why), at most ``fetching_timeout_sec + prefetch_timeout_sec`` seconds."""
    found = table_cache_of(spec)
    if found is None:
        return None
    cache, key = found
    if spec.toc_cache == "wait" and cache.warming(key.layer):
        t0 = time.monotonic()
        bound = spec.fetching_timeout_sec + spec.prefetch_timeout_sec
        log.info("layer %s: its warm-up is running: waiting for it (at most %g s)", key.layer,
                 bound)
        done = cache.wait_warm(key.layer, bound)
        log.info("layer %s: waited %.2f s for its warm-up%s", key.layer,
                 time.monotonic() - t0, "" if done else f" (still running after {bound:g} s)")
    tables = cache.load(key)
    if tables is not None and spec.blob_size is not None and tables.blob_size != spec.blob_size:
        log.warning("layer %s: stored tables are for a %d-byte blob, not %d: parsing the TOC",
                    key.layer, tables.blob_size, spec.blob_size)
        return None
    return tables


def load_tables_isolated(spec: WorkerSpec) -> LayerTables:
    """:func:`load_tables` in a forked child, which pickles the result back.

    The parsed TOC of a big layer is several times larger than the tables kept (for 100k
    entries ~260 MiB at its peak vs ~65 MiB); CPython cannot give that fragmented heap back
    to the OS, so parsing in a short-lived child keeps the long-lived worker small. The child
    also leaves the pickled tables in the parsed-TOC cache (after sending them), so a remount
    of the layer (a snapshotter restarted after a crash) adopts them instead of parsing.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no threads exist yet in the worker, fork is safe
        code = 0
        try:
            os.close(r)
            payload = b""
            try:
                payload = pickle.dumps(load_tables(spec), protocol=pickle.HIGHEST_PROTOCOL)
                reply = b"T" + payload
            except IpfsnapError as exc:
                reply = b"E" + str(exc).encode("utf-8", "replace")
            except Exception as exc:
                log.exception("parsing the TOC failed")
                reply = b"E" + f"unexpected error: {exc!r}".encode("utf-8", "replace")
            with os.fdopen(w, "wb") as f:
                f.write(reply)
            del reply
            found = table_cache_of(spec) if payload else None
            if found is not None:
                found[0].store_payload(found[1], payload)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise LayerMountError(f"layer {spec.layer}: TOC parser process died (status {status})")
    if data[:1] != b"T":
        raise LayerMountError(data[1:].decode("utf-8", "replace"))
    value = pickle.loads(memoryview(data)[1:])
    assert isinstance(value, LayerTables)
    return value


def open_lazy_layer(spec: WorkerSpec, source: BlobSource, *, isolated: bool = True,
                    tables: LayerTables | None = None) -> LazyLayer:
    """The layer of ``spec``: from ``tables`` when given, else from a parse of its TOC."""
    if tables is None:
        tables = load_tables_isolated(spec) if isolated else load_tables(spec)
    # the cache root (parent of the layer directories) is shared by all workers: the limit
    # bounds their total
    cache = ChunkCache(Path(spec.cache_dir), limit=spec.cache_size_limit)

    def decompress(compression: str, data: bytes, chunk: Chunk) -> bytes:
        return decompress_chunk(compression, data, chunk, name=source.name)

    # the cache root is shared by every worker of the state dir: so is the activity board
    board = ActivityBoard(Path(spec.cache_dir).parent)
    pacing = BackgroundPacing(silence_period=spec.silence_period,
                              fetch_period=spec.fetch_period)
    return LazyLayer(tables, source, cache, decompress=decompress,
                     max_concurrency=spec.max_concurrency, timeout=spec.fetching_timeout_sec,
                     max_span=spec.max_span, readahead=spec.readahead,
                     neighbour_span=spec.neighbour_span, prefetch_span=spec.prefetch_span,
                     prefetch_concurrency=spec.prefetch_concurrency, board=board,
                     pacing=pacing, read_split_size=spec.read_split_size)


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.status_path = Path(spec.status_path)
        self.status = LayerStatus(mountpoint=spec.mountpoint, layer=spec.layer, pid=os.getpid())
        self.layer: LazyLayer | None = None
        self._terminated = False
        #: ``warm(serve=True)``: the tables it parsed or adopted, for serving the layer next
        self.warm_tables: LayerTables | None = None

    def write_status(self) -> None:
        if self.layer is not None:
            self.layer.status.mountpoint = self.status.mountpoint
            self.layer.status.layer = self.status.layer
            self.layer.status.pid = self.status.pid
            self.layer.status.state = self.status.state
            st = self.layer.update_status()
            self.status = st
        else:
            self.status.updated = time.time()
        try:
            write_json_atomic(self.status_path, self.status.to_json())
        except OSError as exc:
            log.warning("status file %s: %s", self.status_path, exc)

    def fail(self, message: str) -> int:
        log.error("%s", message)
        self.status.state = "failed"
        self.status.last_error = message
        self.write_status()
        return 1

    def run(self, tables: LayerTables | None = None) -> int:
        """Serve the layer; ``tables``: its parsed TOC, handed over by this process's own
        warm-up of the layer (else adopted from the parsed-TOC cache, or parsed)."""
        spec = self.spec
        self.write_status()
        t0 = time.monotonic()
        try:
            source = make_source(spec)
            self.status.source = source.name
            if tables is not None:
                how = "handed over by its warm-up"
            else:
                tables = adopt_tables(spec)
                how = "adopted from the parsed-TOC cache" if tables is not None else \
                    "opened and verified"
            self.layer = open_lazy_layer(spec, source, tables=tables)
        except IpfsnapError as exc:
            return self.fail(f"layer {spec.layer or spec.mountpoint}: cannot open: {exc}")
        # timings for cold-start analysis (hello_bench --keep-logs collects these logs)
        log.info("%s: TOC %s in %.2f s: %d entries, %d bytes of chunks, %d cached",
                 source.name, how, time.monotonic() - t0, len(self.layer.table),
                 self.layer.chunk_bytes, self.layer.cached_bytes)
        try:
            return trio.run(self._serve, self.layer)
        finally:
            source.close()

    async def _serve(self, layer: LazyLayer) -> int:
        spec = self.spec
        if not spec.noprefetch:
            end = layer.prefetch_end or spec.prefetch_size
            if end > 0:
                self.status.state = "prefetching"
                self.write_status()
                try:
                    await layer.prefetch(min(end, layer.blob_size),
                                         spec.prefetch_timeout_sec)
                except IpfsnapError as exc:
                    # best effort: the mount still works, reads fetch on demand
                    log.warning("prefetch failed: %s", exc)
                    self.status.last_error = str(exc)
        ops = LayerOperations(layer, attr_timeout=spec.attr_timeout,
                              entry_timeout=spec.entry_timeout, direct_io=spec.direct_io,
                              mountpoint=spec.mountpoint, read_ahead_kb=spec.read_ahead_kb)
        try:
            pyfuse3.init(ops, spec.mountpoint, mount_options(spec))
        except RuntimeError as exc:
            return self.fail(f"cannot mount {spec.mountpoint}: {exc}")
        self.status.state = "ready"
        self.write_status()
        log.info("mounted %s at %s", layer.source.name, spec.mountpoint)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._status_loop)
                nursery.start_soon(self._signals)
                nursery.start_soon(layer.readahead_loop)
                nursery.start_soon(layer.activity_loop)
                if not spec.no_background_fetch:
                    nursery.start_soon(layer.background_fetch)
                # neighbour chunks are stored after the reads that brought them are answered
                # (IPFSNAP_NEIGHBOURS_LATER=0: before, as until the fifth session; kept for
                # the side-by-side benchmark, hello-bench suffix -nbnow)
                if os.environ.get(NEIGHBOURS_LATER_ENV, "1") != "0":
                    layer.fetcher.spawn = nursery.start_soon
                try:
                    await pyfuse3.main()
                finally:
                    layer.fetcher.spawn = None
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=self._terminated)
            self.status.state = "unmounted"
            self.write_status()
            st = self.status
            log.info("unmounted %s: %d FUSE reads; foreground %d requests, %d bytes, %.2f s "
                     "(longest %.2f s), %d neighbour chunks; background %d requests, %d bytes",
                     spec.mountpoint, st.read_requests, st.foreground_calls,
                     st.foreground_bytes, st.foreground_seconds, st.foreground_max_seconds,
                     st.neighbour_chunks, st.background_calls, st.background_bytes)
        return 0

    def warm(self, lock_fd: int | None = None, *, serve: bool = False) -> int:
        """``--warm``: open the layer and prefetch its prioritized range into the chunk
        cache, without mounting. The mounter runs this for the next layers of a pull while
        the current one mounts: their TOC blocks and prioritized chunks are then local when
        their own worker starts (one layer's mount no longer waits for the previous layers'
        network round trips), and the parsed TOC is left in the parsed-TOC cache for the
        worker to adopt (fs/tablecache.py).

        ``lock_fd``: the layer's warm-up lock, taken by the mounter and inherited. Without
        it the lock is taken here (and if another warm-up of the layer holds it, there is
        nothing to do). Released when the warm-up is done.

        ``serve``: this process may become the layer's worker afterwards (``main``), so the
        TOC is parsed in a child (as a worker does, to keep its heap small) and the tables
        are kept in :attr:`warm_tables`."""
        spec = self.spec
        t0 = time.monotonic()
        found = table_cache_of(spec)
        try:
            if found is not None and lock_fd is None:
                try:
                    lock_fd = found[0].lock_warm(found[1].layer)
                except OSError as exc:
                    log.warning("warm-up of %s: cannot take its lock: %s", spec.layer, exc)
                else:
                    if lock_fd is None:
                        log.info("warm-up of %s: another warm-up runs", spec.layer)
                        return 0
            return self._warm(found, t0, serve)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # warm-up done: a worker waiting for it goes on

    def _warm(self, found: tuple[TableCache, TableKey] | None, t0: float, serve: bool) -> int:
        spec = self.spec
        try:
            tables = found[0].load(found[1]) if found is not None else None
            if tables is None:
                if serve:
                    tables = load_tables_isolated(spec)  # the child stores them too
                else:
                    tables = load_tables(spec)
                    if found is not None:
                        found[0].store(found[1], tables)
                log.info("warm-up of %s: TOC opened and verified, tables stored in %.2f s",
                         spec.layer, time.monotonic() - t0)
            source = make_source(spec)
        except IpfsnapError as exc:
            log.warning("warm-up of %s: %s", spec.layer, exc)
            return 1
        try:
            layer = open_lazy_layer(spec, source, tables=tables)
            end = 0 if spec.noprefetch else (layer.prefetch_end or spec.prefetch_size)
            if end > 0:
                trio.run(layer.prefetch, min(end, layer.blob_size), spec.prefetch_timeout_sec)
        except IpfsnapError as exc:
            log.warning("warm-up of %s: %s", spec.layer, exc)
            return 1
        finally:
            source.close()
        if serve:
            self.warm_tables = tables
        log.info("warm-up of %s done in %.2f s", spec.layer, time.monotonic() - t0)
        return 0

    async def _status_loop(self) -> None:
        while True:
            await trio.sleep(self.spec.status_interval)
            self.write_status()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: unmounting %s", signum, self.spec.mountpoint)
                self._terminated = True
                pyfuse3.terminate()
                return


#: a spare worker (``--stdin``) exits after this many seconds without a spec, unless given
#: ``--idle 0`` (the mounter's pool: it keeps a bounded number and closes their stdin when
#: it closes or dies); a finished warm-up waiting for its layer's mount (``--serve``) too
SPARE_IDLE = 60.0


#: a spare reads this before a spec path: run that spec's warm-up, then serve (mounter)
WARM_REQUEST = "warm "
#: longest request line a spare reads (a path under the state dir)
MAX_REQUEST = 8192


def _read_line(fd: int) -> bytes:
    """One line from ``fd``, read byte by byte: a buffered reader could swallow the next
    request (a warm-up's later mount spec) and leave it unseen by ``select``."""
    out = bytearray()
    while len(out) < MAX_REQUEST:
        b = os.read(fd, 1)
        if not b or b == b"\n":
            break
        out += b
    return bytes(out)


def wait_for_request(idle: float | None = SPARE_IDLE, *, announce: bool = False
                     ) -> tuple[Path, bool] | None:
    """As a spare: the spec path the mounter writes on stdin, and whether it asks for a
    warm-up (``warm PATH``) rather than a mount (None: EOF or idle timeout; ``idle`` None:
    no timeout, the mounter's pool spares wait until it closes their stdin).

    Then stdout/stderr go to the ``worker.log`` next to the spec; for a mount stdin becomes
    /dev/null, as for a worker started with the spec on its command line (a warm-up keeps
    it: its layer's mount spec comes there later).

    ``announce``: first write one byte to stdout: the mounter's warm spare has a pipe there,
    to learn that the imports are done (other spares' stdout is /dev/null)."""
    if announce:
        with contextlib.suppress(OSError):
            os.write(1, b"R")
    ready, _, _ = select.select([0], [], [], idle)
    if not ready:
        return None
    line = os.fsdecode(_read_line(0)).strip()
    if not line:
        return None
    warm = line.startswith(WARM_REQUEST)
    spec_path = Path(line[len(WARM_REQUEST):] if warm else line)
    fd = os.open(spec_path.parent / "worker.log",
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)
    if not warm:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    return spec_path, warm


def wait_for_spec(idle: float = SPARE_IDLE) -> Path | None:
    """:func:`wait_for_request` for a mount spec only."""
    request = wait_for_request(idle)
    return None if request is None else request[0]


def read_spec(spec_path: Path) -> WorkerSpec | None:
    try:
        return WorkerSpec.from_json(spec_path.read_text(encoding="utf-8"))
    except (OSError, IpfsnapError) as exc:
        sys.stderr.write(f"ipfsnap layer worker: {spec_path}: {exc}\n")
        return None


def same_layer(a: WorkerSpec, b: WorkerSpec) -> bool:
    """Whether tables built for ``a`` serve ``b`` (same layer, TOC, limits and size)."""
    return (a.layer, a.toc_digest, limits_of(a), a.blob_size) == \
        (b.layer, b.toc_digest, limits_of(b), b.blob_size)


def serve_after_warm(warm_spec: WorkerSpec, warmer: Worker, priority: int) -> int:
    """``--warm --serve``, after the warm-up: wait as a spare for the layer's mount (the
    mounter hands its spec on stdin), then serve it with the tables already in memory: the
    mount then costs neither a process start nor a TOC parse nor reading the parsed-TOC
    cache. Exits after ``SPARE_IDLE`` seconds without a spec."""
    spec_path = wait_for_spec()
    if spec_path is None:
        return 0
    spec = read_spec(spec_path)
    if spec is None:
        return 2
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, priority)  # a worker, no longer a warm-up
    tables = warmer.warm_tables if same_layer(warm_spec, spec) else None
    warmer.warm_tables = None
    return Worker(spec).run(tables)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ipfsnap.fs.worker")
    parser.add_argument("spec", type=Path, nargs="?", help="JSON worker spec")
    parser.add_argument("--stdin", action="store_true",
                        help="spare: import everything, then wait for the spec path on stdin")
    parser.add_argument("--idle", type=float, default=SPARE_IDLE,
                        help="with --stdin: exit after this many seconds without a request "
                             "(0: wait until stdin closes)")
    parser.add_argument("--warm", action="store_true",
                        help="open the layer and prefetch into the cache, do not mount")
    parser.add_argument("--lock-fd", type=int, default=None,
                        help="with --warm: inherited descriptor holding the warm-up lock")
    parser.add_argument("--nice", type=int, default=0,
                        help="with --warm: run this much nicer (os.nice increment)")
    parser.add_argument("--serve", action="store_true",
                        help="with --warm: then wait for the layer's mount spec on stdin and "
                             "serve it")
    args = parser.parse_args(argv)
    spec_path: Path | None = args.spec
    if args.stdin:
        request = wait_for_request(args.idle if args.idle > 0 else None, announce=True)
        if request is None:
            return 0
        spec_path, warm = request
        if warm:  # the mounter's warm spare: warm the layer up, then serve it
            args.warm = args.serve = True
    if spec_path is None:
        parser.error("a spec path (or --stdin) is required")
    spec = read_spec(spec_path)
    if spec is None:
        return 2
    logging.basicConfig(
        level=getattr(logging, spec.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    if args.warm:
        priority = os.getpriority(os.PRIO_PROCESS, 0)
        if args.nice > 0:
            os.nice(args.nice)
        worker = Worker(spec)
        code = worker.warm(args.lock_fd, serve=args.serve)
        if code != 0 or not args.serve:
            return code
        return serve_after_warm(spec, worker, priority)
    return Worker(spec).run()


if __name__ == "__main__":
    sys.exit(main())
