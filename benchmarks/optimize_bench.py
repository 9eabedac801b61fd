"""optimize-bench: cold start from IPFS of full vs lazy vs lazy-optimized images.

The reference's hello-bench modes legacy / estargz-noopt / estargz, on ipfsnap:

* ``full``: pushed with ``--estargz=false``; rpull with the overlayfs snapshotter fetches and
  unpacks every layer before the run;
* ``lazy``: pushed as eStargz (``.no.prefetch.landmark``): chunks come from IPFS on demand;
* ``lazy-opt``: pushed with ``ipfs-push --optimize --args <the workload>``: the files the
  workload read when recorded come first in each layer, before ``.prefetch.landmark``, and
  the lazy mount prefetches them (in parallel across layers) before the container starts.

Each run starts from nothing local: a fresh node B joined to node A (which alone holds the
blobs) over a private network, a fresh state dir, dropped page cache (the helpers of
``hello_bench.py``). Timed: pull (``image rpull``), run (``run`` until exit), total. Modes
alternate within each round so drift hits them alike.

Workloads (both on the small python sample, ~65 MB compressed, 2 layers):

* ``hello``: ``python3 -c 'print("Hello, World!")'``
* ``imports``: a script importing several stdlib packages (json, decimal, email, http,
  xml, asyncio, unittest, argparse, logging, sqlite3) and printing a line.

    .venv/bin/python benchmarks/optimize_bench.py [--runs 3] [--workload hello|imports|all]
    .venv/bin/python benchmarks/optimize_bench.py --report runs.json

Needs root, FUSE, runc, strace, debootstrap and the managed IPFS node (js-ipfs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hello_bench as hb

from ipfsnap.ipfs.node import ManagedNode, rpc_call
from ipfsnap.ipfs.pnet import generate_swarm_key, write_swarm_key

log = logging.getLogger(__name__)

MODES = ("full", "lazy", "lazy-opt", "lazy-nobg", "lazy-opt-nobg")
#: the modes run unless --modes says otherwise
DEFAULT_MODES = ("full", "lazy", "lazy-opt")
#: ipfsnap config.toml per mode: "-nobg" turns the background fetch of lazy layers off (it
#: competes with the container for the 2 cores and the bitswap link during the run)
MODE_CONFIG = {m: "no_background_fetch = true\n" if m.endswith("-nobg") else "" for m in MODES}
IMPORTS = ("import json, decimal, email.parser, http.client, xml.etree.ElementTree, asyncio, "
           "unittest, argparse, logging, sqlite3; print('imports ok')")
WORKLOADS: dict[str, tuple[list[str], str]] = {
    "hello": (["python3", "-c", 'print("Hello, World!")'], "Hello, World!"),
    "imports": (["python3", "-c", IMPORTS], "imports ok"),
}


@dataclass
class Run:
    workload: str
    mode: str
    pull: float
    run: float
    fetched: int

    @property
    def total(self) -> float:
        return self.pull + self.run


@dataclass
class Setup:
    work: Path
    node_a: ManagedNode
    key_dir: Path
    #: (workload, mode) -> CID (full and lazy are shared by the workloads)
    cids: dict[tuple[str, str], str]


@contextlib.contextmanager
def setup(archive: Path, work: Path, workloads: Sequence[str]) -> Iterator[Setup]:
    key = generate_swarm_key()
    repo_a = work / "node-a"
    write_swarm_key(repo_a, key)
    node_a = ManagedNode(repo_a).start()
    state_a = work / "state-a"
    state_a.mkdir()
    try:
        api = node_a.api_multiaddr
        hb.ipfsnap(state_a, "image", "import", str(archive), "--name", "bench", api=api)
        cids: dict[tuple[str, str], str] = {}

        def push(*args: str) -> str:
            t0 = time.perf_counter()
            out = hb.ipfsnap(state_a, "image", "ipfs-push", *args, "bench", api=api).stdout
            cid = out.strip().splitlines()[-1]
            print(f"# ipfs-push {' '.join(args)}: {cid} ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr, flush=True)
            return cid

        full = push("--estargz=false")
        lazy = push()
        for w in workloads:
            cids[(w, "full")] = full
            cids[(w, "lazy")] = lazy
            cids[(w, "lazy-opt")] = push("--optimize", "--args", json.dumps(WORKLOADS[w][0]))
            cids[(w, "lazy-nobg")] = lazy
            cids[(w, "lazy-opt-nobg")] = cids[(w, "lazy-opt")]
        yield Setup(work, node_a, repo_a, cids)
    finally:
        hb.cleanup_state(state_a)
        node_a.stop()


def one_run(s: Setup, workload: str, mode: str, n: int) -> Run:
    repo = s.work / f"node-b-{workload}-{mode}-{n}"
    repo.mkdir(parents=True)
    shutil.copy(s.key_dir / "swarm.key", repo / "swarm.key")
    node_b = ManagedNode(repo).start()
    state = s.work / f"state-{workload}-{mode}-{n}"
    state.mkdir()
    state.with_name(state.name + ".toml").write_text(MODE_CONFIG[mode])
    try:
        rpc_call(node_b.api_url, "swarm/connect", timeout=30.0, arg=s.node_a.swarm_addrs[0])
        api = node_b.api_multiaddr
        snapshotter = "overlayfs" if mode == "full" else "stargz"
        cid = s.cids[(workload, mode)]
        argv, expect = WORKLOADS[workload]
        hb.drop_caches()
        t0 = time.perf_counter()
        hb.ipfsnap(state, "image", "rpull", "--ipfs", "--snapshotter", snapshotter, cid, api=api)
        t1 = time.perf_counter()
        proc = hb.ipfsnap(state, "run", f"--snapshotter={snapshotter}", "--rm", cid, "bench",
                          *argv, api=api)
        t2 = time.perf_counter()
        if expect not in proc.stdout:
            raise hb.BenchError(f"{workload}/{mode} run {n}: unexpected output "
                                f"{proc.stdout!r} {proc.stderr[-500:]!r}")
        return Run(workload, mode, t1 - t0, t2 - t1, hb.blockstore_bytes(repo))
    finally:
        hb.cleanup_state(state)
        state.with_name(state.name + ".toml").unlink(missing_ok=True)
        node_b.stop()
        shutil.rmtree(repo, ignore_errors=True)


def _fmt(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def report(runs: Sequence[Run]) -> str:
    lines = ["| workload | mode | runs | pull s | run s | total s | fetched from IPFS |",
             "|---|---|---|---|---|---|---|"]
    notes = []
    for w in WORKLOADS:
        med: dict[str, float] = {}
        for mode in MODES:
            rs = [r for r in runs if r.workload == w and r.mode == mode]
            if not rs:
                continue
            med[mode] = statistics.median(r.total for r in rs)
            lines.append(f"| {w} | {mode} | {len(rs)} | {_fmt([r.pull for r in rs])} | "
                         f"{_fmt([r.run for r in rs])} | {_fmt([r.total for r in rs])} | "
                         f"{statistics.median(r.fetched for r in rs) / 1e6:.1f} MB |")
        for plain, opt in (("lazy", "lazy-opt"), ("lazy-nobg", "lazy-opt-nobg")):
            if plain in med and opt in med:
                gain = 100 * (1 - med[opt] / med[plain])
                notes.append(f"{w}: {opt} total is {gain:.0f}% below {plain} "
                             f"({med[plain]:.2f} s -> {med[opt]:.2f} s, medians)")
    return "\n".join([*lines, "", *notes,
                      "seconds: median (min-max); fetched = block bytes node B holds after"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="full vs lazy vs lazy-optimized cold starts")
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (default 3)")
    parser.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help=f"comma-separated, of {', '.join(MODES)} "
                        f"(default {','.join(DEFAULT_MODES)})")
    parser.add_argument("--json", metavar="FILE", help="write the runs here")
    parser.add_argument("--report", metavar="FILE", help="print the table of saved runs")
    args = parser.parse_args(argv)
    if args.report:
        runs = [Run(**r) for r in json.loads(Path(args.report).read_text())]
        print(report(runs))
        return 0
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))
    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes: {', '.join(unknown)}")
    archive = hb.small_image()
    work = Path(tempfile.mkdtemp(prefix="optbench-", dir="/var/tmp"))
    runs: list[Run] = []
    try:
        with setup(archive, work, workloads) as s:
            for n in range(args.runs):
                for w in workloads:
                    for mode in modes:
                        r = one_run(s, w, mode, n)
                        runs.append(r)
                        print(f"# {w} {mode} #{n}: pull {r.pull:.2f} s, run {r.run:.2f} s, "
                              f"total {r.total:.2f} s, fetched {r.fetched / 1e6:.1f} MB",
                              file=sys.stderr, flush=True)
                        if args.json:
                            Path(args.json).write_text(json.dumps([asdict(x) for x in runs]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
