"""Load test of the lazy path (issue 8, "Load"): concurrent random reads over lazily mounted
eStargz layers fetched from IPFS, then containers started concurrently from the same CID.

Usage (root, /dev/fuse, runc, the managed IPFS node's js-ipfs)::

    .venv/bin/python scripts/reliability_load.py --duration 300 --readers 64 --layers 8 \\
        --json load.json

Set-up, as ``tests/fixtures/ipfs.py`` does it: two managed IPFS nodes in one private network;
every blob is added on node A; the snapshotter (started on demand by ``ipfsnap image rpull``,
its own state dir, the default config) reads through node B, so chunks cross bitswap. The
image has ``--layers`` eStargz layers; layer 0 also holds busybox (the containers' shell).
Every layer holds ``load/L<i>/`` with files from 1 byte to several MiB whose bytes are a
function of (layer, file, offset) (:func:`expected`), so any read can be verified without
keeping the files around.

Phase 1, ``--duration`` seconds: ``--readers`` processes each loop over random
(layer, file, offset, length) reads of the layer mounts themselves (not the overlay), compare
every byte, and evict the file from the page cache after each read (``posix_fadvise
DONTNEED``; the mounts keep the page cache, so without it most reads would never reach the
snapshotter's workers). Meanwhile the snapshotter's and its layer workers' RSS and open fds
are sampled. Figures: reads, throughput, p50/p99 latency, errors, wrong bytes, RSS of the
first window after warm-up vs the last window, fds.

Phase 2: ``--containers`` ``ipfsnap run --rm --snapshotter=stargz CID`` started at once (runc),
each printing the markers of all layers and the sha256 of one data file; figures: wall time,
failures (exit code or output not the expected one).

Prints a Markdown table and writes every figure as JSON (``--json``). Exit status 0 only when
every check passes.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ipfsnap.content.sample import BUSYBOX_APPLETS, GROUP, PASSWD, TarEntry, build_tar
from ipfsnap.ipfs import IPFSClient
from ipfsnap.ipfs.node import ManagedNode, rpc_call
from ipfsnap.ipfs.pnet import generate_swarm_key, write_swarm_key
from ipfsnap.snapshot.mount import mounts_under

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.image.rpull_helpers import push, unmount_state  # noqa: E402 - the tests' pusher

MiB = 1 << 20
#: eStargz chunk size of the test layers: one IPFS block (FACTS.md 1: 262144-byte chunks), so a
#: chunk fetch is one or two bitswap blocks
CHUNK = 256 * 1024
#: period of the data pattern: the largest prime below 1 MiB, so that a read served from the
#: wrong chunk, page or file (all power-of-two apart) cannot match by accident
PERIOD = 1_048_573
#: every 4 KiB page of a data file starts with a 16-byte stamp naming (layer, file, page)
PAGE = 4096
STAMP = 16
#: the largest single read of a reader: 32 pages, the size of a big buffered read
MAX_READ = 128 * 1024
PATTERN_SEED = 8
#: RSS growth allowed between the first and the last window after warm-up, per process:
#: allocator noise (pymalloc arenas, glibc heap trimming) moves a busy Python process by a
#: few MiB; a leak of one 4 KiB buffer per read at the ~50 reads/s a worker serves here grows
#: it by > 10 MiB a minute, above this bound
RSS_SLACK = 8 * MiB
RSS_SLACK_FRACTION = 0.10
#: fds a process may hold more at the end than at the start of the measured part: the number
#: of requests in flight varies between samples (the workers serve reads concurrently), a fd
#: leaked per read would add hundreds
FD_SLACK = 8
CLI_TIMEOUT = 600.0
#: a read this slow is recorded with its parts (open, pread, close): 10x the p99 seen here
SLOW_READ = 3.0
IPFS_B = "ipfs node B (info)"


def _pattern() -> bytes:
    data = random.Random(PATTERN_SEED).randbytes(PERIOD)
    return data + data[:MAX_READ]  # any read of <= MAX_READ bytes is one slice


_PATTERN = b""


def expected(layer: int, index: int, offset: int, length: int) -> bytes:
    """Bytes ``[offset, offset + length)`` of data file ``index`` of layer ``layer``."""
    global _PATTERN
    if not _PATTERN:
        _PATTERN = _pattern()
    out = bytearray()
    while length > 0:
        n = min(length, MAX_READ)
        start = (offset + (layer * 1009 + index) * 7919) % PERIOD
        piece = bytearray(_PATTERN[start : start + n])
        first = offset // PAGE * PAGE
        for page_start in range(first, offset + n, PAGE):
            stamp = f"{layer:03x}{index:04x}{page_start // PAGE:09x}".encode()
            lo, hi = max(page_start, offset), min(page_start + STAMP, offset + n)
            if lo < hi:
                piece[lo - offset : hi - offset] = stamp[lo - page_start : hi - page_start]
        out += piece
        offset += n
        length -= n
    return bytes(out)


def file_sizes(layer_bytes: int) -> list[int]:
    """Data file sizes of one layer: edge cases around pages and chunks, then big files."""
    small = [1, PAGE - 1, PAGE, CHUNK + 1, 3 * CHUNK - 7]
    rest = max(layer_bytes - sum(small), 3 * MAX_READ)
    big = [rest // 2 + 4093, rest // 3 - 11]
    return small + big + [rest - sum(big)]


@dataclass(frozen=True)
class DataFile:
    layer: int
    index: int
    size: int

    @property
    def path(self) -> str:
        return f"load/L{self.layer}/f{self.index}"


def marker(layer: int) -> str:
    return f"layer {layer} of the load image"


def layer_tar(layer: int, files: Sequence[DataFile]) -> bytes:
    entries: list[TarEntry] = []
    if layer == 0:  # the containers' shell
        entries += [TarEntry("bin", "dir", mode=0o755),
                    TarEntry("bin/busybox", data=Path("/bin/busybox").read_bytes(), mode=0o755),
                    *[TarEntry(f"bin/{a}", "symlink", link="busybox") for a in BUSYBOX_APPLETS],
                    TarEntry("etc", "dir", mode=0o755), TarEntry("etc/passwd", data=PASSWD),
                    TarEntry("etc/group", data=GROUP), TarEntry("tmp", "dir", mode=0o1777)]
    entries += [TarEntry("load", "dir", mode=0o755), TarEntry(f"load/L{layer}", "dir", mode=0o755),
                TarEntry(f"load/L{layer}/marker", data=(marker(layer) + "\n").encode())]
    entries += [TarEntry(f.path, data=expected(f.layer, f.index, 0, f.size)) for f in files]
    return build_tar(entries)


# ---- processes: the IPFS nodes, the CLI ---------------------------------------------------


@contextlib.contextmanager
def ipfs_nodes(base: Path) -> Iterator[tuple[ManagedNode, ManagedNode]]:
    """Nodes A and B in one private network, B connected to A (tests/fixtures/ipfs.py)."""
    key = generate_swarm_key()
    started: list[ManagedNode] = []
    try:
        for name in ("a", "b"):
            write_swarm_key(base / name, key)
            started.append(ManagedNode(base / name).start())
        a, b = started
        rpc_call(b.api_url, "swarm/connect", timeout=30.0, arg=a.swarm_addrs[0])
        yield a, b
    finally:
        for node in reversed(started):
            node.stop()


@dataclass
class Cli:
    state: Path
    config: Path
    api: str

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "ipfsnap.cli.main", "--state-dir", str(self.state),
                "--config", str(self.config), "--ipfs-api", self.api, *args]

    def __call__(self, *args: str) -> str:
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True,
                              timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"ipfsnap {' '.join(args)} exited {proc.returncode}: "
                               f"{proc.stderr.strip()}")
        return proc.stdout


# ---- phase 1: readers ----------------------------------------------------------------------


@dataclass
class ReaderResult:
    reads: int = 0
    nbytes: int = 0
    wrong_reads: int = 0
    wrong_bytes: int = 0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    #: latency of each read (open + pread + close), seconds, as array('d') bytes
    latencies: bytes = b""
    #: when each read ended (time.monotonic()), same order, as array('d') bytes
    ends: bytes = b""
    #: reads slower than SLOW_READ: where the time went
    slow: list[dict[str, Any]] = field(default_factory=list)


def reader(seed: int, mounts: dict[int, str], files: list[DataFile], deadline: float,
           evict: bool, out: multiprocessing.connection.Connection) -> None:
    rng = random.Random(seed)
    res = ReaderResult()
    lat = array.array("d")
    ends = array.array("d")
    while time.monotonic() < deadline:
        f = rng.choice(files)
        length = rng.randint(1, min(MAX_READ, f.size))
        offset = rng.randint(0, f.size - length)
        path = os.path.join(mounts[f.layer], f.path)
        t0 = time.perf_counter()
        t1 = t2 = t0
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                t1 = time.perf_counter()
                data = os.pread(fd, length, offset)
                t2 = time.perf_counter()
                if evict:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except OSError as exc:
            res.error_count += 1
            if len(res.errors) < 5:
                res.errors.append(f"{path} [{offset}:+{length}]: {exc}")
            continue
        t3 = time.perf_counter()
        lat.append(t3 - t0)
        ends.append(time.monotonic())
        if t3 - t0 >= SLOW_READ and len(res.slow) < 20:
            res.slow.append({"end": time.monotonic(), "path": f.path, "offset": offset,
                             "length": length, "open_s": round(t1 - t0, 3),
                             "pread_s": round(t2 - t1, 3), "close_s": round(t3 - t2, 3)})
        res.reads += 1
        res.nbytes += len(data)
        want = expected(f.layer, f.index, offset, length)
        if data != want:
            res.wrong_reads += 1
            res.wrong_bytes += sum(1 for x, y in zip(data, want, strict=False) if x != y)
            res.wrong_bytes += abs(len(want) - len(data))
            if len(res.errors) < 5:
                res.errors.append(f"{path} [{offset}:+{length}]: wrong bytes (got {len(data)})")
    res.latencies = lat.tobytes()
    res.ends = ends.tobytes()
    out.send(asdict(res))
    out.close()


def proc_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def proc_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


class Sampler(threading.Thread):
    """RSS and open fds of the given processes every ``interval`` s."""

    def __init__(self, pids: dict[str, int], interval: float) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.interval = interval
        self.t0 = time.monotonic()
        self.samples: list[dict[str, Any]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            row: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 2), "rss": {},
                                   "fds": {}}
            for name, pid in self.pids.items():
                row["rss"][name] = proc_rss(pid)
                row["fds"][name] = proc_fds(pid)
            self.samples.append(row)
            self.stopped.wait(self.interval)


def window(samples: list[dict[str, Any]], lo: float, hi: float) -> list[dict[str, Any]]:
    return [s for s in samples if lo <= s["t"] < hi]


def memory_figures(samples: list[dict[str, Any]], names: Sequence[str], warmup: float,
                   win: float, duration: float) -> dict[str, Any]:
    """Per process: mean RSS of the first window after warm-up and of the last window, max
    fds in each, and whether growth stays within the slack."""
    first = window(samples, warmup, warmup + win)
    last = window(samples, duration - win, duration + 1)
    out: dict[str, Any] = {"first_window_s": [warmup, warmup + win],
                           "last_window_s": [duration - win, duration], "processes": {}}
    ok = bool(first and last)
    for name in names:
        r1 = [s["rss"][name] for s in first if s["rss"].get(name)]
        r2 = [s["rss"][name] for s in last if s["rss"].get(name)]
        f1 = [s["fds"][name] for s in first if s["fds"].get(name)]
        f2 = [s["fds"][name] for s in last if s["fds"].get(name)]
        alive = bool(r1 and r2 and f1 and f2) and all(
            s["rss"].get(name) for s in samples)  # a process gone mid-run is a failure
        m1 = statistics.fmean(r1) if r1 else 0.0
        m2 = statistics.fmean(r2) if r2 else 0.0
        allowed = max(RSS_SLACK, RSS_SLACK_FRACTION * m1)
        rss_ok = alive and m2 - m1 <= allowed
        fds_ok = alive and max(f2) <= max(f1) + FD_SLACK
        out["processes"][name] = {
            "rss_first_mib": round(m1 / MiB, 1), "rss_last_mib": round(m2 / MiB, 1),
            "rss_growth_mib": round((m2 - m1) / MiB, 2), "rss_allowed_mib": round(allowed / MiB, 1),
            "rss_max_mib": round(max((s["rss"].get(name) or 0) for s in samples) / MiB, 1),
            "fds_first_max": max(f1) if f1 else None, "fds_last_max": max(f2) if f2 else None,
            "alive": alive, "ok": rss_ok and fds_ok,
        }
        if name != IPFS_B:
            ok = ok and rss_ok and fds_ok
    out["ok"] = ok
    return out


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def run_readers(mounts: dict[int, str], files: list[DataFile], args: argparse.Namespace,
                pids: dict[str, int]) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")  # no threads run yet: forking is safe
    deadline = time.monotonic() + args.duration
    pipes: list[multiprocessing.connection.Connection] = []
    procs = []
    for i in range(args.readers):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=reader, args=(args.seed * 1000 + i, mounts, files, deadline,
                                             not args.keep_page_cache, send))
        p.start()
        send.close()
        pipes.append(recv)
        procs.append(p)
    sampler = Sampler(pids, args.sample_interval)
    sampler.start()
    results = []
    for recv, p in zip(pipes, procs, strict=True):
        try:
            if recv.poll(args.duration + 120):
                results.append(ReaderResult(**recv.recv()))
            else:
                results.append(ReaderResult(error_count=1, errors=[f"reader {p.pid} hung"]))
        except EOFError:
            results.append(ReaderResult(error_count=1, errors=[f"reader {p.pid} died"]))
        p.join(30)
        if p.is_alive():
            p.kill()
    elapsed = time.monotonic() - sampler.t0
    sampler.stopped.set()
    sampler.join()
    lat: list[float] = []
    steady: list[float] = []  # reads that ended after the warm-up
    for r in results:
        a, e = array.array("d"), array.array("d")
        a.frombytes(r.latencies)
        e.frombytes(r.ends)
        lat += a.tolist()
        steady += [x for x, end in zip(a, e, strict=True) if end - sampler.t0 >= args.warmup]
    lat.sort()
    steady.sort()
    reads = sum(r.reads for r in results)
    total = sum(r.nbytes for r in results)
    errors = [e for r in results for e in r.errors]
    return {
        "readers": args.readers, "layers": len(mounts), "files": len(files),
        "duration_s": round(elapsed, 1), "reads": reads, "bytes": total,
        "reads_per_s": round(reads / elapsed, 1),
        "throughput_mb_s": round(total / elapsed / 1e6, 2),
        "latency_p50_ms": round(percentile(lat, 0.50) * 1e3, 2),
        "latency_p99_ms": round(percentile(lat, 0.99) * 1e3, 2),
        "latency_max_ms": round((lat[-1] if lat else float("nan")) * 1e3, 1),
        "steady_reads": len(steady),
        "steady_reads_per_s": round(len(steady) / max(elapsed - args.warmup, 1e-9), 1),
        "steady_latency_p50_ms": round(percentile(steady, 0.50) * 1e3, 2),
        "steady_latency_p99_ms": round(percentile(steady, 0.99) * 1e3, 2),
        "steady_latency_max_ms": round((steady[-1] if steady else float("nan")) * 1e3, 1),
        "errors": sum(r.error_count for r in results),
        "wrong_reads": sum(r.wrong_reads for r in results),
        "wrong_bytes": sum(r.wrong_bytes for r in results),
        "error_samples": errors[:10],
        "slowest_reads": sorted(
            ({**x, "end": round(x["end"] - sampler.t0, 1)} for r in results for x in r.slow),
            key=lambda x: -(x["open_s"] + x["pread_s"] + x["close_s"]))[:10],
        "memory": memory_figures(sampler.samples, list(pids), args.warmup, args.window, elapsed),
        "samples": sampler.samples,
    }


# ---- phase 2: containers -------------------------------------------------------------------


def run_containers(cli: Cli, cid: str, count: int, files: list[DataFile],
                   layers: int) -> dict[str, Any]:
    """``count`` ``ipfsnap run --rm`` at once; each must print every layer's marker and the
    sha256 of one data file (a different one per container)."""
    procs = []
    want: list[str] = []
    t0 = time.monotonic()
    for i in range(count):
        f = [d for d in files if d.size <= 4 * CHUNK][i % sum(1 for d in files
                                                            if d.size <= 4 * CHUNK)]
        digest = hashlib.sha256(expected(f.layer, f.index, 0, f.size)).hexdigest()
        want.append("\n".join([marker(n) for n in range(layers)]
                              + [f"{digest}  /{f.path}"]) + "\n")
        script = f"cat {' '.join(f'/load/L{n}/marker' for n in range(layers))}; " \
                 f"sha256sum /{f.path}"
        argv = cli.argv("run", "--rm", "--snapshotter=stargz", cid, f"load-{i}",
                        "sh", "-c", script)
        procs.append((subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       stdin=subprocess.DEVNULL, text=True), time.monotonic()))
    times: list[float] = []
    failures: list[str] = []
    for i, (p, started) in enumerate(procs):
        try:
            out, err = p.communicate(timeout=CLI_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            failures.append(f"load-{i}: timed out")
            continue
        times.append(time.monotonic() - started)
        if p.returncode != 0 or out != want[i]:
            failures.append(f"load-{i}: exit {p.returncode}, stdout {out[-200:]!r}, "
                            f"stderr {err.strip()[-300:]!r}")
    wall = time.monotonic() - t0
    left = [line for line in cli("ps", "--json").splitlines() if line.strip()]
    return {"containers": count, "wall_s": round(wall, 2),
            "per_container_p50_s": round(statistics.median(times), 2) if times else None,
            "per_container_max_s": round(max(times), 2) if times else None,
            "failures": len(failures), "failure_samples": failures[:5],
            "containers_left": len(left)}


# ---- driver --------------------------------------------------------------------------------


def log_errors(state: Path) -> list[str]:
    """ERROR lines and tracebacks in the snapshotter's and the workers' logs."""
    found = []
    for log in [state / "snapshotter.log", *sorted(state.glob("fs/workers/*/worker.log"))]:
        with contextlib.suppress(OSError):
            for line in log.read_text(errors="replace").splitlines():
                if " ERROR " in line or line.startswith("Traceback"):
                    found.append(f"{log.relative_to(state)}: {line[:300]}")
    return found


def run(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    files = [DataFile(layer, i, size) for layer in range(args.layers)
             for i, size in enumerate(file_sizes(int(args.layer_mib * MiB)))]
    t0 = time.monotonic()
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "json"}}
    with ipfs_nodes(base / "ipfs") as (a, b):
        tars = [layer_tar(n, [f for f in files if f.layer == n]) for n in range(args.layers)]
        with IPFSClient(a.api_url) as client:
            image = push(client, tars, [True] * args.layers, chunk_size=CHUNK)
        del tars
        report["image"] = {"cid": image.cid, "blob_bytes": sum(d.size for d in image.layers),
                           "setup_s": round(time.monotonic() - t0, 1)}
        state = base / "state"
        state.mkdir()
        config = base / "config.toml"
        config.write_text("")  # the defaults: background fetch on, as users run it
        cli = Cli(state, config, b.api_multiaddr)
        try:
            t1 = time.monotonic()
            cli("image", "rpull", "--ipfs", image.cid)
            report["image"]["rpull_s"] = round(time.monotonic() - t1, 2)
            rows = [json.loads(line) for line in cli("snapshot", "status", "--json").splitlines()
                    if line.strip()]
            mounts: dict[int, str] = {}
            for row in rows:
                found = [int(p.name[1:]) for p in Path(row["mountpoint"], "load").iterdir()]
                assert len(found) == 1, (row["mountpoint"], found)
                mounts[found[0]] = row["mountpoint"]
            if sorted(mounts) != list(range(args.layers)):
                raise RuntimeError(f"lazily mounted layers {sorted(mounts)}, expected "
                                   f"{args.layers} (snapshot status: {rows})")
            pids = {"snapshotter": _daemon_pid(state)}
            pids.update({f"worker L{n}": int(next(r["pid"] for r in rows
                                                  if r["mountpoint"] == mp))
                         for n, mp in sorted(mounts.items())})
            pids[IPFS_B] = b.pid or 0  # for information: not ipfsnap's memory
            report["load"] = run_readers(mounts, files, args, pids)
            status = [json.loads(line) for line in
                      cli("snapshot", "status", "--json").splitlines() if line.strip()]
            report["load"]["layer_states"] = sorted({s["state"] for s in status})
            report["load"]["layer_errors"] = [s["last_error"] for s in status if s["last_error"]]
            report["load"]["worker_read_requests"] = worker_read_requests(state)
            if args.containers:
                report["containers"] = run_containers(cli, image.cid, args.containers, files,
                                                      args.layers)
            report["log_errors"] = log_errors(state)
        finally:
            unmount_state(state)
            report["mounts_left"] = mounts_under(state)
    report["checks"] = checks(report)
    return report


def worker_read_requests(state: Path) -> int:
    """FUSE read requests the layer workers served (reads the page cache answered never get
    there): shows that the readers' reads reached the snapshotter."""
    total = 0
    for path in state.glob("fs/workers/*/status.json"):
        with contextlib.suppress(OSError, ValueError):
            total += int(json.loads(path.read_text()).get("read_requests", 0))
    return total


