"""Fault injection for lazily mounted layers (issue 8, "Faults"), with real processes.

- :class:`FaultProxy`: the IPFS API behind a loopback proxy (``tests/fs/proxy.py``'s
  StallingProxy) that can also delay replies or flip bytes in the bodies of ``cat`` replies.
- :class:`RandomReads`: random reads (random file, offset, length) of a mounted tree, each
  checked byte for byte against the expected content and counted in :class:`ReadStats`
  (ok / EIO / other errno / wrong bytes, latency of the failed reads).
- one function per fault, ``fault_*(setup) -> FaultResult``, shared by the CI tests
  (``tests/reliability/test_faults.py``) and the full campaign::

      .venv/bin/python -m tests.reliability.faults [--reads 1000] [--only NAME ...]

  which prints the table of docs/reliability.md ("Faults").

Reads bypass the page cache (layer mounts with ``direct_io``; through the snapshotter and
overlayfs, ``posix_fadvise(DONTNEED)`` before each read), so every read reaches the layer
worker; the layer mounts of the IPFS faults get a chunk cache limited to an eighth of the
layer, so that most reads go to IPFS through the fault instead of hitting the cache.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipfsnap.config import load_config
from ipfsnap.fs import LayerMounter
from ipfsnap.fs.errors import LayerMountError
from ipfsnap.fs.spec import read_status
from ipfsnap.ipfs import IPFSClient
from ipfsnap.ipfs.node import ManagedNode
from ipfsnap.service import SnapshotterClient, connect_or_start
from ipfsnap.snapshot import REMOTE_LABEL, TARGET_SNAPSHOT_LABEL, Kind
from ipfsnap.snapshot.errors import SnapshotExists
from ipfsnap.snapshot.mount import mounts_under
from tests.fs.layers import CHUNK, Blob, Item, build_blob, make_tar
from tests.fs.mounts import make_mounter, mounted, wait_status
from tests.fs.proxy import StallingProxy
from tests.fs.test_cache_mount import tmpfs
from tests.fs.test_ipfs import free_port, ipfs_labels
from tests.image.rpull_helpers import push
from tests.service.conftest import Svc, _cleanup

#: the longest random read: two FUSE requests of the kernel's default 128 KiB
MAX_READ = 256 * 1024
#: seconds a read loop sleeps after a failed read (a real reader does not spin on errors)
ERROR_PAUSE = 0.01
#: fetching_timeout_sec of the fault mounts: short, so that a stalled phase costs seconds
TIMEOUT = 3


# -- proxy --------------------------------------------------------------------------------------

class FaultProxy(StallingProxy):
    """StallingProxy (``stalled``: accept, forward nothing) that can also delay every reply
    piece by ``delay`` seconds and flip one byte of a ``cat`` reply piece with probability
    ``flip_probability`` (``flipped`` counts them)."""

    def __init__(self, upstream: tuple[str, int], *, seed: int = 0) -> None:
        self.delay = 0.0
        self.flip_probability = 0.0
        self.flipped = 0
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        #: per upstream socket: whether the request in flight on it is a ``cat``
        self._cat: dict[int, bool] = {}
        super().__init__(upstream)

    @classmethod
    def for_node(cls, node: ManagedNode, seed: int = 0) -> FaultProxy:
        host, _, port = node.api_url.rpartition(":")
        return cls((host.rpartition("/")[2], int(port)), seed=seed)

    def transform(self, src: socket.socket, dst: socket.socket, data: bytes) -> bytes:
        try:
            reply = src.getpeername()[1] == self.upstream[1]
        except OSError:
            return data
        if not reply:
            if data.startswith(b"POST "):
                self._cat[id(dst)] = b"/api/v0/cat" in data.split(b"\r\n", 1)[0]
            return data
        if self.delay:
            time.sleep(self.delay)
        if not self._cat.get(id(src)) or not self.flip_probability:
            return data
        # body bytes only: a flipped status line or header is a protocol error, not a test
        # of the chunk verification
        head = data.find(b"\r\n\r\n")
        start = head + 4 if head >= 0 else 0
        with self._rng_lock:
            if start >= len(data) or self._rng.random() >= self.flip_probability:
                return data
            pos = self._rng.randrange(start, len(data))
            mask = self._rng.randrange(1, 256)
            self.flipped += 1
        out = bytearray(data)
        out[pos] ^= mask
        return bytes(out)


# -- random reads ---------------------------------------------------------------------------------

@dataclass
class ReadStats:
    reads: int = 0
    ok: int = 0
    eio: int = 0
    #: other failures by errno name (ENOTCONN of a dead FUSE server, ETIMEDOUT ...)
    other: dict[str, int] = field(default_factory=dict)
    #: reads that returned bytes differing from the expected ones, and how many bytes
    wrong_reads: int = 0
    wrong_bytes: int = 0
    error_seconds: list[float] = field(default_factory=list)
    ok_seconds: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, outcome: str, seconds: float, wrong: int) -> None:
        with self._lock:
            self.reads += 1
            if wrong:
                self.wrong_reads += 1
                self.wrong_bytes += wrong
            if outcome == "ok":
                self.ok += 1
                self.ok_seconds.append(seconds)
                return
            self.error_seconds.append(seconds)
            if outcome == "EIO":
                self.eio += 1
            else:
                self.other[outcome] = self.other.get(outcome, 0) + 1

    def merge(self, other: ReadStats) -> None:
        with self._lock:
            self.reads += other.reads
            self.ok += other.ok
            self.eio += other.eio
            for k, v in other.other.items():
                self.other[k] = self.other.get(k, 0) + v
            self.wrong_reads += other.wrong_reads
            self.wrong_bytes += other.wrong_bytes
            self.error_seconds += other.error_seconds
            self.ok_seconds += other.ok_seconds

    def wait_reads(self, n: int, timeout: float = 300.0) -> None:
        """Block until ``n`` reads are counted (readers run in other threads)."""
        deadline = time.monotonic() + timeout
        while self.reads < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.reads} of {n} reads done in {timeout:g}s: "
                                     "reads hang")
            time.sleep(0.02)

    def error_p50(self) -> float:
        return statistics.median(self.error_seconds) if self.error_seconds else 0.0

    def error_max(self) -> float:
        return max(self.error_seconds, default=0.0)

    def summary(self) -> str:
        other = ", ".join(f"{k} {v}" for k, v in sorted(self.other.items()))
        return (f"{self.reads} reads: {self.ok} ok, {self.eio} EIO"
                f"{', ' + other if other else ''}, {self.wrong_bytes} wrong bytes; errors "
                f"p50 {self.error_p50():.2f}s max {self.error_max():.2f}s")


def count_wrong(got: bytes, want: bytes) -> int:
    """Bytes of ``got`` that differ from ``want`` (same length)."""
    if got == want:
        return 0
    return sum(1 for a, b in zip(got, want, strict=True) if a != b)


class RandomReads:
    """Random reads of the files ``files`` (relative path -> content) under ``root``."""

    def __init__(self, root: Path, files: Mapping[str, bytes], *, drop_cache: bool = True
                 ) -> None:
        self.root = root
        self.files = dict(files)
        self.names = sorted(n for n, d in self.files.items() if d)
        self.drop_cache = drop_cache

    def one(self, rng: random.Random, stats: ReadStats) -> str:
        name = rng.choice(self.names)
        data = self.files[name]
        offset = rng.randrange(len(data))
        length = rng.randint(1, min(MAX_READ, len(data) - offset))
        want = data[offset : offset + length]
        got = bytearray()
        outcome = "ok"
        t0 = time.monotonic()
        try:
            fd = os.open(self.root / name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if self.drop_cache:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                while len(got) < length:
                    piece = os.pread(fd, length - len(got), offset + len(got))
                    if not piece:
                        break
                    got += piece
            finally:
                os.close(fd)
        except OSError as exc:
            outcome = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        seconds = time.monotonic() - t0
        wrong = count_wrong(bytes(got), want[: len(got)])
        if outcome == "ok" and len(got) < length:
            wrong += length - len(got)  # a file shorter than it is: wrong data too
        stats.add(outcome, seconds, wrong)
        return outcome

    def run(self, stats: ReadStats, n: int | None, *, threads: int = 4, seed: int = 0,
            stop: threading.Event | None = None) -> None:
        """``n`` reads (None: until ``stop`` is set) on ``threads`` threads; blocks."""
        counter = iter(range(n)) if n is not None else None
        lock = threading.Lock()
        failures: list[BaseException] = []

        def loop(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            try:
                while stop is None or not stop.is_set():
                    if counter is not None:
                        with lock:
                            if next(counter, None) is None:
                                return
                    if self.one(rng, stats) != "ok":
                        time.sleep(ERROR_PAUSE)
            except BaseException as exc:  # reported by the caller
                failures.append(exc)

        workers = [threading.Thread(target=loop, args=(i,), daemon=True)
                   for i in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        if failures:
            raise failures[0]

    @contextlib.contextmanager
    def background(self, stats: ReadStats, n: int | None = None, *, threads: int = 4,
                   seed: int = 0) -> Iterator[None]:
        """Read in other threads while the body runs (it injects a fault): until the body
        ends, ``n`` reads at most."""
        stop = threading.Event()
        t = threading.Thread(target=self.run, args=(stats, n),
                             kwargs={"threads": threads, "seed": seed, "stop": stop},
                             daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join(600)

    def verify_all(self) -> list[str]:
        """Read every file whole; the names whose content is not exactly the expected one
        (or that fail to read)."""
        bad = []
        for name, data in sorted(self.files.items()):
            try:
                with open(self.root / name, "rb") as f:
                    if self.drop_cache:
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                    if f.read() != data:
                        bad.append(name)
            except OSError as exc:
                bad.append(f"{name} ({exc.strerror})")
        return bad


# -- results ----------------------------------------------------------------------------------

@dataclass
class FaultResult:
    fault: str
    stats: ReadStats
    #: fetching_timeout_sec of the mount (0: the reads do not wait on the faulty part)
    timeout: float
    recovered: bool
    #: per phase of the run: ``[(phase, stats)]``
    phases: list[tuple[str, ReadStats]] = field(default_factory=list)
    #: what the logs said about the fault (a few lines)
    log: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def phase(self, name: str) -> ReadStats:
        st = ReadStats()
        self.phases.append((name, st))
        return st

    def finish(self) -> FaultResult:
        for _, st in self.phases:
            self.stats.merge(st)
        return self

    def describe(self) -> str:
        lines = [f"{self.fault}: {self.stats.summary()}; recovered: {self.recovered}"]
        lines += [f"  {name}: {st.summary()}" for name, st in self.phases]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  log: {ln}" for ln in self.log]
        return "\n".join(lines)


def table(results: list[FaultResult]) -> str:
    head = ("| fault | reads | ok | EIO | other errors | wrong bytes | error latency p50 / max "
            "| timeout | recovered |")
    rows = [head, "|" + "---|" * 9]
    for r in results:
        s = r.stats
        other = ", ".join(f"{k} {v}" for k, v in sorted(s.other.items())) or "0"
        lat = f"{s.error_p50():.2f} / {s.error_max():.2f} s" if s.error_seconds else "-"
        rows.append(f"| {r.fault} | {s.reads} | {s.ok} | {s.eio} | {other} | {s.wrong_bytes} "
                    f"| {lat} | {f'{r.timeout:g} s' if r.timeout else '-'} "
                    f"| {'yes' if r.recovered else 'NO'} |")
    return "\n".join(rows)


def log_lines(path: Path, *needles: str, limit: int = 2) -> list[str]:
    """The first ``limit`` lines of ``path`` containing every needle, without timestamps."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        text = line.split(" ", 2)[-1][:300]
        if all(n in line for n in needles) and text not in out:
            out.append(text)
            if len(out) >= limit:
                break
    return out


