"""Layer mounts of a lazy rpull: each worker parsing its TOC vs adopting its warm-up's tables.

The parsed-TOC cache (src/ipfsnap/fs/tablecache.py) hands a layer's parsed TOC from its
warm-up (started while the earlier layers mount) to its worker. This times every layer's
mount (the snapshotter's ``mounted lazily ... in X s`` log line: from the mount request to
the layer ready) of a lazy ``rpull``, with the workers' ``toc_cache`` mode set through
``IPFSNAP_TOC_CACHE`` in the snapshotter's environment, modes alternating in each round:

- ``off``: every worker parses its TOC (the behaviour before the cache; warm-ups exit when
  done, as before);
- ``wait`` (the default): a warm-up, once done, is handed its layer's mount and serves it
  with the tables in memory; a mount that goes to another worker adopts the stored tables,
  waiting for a warm-up still running;
- ``adopt``: as wait, but such a worker parses at once, in parallel with a warm-up still
  running, when no tables are stored yet;
- suffixes: ``-noserve`` (``IPFSNAP_WARM_SERVE=0``: warm-ups exit when done, every mount
  goes to the spare or a new worker), ``-niceN`` (``IPFSNAP_WARM_NICE=N``: warm-ups run N
  nicer, so the layer being mounted gets the CPU first), e.g. ``wait-noserve``.

Set-up and runs as hello_bench (its helpers): node A holds the image pushed as eStargz; every
run gets a fresh node B connected to A, a fresh state dir and a dropped page cache. Only the
pull is run (no container). Per layer the table shows the mount seconds and, from the worker
logs, how the worker got its tables (parse / adopted) and how long it waited for a warm-up.

    .venv/bin/python benchmarks/mount_handoff_bench.py [--runs 3]
        [--modes off,wait,wait-noserve,adopt-noserve] [--image big|small] [--json out.json]
        [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hello_bench as hb

from ipfsnap.fs.mounter import TOC_CACHE_ENV, WARM_NICE_ENV, WARM_SERVE_ENV
from ipfsnap.ipfs.node import ManagedNode, rpc_call

MOUNTED = re.compile(r"layer (sha256:[0-9a-f]+) mounted lazily at \S+ in ([0-9.]+) s")
TOC = re.compile(r"TOC (adopted from the parsed-TOC cache|opened and verified|handed over by its "
                 r"warm-up) in ([0-9.]+) s")
HOW = {"adopted": "adopt", "opened": "parse", "handed": "handed"}
WAITED = re.compile(r"waited ([0-9.]+) s for its warm-up")


@dataclass
class Run:
    mode: str
    pull: float
    #: per layer, in mount order: mount seconds
    mounts: list[float] = field(default_factory=list)
    #: per layer: "parse", "adopt" or "handed", seconds to get the tables, seconds waited for
    #: a warm-up
    how: list[str] = field(default_factory=list)
    toc: list[float] = field(default_factory=list)
    waited: list[float] = field(default_factory=list)
    load: float = 0.0


def worker_facts(state: Path) -> dict[str, tuple[str, float, float]]:
    """Per layer digest: (parse|adopt, TOC seconds, seconds waited) from the worker logs."""
    out: dict[str, tuple[str, float, float]] = {}
    workers = state / "fs" / "workers"
    for wdir in workers.iterdir() if workers.is_dir() else ():
        if wdir.name.startswith("warm-"):
            continue
        try:
            spec = json.loads((wdir / "spec.json").read_text())
            text = (wdir / "worker.log").read_text()
        except (OSError, ValueError):
            continue
        toc = TOC.search(text)
        waited = WAITED.search(text)
        if toc:
            out[spec["layer"]] = (HOW[toc.group(1).split()[0]],
                                  float(toc.group(2)),
                                  float(waited.group(1)) if waited else 0.0)
    return out


def mode_env(mode: str) -> dict[str, str]:
    """The snapshotter's environment for a mode (see the module doc)."""
    base, *suffixes = mode.split("-")
    env = {TOC_CACHE_ENV: base, WARM_SERVE_ENV: "1", WARM_NICE_ENV: "0"}
    for suf in suffixes:
        if suf == "noserve":
            env[WARM_SERVE_ENV] = "0"
        elif suf.startswith("nice") and suf[4:].isdigit():
            env[WARM_NICE_ENV] = suf[4:]
        else:
            raise ValueError(f"unknown mode suffix {suf!r} in {mode!r}")
    return env