def _daemon_pid(state: Path) -> int:
    from ipfsnap.service.paths import lock_holder

    pid = lock_holder(state)
    if not pid or pid < 0:
        raise RuntimeError(f"no snapshotter holds {state}")
    return pid


def checks(report: dict[str, Any]) -> dict[str, bool]:
    load = report["load"]
    out = {
        "reader errors = 0": load["errors"] == 0,
        "wrong bytes = 0": load["wrong_bytes"] == 0 and load["wrong_reads"] == 0,
        "reads > 0": load["reads"] > 0,
        "RSS and fds bounded after warm-up": bool(load["memory"]["ok"]),
        "layer errors = 0": not load["layer_errors"],
        "ERROR lines in the logs = 0": not report["log_errors"],
        "no mount left after stop": not report["mounts_left"],
    }
    if "containers" in report:
        c = report["containers"]
        out["container failures = 0"] = c["failures"] == 0 and c["containers_left"] == 0
    return out


def table(report: dict[str, Any]) -> str:
    load = report["load"]
    mem = load["memory"]
    lines = ["| figure | value |", "|---|---:|",
             f"| image | {report['args']['layers']} eStargz layers, "
             f"{report['image']['blob_bytes'] / 1e6:.1f} MB of blobs, rpull "
             f"{report['image']['rpull_s']} s |",
             f"| readers x duration | {load['readers']} processes x {load['duration_s']} s |",
             f"| reads verified | {load['reads']} ({load['reads_per_s']}/s) |",
             f"| throughput | {load['throughput_mb_s']} MB/s |",
             f"| read latency p50 / p99 / max | {load['latency_p50_ms']} / "
             f"{load['latency_p99_ms']} / {load['latency_max_ms']} ms |",
             f"| reads after the {report['args']['warmup']:g} s warm-up | "
             f"{load['steady_reads']} ({load['steady_reads_per_s']}/s) |",
             f"| latency p50 / p99 / max of those | "
             f"{load['steady_latency_p50_ms']} / {load['steady_latency_p99_ms']} / "
             f"{load['steady_latency_max_ms']} ms |",
             f"| errors / wrong reads / wrong bytes | {load['errors']} / {load['wrong_reads']} / "
             f"{load['wrong_bytes']} |",
             f"| FUSE read requests the workers served | {load['worker_read_requests']} |"]
    for name, p in mem["processes"].items():
        lines.append(f"| {name}: RSS {mem['first_window_s'][0]:g}-{mem['first_window_s'][1]:g}"
                     f" s -> last window (max) | {p['rss_first_mib']} -> {p['rss_last_mib']} "
                     f"MiB ({p['rss_growth_mib']:+} MiB, allowed {p['rss_allowed_mib']}; max "
                     f"{p['rss_max_mib']}), fds {p['fds_first_max']} -> {p['fds_last_max']} |")
    if "containers" in report:
        c = report["containers"]
        lines.append(f"| {c['containers']} concurrent `ipfsnap run --rm` | wall {c['wall_s']} s, "
                     f"each p50 {c['per_container_p50_s']} s / max {c['per_container_max_s']} s,"
                     f" failures {c['failures']} |")
    lines.append(f"| ERROR lines in snapshotter/worker logs | {len(report['log_errors'])} |")
    lines.append("")
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in report["checks"].items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of reads")
    ap.add_argument("--readers", type=int, default=64, help="reader processes")
    ap.add_argument("--layers", type=int, default=8, help="lazily mounted layers")
    ap.add_argument("--layer-mib", type=float, default=16.0, help="data per layer, MiB")
    ap.add_argument("--containers", type=int, default=20, help="concurrent containers (0: none)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds before the first RSS window (default: min(60, duration/3))")
    ap.add_argument("--window", type=float, default=None,
                    help="length of the first/last RSS windows (default: min(60, duration/3))")
    ap.add_argument("--sample-interval", type=float, default=2.0)
    ap.add_argument("--keep-page-cache", action="store_true",
                    help="do not evict files from the page cache after each read")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args(argv)
    third = min(60.0, args.duration / 3)
    args.warmup = third if args.warmup is None else args.warmup
    args.window = third if args.window is None else args.window
    if args.layers < 1 or args.readers < 1 or args.warmup + 2 * args.window > args.duration + 1:
        ap.error("need --layers >= 1, --readers >= 1 and warmup + 2 windows <= duration")
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="reliability-load-") as d:
        report = run(args, Path(d))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
