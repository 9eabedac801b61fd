"""The fixed overhead of ``ipfsnap run --rm``: this checkout against a baseline, with phases.

Usage::

    .venv/bin/python benchmarks/run_bench.py [--baseline REV] [--runs N]
        [--snapshotters overlayfs,stargz] [--image OCI_TAR] [--json FILE]

The baseline's ``src/`` is exported with ``git archive REV`` into a temporary directory and
put first on ``PYTHONPATH`` (same interpreter and venv). Each tree gets its own state dir
(under /var/tmp), the image imported and one warm-up run per snapshotter (layers unpacked,
the stargz snapshotter service started), so what is timed is the run of a fully local
image. Then N rounds; in each, every (snapshotter, tree) runs once, the order alternating,
so both trees see the same load. Needs root and runc.

One run: ``ipfsnap run --rm [--snapshotter S] IMAGE bench python3 -c 'print(...)'`` with a
workload that prints "Hello, World!" and ``time.time()``. Phases, from outside the CLI so
the baseline needs no instrumentation:

- start: from spawning the CLI to its ``runc run`` (a ``runc`` shim first on PATH records
  the time and execs the real runc): interpreter and imports, image and container records,
  layer snapshots checked, active snapshot prepared and mounted, bundle written;
- container: from ``runc run`` to the container's python printing (runc create/start,
  python's own start-up);
- exit: from that print to the CLI's exit: python and runc exiting, then the ``--rm``
  clean-up (unmount, snapshot removal, container record).

After every run the bench checks that nothing is left: no container directory, no mount
under the state dir's containers, no ``ipfsnap-container`` snapshot in the store's
metadata. It prints median (min-max) per phase and the ratio this/baseline of the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY = "import sys; from ipfsnap.cli.main import main; sys.exit(main())"
DEFAULT_IMAGE = Path("/var/cache/ipfsnap-test/python-3/image.oci.tar")
WORKLOAD = ["python3", "-c", 'import time; print("Hello, World!", time.time())']
CONTAINER_ID = "bench"
PHASES = ("total", "start", "container", "exit", "cpu")

SHIM = """#!/bin/sh
case " $* " in *" run "*) date +%s.%N >> "$RUN_BENCH_LOG";; esac
exec {runc} "$@"
"""


@dataclass
class Sample:
    tree: str
    snapshotter: str
    total: float
    start: float
    container: float
    exit: float
    cpu: float


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Tree:
    """One source tree with its own state dir."""

    def __init__(self, name: str, src: Path, state: Path, shim_dir: Path) -> None:
        self.name, self.src, self.state = name, src, state
        self.log = state.parent / f"{name}.runc-times"
        self.env = dict(os.environ, PYTHONPATH=str(src), RUN_BENCH_LOG=str(self.log),
                        PATH=f"{shim_dir}:{os.environ.get('PATH', '')}")

    def cli(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", ENTRY, "--state-dir", str(self.state),
                               *argv], env=self.env, check=check, capture_output=True,
                              text=True)

    def run_argv(self, snapshotter: str, image: str) -> list[str]:
        return [sys.executable, "-c", ENTRY, "--state-dir", str(self.state), "run", "--rm",
                "--snapshotter", snapshotter, image, CONTAINER_ID, *WORKLOAD]

    def timed_run(self, snapshotter: str, image: str) -> Sample:
        self.log.unlink(missing_ok=True)
        cpu0, t0 = _cpu(), time.time()
        proc = subprocess.run(self.run_argv(snapshotter, image), env=self.env,
                              capture_output=True, text=True, check=False)
        t_end, cpu = time.time(), _cpu() - cpu0
        words = proc.stdout.split()
        if proc.returncode != 0 or words[:2] != ["Hello,", "World!"]:
            raise SystemExit(f"{self.name} {snapshotter}: run failed ({proc.returncode}): "
                             f"{proc.stdout!r} {proc.stderr[-500:]!r}")
        t_hello = float(words[2])
        t_runc = float(self.log.read_text().split()[0])
        self.check_clean(snapshotter)
        return Sample(self.name, snapshotter, t_end - t0, t_runc - t0, t_hello - t_runc,
                      t_end - t_hello, cpu)

    def check_clean(self, snapshotter: str) -> None:
        """What ``--rm`` must have removed by the time the command returned."""
        left = []
        if (self.state / "containers" / CONTAINER_ID).exists():
            left.append("container directory")
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            mounts = [ln.split()[4] for ln in f]
        left += [m for m in mounts if m.startswith(str(self.state / "containers"))]
        db = self.state / "snapshots" / snapshotter / "metadata.db"
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            left += [r[0] for r in conn.execute(
                "SELECT key FROM snapshots WHERE key LIKE 'ipfsnap-container %'")]
        if left:
            raise SystemExit(f"{self.name} {snapshotter}: left behind after run --rm: {left}")

    def teardown(self) -> None:
        self.cli("snapshotter", "stop", check=False)
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            mounts = [ln.split()[4] for ln in f]
        for m in reversed(mounts):
            if m.startswith(str(self.state) + "/"):
                subprocess.run(["umount", "-l", m], check=False)
        shutil.rmtree(self.state, ignore_errors=True)


def export(rev: str, dest: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True,
                             capture_output=True).stdout
    dest.mkdir()
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def report(samples: list[Sample], snapshotters: list[str]) -> None:
    print(f"{'snapshotter':11} {'phase':9} {'baseline s':>22} {'this s':>22} {'ratio':>6}")
    for snap in snapshotters:
        for phase in PHASES:
            cols = {tree: [getattr(s, phase) for s in samples
                           if s.snapshotter == snap and s.tree == tree]
                    for tree in ("baseline", "this")}
            if not cols["this"]:
                continue
            ratio = statistics.median(cols["this"]) / statistics.median(cols["baseline"])
            print(f"{snap:11} {phase:9} {fmt(cols['baseline']):>22} {fmt(cols['this']):>22}"
                  f" {ratio:6.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="d592638", metavar="REV")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--snapshotters", default="overlayfs,stargz")
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE, metavar="OCI_TAR")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write every sample here")
    opts = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run_bench: needs root (mounts, runc)")
    runc = shutil.which("runc")
    if runc is None:
        raise SystemExit("run_bench: runc not found")
    if not opts.image.exists():
        raise SystemExit(f"run_bench: no image at {opts.image} (the tests build it: "
                         "tests/fixtures/images.py python_image)")
    snapshotters = opts.snapshotters.split(",")
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="run-bench-", dir="/var/tmp") as tmp:
        shim_dir = Path(tmp) / "shim"
        shim_dir.mkdir()
        (shim_dir / "runc").write_text(SHIM.format(runc=runc))
        (shim_dir / "runc").chmod(0o755)
        trees = [Tree("baseline", export(opts.baseline, Path(tmp) / "baseline"),
                      Path(tmp) / "state-baseline", shim_dir),
                 Tree("this", ROOT / "src", Path(tmp) / "state-this", shim_dir)]
        try:
            image = ""
            for tree in trees:
                out = tree.cli("image", "import", str(opts.image)).stdout.split()
                image = out[0]
                for snap in snapshotters:  # warm-up: layers unpacked, service started
                    tree.timed_run(snap, image)
            for i in range(opts.runs):
                order = trees if i % 2 == 0 else trees[::-1]
                for snap in snapshotters:
                    for tree in order:
                        samples.append(tree.timed_run(snap, image))
                print(f"round {i + 1}/{opts.runs} done", file=sys.stderr)
        finally:
            for tree in trees:
                tree.teardown()
    print(f"{opts.runs} runs each, image {opts.image}, load average "
          f"{os.getloadavg()[0]:.1f}; seconds: median (min-max); ratio this/baseline")
    report(samples, snapshotters)
    if opts.json:
        opts.json.write_text(json.dumps([asdict(s) for s in samples], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
