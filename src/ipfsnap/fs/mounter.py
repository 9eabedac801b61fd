"""``LayerMounter``: the ``snapshot.RemoteFileSystem`` that mounts lazy layers with workers.

Labels read (the reference's names where it has one):

==============================================  ===============================================
``containerd.io/snapshot/remote/stargz.digest``  layer (blob) digest, required; names the cache
``containerd.io/snapshot/stargz/toc.digest``     TOC digest, required: never mounted unverified
``containerd.io/snapshot/remote/urls``           comma-separated urls; the first ``ipfs://CID``
                                                 is the source
``containerd.io/snapshot/remote/stargz.prefetch`` prefetch size in bytes (overrides config)
``ipfsnap.io/layer.size``                        blob size (optional; else files/stat)
``ipfsnap.io/layer.path``                        local blob file (optional; used instead of IPFS)
``ipfsnap.io/ipfs.api``                          IPFS API URL to fetch from (optional; the API
                                                 of the command that asked for the layer, else
                                                 the snapshotter's configured/discovered one)
``ipfsnap.io/layers.next``                       JSON list of the labels of the image's next
                                                 lazy layers (optional): they are warmed up
                                                 (TOC, prioritized range) while this one mounts
==============================================  ===============================================

Per mountpoint a run directory ``<state>/fs/workers/<sha256(mountpoint)[:16]>`` holds
``spec.json``, ``status.json`` and ``worker.log``; chunks are cached in
``<state>/fs/cache/<layer digest hex>/``. Workers run in their own session, so they outlive
a restart of the snapshotter; a new ``LayerMounter`` finds them again by their status file.
A warm-up of a next layer runs ``worker --warm --serve`` (the first ``WARM_SPARES`` of a
pull in warm spares, processes kept ready by the mounter, so they skip the imports) in
``<state>/fs/workers/warm-<digest prefix>/``, holding the layer's warm-up lock, and leaves
the layer's parsed TOC in ``<state>/fs/cache/.tables/`` (fs/tablecache.py). Once done it
waits, like a spare, for its layer's mount: the mounter hands that mount's spec to it, and
it serves the layer with the tables it holds (no process start, no TOC parse, no cache read
on the mount path; a mount that comes while the warm-up still runs is taken when it is
done). Otherwise (no warm-up, or
one too old to be handed the mount, or one that exited) the mount goes to the spare worker
(``worker --stdin``, imports done) or a new worker, which adopts the stored tables, waiting
for a warm-up of the layer still running rather than parsing the same TOC a second time. A
layer's stored tables are removed when it is unmounted.

Benchmark switches (environment of the snapshotter): ``IPFSNAP_TOC_CACHE`` sets the workers'
``toc_cache`` mode (``wait``, the default; ``adopt``; ``off`` = the behaviour before the
cache: every worker parses, warm-ups exit when done), ``IPFSNAP_WARM_SERVE=0`` makes warm-ups
exit when done, ``IPFSNAP_WARM_NICE=N`` runs them N nicer, ``IPFSNAP_TOC_TAIL=N`` sets the
bytes of a blob's end read in one request to open its TOC (beyond the footer's block),
``IPFSNAP_WARM_SPARES=N`` the number of warm spares, ``IPFSNAP_REFILL_QUIET=S`` the quiet
seconds before used spares are replaced (``0``: at once).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ipfsnap.config import Config
from ipfsnap.docparse import MalformedDocument, parse_json
from ipfsnap.errors import IpfsnapError
from ipfsnap.estargz.footer import tail_read_size
from ipfsnap.fs.errors import LayerMountError, WorkerSpecError
from ipfsnap.fs.fetcher import ActivityBoard
from ipfsnap.fs.spec import SourceSpec, WorkerSpec, read_status
from ipfsnap.fs.tablecache import TableCache
from ipfsnap.ipfs import endpoint_from_config, parse_api

log = logging.getLogger(__name__)

LAYER_DIGEST_LABEL = "containerd.io/snapshot/remote/stargz.digest"
TOC_DIGEST_LABEL = "containerd.io/snapshot/stargz/toc.digest"
URLS_LABEL = "containerd.io/snapshot/remote/urls"
PREFETCH_SIZE_LABEL = "containerd.io/snapshot/remote/stargz.prefetch"
SIZE_LABEL = "ipfsnap.io/layer.size"
LOCAL_PATH_LABEL = "ipfsnap.io/layer.path"
IPFS_API_LABEL = "ipfsnap.io/ipfs.api"
#: JSON list of the labels of the image's next lazy layers (set by image.unpack): their TOC
#: and prioritized range are fetched while this layer mounts (see ``LayerMounter.warm``)
NEXT_LAYERS_LABEL = "ipfsnap.io/layers.next"
#: next layers warmed at most per mount (the label carries at most 8)
NEXT_LAYERS_MAX = 8

#: seconds a connect to a request's IPFS API may take (loopback answers at once)
_PROBE_TIMEOUT = 2.0
#: seconds a ``check`` waits for the mountpoint to answer a stat
CHECK_TIMEOUT = 5.0
#: seconds to wait for a worker to exit after its filesystem was unmounted
EXIT_TIMEOUT = 10.0
#: environment variable naming the workers' parsed-TOC cache mode (benchmarks)
TOC_CACHE_ENV = "IPFSNAP_TOC_CACHE"
#: seconds after the last mount (none in progress) before used spares are replaced: not
#: during a pull (a new process's imports, ~0.5 s of CPU idle and 1.5-2.7 s at load 6-8,
#: would compete with the layers being opened on 2 cores) nor while the container it was
#: for starts (with 3 s, four niced replacements ran during hello-bench's run phase: run
#: 6.85 vs 4.45 s medians), but well before a next pull
REFILL_QUIET = 10.0
#: environment variable: :data:`REFILL_QUIET` in seconds; 0 = replace a used spare at once,
#: not niced, as before the refill (benchmarks)
REFILL_QUIET_ENV = "IPFSNAP_REFILL_QUIET"
#: replacement spares run this much nicer until they are handed a request: their imports
#: take only CPU that nothing else wants
REFILL_NICE = 19
#: warm spares the mounter keeps (``worker --stdin``, imports done, ~34 MB each), each
#: taking one warm-up of the next layers of a pull. 3 = the next layers of the hello-bench
#: image (4 layers): a warm-up in a new process first spends 1.5-2.7 s on imports at load
#: 6-8 (0.5 s idle) before it fetches its TOC, so the third layer's mount waited for it
#: (0.6-1.7 s); from a spare the fetch starts at once (third layer mounted in ~0.1 s).
#: Measured in docs/benchmarks.md, "TOC in one request, first layer ahead, spare pool"
WARM_SPARES = 3
#: environment variable: the number of warm spares (benchmarks)
WARM_SPARES_ENV = "IPFSNAP_WARM_SPARES"
#: environment variable: niceness increment of warm-up processes (benchmarks)
WARM_NICE_ENV = "IPFSNAP_WARM_NICE"
#: warm-ups run this much nicer than the workers: the layer being mounted is waited for
#: now, the next layers' warm-ups only later
WARM_NICE = 0
#: environment variable: "0" = warm-ups exit when done instead of waiting to serve their
#: layer (benchmarks)
WARM_SERVE_ENV = "IPFSNAP_WARM_SERVE"
#: what a spare reads on stdin before a spec path to run a warm-up (worker.wait_for_request)
WARM_REQUEST = b"warm "
#: a warm-up waits worker.SPARE_IDLE (60 s) for its layer's mount once done; it is handed
#: the mount only within this many seconds of its start, so it cannot be about to exit
WARM_HANDOFF_WINDOW = 50.0


def _is_digest(value: str) -> bool:
    algo, _, hexpart = value.partition(":")
    return algo == "sha256" and len(hexpart) == 64 and all(
        c in "0123456789abcdef" for c in hexpart
    )


def _cid_from_urls(urls: str) -> str | None:
    for url in urls.split(","):
        url = url.strip()
        if url.startswith("ipfs://"):
            cid = url[len("ipfs://"):].strip("/")
            if cid and "/" not in cid:
                return cid
    return None


def _request_api(labels: Mapping[str, str]) -> str:
    """The API the request named (:data:`IPFS_API_LABEL`) if something listens there, else "".

    The label is kept with the snapshot, so a restarted snapshotter remounts the layer from
    the same node; but that node may have moved meanwhile (a managed node gets a new port
    each start), and then the snapshotter's own API must serve it. A TCP connect is enough
    to tell (a refused connection is answered at once) and costs no request on the node.
    """
    api = labels.get(IPFS_API_LABEL, "")
    if not api:
        return ""
    try:
        endpoint = parse_api(api)
        with socket.create_connection((endpoint.host, endpoint.port), timeout=_PROBE_TIMEOUT):
            pass
    except (IpfsnapError, OSError) as exc:
        log.warning("IPFS API %s (label %s) does not answer (%s): using the snapshotter's own",
                    api, IPFS_API_LABEL, exc)
        return ""
    return api


def is_mountpoint(path: Path) -> bool:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            target = os.path.realpath(path)
            for line in f:
                parts = line.split()
                if len(parts) > 4:
                    mp = parts[4].replace("\\040", " ").replace("\\011", "\t")
                    if mp == target:
                        return True
    except OSError:
        pass
    return False


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child counts as dead
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def next_layer_labels(value: str) -> list[dict[str, str]]:
    """The label maps listed in a :data:`NEXT_LAYERS_LABEL` value (the first
    :data:`NEXT_LAYERS_MAX` entries). The label may come from any snapshotter client, so
    nothing in it fails the mount: a value that is not a JSON list (bad syntax, nested too
    deeply, another type) is logged and gives none, an entry that is not an object of strings
    is logged and skipped."""
    if not value:
        return []
    try:
        items = parse_json(value)
    except MalformedDocument as exc:
        log.warning("ignoring label %s: not JSON: %s", NEXT_LAYERS_LABEL, exc)
        return []
    if not isinstance(items, list):
        log.warning("ignoring label %s: a JSON %s, not a list", NEXT_LAYERS_LABEL,
                    type(items).__name__)
        return []
    out: list[dict[str, str]] = []
    for item in items[:NEXT_LAYERS_MAX]:
        if not isinstance(item, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in item.items()):
            log.warning("ignoring an entry of label %s: not an object of strings",
                        NEXT_LAYERS_LABEL)
            continue
        out.append(dict(item))
    return out


class LayerMounter:
    """Mount, check and unmount lazy layers; one worker process per mountpoint."""

    def __init__(
        self,
        config: Config,
        *,
        run_dir: Path | None = None,
        cache_root: Path | None = None,
        python: str = sys.executable,
        ready_timeout: float | None = None,
        extra: Mapping[str, Any] | None = None,
        spare: bool = True,
    ) -> None:
        self.config = config
        self.run_dir = run_dir or config.state_dir / "fs" / "workers"
        self.cache_root = cache_root or config.state_dir / "fs" / "cache"
        #: parsed TOCs handed from warm-ups to workers (fs/tablecache.py)
        self.tables = TableCache(self.cache_root)
        self.toc_cache = os.environ.get(TOC_CACHE_ENV, "") or "wait"
        #: the workers' ``toc_tail`` (``IPFSNAP_TOC_TAIL``, benchmarks)
        self.toc_tail = tail_read_size()
        try:
            self.warm_nice = int(os.environ.get(WARM_NICE_ENV, "") or WARM_NICE)
        except ValueError:
            self.warm_nice = WARM_NICE
        self.python = python
        # opening the TOC and prefetching are each bounded; allow both plus start-up
        self.ready_timeout = ready_timeout if ready_timeout is not None else (
            config.blob.fetching_timeout_sec + config.prefetch_timeout_sec + 30.0
        )
        #: extra WorkerSpec fields (tests: max_span, status_interval, log_level ...)
        self.extra = dict(extra or {})
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        #: workers of lazily unmounted layers, reaped when they exit
        self._detached: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        #: a worker process started ahead (``--stdin``): Python, trio and pyfuse3 already
        #: imported, waiting for the next mount's spec. Starting a worker costs ~0.5 s of
        #: imports on an idle 2-core machine and several seconds under load, paid once per
        #: layer, one layer after the other, during a pull; the spare takes that off the
        #: mount path (it exits by itself after worker.SPARE_IDLE seconds unused)
        self.spare = spare
        self._spare: subprocess.Popen[bytes] | None = None
        #: the mounter's own priority: a replacement spare gets it back when it is used
        self._priority = os.getpriority(os.PRIO_PROCESS, 0)
        self.refill_quiet = REFILL_QUIET
        with contextlib.suppress(ValueError):
            self.refill_quiet = max(0.0, float(os.environ.get(REFILL_QUIET_ENV, "")))
        self._last_request = 0.0
        self._mounting = 0
        self._refiller: threading.Thread | None = None
        self._closed = False
        self._start_spare()
        #: warm-up processes (``worker --warm``) by layer digest: one per layer, with the
        #: time they started; layers whose warm-up became their worker (not warmed again)
        self._warming: dict[str, subprocess.Popen[bytes]] = {}
        self._warm_started: dict[str, float] = {}
        self._handed: set[str] = set()
        self.warm_serve = os.environ.get(WARM_SERVE_ENV, "") != "0"
        #: warm spares, started with the mounter only, for the first warm-ups of the first
        #: pull it serves (the next layers, whose mounts come first): those warm-ups then
        #: skip the worker's imports, which took ~2 s of the second layer's mount under load
        #: (docs/benchmarks.md, "Layer mount handoff"). Replaced once used, after the pull
        #: (:meth:`_refill_later`): a new one would import beside the layers being mounted
        self._warm_spares: list[subprocess.Popen[bytes]] = []
        try:
            count = int(os.environ.get(WARM_SPARES_ENV, "") or WARM_SPARES)
        except ValueError:
            count = WARM_SPARES
        self.warm_spares = max(0, min(count, NEXT_LAYERS_MAX)) if (
            spare and self.warm_serve and self.toc_cache != "off") else 0
        for _ in range(self.warm_spares):
            proc = self._new_spare(report_ready=True)
            if proc is not None:
                self._warm_spares.append(proc)

    # -- paths ----------------------------------------------------------------------------
    def worker_dir(self, mountpoint: Path) -> Path:
        key = hashlib.sha256(os.fsencode(os.path.abspath(mountpoint))).hexdigest()[:16]
        return self.run_dir / key

    def status(self, mountpoint: Path) -> dict[str, Any] | None:
        """The worker's last status (see ``LayerStatus``), or None."""
        return read_status(self.worker_dir(mountpoint) / "status.json")

    def all_status(self) -> list[dict[str, Any]]:
        out = []
        if self.run_dir.is_dir():
            for d in sorted(self.run_dir.iterdir()):
                st = read_status(d / "status.json")
                if st is not None:
                    out.append(st)
        return out

    # -- spec -----------------------------------------------------------------------------
    def spec_for(self, mountpoint: Path, labels: Mapping[str, str]) -> WorkerSpec:
        layer = labels.get(LAYER_DIGEST_LABEL, "")
        if not _is_digest(layer):
            raise WorkerSpecError(f"layer at {mountpoint}: label {LAYER_DIGEST_LABEL} is "
                                  f"missing or not a sha256 digest: {layer!r}")
        toc = labels.get(TOC_DIGEST_LABEL, "")
        if not _is_digest(toc):
            raise WorkerSpecError(f"layer {layer}: label {TOC_DIGEST_LABEL} is missing or "
                                  f"invalid ({toc!r}); not mounting an unverifiable layer")
        local = labels.get(LOCAL_PATH_LABEL, "")
        if local:
            source = SourceSpec(kind="file", path=local)
        else:
            cid = _cid_from_urls(labels.get(URLS_LABEL, ""))
            if cid is None:
                raise WorkerSpecError(f"layer {layer}: no ipfs:// url in label {URLS_LABEL}")
            # per request: a long-lived snapshotter serves commands with different APIs
            api = _request_api(labels) or self.config.ipfs_api
            if not api:
                api = self._discover_api()
            source = SourceSpec(kind="ipfs", api=api, cid=cid, auth=self.config.ipfs_auth or "")
        size: int | None = None
        if labels.get(SIZE_LABEL):
            try:
                size = int(labels[SIZE_LABEL])
            except ValueError:
                raise WorkerSpecError(f"layer {layer}: label {SIZE_LABEL} is not a number: "
                                      f"{labels[SIZE_LABEL]!r}") from None
        prefetch = self.config.prefetch_size
        if labels.get(PREFETCH_SIZE_LABEL):
            try:
                prefetch = int(labels[PREFETCH_SIZE_LABEL])
            except ValueError:
                log.warning("layer %s: ignoring bad %s label", layer, PREFETCH_SIZE_LABEL)
        wdir = self.worker_dir(mountpoint)
        cfg = self.config
        spec = WorkerSpec(
            mountpoint=os.path.abspath(mountpoint),
            source=source,
            toc_digest=toc,
            cache_dir=str(self.cache_root / layer.partition(":")[2]),
            status_path=str(wdir / "status.json"),
            cache_size_limit=cfg.cache_size_limit,
            layer=layer,
            blob_size=size,
            noprefetch=cfg.noprefetch,
            no_background_fetch=cfg.no_background_fetch,
            prefetch_size=prefetch,
            prefetch_timeout_sec=float(cfg.prefetch_timeout_sec),
            max_concurrency=cfg.max_concurrency,
            fetching_timeout_sec=float(cfg.blob.fetching_timeout_sec),
            max_retries=cfg.blob.max_retries,
            attr_timeout=cfg.fuse.attr_timeout,
            entry_timeout=cfg.fuse.entry_timeout,
            neighbour_span=cfg.blob.neighbour_span,
            prefetch_span=cfg.blob.prefetch_chunk_size,
            prefetch_concurrency=max(1, cfg.prefetch_concurrency),
            read_split_size=cfg.blob.read_split_size,
            readahead=cfg.blob.readahead_chunks,
            silence_period=cfg.background_fetch.silence_period_msec / 1000.0,
            fetch_period=cfg.background_fetch.fetch_period_msec / 1000.0,
            toc_cache=self.toc_cache,
        )
        spec.toc_tail = self.toc_tail
        for key, value in self.extra.items():
            if not hasattr(spec, key):
                raise WorkerSpecError(f"layer worker: unknown option {key!r}")
            setattr(spec, key, value)
        return spec

    def _discover_api(self) -> str:
        try:
            endpoint = endpoint_from_config(self.config)
        except IpfsnapError as exc:
            raise LayerMountError(f"no IPFS API for lazy layers: {exc}") from exc
        return endpoint.url

    # -- RemoteFileSystem -----------------------------------------------------------------
    def mount(self, mountpoint: Path, labels: Mapping[str, str]) -> None:
        # a pull is in progress while a mount is: used spares are replaced after it
        with self._lock:
            self._mounting += 1
        try:
            self._mount(mountpoint, labels)
        finally:
            with self._lock:
                self._mounting -= 1
                self._last_request = time.monotonic()

    def _mount(self, mountpoint: Path, labels: Mapping[str, str]) -> None:
        mountpoint = Path(os.path.abspath(mountpoint))
        t0 = time.monotonic()
        self.reap()
        spec = self.spec_for(mountpoint, labels)
        self.warm(labels.get(NEXT_LAYERS_LABEL, ""), labels)
        if is_mountpoint(mountpoint):
            # a worker that outlived a snapshotter restart already serves this layer here
            st = self.status(mountpoint) or {}
            if (st.get("layer") == spec.layer and st.get("state") in ("ready", "complete")
                    and pid_alive(int(st.get("pid", 0)))):
                self.check(mountpoint, labels)
                log.info("layer %s already mounted at %s (pid %s)", spec.layer, mountpoint,
                         st.get("pid"))
                return
            raise LayerMountError(f"{mountpoint}: already a mountpoint")
        mountpoint.mkdir(parents=True, exist_ok=True)
        # mounting is foreground work (an image is being pulled to run): the background
        # fetch of layers mounted earlier holds off, as it does during reads; marked again
        # when the mount is ready, so the silence period starts when its user can read
        board: ActivityBoard | None = None
        with contextlib.suppress(OSError):
            board = ActivityBoard(Path(spec.cache_dir).parent, mark_interval=0.0)
            board.mark()
        wdir = self.worker_dir(mountpoint)
        wdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        Path(spec.cache_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        status_path = Path(spec.status_path)
        status_path.unlink(missing_ok=True)
        spec_path = wdir / "spec.json"
        # 0600: the spec may carry the IPFS API's Authorization value
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(spec.to_json())
        proc = self._hand_to_warm(spec.layer, spec_path)
        from_warm = proc is not None
        if proc is None:
            proc = self._launch(spec_path, wdir)
        with self._lock:
            self._procs[str(mountpoint)] = proc
        deadline = time.monotonic() + self.ready_timeout
        while True:
            st = read_status(status_path) or {}
            state = st.get("state")
            if state in ("ready", "complete") and is_mountpoint(mountpoint):
                if board is not None:
                    with contextlib.suppress(OSError):
                        board.mark()
                log.info("layer %s mounted lazily at %s in %.2f s (pid %d)", spec.layer,
                         mountpoint, time.monotonic() - t0, proc.pid)
                return
            code = proc.poll()
            if code is not None and from_warm and not st:
                # the warm-up failed (or ended) before it took the spec: a worker of its own
                # tries again (it parses the TOC itself, as without a warm-up)
                proc.wait()
                log.info("layer %s: its warm-up exited (%d) before serving it: starting a "
                         "worker", spec.layer, code)
                from_warm = False
                proc = self._launch(spec_path, wdir)
                with self._lock:
                    self._procs[str(mountpoint)] = proc
                continue
            if state == "failed" or code is not None:
                proc.wait()
                reason = st.get("last_error") or self._log_tail(wdir)
                raise LayerMountError(f"layer {spec.layer}: lazy mount at {mountpoint} failed: "
                                      f"{reason}")
            if time.monotonic() > deadline:
                self._stop(proc, mountpoint)
                raise LayerMountError(f"layer {spec.layer}: lazy mount at {mountpoint} not ready "
                                      f"after {self.ready_timeout:g}s")
            time.sleep(0.05)

    def check(self, mountpoint: Path, labels: Mapping[str, str] | None = None) -> None:
        mountpoint = Path(os.path.abspath(mountpoint))
        st = self.status(mountpoint)
        pid = int(st.get("pid", 0)) if st else 0
        if not pid_alive(pid):
            raise LayerMountError(f"{mountpoint}: layer worker (pid {pid}) is not running")
        if not is_mountpoint(mountpoint):
            raise LayerMountError(f"{mountpoint}: not mounted")
        result: list[BaseException | None] = []

        def probe() -> None:
            try:
                os.stat(mountpoint)
                os.listdir(mountpoint)
                result.append(None)
            except OSError as exc:
                result.append(exc)

        t = threading.Thread(target=probe, daemon=True)  # a hung FUSE must not hang us
        t.start()
        t.join(CHECK_TIMEOUT)
        if not result:
            raise LayerMountError(f"{mountpoint}: lazy layer does not answer within "
                                  f"{CHECK_TIMEOUT:g}s")
        if result[0] is not None:
            raise LayerMountError(f"{mountpoint}: lazy layer fails: {result[0]}")

    def unmount(self, mountpoint: Path) -> None:
        mountpoint = Path(os.path.abspath(mountpoint))
        st = self.status(mountpoint)
        pid = int(st.get("pid", 0)) if st else 0
        layer = str(st.get("layer", "")) if st else ""
        try:
            self._unmount(mountpoint, pid)
        finally:
            # the layer's parsed TOC goes with its mount (the snapshot store unmounts a
            # layer when its snapshot is removed)
            if _is_digest(layer):
                self.tables.remove_layer(layer)

    def _unmount(self, mountpoint: Path, pid: int) -> None:
        with self._lock:
            proc = self._procs.pop(str(mountpoint), None)
        if is_mountpoint(mountpoint):
            fusermount = shutil.which("fusermount3") or "fusermount3"
            res = subprocess.run([fusermount, "-u", str(mountpoint)], capture_output=True,
                                 text=True, check=False)
            if res.returncode != 0 and is_mountpoint(mountpoint):
                log.warning("%s: busy (%s), lazy unmount", mountpoint, res.stderr.strip())
                res = subprocess.run([fusermount, "-u", "-z", str(mountpoint)],
                                     capture_output=True, text=True, check=False)
                if res.returncode != 0 and is_mountpoint(mountpoint):
                    raise LayerMountError(f"{mountpoint}: cannot unmount: {res.stderr.strip()}")
                # detached, still in use: the worker keeps serving the open files and exits
                # by itself when the kernel drops the last reference
                if proc is not None:
                    with self._lock:
                        self._detached.append(proc)
                return
        self._wait_exit(proc, pid, mountpoint)

    def _launch(self, spec_path: Path, wdir: Path) -> subprocess.Popen[bytes]:
        """A worker for the spec: the spare if one is alive, else a new process."""
        proc = self._hand_to_spare(spec_path)
        if proc is None:
            logfile = open(wdir / "worker.log", "ab")  # noqa: SIM115 - handed to the child
            try:
                proc = subprocess.Popen(
                    [self.python, "-m", "ipfsnap.fs.worker", str(spec_path)],
                    stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                    start_new_session=True, close_fds=True, cwd="/",
                )
            finally:
                logfile.close()
        self._refill_later()
        return proc

    # -- warm-up of the next layers -------------------------------------------------------
    def warm(self, next_layers: str, labels: Mapping[str, str]) -> None:
        """Start a warm-up process for each next layer (JSON list of label objects) that is
        neither warming nor already has chunks in the cache. Never fails the mount: a bad
        list is logged and ignored."""
        for lbls in next_layer_labels(next_layers):
            if IPFS_API_LABEL in labels and IPFS_API_LABEL not in lbls:
                lbls[IPFS_API_LABEL] = labels[IPFS_API_LABEL]
            digest = lbls.get(LAYER_DIGEST_LABEL, "")
            with self._lock:
                if digest in self._warming or digest in self._handed:
                    continue
            try:
                self._start_warm(lbls)
            except (IpfsnapError, OSError) as exc:
                log.warning("warm-up of layer %s not started: %s", digest, exc)

    def _start_warm(self, labels: Mapping[str, str]) -> None:
        digest = labels.get(LAYER_DIGEST_LABEL, "")
        wdir = self.run_dir / ("warm-" + digest.partition(":")[2][:16])
        spec = self.spec_for(wdir / "unused-mountpoint", labels)
        cache = Path(spec.cache_dir)
        if spec.toc_cache == "off":
            with contextlib.suppress(OSError):
                if cache.is_dir() and any(os.scandir(cache)):
                    return  # fetched before (an earlier pull or a restart): nothing to gain
        elif self.tables.path(spec.layer, spec.toc_digest).exists():
            return  # warmed before (its tables are stored): nothing to gain
        wdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        spec.status_path = str(wdir / "status.json")
        spec_path = wdir / "spec.json"
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(spec.to_json())
        if self.warm_serve and spec.toc_cache != "off" and \
                not self.tables.warming(spec.layer) and self._warm_in_spare(digest, spec_path):
            return
        # the warm-up lock is taken here and inherited by the warm-up, so a worker of this
        # layer that starts before the warm-up process runs still sees it (tablecache doc)
        lock_fd: int | None = None
        if spec.toc_cache != "off":
            lock_fd = self.tables.lock_warm(spec.layer)
            if lock_fd is None:
                log.info("layer %s: already warming (another process)", digest)
                return
        logfile = open(wdir / "worker.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            argv = [self.python, "-m", "ipfsnap.fs.worker", "--warm", str(spec_path)]
            if lock_fd is not None:
                argv += ["--lock-fd", str(lock_fd)]
            if self.warm_nice > 0:
                argv += ["--nice", str(self.warm_nice)]
            serve = self.warm_serve and spec.toc_cache != "off"
            if serve:
                argv.append("--serve")
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE if serve else subprocess.DEVNULL,
                stdout=logfile, stderr=logfile,
                start_new_session=True, close_fds=True, cwd="/",
                pass_fds=() if lock_fd is None else (lock_fd,),
            )
        finally:
            logfile.close()
            if lock_fd is not None:
                os.close(lock_fd)  # the warm-up holds the lock now (or nobody, if it failed)
        with self._lock:
            self._warming[digest] = proc
            self._warm_started[digest] = time.monotonic()
        log.info("warming up layer %s (pid %d)", digest, proc.pid)

    # -- spare worker ---------------------------------------------------------------------
    def _new_spare(self, report_ready: bool = False,
                   nice: int = 0) -> subprocess.Popen[bytes] | None:
        """A ``worker --stdin`` process; with ``report_ready`` its stdout is a pipe on which
        it writes one byte once its imports are done (worker.wait_for_request). It waits
        for a request until its stdin closes (the mounter closed or died): the pool stays
        filled between pulls. ``nice``: started that much nicer (:meth:`_wake` undoes it)."""
        try:
            proc = subprocess.Popen(
                [self.python, "-m", "ipfsnap.fs.worker", "--stdin", "--idle", "0"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE if report_ready else subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                cwd="/",
            )
        except OSError as exc:
            log.warning("cannot start a spare layer worker: %s", exc)
            return None
        if nice > 0:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, proc.pid, self._priority + nice)
        return proc

    def _wake(self, proc: subprocess.Popen[bytes]) -> None:
        """Give a (replacement, niced) spare the mounter's priority before its request."""
        with contextlib.suppress(OSError):
            if os.getpriority(os.PRIO_PROCESS, proc.pid) != self._priority:
                os.setpriority(os.PRIO_PROCESS, proc.pid, self._priority)

    def _start_spare(self, nice: int = 0) -> None:
        if not self.spare:
            return
        with self._lock:
            if self._closed or (self._spare is not None and self._spare.poll() is None):
                return
            self._spare = self._new_spare(nice=nice)

    def _refill_later(self) -> None:
        """Replace used spares once no mount is in progress and none ended or took a spare
        during :attr:`refill_quiet` seconds (a pull's mounts follow each other at once),
        niced (:data:`REFILL_NICE`): the next pull finds the pool full, its imports done."""
        if not self.spare:
            return
        with self._lock:
            self._last_request = time.monotonic()
            if self._closed or (self._refiller is not None and self._refiller.is_alive()):
                return
            self._refiller = threading.Thread(target=self._refill, name="spare refill",
                                              daemon=True)
            self._refiller.start()

    def _refill(self) -> None:
        nice = REFILL_NICE if self.refill_quiet > 0 else 0
        while True:
            with self._lock:
                if self._closed:
                    return
                wait = self._last_request + self.refill_quiet - time.monotonic()
                if self._mounting:  # a mount in progress (it may wait for a warm-up)
                    wait = max(wait, min(self.refill_quiet, 0.1))
            if wait <= 0:
                break
            time.sleep(wait)
        self._start_spare(nice=nice)
        with self._lock:
            self._warm_spares = [p for p in self._warm_spares if p.poll() is None]
            while not self._closed and len(self._warm_spares) < self.warm_spares:
                proc = self._new_spare(report_ready=True, nice=nice)
                if proc is None:
                    break
                self._warm_spares.append(proc)
        log.debug("spare layer workers refilled")

    def _warm_in_spare(self, digest: str, spec_path: Path) -> bool:
        """Run the warm-up of ``digest`` in the warm spare (it takes the warm-up lock
        itself, then serves the layer as a ``--warm --serve`` process does); whether it
        took it. Its stdin stays open for the layer's mount spec (:meth:`_hand_to_warm`)."""
        with self._lock:
            # only a spare whose imports are done (it said so): it takes the warm-up lock
            # within milliseconds, so a worker of the layer cannot miss the warm-up
            ready = [p for p in self._warm_spares
                     if p.stdin is not None and p.stdout is not None and
                     select.select([p.stdout], [], [], 0)[0]]
            if not ready:
                return False
            proc = ready[0]
            self._warm_spares.remove(proc)
        assert proc.stdin is not None and proc.stdout is not None
        self._wake(proc)
        self._refill_later()
        with contextlib.suppress(OSError):
            proc.stdout.close()
        try:
            if proc.poll() is not None:
                raise BrokenPipeError("warm spare exited")
            proc.stdin.write(WARM_REQUEST + os.fsencode(spec_path) + b"\n")
            proc.stdin.flush()
        except OSError as exc:
            log.debug("warm spare unusable (%s)", exc)
            with contextlib.suppress(OSError):
                proc.stdin.close()
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
            return False
        with self._lock:
            self._warming[digest] = proc
            self._warm_started[digest] = time.monotonic()
        log.info("warming up layer %s in the warm spare (pid %d)", digest, proc.pid)
        return True

    def _hand_to_warm(self, layer: str, spec_path: Path) -> subprocess.Popen[bytes] | None:
        """Give the spec to the layer's own warm-up (``--serve``), which serves the layer with
        the tables it holds in memory once its warm-up is done; None if there is no such
        warm-up alive and young enough (see :data:`WARM_HANDOFF_WINDOW`)."""
        with self._lock:
            proc = self._warming.get(layer)
            started = self._warm_started.get(layer, 0.0)
            if proc is None or proc.stdin is None or proc.poll() is not None or \
                    time.monotonic() - started > WARM_HANDOFF_WINDOW:
                return None
            del self._warming[layer]
            self._handed.add(layer)
        if not self._send_spec(proc, spec_path, f"warm-up of layer {layer}"):
            return None
        log.info("layer %s: handed to its warm-up (pid %d)", layer, proc.pid)
        return proc

    @staticmethod
    def _send_spec(proc: subprocess.Popen[bytes], spec_path: Path, what: str) -> bool:
        """Write the spec path to a waiting process's stdin (then EOF); on failure the
        process is killed and reaped."""
        try:
            if proc.stdin is None or proc.poll() is not None:
                raise BrokenPipeError(f"{what} exited")
            proc.stdin.write(os.fsencode(spec_path) + b"\n")
            proc.stdin.close()
        except OSError as exc:
            log.debug("%s unusable (%s): starting a new worker", what, exc)
            with contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
            return False
        return True

    def _hand_to_spare(self, spec_path: Path) -> subprocess.Popen[bytes] | None:
        """Give the spec to the spare worker; None if there is none alive."""
        with self._lock:
            proc, self._spare = self._spare, None
        if proc is not None:
            self._wake(proc)
        if proc is None or not self._send_spec(proc, spec_path, "spare layer worker"):
            return None
        return proc

    def close(self) -> None:
        """Stop the spare worker and warm-ups (mounted layers keep being served)."""
        with self._lock:
            self._closed = True  # no refill after this
            warming = list(self._warming.values())
            warming += self._warm_spares
            self._warm_spares = []
            proc, self._spare = self._spare, None
        for w in warming:
            if w.stdin is not None:
                with contextlib.suppress(OSError):
                    w.stdin.close()  # EOF: a warm-up waiting to serve exits
            if w.poll() is None:
                w.terminate()
            w.wait()
        if proc is not None:
            with contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()  # EOF: the spare exits
            try:
                proc.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- helpers --------------------------------------------------------------------------
    def reap(self) -> None:
        """Collect workers of lazily unmounted layers that have exited."""
        with self._lock:
            self._detached = [p for p in self._detached if p.poll() is None]
            # finished warm-ups stay listed (the layer is not warmed twice), reaped here
            for w in self._warming.values():
                w.poll()

    def _wait_exit(self, proc: subprocess.Popen[bytes] | None, pid: int,
                   mountpoint: Path) -> None:
        deadline = time.monotonic() + EXIT_TIMEOUT
        while time.monotonic() < deadline:
            if proc is not None:
                if proc.poll() is not None:
                    return
            elif not pid_alive(pid):
                return
            time.sleep(0.05)
        target = proc.pid if proc is not None else pid
        if target > 0 and pid_alive(target):
            log.warning("%s: worker %d did not exit after unmount, killing it", mountpoint,
                        target)
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGKILL)
        if proc is not None:
            proc.wait()

    def _stop(self, proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if is_mountpoint(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False,
                           capture_output=True)

    @staticmethod
    def _log_tail(wdir: Path, lines: int = 5) -> str:
        try:
            text = (wdir / "worker.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "worker exited"
        tail = [ln for ln in text.splitlines() if ln.strip()][-lines:]
        return " | ".join(tail) or "worker exited"