# -- set-up -----------------------------------------------------------------------------------

def layer_files(total: int, seed: int) -> dict[str, bytes]:
    """Files of random bytes, about ``total`` bytes: edge sizes around the chunk size, the
    rest in files of a few chunks."""
    rng = random.Random(seed)
    sizes = [1, 100, 4095, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17, 300_001]
    while sum(sizes) < total:
        sizes.append(rng.randint(4 * CHUNK, 24 * CHUNK))
    return {f"d{i % 3}/f{i:02d}": rng.randbytes(n) for i, n in enumerate(sizes)}


def items_of(files: Mapping[str, bytes]) -> list[Item]:
    dirs = sorted({name.rpartition("/")[0] for name in files})
    return [Item(d, "dir", mode=0o755) for d in dirs] + [
        Item(name, "file", data) for name, data in files.items()]


@dataclass
class Layer:
    blob: Blob
    cid: str
    files: dict[str, bytes]


@dataclass
class FaultSetup:
    """What every fault runs against: a scratch dir, an IPFS node whose API address
    survives restarts, and a layer added to it."""

    work: Path
    node: ManagedNode
    layer: Layer
    reads: int = 1000
    threads: int = 4
    timeout: int = TIMEOUT
    seed: int = 1

    def scratch(self, name: str) -> Path:
        d = Path(tempfile.mkdtemp(prefix=name + "-", dir=self.work))
        return d

    def reads_of(self, fraction: float) -> int:
        return max(1, round(self.reads * fraction))


