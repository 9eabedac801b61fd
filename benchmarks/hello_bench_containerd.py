"""hello-bench, containerd mode: cold start of ``python3 -c 'print("Hello, World!")'`` from
IPFS through a private containerd, ``ctr run`` with ipfsnap vs ``ctr run`` with overlayfs.

Same image, nodes and rules as ``benchmarks/hello_bench.py`` (whose helpers this reuses):
the blobs live only on node A; every run gets a fresh node B connected to A, a fresh
containerd (own root) with a fresh ipfsnap snapshotter (own state dir, its gRPC socket
registered as ``[proxy_plugins.ipfsnap]``), and a dropped page cache. Modes alternate.

* ``ctr-lazy``: eStargz image; ``ipfsnap --containerd SOCK image rpull --ipfs CID`` (layers
  mounted lazily by the ipfsnap proxy snapshotter), then
  ``ctr run --snapshotter ipfsnap CID ...``.
* ``ctr-lazy-nobg``: the same with ``no_background_fetch = true``.
* ``ctr-full``: plain gzip image; ``ipfsnap --containerd SOCK image rpull --snapshotter
  overlayfs --ipfs CID`` (every layer fetched through IPFS, verified and unpacked into
  containerd's own overlayfs snapshots), then ``ctr run --snapshotter overlayfs CID ...``.

Timed: pull, run (until ``ctr run`` exits having printed the greeting), total; bytes fetched
= node B's bitswap ``DataReceived``. Starting containerd and the snapshotter is not timed.

    .venv/bin/python benchmarks/hello_bench_containerd.py [--runs 5] [--quick] [--image big|small]

Needs root, FUSE, runc, containerd + ctr, debootstrap and the managed IPFS node.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hello_bench as hb  # the sibling script, found through sys.path above

from ipfsnap.ipfs.node import ManagedNode, rpc_call
from tests.containerd.env import ContainerdEnv, start_env

log = logging.getLogger(__name__)

MODES = ("ctr-lazy", "ctr-lazy-nobg", "ctr-full")
MODE_CONFIG = {"ctr-lazy": "", "ctr-lazy-nobg": "no_background_fetch = true\n",
               "ctr-full": ""}
#: (rpull --snapshotter, ctr run --snapshotter, which pushed image)
MODE_SNAPSHOTTER = {"ctr-lazy": ("stargz", "ipfsnap", "lazy"),
                    "ctr-lazy-nobg": ("stargz", "ipfsnap", "lazy"),
                    "ctr-full": ("overlayfs", "overlayfs", "full")}


def one_run(bench: hb.Bench, mode: str, n: int) -> hb.Run:
    repo = bench.work / f"node-b-{mode}-{n}"
    repo.mkdir(parents=True)
    shutil.copy(bench.key_dir / "swarm.key", repo / "swarm.key")
    node_b = ManagedNode(repo).start()
    env: ContainerdEnv | None = None
    try:
        rpc_call(node_b.api_url, "swarm/connect", timeout=30.0, arg=bench.node_a.swarm_addrs[0])
        env = start_env(node_b.api_multiaddr, MODE_CONFIG[mode])
        rpull_snap, run_snap, image = MODE_SNAPSHOTTER[mode]
        cid = bench.cids[image]
        hb.drop_caches()
        before = hb.bitswap_received(node_b.api_url)
        t0 = time.perf_counter()
        env.ipfsnap("image", "rpull", "--snapshotter", rpull_snap, "--ipfs", cid, timeout=3600)
        t1 = time.perf_counter()
        proc = env.ctr("run", "--rm", "--snapshotter", run_snap, cid, "hello", *hb.HELLO_CMD,
                       timeout=3600)
        t2 = time.perf_counter()
        if hb.GREETING not in proc.stdout:
            raise hb.BenchError(f"{mode} run {n}: no greeting in the output: {proc.stdout!r}")
        fetched = hb.bitswap_received(node_b.api_url) - before
        if run_snap == "ipfsnap":
            # the lazy layers' own count of bytes read from IPFS, to cross-check bitswap's
            states = [json.loads(line) for line in
                      env.ipfsnap("snapshot", "status", "--json").stdout.splitlines()]
            print(f"# {mode} run {n + 1}: lazy layers read "
                  f"{sum(s['read_bytes'] for s in states) / 1e6:.1f} MB from IPFS",
                  file=sys.stderr, flush=True)
        return hb.Run(mode, t1 - t0, t2 - t1, fetched)
    except AssertionError as exc:  # ContainerdEnv's command failures
        raise hb.BenchError(f"{mode} run {n}: {str(exc)[:2000]}") from exc
    finally:
        if env is not None:
            env.teardown()
        node_b.stop()
        shutil.rmtree(repo, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="cold start from IPFS through containerd")
    parser.add_argument("--runs", type=int, default=5, help="runs per mode (default 5)")
    parser.add_argument("--quick", action="store_true",
                        help="small python sample, 1 run each (smoke run)")
    parser.add_argument("--image", choices=("big", "small"), default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="# %(message)s", stream=sys.stderr)
    if os.geteuid() != 0:
        print("hello_bench_containerd: needs root", file=sys.stderr)
        return 1
    which = args.image or ("small" if args.quick else "big")
    runs_per_mode = 1 if args.quick else args.runs
    try:
        archive = hb.build_big_image() if which == "big" else hb.small_image()
        sizes = hb.image_sizes(archive)
        runs: list[hb.Run] = []
        with tempfile.TemporaryDirectory(prefix="hello-bench-ctr-") as tmp, \
                hb.setup(archive, Path(tmp)) as bench:
            for n in range(runs_per_mode):
                for mode in MODES:
                    r = one_run(bench, mode, n)
                    print(f"# {mode} run {n + 1}: pull {r.pull:.2f} s, run {r.run:.2f} s, "
                          f"total {r.total:.2f} s, fetched {r.fetched / 1e6:.1f} MB",
                          file=sys.stderr, flush=True)
                    runs.append(r)
    except hb.BenchError as exc:
        print(f"hello_bench_containerd: {exc}", file=sys.stderr)
        return 1
    load = os.getloadavg()
    print(f"hello-bench (containerd) {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"image {which}, {os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f}")
    print(report(runs, sizes))
    return 0


def report(runs: Sequence[hb.Run], image_bytes: tuple[int, int, int]) -> str:
    layers, compressed, uncompressed = image_bytes
    lines = [
        f"image: {layers} layers, {compressed / 1e6:.1f} MB compressed, "
        f"{uncompressed / 1e6:.1f} MB uncompressed",
        "",
        "| mode | runs | pull s | run s | total s | fetched from IPFS | fetched / image |",
        "|---|---|---|---|---|---|---|",
    ]
    medians: dict[str, float] = {}
    for mode in MODES:
        rs = [r for r in runs if r.mode == mode]
        if not rs:
            continue
        fetched = statistics.median(r.fetched for r in rs)
        medians[mode] = statistics.median(r.total for r in rs)
        lines.append(
            f"| {mode} | {len(rs)} | {_fmt([r.pull for r in rs])} | "
            f"{_fmt([r.run for r in rs])} | {_fmt([r.total for r in rs])} | "
            f"{fetched / 1e6:.1f} MB | {100 * fetched / compressed:.1f}% |")
    if "ctr-full" in medians:
        lines.append("")
        for lazy in ("ctr-lazy", "ctr-lazy-nobg"):
            if lazy in medians:
                lines.append(f"ctr-full/{lazy} (median total): "
                             f"{medians['ctr-full'] / medians[lazy]:.1f}x")
    lines.append("seconds: median (min-max); fetched = node B's bitswap DataReceived; "
                 "fetched / image = of the compressed layer bytes")
    return "\n".join(lines)


def _fmt(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


if __name__ == "__main__":
    sys.exit(main())