def one_run(bench: hb.Bench, mode: str, n: int) -> Run:
    repo = bench.work / f"node-b-{mode}-{n}"
    shutil.copy(bench.key_dir / "swarm.key", hb._mkdir(repo) / "swarm.key")
    node_b = ManagedNode(repo).start()
    state = bench.work / f"state-{mode}-{n}"
    state.mkdir()
    os.environ.update(mode_env(mode))
    try:
        rpc_call(node_b.api_url, "swarm/connect", timeout=30.0, arg=bench.node_a.swarm_addrs[0])
        # the snapshotter runs (with its spare worker ready) before the timed pull, as in
        # hello_bench; it inherits the mode's environment
        hb.start_snapshotter(state, node_b.api_multiaddr)
        hb.drop_caches()
        t0 = time.perf_counter()
        hb.ipfsnap(state, "image", "rpull", "--ipfs", "--snapshotter", "stargz",
                   bench.cids["lazy"], api=node_b.api_multiaddr)
        run = Run(mode, time.perf_counter() - t0, load=os.getloadavg()[0])
        facts = worker_facts(state)
        log_text = (state / "snapshotter.log").read_text()
        for m in MOUNTED.finditer(log_text):
            run.mounts.append(float(m.group(2)))
            how, toc, waited = facts.get(m.group(1), ("?", -1.0, 0.0))
            run.how.append(how)
            run.toc.append(toc)
            run.waited.append(waited)
        if bench.keep_logs is not None:
            hb.keep_logs(state, bench.keep_logs / f"{mode}-{n}", {})
        return run
    finally:
        for name in mode_env(mode):
            os.environ.pop(name, None)
        hb.cleanup_state(state)
        node_b.stop()
        shutil.rmtree(repo, ignore_errors=True)


def _fmt(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def report(runs: Sequence[Run]) -> str:
    modes = list(dict.fromkeys(r.mode for r in runs))
    layers = max((len(r.mounts) for r in runs), default=0)
    head = "| mode | runs | pull s | " + " | ".join(f"layer {i + 1} mount s"
                                                    for i in range(layers))
    lines = [head + " | layer mounts summed s | TOC in worker s (summed) |",
             "|" + "---|" * (layers + 5)]
    sums: dict[str, float] = {}
    for mode in modes:
        rs = [r for r in runs if r.mode == mode and len(r.mounts) == layers]
        if not rs:
            continue
        cells = [_fmt([r.mounts[i] for r in rs]) for i in range(layers)]
        summed = [sum(r.mounts) for r in rs]
        sums[mode] = statistics.median(summed)
        lines.append(f"| {mode} | {len(rs)} | {_fmt([r.pull for r in rs])} | "
                     + " | ".join(cells) + f" | {_fmt(summed)} | "
                     f"{_fmt([sum(r.toc) for r in rs])} |")
    lines.append("")
    for r in runs:
        lines.append(f"{r.mode}: pull {r.pull:.2f} s, load {r.load:.1f}; per layer "
                     + ", ".join(f"{m:.2f} s ({h} {t:.2f} s, waited {w:.2f} s)"
                                 for m, h, t, w in zip(r.mounts, r.how, r.toc, r.waited,
                                                       strict=True)))
    if "off" in sums:
        for mode in modes:
            if mode != "off" and mode in sums and sums[mode] > 0:
                lines.append(f"summed layer mounts, median: off/{mode} = "
                             f"{sums['off'] / sums[mode]:.2f}x ({sums['off']:.2f} s -> "
                             f"{sums[mode]:.2f} s)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="rounds (every mode once per round)")
    p.add_argument("--modes", default="off,wait,wait-noserve,adopt-noserve")
    p.add_argument("--image", choices=("big", "small"), default="big")
    p.add_argument("--json", type=Path, help="write the runs here")
    p.add_argument("--keep-logs", type=Path, help="keep each run's logs here")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root (FUSE mounts, drop_caches)")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    archive = hb.build_big_image() if args.image == "big" else hb.small_image()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="ipfsnap-handoff-") as tmp, \
            hb.setup(archive, Path(tmp), full=False) as bench:
        bench.keep_logs = args.keep_logs
        for n in range(args.runs):
            # rotate the order in each round, so no mode always runs first
            for mode in modes[n % len(modes):] + modes[:n % len(modes)]:
                run = one_run(bench, mode, n)
                runs.append(run)
                print(f"# {mode} {n}: pull {run.pull:.2f} s, mounts "
                      + " ".join(f"{m:.2f}" for m in run.mounts), file=sys.stderr, flush=True)
                if args.json:
                    args.json.write_text(json.dumps([asdict(r) for r in runs], indent=1))
    print(report(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