@contextlib.contextmanager
def fixed_node(repo: Path) -> Iterator[ManagedNode]:
    """A managed node on a fixed API port (a restart keeps the address), offline."""
    node = ManagedNode(repo, api=f"/ip4/127.0.0.1/tcp/{free_port()}", offline=True)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def make_layer(work: Path, node: ManagedNode, total: int, seed: int) -> Layer:
    files = layer_files(total, seed)
    blob = build_blob(items_of(files), work / f"layer{seed}.blob")
    with IPFSClient(node.api_url) as c:
        cid = c.add(blob.path).cid
    return Layer(blob, cid, files)


def layer_mounter(state: Path, api: str, setup: FaultSetup, *, background: bool,
                  cache_limit: int | None = None) -> LayerMounter:
    """A mounter of IPFS layers with every read reaching the worker (direct_io)."""
    m = make_mounter(state, background=background, direct_io=True)
    cfg = m.config
    cfg.ipfs_api = api
    cfg.blob.fetching_timeout_sec = setup.timeout
    cfg.blob.max_retries = 2
    cfg.max_concurrency = setup.threads
    cfg.cache_size_limit = setup.layer.blob.size // 8 if cache_limit is None else cache_limit
    return m


def cache_entries(cache_dir: Path) -> list[Path]:
    return [p for p in cache_dir.iterdir() if len(p.name) == 64]


