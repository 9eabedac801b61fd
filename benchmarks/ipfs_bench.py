"""IPFS client benchmark: ipfsnap's sync and trio clients against curl on the same requests.

Starts two managed nodes (A and B, B connected to A) in a temporary directory, adds random
blobs on A, then measures, locally on A and remotely from B over bitswap:

- latency of a 64 KiB and of a 1 MiB range read (``cat`` with offset/length -> bytes),
- a full read of a blob, twice: into memory (``cat`` -> one ``bytes``) and streamed
  (``cat_into`` a sink that drops the pieces, which is what ``curl -o /dev/null`` does),
- ``add`` of a file (streamed multipart upload) against ``curl -F``.

Every remote read is cold: B's repo is garbage-collected (untimed) before each one, so each
method fetches the same blocks over bitswap. The methods are interleaved read by read, their
order rotating, so load changes on a shared machine hit them alike; the whole set is repeated
``--rounds`` times. curl is timed by its own ``%{time_total}`` (the request, not the process
start-up). Reported per case: the median time of each method over all its reads, the ratio
ipfsnap/curl of those medians (goal: < 1.10), and the spread of the per-round ratios. CPU
columns: the client's own CPU time per request (ipfsnap: this process; curl: the child,
including its start-up), medians.

    .venv/bin/python benchmarks/ipfs_bench.py [--full-mib 32] [--reads 10] [--full-reads 3]
        [--rounds 3] [--remote-full-mib N] [--add-mib 32] [--only range,full,stream,add]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
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
#: curl options shared by every call: POST, fail on HTTP errors, time and size on stdout
CURL = ["curl", "-sS", "-f", "-X", "POST", "-w", "%{time_total} %{size_download}"]


@dataclass(frozen=True)
class Case:
    where: str  # "local" | "remote"
    name: str
    kind: str  # "range" | "full" | "stream" | "add"
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


def curl_read(api_url: str, cid: str, offset: int, length: int) -> Sample:
    url = (f"{api_url}/api/v0/cat?arg=/ipfs/{cid}&offset={offset}&length={length}"
           "&timeout=300s")
    return curl_call(["-o", "/dev/null", url], length)


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


def sync_run(api: str, case: Case, op: tuple[int, int] | Path, cid: str) -> Sample:
    with IPFSClient(api, timeout=300) as c:
        c.version()  # open the pooled connection, as a long-lived user has it
        if isinstance(op, Path):
            return _timed(lambda: c.add(op, pin=False))
        off, n = op

        def read() -> None:
            if case.kind == "stream":
                got = c.cat_into(cid, off, n, _drop)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full-mib", type=int, default=32, help="size of the full-read blob")
    ap.add_argument("--remote-full-mib", type=int, default=0,
                    help="size of the blob read in full over bitswap (default: --full-mib)")
    ap.add_argument("--add-mib", type=int, default=32, help="size of the added file")
    ap.add_argument("--reads", type=int, default=10, help="range reads per case and round")
    ap.add_argument("--full-reads", type=int, default=3,
                    help="full reads (and adds) per case and round")
    ap.add_argument("--rounds", type=int, default=3, help="repetitions of the whole set")
    ap.add_argument("--only", default="", help="comma-separated kinds to run "
                    "(range,full,stream,add)")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(","))) or {"range", "full", "stream", "add"}
    rng = random.Random(1)
    small_chunks = 16  # 64 KiB reads: one per 256 KiB chunk, in the first 4 MiB
    big_mibs = 12  # 1 MiB reads: in the next 12 MiB
    region = small_chunks * CHUNK + big_mibs * MIB
    remote_full = args.remote_full_mib or args.full_mib
    with tempfile.TemporaryDirectory(prefix="ipfs-bench-") as tmp:
        a = ManagedNode(Path(tmp) / "a")
        b = ManagedNode(Path(tmp) / "b")
        upload = Path(tmp) / "upload.bin"
        upload.write_bytes(os.urandom(args.add_mib * MIB))
        with a, b, IPFSClient(a.api_multiaddr) as ca, IPFSClient(b.api_multiaddr) as cb:
            cb.swarm_connect(a.swarm_addrs[0])
            print(f"nodes: {a.agent_version}, A {a.api_url}, B {b.api_url}", file=sys.stderr)
            cids = {"range": ca.add(rng.randbytes(region)).cid,
                    "local": ca.add(rng.randbytes(args.full_mib * MIB)).cid,
                    "remote": ca.add(rng.randbytes(remote_full * MIB)).cid}
            cases: list[Case] = []
            for where in ("local", "remote"):
                node_full = args.full_mib if where == "local" else remote_full
                full = [(0, node_full * MIB)] * args.full_reads
                cases += [Case(where, "64 KiB range", "range"),
                          Case(where, "1 MiB range", "range"),
                          Case(where, f"full {node_full} MiB", "full", full),
                          Case(where, f"stream {node_full} MiB", "stream", full)]
            cases.append(Case("local", f"add {args.add_mib} MiB", "add"))
            cases = [c for c in cases if c.kind in only]
            samples: dict[tuple[str, str], dict[str, list[Sample]]] = {
                (c.where, c.name): {m: [] for m in METHODS} for c in cases}
            round_ratios: dict[tuple[str, str], dict[str, list[float]]] = {
                (c.where, c.name): {m: [] for m in METHODS[1:]} for c in cases}
            for rnd in range(args.rounds):
                for case in cases:
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
                    here: dict[str, list[Sample]] = {m: [] for m in METHODS}
                    for i, read in enumerate(reads):
                        order = METHODS[(i + rnd) % 3:] + METHODS[:(i + rnd) % 3]
                        for method in order:
                            op: tuple[int, int] | Path = upload if case.kind == "add" else read
                            if case.where == "remote":
                                gc(b)
                            if method == "curl":
                                s = (curl_add(node.api_url, upload) if case.kind == "add"
                                     else curl_read(node.api_url, cid, *read))
                            elif method == "sync":
                                s = sync_run(node.api_multiaddr, case, op, cid)
                            else:
                                s = trio_run(node.api_multiaddr, case, op, cid)
                            here[method].append(s)
                    key = (case.where, case.name)
                    med = {m: statistics.median(x.wall for x in here[m]) for m in METHODS}
                    for m in METHODS:
                        samples[key][m] += here[m]
                    for m in METHODS[1:]:
                        round_ratios[key][m].append(med[m] / med["curl"])
                    print(f"  round {rnd + 1} {case.where} {case.name}: " + ", ".join(
                        f"{m} {med[m] * 1000:.1f} ms" for m in METHODS), file=sys.stderr)
    print(f"{'where':7} {'case':15} {'curl':>10} {'sync':>10} {'trio':>10} "
          f"{'sync/curl':>16} {'trio/curl':>16} {'cpu ms curl/sync/trio':>22}")
    for case in cases:
        key = (case.where, case.name)
        med = {m: statistics.median(x.wall for x in samples[key][m]) for m in METHODS}
        cpu = {m: statistics.median(x.cpu for x in samples[key][m]) for m in METHODS}
        if case.kind in ("full", "stream", "add"):
            mib = int(case.name.split()[1])
            cells = [f"{mib * MIB / 1e6 / med[m]:6.1f}MB/s" for m in METHODS]
        else:
            cells = [f"{med[m] * 1000:8.2f}ms" for m in METHODS]
        ratios = []
        for m in METHODS[1:]:
            rr = round_ratios[key][m]
            ratios.append(f"{med[m] / med['curl']:5.2f} ({min(rr):.2f}-{max(rr):.2f})")
        print(f"{case.where:7} {case.name:15} {cells[0]:>10} {cells[1]:>10} {cells[2]:>10} "
              f"{ratios[0]:>16} {ratios[1]:>16} "
              f"{cpu['curl'] * 1000:6.1f}/{cpu['sync'] * 1000:.1f}/{cpu['trio'] * 1000:.1f}")
    print(f"({args.rounds} rounds; ratio = median time / curl's median time, in brackets the "
          "lowest and highest per-round ratio)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
