"""IPFS client benchmark: ipfsnap's sync and trio clients against curl on the same reads.

Starts two managed nodes (A and B, B connected to A) in a temporary directory, adds random
blobs on A, then measures, locally on A and remotely from B over bitswap:

- latency of a 64 KiB and of a 1 MiB range read (median over several reads),
- time of a full read of a blob (throughput).

Every method reads its own blobs at the same offsets, so remote reads are cold for each of
them (B has not fetched those blocks before). curl is timed by its own ``%{time_total}`` (the
request, not the process start-up). Ratios are ipfsnap time / curl time (goal: < 1.10).

    .venv/bin/python benchmarks/ipfs_bench.py [--full-mib 32] [--reads 10]
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from ipfsnap.ipfs import AsyncIPFSClient, IPFSClient
from ipfsnap.ipfs.node import ManagedNode

KIB = 1024
MIB = 1024 * KIB
CHUNK = 262144
METHODS = ("curl", "sync", "trio")


def curl_read(api_url: str, cid: str, offset: int, length: int | None) -> float:
    url = f"{api_url}/api/v0/cat?arg=/ipfs/{cid}&offset={offset}&timeout=120s"
    if length is not None:
        url += f"&length={length}"
    out = subprocess.run(
        ["curl", "-sS", "-f", "-X", "POST", "-o", "/dev/null",
         "-w", "%{time_total} %{size_download}", url],
        capture_output=True, check=True, text=True,
    ).stdout.split()
    if length is not None and int(out[1]) != length:
        raise RuntimeError(f"curl read {out[1]} bytes, wanted {length}")
    return float(out[0])


def measure(method: str, api_multiaddr: str, api_url: str, cid: str,
            reads: list[tuple[int, int | None]]) -> list[float]:
    """Seconds per read of ``reads`` (offset, length) on ``cid`` with ``method``."""
    if method == "curl":
        return [curl_read(api_url, cid, off, n) for off, n in reads]
    if method == "sync":
        with IPFSClient(api_multiaddr, timeout=120) as c:
            c.version()  # open the pooled connection, as a long-lived user has it
            out = []
            for off, n in reads:
                t = time.perf_counter()
                data = c.cat(cid, off, n)
                out.append(time.perf_counter() - t)
                if n is not None and len(data) != n:
                    raise RuntimeError("short read")
            return out

    async def main() -> list[float]:
        async with AsyncIPFSClient(api_multiaddr, timeout=120) as c:
            await c.version()
            out = []
            for off, n in reads:
                t = time.perf_counter()
                data = await c.cat(cid, off, n)
                out.append(time.perf_counter() - t)
                if n is not None and len(data) != n:
                    raise RuntimeError("short read")
            return out

    return trio.run(main)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full-mib", type=int, default=32, help="size of the full-read blobs")
    ap.add_argument("--reads", type=int, default=10, help="range reads per case")
    args = ap.parse_args()
    rng = random.Random(1)
    region = 32 * MIB  # range reads: 64 KiB in distinct chunks, 1 MiB in distinct MiBs
    with tempfile.TemporaryDirectory(prefix="ipfs-bench-") as tmp:
        a = ManagedNode(Path(tmp) / "a")
        b = ManagedNode(Path(tmp) / "b")
        with a, b:
            ca, cb = IPFSClient(a.api_multiaddr), IPFSClient(b.api_multiaddr)
            cb.swarm_connect(a.swarm_addrs[0])
            print(f"nodes: {a.agent_version}, A {a.api_url}, B {b.api_url}", file=sys.stderr)
            blobs: dict[tuple[str, str, str], str] = {}
            for where in ("local", "remote"):
                for method in METHODS:
                    for kind, size in (("range", region), ("full", args.full_mib * MIB)):
                        cid = ca.add(rng.randbytes(size), pin=True).cid
                        blobs[(where, method, kind)] = cid
            chunks = rng.sample(range(region // 2 // CHUNK), args.reads)
            small: list[tuple[int, int | None]] = [
                (c * CHUNK + rng.randrange(CHUNK - 64 * KIB), 64 * KIB) for c in chunks]
            mibs = rng.sample(range(region // 2 // MIB), min(args.reads, region // 2 // MIB))
            big: list[tuple[int, int | None]] = [(region // 2 + m * MIB, MIB) for m in mibs]
            full: list[tuple[int, int | None]] = [(0, args.full_mib * MIB)]
            rows = []
            for where, node in (("local", a), ("remote", b)):
                for case, reads, kind in (("64 KiB range", small, "range"),
                                          ("1 MiB range", big, "range"),
                                          (f"full {args.full_mib} MiB", full, "full")):
                    times: dict[str, list[float]] = {m: [] for m in METHODS}
                    # interleaved, read by read, so load changes hit every method alike
                    for read in reads:
                        for method in METHODS:
                            cid = blobs[(where, method, kind)]
                            times[method] += measure(method, node.api_multiaddr, node.api_url,
                                                     cid, [read])
                    res = {m: statistics.median(times[m]) for m in METHODS}
                    rows.append((where, case, res))
                    print(f"  {where} {case}: " + ", ".join(
                        f"{m} {res[m] * 1000:.1f} ms" for m in METHODS), file=sys.stderr)
            ca.close()
            cb.close()
    print(f"{'where':7} {'read':14} {'curl':>10} {'sync':>10} {'trio':>10} "
          f"{'sync/curl':>10} {'trio/curl':>10}")
    for where, case, res in rows:
        if case.startswith("full"):
            cells = [f"{args.full_mib / res[m]:6.1f}MB/s" for m in METHODS]
        else:
            cells = [f"{res[m] * 1000:8.2f}ms" for m in METHODS]
        print(f"{where:7} {case:14} {cells[0]:>10} {cells[1]:>10} {cells[2]:>10} "
              f"{res['sync'] / res['curl']:10.2f} {res['trio'] / res['curl']:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