def bad_cache_entries(cache_dir: Path) -> list[str]:
    """Entries whose content does not hash to their name, and temp files left behind."""
    bad = [p.name for p in cache_dir.iterdir() if p.name.endswith(".tmp")]
    for p in cache_entries(cache_dir):
        if hashlib.sha256(p.read_bytes()).hexdigest() != p.name:
            bad.append(p.name)
    return bad


# -- faults: a layer mounted straight from IPFS -----------------------------------------------

def fault_daemon_killed(setup: FaultSetup) -> FaultResult:
    """kill -9 of the IPFS daemon while reads are in flight; restart on the same address."""
    res = FaultResult("IPFS daemon killed mid-read, restarted", ReadStats(), setup.timeout,
                      False)
    work = setup.scratch("killed")
    node, layer = setup.node, setup.layer
    m = layer_mounter(work / "state", node.api_url, setup, background=False)
    mp = work / "mp"
    reader = RandomReads(mp, layer.files)
    with mounted(m, mp, ipfs_labels(layer.blob, layer.cid)):
        reader.run(res.phase("daemon up"), setup.reads_of(0.3), threads=setup.threads,
                   seed=setup.seed)
        down = res.phase("killed, restarting")
        with reader.background(down, setup.reads_of(0.1), threads=setup.threads,
                               seed=setup.seed + 1):
            down.wait_reads(setup.reads_of(0.05))
            pid = node.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)  # reads are in flight: 4 threads read non-stop
            t0 = time.monotonic()
            node.stop()  # reaps it; a start needs no manual cleanup of the repo
            node.start()
            res.notes.append(f"daemon down {time.monotonic() - t0:.1f}s (restart included)")
        reader.run(res.phase("restarted"), setup.reads_of(0.6), threads=setup.threads,
                   seed=setup.seed + 2)
        res.recovered = not reader.verify_all()
        res.log = log_lines(m.worker_dir(mp) / "worker.log", "ERROR", "EIO", limit=4)
    return res.finish()


def fault_daemon_stalls(setup: FaultSetup) -> FaultResult:
    """A proxy in front of the daemon: replies delayed, then nothing forwarded at all."""
    res = FaultResult("IPFS daemon slow, then stalled", ReadStats(), setup.timeout, False)
    work = setup.scratch("stall")
    layer = setup.layer
    proxy = FaultProxy.for_node(setup.node)
    try:
        m = layer_mounter(work / "state", proxy.url, setup, background=False)
        mp = work / "mp"
        reader = RandomReads(mp, layer.files)
        with mounted(m, mp, ipfs_labels(layer.blob, layer.cid)):
            reader.run(res.phase("forwarding"), setup.reads_of(0.3), threads=setup.threads,
                       seed=setup.seed)
            # 20 ms per forwarded reply piece: reads get slower, well within the timeout
            proxy.delay = 0.02
            reader.run(res.phase("delayed 20 ms per piece"), setup.reads_of(0.2),
                       threads=setup.threads, seed=setup.seed + 1)
            proxy.delay = 0.0
            proxy.stalled.set()
            proxy.drop_connections()
            # twice as many readers as concurrent fetches: queued reads must fail in time too
            reader.run(res.phase("stalled"), setup.reads_of(0.05), threads=2 * setup.threads,
                       seed=setup.seed + 2)
            proxy.stalled.clear()
            proxy.drop_connections()
            reader.run(res.phase("forwarding again"), setup.reads_of(0.45),
                       threads=setup.threads, seed=setup.seed + 3)
            res.recovered = not reader.verify_all()
            res.log = log_lines(m.worker_dir(mp) / "worker.log", "ERROR", "longer than")
    finally:
        proxy.close()
    return res.finish()


