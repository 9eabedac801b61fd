"""IPFS client benchmark: ipfsnap's sync and trio clients against curl on the same requests.

Starts two managed nodes (A and B, B connected to A) in a temporary directory, adds random
blobs on A, then measures, locally on A and remotely from B over bitswap:

- latency of a 64 KiB and of a 1 MiB range read (``cat`` with offset/length -> bytes),
- a full read of a blob, three ways: into memory as a fresh result (``cat`` -> one new
  ``bytes``: the kernel must supply and zero a fresh page per 4 KiB), into a reused buffer
  (``cat_into`` a ``bytearray`` the caller keeps: the client's own cost, no page faults) and
  streamed to a sink that drops the pieces (``cat_into`` a callback; what ``curl -o
  /dev/null`` does),
- ``add`` of a file (streamed multipart upload) against ``curl -F``.

Baselines: ``curl -o /dev/null`` for every case; for full reads also ``curl -o`` a file in
/dev/shm, which, like a fresh result, ends with the whole blob in newly allocated memory.

Every remote read is cold: B's repo is garbage-collected (untimed) before each one, so each
method fetches the same blocks over bitswap. The methods are interleaved read by read, their
order rotating, so load changes on a shared machine hit them alike; the whole set is repeated
``--rounds`` times. curl is timed by its own ``%{time_total}`` (the request, not the process
start-up). Reported per case: the median time of each method over all its reads, the ratio
ipfsnap/curl of those medians (goal: < 1.10), and in brackets the lowest and highest of the
per-round ratios; then the paired ratios: each read's time over the time curl took for the
same read moments apart, median and quartiles (on a loaded machine the load drifts between
reads, and pairing cancels the drift). CPU columns: the client's own CPU time per request
(ipfsnap: this process; curl: the child, including its start-up), medians. The load average
is printed per round.

    .venv/bin/python benchmarks/ipfs_bench.py [--full-mib 32] [--reads 10] [--full-reads 3]
        [--rounds 5] [--remote-full-mib N] [--add-mib 32]
        [--only range,full,reuse,stream,add] [--where local,remote]
    .venv/bin/python benchmarks/ipfs_bench.py --probe [--full-mib 32] [--rounds 9]

``--probe`` shows where the time of a full read into fresh memory goes, on node A alone: CPU
time and minor page faults per request of curl (to /dev/null, to /dev/shm), a bare Python
socket reader (the raw HTTP reply into a reused 256 KiB buffer, or into one fresh buffer),
ipfsnap's ``cat`` (fresh result), ``cat_into`` a reused buffer and ``cat_into`` a dropping
callback, and the cost of touching a fresh buffer of the same size with no I/O at all.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ipfsnap.ipfs import AsyncIPFSClient, IPFSClient
from ipfsnap.ipfs.node import ManagedNode

KIB = 1024
MIB = 1024 * KIB
CHUNK = 262144
METHODS = ("curl", "sync", "trio")
#: the second baseline of full reads: curl writing the blob to a file in memory (tmpfs)
SHM = "shm"
#: case kinds: range reads; full reads into a fresh result, a reused buffer, a dropping sink
KINDS = ("range", "full", "reuse", "stream", "add")
#: curl options shared by every call: POST, fail on HTTP errors, time and size on stdout
CURL = ["curl", "-sS", "-f", "-X", "POST", "-w", "%{time_total} %{size_download}"]


@dataclass(frozen=True)
class Case:
    where: str  # "local" | "remote"
    name: str
    kind: str  # one of KINDS
    reads: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Sample:
    wall: float
    cpu: float


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def curl_call(args: list[str], expect: int | None = None) -> Sample:
    cpu = _children_cpu()
    out = subprocess.run([*CURL, *args], capture_output=True, check=True, text=True)
    cpu = _children_cpu() - cpu
    # ``add`` prints the JSON reply before the -w line
    seconds, size = out.stdout.splitlines()[-1].split()[-2:]
    if expect is not None and int(size) != expect:
        raise RuntimeError(f"curl read {size} bytes, wanted {expect}")
    return Sample(float(seconds), cpu)


def curl_read(api_url: str, cid: str, offset: int, length: int, out: str = "/dev/null"
              ) -> Sample:
    url = (f"{api_url}/api/v0/cat?arg=/ipfs/{cid}&offset={offset}&length={length}"
           "&timeout=300s")
    return curl_call(["-o", out, url], length)


def curl_add(api_url: str, path: Path) -> Sample:
    url = (f"{api_url}/api/v0/add?cid-version=1&raw-leaves=true&chunker=size-262144"
           "&pin=false")
    return curl_call(["-F", f"file=@{path};type=application/octet-stream", url])


def _timed(fn: Callable[[], object]) -> Sample:
    cpu, t = time.process_time(), time.perf_counter()
    fn()
    return Sample(time.perf_counter() - t, time.process_time() - cpu)


def _drop(_piece: bytes) -> None:
    pass


#: per case and method: each read's time / the same read's time by curl (its neighbour)
PAIRED: dict[tuple[str, str], dict[str, list[float]]] = {}

#: the reused buffers of the "reuse" cases, by size: made and touched once, before timing
_BUFFERS: dict[int, bytearray] = {}


def reused_buffer(n: int) -> bytearray:
    if n not in _BUFFERS:
        _BUFFERS[n] = bytearray(b"\1" * n)  # written: every page is mapped from the start
    return _BUFFERS[n]


def sync_run(api: str, case: Case, op: tuple[int, int] | Path, cid: str) -> Sample:
    with IPFSClient(api, timeout=300) as c:
        c.version()  # open the pooled connection, as a long-lived user has it
        if isinstance(op, Path):
            return _timed(lambda: c.add(op, pin=False))
        off, n = op

        def read() -> None:
            if case.kind == "stream":
                got = c.cat_into(cid, off, n, _drop)
            elif case.kind == "reuse":
                got = c.cat_into(cid, off, n, reused_buffer(n))
            else:
                got = len(c.cat(cid, off, n))
            if got != n:
                raise RuntimeError("short read")

        return _timed(read)


def trio_run(api: str, case: Case, op: tuple[int, int] | Path, cid: str) -> Sample:
    async def main() -> Sample:
        async with AsyncIPFSClient(api, timeout=300) as c:
            await c.version()
            cpu, t = time.process_time(), time.perf_counter()
            if isinstance(op, Path):
                await c.add(op, pin=False)
            else:
                off, n = op
                if case.kind == "stream":
                    got = await c.cat_into(cid, off, n, _drop)
                elif case.kind == "reuse":
                    got = await c.cat_into(cid, off, n, reused_buffer(n))
                else:
                    got = len(await c.cat(cid, off, n))
                if got != n:
                    raise RuntimeError("short read")
            return Sample(time.perf_counter() - t, time.process_time() - cpu)

    return trio.run(main)


def gc(node: ManagedNode) -> None:
    """Forget every unpinned block on ``node`` (the next read of them goes over bitswap)."""
    subprocess.run(["curl", "-sS", "-f", "-X", "POST", "-o", "/dev/null",
                    f"{node.api_url}/api/v0/repo/gc"], check=True)


def _self_usage() -> tuple[float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt


def _probe_timed(fn: Callable[[], object]) -> tuple[float, float, int]:
    """(wall s, CPU s, minor faults) of ``fn()`` in this process."""
    cpu, faults = _self_usage()
    t = time.perf_counter()
    fn()
    wall = time.perf_counter() - t
    cpu2, faults2 = _self_usage()
    return wall, cpu2 - cpu, faults2 - faults


def _probe_curl(url: str, out: str) -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run([*CURL, "-o", out, url], capture_output=True, check=True, text=True)
    r2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = r2.ru_utime + r2.ru_stime - r.ru_utime - r.ru_stime
    return float(res.stdout.split()[0]), cpu, r2.ru_minflt - r.ru_minflt


def raw_read(host: str, port: int, target: str, dest: memoryview | None) -> int:
    """The whole raw HTTP reply (head and chunked body, not decoded) into ``dest`` (None: a
    reused 256 KiB buffer), until the last chunk: the least a Python client can do."""
    with socket.create_connection((host, port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n"
                  "Connection: close\r\n\r\n".encode())
        buf = dest if dest is not None else memoryview(bytearray(256 * KIB))
        total = 0
        while True:
            n = s.recv_into(buf[total:] if dest is not None else buf)
            if not n:
                return total
            total += n


def probe(args: argparse.Namespace) -> int:
    n = args.full_mib * MIB
    with tempfile.TemporaryDirectory(prefix="ipfs-probe-") as tmp:
        shm = Path(tempfile.mkdtemp(prefix="ipfs-probe-", dir="/dev/shm")) / "blob"
        a = ManagedNode(Path(tmp) / "a")
        with a, IPFSClient(a.api_multiaddr, timeout=300) as c:
            cid = c.add(random.Random(1).randbytes(n)).cid
            target = f"/api/v0/cat?arg=/ipfs/{cid}&offset=0&length={n}&timeout=300s"
            host, port = a.api_url.removeprefix("http://").rsplit(":", 1)
            reused = memoryview(bytearray(b"\1" * n))
            head_room = MIB  # the raw reply also holds the head and the chunk framing
            cases: dict[str, Callable[[], tuple[float, float, int]]] = {
                "curl -o /dev/null": lambda: _probe_curl(a.api_url + target, "/dev/null"),
                "curl -o /dev/shm/file": lambda: _probe_curl(a.api_url + target, str(shm)),
                "raw socket, reused 256 KiB": lambda: _probe_timed(
                    lambda: raw_read(host, int(port), target, None)),
                "raw socket, fresh buffer": lambda: _probe_timed(
                    lambda: raw_read(host, int(port), target,
                                     memoryview(bytearray(n + head_room)))),
                "ipfsnap cat (fresh bytes)": lambda: _probe_timed(lambda: c.cat(cid, 0, n)),
                "ipfsnap cat_into reused buffer": lambda: _probe_timed(
                    lambda: c.cat_into(cid, 0, n, reused)),
                "ipfsnap cat_into drop": lambda: _probe_timed(
                    lambda: c.cat_into(cid, 0, n, _drop)),
                # bytearray(n) zero-fills: every page is faulted in, no I/O
                "touch fresh memory only": lambda: _probe_timed(lambda: bytearray(n)),
            }
            names = list(cases)
            got: dict[str, list[tuple[float, float, int]]] = {k: [] for k in names}
            loads = [os.getloadavg()[0]]
            try:
                for rnd in range(args.rounds):
                    k = rnd % len(names)
                    for name in names[k:] + names[:k]:
                        got[name].append(cases[name]())
                    loads.append(os.getloadavg()[0])
            finally:
                shm.unlink(missing_ok=True)
                shm.parent.rmdir()
    print(f"{'request (' + str(args.full_mib) + ' MiB, node A)':32} {'wall ms':>8} "
          f"{'CPU ms':>7} {'(min-max)':>13} {'minor faults':>13}")
    for name in names:
        walls, cpus, faults = zip(*got[name], strict=True)
        print(f"{name:32} {statistics.median(walls) * 1000:8.1f} "
              f"{statistics.median(cpus) * 1000:7.1f} "
              f"({min(cpus) * 1000:5.1f}-{max(cpus) * 1000:5.1f}) "
              f"{statistics.median(faults):13.0f}")
    print(f"({args.rounds} rounds, medians; CPU of curl includes its start-up; load average "
          f"(1 min) {min(loads):.1f}-{max(loads):.1f})")
    return 0


def methods_of(case: Case) -> tuple[str, ...]:
    return (*METHODS, SHM) if case.kind == "full" else METHODS


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full-mib", type=int, default=32, help="size of the full-read blob")
    ap.add_argument("--remote-full-mib", type=int, default=0,
                    help="size of the blob read in full over bitswap (default: --full-mib)")
    ap.add_argument("--add-mib", type=int, default=32, help="size of the added file")
    ap.add_argument("--reads", type=int, default=10, help="range reads per case and round")
    ap.add_argument("--full-reads", type=int, default=3,
                    help="full reads (and adds) per case and round")
    ap.add_argument("--rounds", type=int, default=5, help="repetitions of the whole set")
    ap.add_argument("--only", default="", help="comma-separated kinds to run "
                    f"({','.join(KINDS)})")
    ap.add_argument("--where", default="local,remote", help="local, remote or both")
    ap.add_argument("--probe", action="store_true",
                    help="where a full read into fresh memory spends its time (see above)")
    args = ap.parse_args()
    if args.probe:
        return probe(args)
    only = set(filter(None, args.only.split(","))) or set(KINDS)
    wheres = [w for w in ("local", "remote") if w in args.where.split(",")]
    rng = random.Random(1)
    small_chunks = 16  # 64 KiB reads: one per 256 KiB chunk, in the first 4 MiB
    big_mibs = 12  # 1 MiB reads: in the next 12 MiB
    region = small_chunks * CHUNK + big_mibs * MIB
    remote_full = args.remote_full_mib or args.full_mib
    loads = [os.getloadavg()[0]]
    shm = Path(tempfile.mkdtemp(prefix="ipfs-bench-", dir="/dev/shm")) / "blob"
    with tempfile.TemporaryDirectory(prefix="ipfs-bench-") as tmp:
        a = ManagedNode(Path(tmp) / "a")
        b = ManagedNode(Path(tmp) / "b")
        upload = Path(tmp) / "upload.bin"
        upload.write_bytes(os.urandom(args.add_mib * MIB))
        with a, b, IPFSClient(a.api_multiaddr) as ca, IPFSClient(b.api_multiaddr) as cb:
            cb.swarm_connect(a.swarm_addrs[0])
            print(f"nodes: {a.agent_version}, A {a.api_url}, B {b.api_url}; load {_load()}",
                  file=sys.stderr)
            cids = {"range": ca.add(rng.randbytes(region)).cid,
                    "local": ca.add(rng.randbytes(args.full_mib * MIB)).cid,
                    "remote": ca.add(rng.randbytes(remote_full * MIB)).cid}
            cases: list[Case] = []
            for where in wheres:
                node_full = args.full_mib if where == "local" else remote_full
                full = [(0, node_full * MIB)] * args.full_reads
                reused_buffer(node_full * MIB)
                cases += [Case(where, "64 KiB range", "range"),
                          Case(where, "1 MiB range", "range"),
                          Case(where, f"{node_full} MiB fresh", "full", full),
                          Case(where, f"{node_full} MiB reused", "reuse", full),
                          Case(where, f"{node_full} MiB sink", "stream", full)]
            if "local" in wheres:
                cases.append(Case("local", f"add {args.add_mib} MiB", "add"))
            cases = [c for c in cases if c.kind in only]
            samples: dict[tuple[str, str], dict[str, list[Sample]]] = {
                (c.where, c.name): {m: [] for m in methods_of(c)} for c in cases}
            round_ratios: dict[tuple[str, str], dict[str, list[float]]] = {
                (c.where, c.name): {m: [] for m in methods_of(c)[1:]} for c in cases}
            try:
                for rnd in range(args.rounds):
                    for case in cases:
                        run_case(case, rnd, args, rng, a, b, cids, upload, shm, samples,
                                 round_ratios, small_chunks, big_mibs)
                    loads.append(os.getloadavg()[0])
                    print(f"round {rnd + 1} done, load {_load()}", file=sys.stderr)
            finally:
                shm.unlink(missing_ok=True)
                shm.parent.rmdir()
    report(cases, samples, round_ratios, args.rounds, loads)
    return 0


def run_case(
    case: Case, rnd: int, args: argparse.Namespace, rng: random.Random,
    a: ManagedNode, b: ManagedNode, cids: dict[str, str], upload: Path, shm: Path,
    samples: dict[tuple[str, str], dict[str, list[Sample]]],
    round_ratios: dict[tuple[str, str], dict[str, list[float]]],
    small_chunks: int, big_mibs: int,
) -> None:
    """One round of one case: every read done by each method, the order rotating."""
    node = a if case.where == "local" else b
    if case.name.startswith("64 KiB"):
        reads = [(c * CHUNK + rng.randrange(CHUNK - 64 * KIB), 64 * KIB)
                 for c in rng.sample(range(small_chunks), args.reads)]
    elif case.name.startswith("1 MiB"):
        reads = [(small_chunks * CHUNK + m * MIB, MIB)
                 for m in rng.sample(range(big_mibs), min(args.reads, big_mibs))]
    else:
        reads = case.reads or [(0, 0)] * args.full_reads
    cid = cids["range"] if case.kind == "range" else cids[case.where]
    methods = methods_of(case)
    here: dict[str, list[Sample]] = {m: [] for m in methods}
    for i, read in enumerate(reads):
        k = (i + rnd) % len(methods)
        for method in methods[k:] + methods[:k]:
            op: tuple[int, int] | Path = upload if case.kind == "add" else read
            if case.where == "remote":
                gc(b)
            if method == "curl":
                s = (curl_add(node.api_url, upload) if case.kind == "add"
                     else curl_read(node.api_url, cid, *read))
            elif method == SHM:
                s = curl_read(node.api_url, cid, *read, out=str(shm))
            elif method == "sync":
                s = sync_run(node.api_multiaddr, case, op, cid)
            else:
                s = trio_run(node.api_multiaddr, case, op, cid)
            here[method].append(s)
    key = (case.where, case.name)
    med = {m: statistics.median(x.wall for x in here[m]) for m in methods}
    for m in methods:
        samples[key][m] += here[m]
    for m in methods[1:]:
        # the same read by curl, moments apart: slow drifts of the load cancel out
        PAIRED.setdefault(key, {}).setdefault(m, []).extend(
            x.wall / c.wall for x, c in zip(here[m], here["curl"], strict=True))
    for m in methods[1:]:
        round_ratios[key][m].append(med[m] / med["curl"])
    print(f"  round {rnd + 1} {case.where} {case.name}: " + ", ".join(
        f"{m} {med[m] * 1000:.1f} ms" for m in methods), file=sys.stderr)


def report(
    cases: list[Case],
    samples: dict[tuple[str, str], dict[str, list[Sample]]],
    round_ratios: dict[tuple[str, str], dict[str, list[float]]],
    rounds: int,
    loads: list[float],
) -> None:
    print(f"{'where':7} {'case':15} {'curl':>10} {'curl shm':>10} {'sync':>10} {'trio':>10} "
          f"{'sync/curl':>16} {'trio/curl':>16} {'shm/curl':>16} {'cpu ms curl/shm/sync/trio':>26}")
    for case in cases:
        key = (case.where, case.name)
        methods = methods_of(case)
        med = {m: statistics.median(x.wall for x in samples[key][m]) for m in methods}
        cpu = {m: statistics.median(x.cpu for x in samples[key][m]) for m in methods}
        if case.kind == "range":
            cells = {m: f"{med[m] * 1000:8.2f}ms" for m in methods}
        else:
            mib = int(next(w for w in case.name.split() if w.isdigit()))
            cells = {m: f"{mib * MIB / 1e6 / med[m]:6.1f}MB/s" for m in methods}
        ratios = {}
        for m in methods[1:]:
            rr = round_ratios[key][m]
            ratios[m] = f"{med[m] / med['curl']:5.2f} ({min(rr):.2f}-{max(rr):.2f})"
        cpus = "/".join(f"{cpu[m] * 1000:.1f}" if m in cpu else "-"
                        for m in ("curl", SHM, "sync", "trio"))
        print(f"{case.where:7} {case.name:15} {cells['curl']:>10} {cells.get(SHM, '-'):>10} "
              f"{cells['sync']:>10} {cells['trio']:>10} {ratios['sync']:>16} "
              f"{ratios['trio']:>16} {ratios.get(SHM, '-'):>16} {cpus:>26}")
    for case in cases:
        if case.kind == "full":
            key = (case.where, case.name)
            med = {m: statistics.median(x.wall for x in samples[key][m]) for m in methods_of(case)}
            print(f"{case.where} {case.name} against curl -o /dev/shm (both end with the blob "
                  f"in fresh memory): sync {med['sync'] / med[SHM]:.2f}, "
                  f"trio {med['trio'] / med[SHM]:.2f}")
    print("paired ratios: median over reads of (time / the same read's time by curl), "
          "quartiles in brackets")
    for case in cases:
        parts = []
        for m in methods_of(case)[1:]:
            q = statistics.quantiles(PAIRED[(case.where, case.name)][m], n=4)
            parts.append(f"{m} {q[1]:.2f} ({q[0]:.2f}-{q[2]:.2f})")
        print(f"  {case.where:7} {case.name:15} " + "  ".join(parts))
    print(f"({rounds} rounds; ratio = median time / curl -o /dev/null's median time, in "
          "brackets the lowest and highest per-round ratio; MB/s = 10^6 bytes/s; load "
          f"average (1 min) over the run: {min(loads):.1f}-{max(loads):.1f})")


if __name__ == "__main__":
    sys.exit(main())