def fault_flipped_bytes(setup: FaultSetup) -> FaultResult:
    """A proxy that flips one byte in a quarter of the ``cat`` reply pieces."""
    res = FaultResult("proxy flips bytes in cat replies", ReadStats(), setup.timeout, False)
    work = setup.scratch("flip")
    layer = setup.layer
    proxy = FaultProxy.for_node(setup.node, seed=setup.seed)
    try:
        m = layer_mounter(work / "state", proxy.url, setup, background=False)
        mp = work / "mp"
        reader = RandomReads(mp, layer.files)
        # a mount while every reply is damaged: the footer and TOC checks refuse it, unless
        # every flipped byte fell outside them (the worker reads the blob's end from the
        # start of the footer's IPFS block, fs.source.TailReader): then it must hold only
        # verified bytes, so every file reads back exactly
        proxy.flip_probability = 1.0
        try:
            with mounted(m, mp, ipfs_labels(layer.blob, layer.cid)):
                proxy.flip_probability = 0.0
                first_safe = not reader.verify_all()
                res.notes.append("mount while flipping: the damaged bytes were not the "
                                 f"footer's or the TOC's; files exact: {first_safe}")
        except LayerMountError as exc:
            first_safe = True
            res.notes.append(f"mount while flipping: refused: {str(exc)[-160:]}")
        proxy.flip_probability = 0.0
        with mounted(m, mp, ipfs_labels(layer.blob, layer.cid)):
            proxy.flip_probability = 0.25
            reader.run(res.phase("flipping"), setup.reads_of(0.7), threads=setup.threads,
                       seed=setup.seed)
            proxy.flip_probability = 0.0
            res.notes.append(f"{proxy.flipped} bytes flipped")
            reader.run(res.phase("clean"), setup.reads_of(0.3), threads=setup.threads,
                       seed=setup.seed + 1)
            res.recovered = first_safe and not reader.verify_all() and proxy.flipped > 0
            wlog = m.worker_dir(mp) / "worker.log"
            res.log = log_lines(wlog, "ERROR", "digest", limit=1) + \
                log_lines(wlog, "ERROR", "EIO", limit=1)
    finally:
        proxy.close()
    return res.finish()


def fault_full_cache_disk(setup: FaultSetup) -> FaultResult:
    """The chunk cache on a 256 KiB tmpfs (4 chunks), then grown to 64 MiB."""
    res = FaultResult("chunk cache disk full (256 KiB tmpfs)", ReadStats(), 0, False)
    work = setup.scratch("full")
    layer = setup.layer
    m = layer_mounter(work / "state", setup.node.api_url, setup, background=True,
                      cache_limit=0)
    mp = work / "mp"
    reader = RandomReads(mp, layer.files)
    with tmpfs(m.cache_root, "256k"), mounted(m, mp, ipfs_labels(layer.blob, layer.cid)):
        wait_status(m, mp, lambda s: s["cache_write_failures"] > 0)
        reader.run(res.phase("disk full"), setup.reads_of(0.7), threads=setup.threads,
                   seed=setup.seed)
        failures = wait_status(m, mp, lambda s: True)["cache_write_failures"]
        cache_dir = m.cache_root / layer.blob.digest[7:]
        before = len(cache_entries(cache_dir))
        subprocess.run(["mount", "-o", "remount,size=64m", str(m.cache_root)], check=True)
        res.notes.append(f"{failures} cache writes failed while full, {before} entries fit")
        # one status interval for writes that were failing at the remount to be counted
        time.sleep(0.5)
        failures = wait_status(m, mp, lambda s: True)["cache_write_failures"]
        reader.run(res.phase("space again"), setup.reads_of(0.3), threads=setup.threads,
                   seed=setup.seed + 1)
        st = wait_status(m, mp, lambda s: True)
        after = len(cache_entries(cache_dir))
        res.notes.append(f"after the remount: {after - before} entries written, "
                         f"{st['cache_write_failures'] - failures} writes failed")
        res.recovered = (not reader.verify_all() and after > before
                         and st["cache_write_failures"] == failures)
        wlog = m.worker_dir(mp) / "worker.log"
        res.log = log_lines(wlog, "WARNING", "cannot write", limit=1) + \
            log_lines(wlog, "background fetch paused", limit=1)
    return res.finish()


def corrupt_entries(cache_dir: Path, rng: random.Random, fraction: float) -> int:
    """Damage a fraction of the cache entries, four ways in turn: a flipped byte, cut in
    half, emptied, replaced by another (valid) entry's content."""
    entries = sorted(cache_entries(cache_dir))
    victims = rng.sample(entries, max(1, int(len(entries) * fraction)))
    for i, p in enumerate(victims):
        data = p.read_bytes()
        kind = i % 4
        if kind == 0 and data:
            pos = rng.randrange(len(data))
            data = data[:pos] + bytes([data[pos] ^ 0x5A]) + data[pos + 1 :]
        elif kind == 1:
            data = data[: len(data) // 2]
        elif kind == 2:
            data = b""
        else:
            data = next(e for e in entries if e != p).read_bytes()
        p.write_bytes(data)
    return len(victims)


def fault_corrupt_cache(setup: FaultSetup) -> FaultResult:
    """Chunk files damaged on disk after the whole layer was cached: twice with IPFS up
    (refetched), once more with IPFS stalled (EIO, not the damaged bytes)."""
    res = FaultResult("cache files of chunks corrupted on disk", ReadStats(), setup.timeout,
                      False)
    work = setup.scratch("corrupt")
    layer = setup.layer
    proxy = FaultProxy.for_node(setup.node)
    try:
        m = layer_mounter(work / "state", proxy.url, setup, background=True, cache_limit=0)
        mp = work / "mp"
        reader = RandomReads(mp, layer.files)
        rng = random.Random(setup.seed)
        with mounted(m, mp, ipfs_labels(layer.blob, layer.cid)):
            wait_status(m, mp, lambda s: s["state"] == "complete", timeout=120)
            cache_dir = m.cache_root / layer.blob.digest[7:]
            damaged = 0
            for i in range(2):  # damage, read; damage again (refetched entries too), read
                damaged += corrupt_entries(cache_dir, rng, 0.5)
                reader.run(res.phase(f"damaged cache, round {i + 1}"), setup.reads_of(0.475),
                           threads=setup.threads, seed=setup.seed + i)
            damaged += corrupt_entries(cache_dir, rng, 0.5)
            proxy.stalled.set()
            proxy.drop_connections()
            # each read of a damaged chunk now waits for the timeout: few reads, more threads
            reader.run(res.phase("damaged cache, IPFS stalled"), setup.reads_of(0.05),
                       threads=2 * setup.threads, seed=setup.seed + 2)
            proxy.stalled.clear()
            proxy.drop_connections()
            res.recovered = not reader.verify_all() and not bad_cache_entries(cache_dir)
            wlog = m.worker_dir(mp) / "worker.log"
            found = wlog.read_text(encoding="utf-8", errors="replace").count("does not match")
            res.notes.append(f"{damaged} entries damaged, {found} found damaged by reads (the "
                             "rest were still in the worker's RAM or not read again)")
            res.log = log_lines(wlog, "does not match", limit=1)
    finally:
        proxy.close()
    return res.finish()


# -- faults: the snapshotter service ----------------------------------------------------------

@contextlib.contextmanager
def service(work: Path, name: str, config_text: str) -> Iterator[Svc]:
    """A state dir and config for a snapshotter service, everything it started stopped and
    unmounted at the end (as tests/service's ``make_svc``)."""
    state = work / name
    state.mkdir()
    cfg_path = work / f"{name}.toml"
    cfg_path.write_text(config_text, encoding="utf-8")
    svc = Svc(state, load_config(config_path=cfg_path, state_dir=state, environ={}))
    try:
        yield svc
    finally:
        _cleanup(svc)


def service_config(api: str, timeout: int, threads: int) -> str:
    return (f'ipfs_api = "{api}"\nmax_concurrency = {threads}\nprefetch_timeout_sec = 10\n'
            f"[blob]\nfetching_timeout_sec = {timeout}\nmax_retries = 2\n")


def layer_state(client: SnapshotterClient, mp: Path) -> Any:
    return next(s for s in client.status() if s.mountpoint == str(mp))


def wait_layer(client: SnapshotterClient, mp: Path, pred: Callable[[Any], bool],
               timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        st = layer_state(client, mp)
        if pred(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"layer at {mp}: status never matched: {st}")
        time.sleep(0.1)


def remote_layer(svc: Svc, layer: Layer, name: str = "layer") -> tuple[Path, int]:
    """Prepare ``layer`` lazily (from IPFS) as committed snapshot ``name`` through the
    snapshotter of ``svc``, started on demand; its mountpoint and worker pid."""
    labels = {**ipfs_labels(layer.blob, layer.cid), TARGET_SNAPSHOT_LABEL: name}
    with connect_or_start(svc.config) as client:
        with contextlib.suppress(SnapshotExists):
            client.prepare("extract", labels=labels)
        mounts = client.view("probe", parent=name)
        client.remove("probe")
        mp = Path(mounts[0].source)
        return mp, layer_state(client, mp).pid


def fault_snapshotter_restarted_without_ipfs(setup: FaultSetup) -> FaultResult:
    """kill -9 of the snapshotter and the layer worker, restarted while the IPFS API stalls
    (the layer cannot be mounted again); then IPFS comes back and the next use of the
    snapshot (a view, as a container start would) mounts it again."""
    res = FaultResult("snapshotter + worker kill -9, restarted while IPFS stalls",
                      ReadStats(), setup.timeout, False)
    work = setup.scratch("svcnoipfs")
    layer = setup.layer
    proxy = FaultProxy.for_node(setup.node)
    try:
        with service(work, "svc", service_config(proxy.url, setup.timeout, setup.threads)
                     ) as svc:
            mp, worker = remote_layer(svc, layer)
            reader = RandomReads(mp, layer.files)
            reader.run(res.phase("serving"), setup.reads_of(0.3), threads=setup.threads,
                       seed=setup.seed)
            down = res.phase("killed, restarted without IPFS")
            with reader.background(down, setup.reads_of(0.05), threads=setup.threads,
                                   seed=setup.seed + 1):
                svc.kill9()
                os.kill(worker, signal.SIGKILL)
                proxy.stalled.set()
                proxy.drop_connections()
                with connect_or_start(svc.config) as client:  # the restore fails
                    failed = layer_state(client, mp)
                down.wait_reads(setup.reads_of(0.05))
            res.notes.append(f"after the restart: layer {failed.state}: "
                             f"{failed.last_error[:120]}")
            proxy.stalled.clear()
            proxy.drop_connections()
            with connect_or_start(svc.config) as client:
                client.view("container", parent="layer")  # mounts it again
                remounted = layer_state(client, mp)
            reader.run(res.phase("IPFS back, snapshot used again"), setup.reads_of(0.65),
                       threads=setup.threads, seed=setup.seed + 2)
            res.recovered = (failed.state == "error" and remounted.pid != worker
                             and not reader.verify_all())
            slog = svc.state / "snapshotter.log"
            res.log = log_lines(slog, "could not be restored", limit=1) + \
                log_lines(slog, "fails its check, remounting", limit=1)
    finally:
        proxy.close()
    return res.finish()


def fault_snapshotter_killed_in_background_fetch(setup: FaultSetup) -> FaultResult:
    """kill -9 of the snapshotter and of the layer's worker while it fetches the layer in
    the background (replies slowed by a proxy to widen the window); restart on demand."""
    res = FaultResult("snapshotter + layer worker kill -9 during background fetch",
                      ReadStats(), 0, False)
    work = setup.scratch("svcbg")
    layer = setup.layer
    proxy = FaultProxy.for_node(setup.node)
    # the background fetch is one request per 8 MiB (max_span): allow it time when slowed
    text = service_config(proxy.url, 60, setup.threads)
    try:
        with service(work, "svc", text) as svc:
            proxy.delay = 0.05
            mp, worker = remote_layer(svc, layer)
            reader = RandomReads(mp, layer.files)
            with connect_or_start(svc.config) as client:
                st = layer_state(client, mp)
            background = st.state != "complete"
            # the snapshotter alone (systemd's KillMode=process), right after the mount: the
            # slowed background fetch has just begun; the worker serves on
            svc.kill9()
            res.notes.append(f"snapshotter killed at {st.percent:.0f}% cached ({st.state})")
            reader.run(res.phase("snapshotter dead, worker serving"), setup.reads_of(0.3),
                       threads=setup.threads, seed=setup.seed)
            dead = res.phase("worker killed too, restarting")
            with reader.background(dead, setup.reads_of(0.1), threads=setup.threads,
                                   seed=setup.seed + 1):
                wst = read_status(next((svc.state / "fs" / "workers").glob("*/status.json")))
                res.notes.append(f"worker killed at {(wst or {}).get('percent', 0):.0f}% cached")
                os.kill(worker, signal.SIGKILL)
                dead.wait_reads(setup.reads_of(0.05))
                proxy.delay = 0.0
                with connect_or_start(svc.config) as client:  # restores the mount
                    restored = layer_state(client, mp)
            reader.run(res.phase("restarted"), setup.reads_of(0.65), threads=setup.threads,
                       seed=setup.seed + 2)
            with connect_or_start(svc.config) as client:
                done = wait_layer(client, mp, lambda s: s.state == "complete")
            cache_dir = svc.state / "fs" / "cache" / layer.blob.digest[7:]
            bad = bad_cache_entries(cache_dir)
            res.notes.append(f"new worker pid {restored.pid}, layer {done.state}, "
                             f"{len(bad)} bad cache entries")
            res.recovered = (background and restored.pid != worker and not bad
                             and not reader.verify_all())
            res.log = log_lines(svc.state / "snapshotter.log", "restored remote snapshot")
    finally:
        proxy.close()
    return res.finish()


def image_files(seed: int, layers: int = 3, per_layer: int = 6) -> list[dict[str, bytes]]:
    """Files of each layer of a test image (distinct names: the rootfs is their union)."""
    rng = random.Random(seed)
    return [{f"l{i}/f{j}": rng.randbytes(rng.randint(1, 6 * CHUNK)) for j in range(per_layer)}
            for i in range(layers)]


def fault_snapshotter_killed_in_rpull(setup: FaultSetup) -> FaultResult:
    """kill -9 of the snapshotter while ``ipfsnap image rpull`` mounts the layers; rpull
    run again, then the image mounted and read."""
    res = FaultResult("snapshotter kill -9 during rpull, rpull rerun", ReadStats(), 0, False)
    work = setup.scratch("rpull")
    layers = image_files(setup.seed)
    with IPFSClient(setup.node.api_url) as c:
        image = push(c, [make_tar(items_of(f)) for f in layers], [True] * len(layers))
    proxy = FaultProxy.for_node(setup.node)
    try:
        with service(work, "svc", service_config(proxy.url, 60, setup.threads)) as svc:
            base = [sys.executable, "-m", "ipfsnap.cli.main", "--state-dir", str(svc.state),
                    "--config", str(svc.config.config_path)]
            proxy.delay = 0.1  # slow enough to kill it mid-way
            rpull = subprocess.Popen([*base, "image", "rpull", "--ipfs", image.cid],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            workers = svc.state / "fs" / "workers"
            deadline = time.monotonic() + 120
            while not (workers.is_dir() and any(workers.glob("*/status.json"))):
                assert rpull.poll() is None, f"rpull ended before the kill: {rpull.stderr}"
                assert time.monotonic() < deadline, "rpull never started mounting a layer"
                time.sleep(0.02)
            svc.kill9()
            _, err = rpull.communicate(timeout=300)
            res.notes.append(f"killed rpull exited {rpull.returncode}: {err.strip()[-200:]}")
            proxy.delay = 0.0
            again = svc.cli("image", "rpull", "--ipfs", image.cid, check=False)
            res.notes.append(f"rerun exited {again.returncode}")
            target = work / "rootfs"
            target.mkdir()
            files = {k: v for f in layers for k, v in f.items()}
            if again.returncode == 0:
                svc.cli("image", "mount", image.cid, str(target))
                try:
                    reader = RandomReads(target, files)
                    reader.run(res.phase("image mounted after the rerun"), setup.reads,
                               threads=setup.threads, seed=setup.seed)
                    ok = not reader.verify_all()
                finally:
                    svc.cli("image", "unmount", str(target))
            else:
                ok = False
                res.notes.append(again.stderr.strip()[-300:])
            with SnapshotterClient(svc.state) as client:
                infos = client.walk()
            left = [i.name for i in infos if i.kind is Kind.ACTIVE]
            remote = [i.name for i in infos if REMOTE_LABEL in i.labels]
            mounts = mounts_under(svc.state)
            res.notes.append(f"active snapshots left: {left}; {len(mounts)} mounts for "
                             f"{len(remote)} remote snapshots")
            res.recovered = (rpull.returncode != 0 and ok and not left
                             and len(mounts) == len(remote) == len(layers))
            res.log = [err.strip()[-300:],
                       *log_lines(svc.state / "snapshotter.log", "interrupted remote prepare")]
    finally:
        proxy.close()
    return res.finish()


FAULTS: dict[str, Callable[[FaultSetup], FaultResult]] = {
    "daemon-killed": fault_daemon_killed,
    "daemon-stalls": fault_daemon_stalls,
    "flipped-bytes": fault_flipped_bytes,
    "snapshotter-killed-background": fault_snapshotter_killed_in_background_fetch,
    "snapshotter-killed-rpull": fault_snapshotter_killed_in_rpull,
    "snapshotter-restarted-without-ipfs": fault_snapshotter_restarted_without_ipfs,
    "cache-disk-full": fault_full_cache_disk,
    "cache-corrupt": fault_corrupt_cache,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.faults",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--reads", type=int, default=1000, help="random reads per fault")
    parser.add_argument("--layer-mib", type=int, default=8, help="size of the test layer")
    parser.add_argument("--only", action="append", choices=sorted(FAULTS), default=None)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.stderr.write("the fault campaign needs root (FUSE, tmpfs mounts)\n")
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="ipfsnap-faults-") as tmp:
        work = Path(tmp)
        with fixed_node(work / "ipfs") as node:
            layer = make_layer(work, node, args.layer_mib << 20, args.seed)
            setup = FaultSetup(work, node, layer, reads=args.reads, seed=args.seed)
            for name in args.only or list(FAULTS):
                t0 = time.monotonic()
                result = FAULTS[name](setup)
                result.notes.append(f"{time.monotonic() - t0:.0f}s")
                sys.stdout.write(result.describe() + "\n")
                sys.stdout.flush()
                results.append(result)
    sys.stdout.write("\n" + table(results) + "\n")
    bad = [r.fault for r in results if r.stats.wrong_bytes or not r.recovered]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
