"""CLI start-up: wall and CPU time of short commands, this checkout against a baseline.

Usage::

    .venv/bin/python benchmarks/cli_startup.py [--baseline REV] [--runs N] [--state-dir DIR]

The baseline's ``src/`` is exported with ``git archive REV`` into a temporary directory and
put first on ``PYTHONPATH``; each command runs alternately from the baseline and from this
checkout (same interpreter, same machine load), N times each. Printed per command: median
wall time and median CPU time (user + system, from ``getrusage`` of the children: less
sensitive than wall time to other processes on a loaded machine), and the ratio
this/baseline. ``image ls`` uses ``--state-dir`` (default: a fresh empty one).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY = "import sys; from ipfsnap.cli.main import main; sys.exit(main())"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure(src: Path, argv: list[str]) -> tuple[float, float]:
    """(wall, cpu) seconds of one ``ipfsnap ARGV`` with ``src`` first on the path."""
    env = dict(os.environ, PYTHONPATH=str(src))
    cpu0, t0 = _cpu(), time.perf_counter()
    subprocess.run([sys.executable, "-c", ENTRY, *argv], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0, _cpu() - cpu0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="HEAD~1", metavar="REV")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--state-dir", type=Path, default=None)
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cli-startup-") as tmp:
        base = Path(tmp) / "baseline"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", opts.baseline, "src"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        state = opts.state_dir or Path(tmp) / "state"
        state.mkdir(exist_ok=True)
        trees = {"baseline": base / "src", "this": ROOT / "src"}
        commands = [["--help"], ["image", "rpull", "--help"],
                    ["--state-dir", str(state), "image", "ls"]]
        print(f"{'command':40} {'wall baseline':>14} {'this':>8} {'ratio':>6}"
              f" {'cpu baseline':>13} {'this':>8} {'ratio':>6}")
        for argv in commands:
            wall: dict[str, list[float]] = {k: [] for k in trees}
            cpu: dict[str, list[float]] = {k: [] for k in trees}
            for _ in range(opts.runs):
                for name, src in trees.items():  # alternate: both see the same load
                    w, c = measure(src, argv)
                    wall[name].append(w)
                    cpu[name].append(c)
            wb, wt = (statistics.median(wall[k]) * 1e3 for k in trees)
            cb, ct = (statistics.median(cpu[k]) * 1e3 for k in trees)
            label = " ".join(a for a in argv if a not in (str(state), "--state-dir"))
            print(f"ipfsnap {label:32} {wb:11.0f} ms {wt:5.0f} ms {wt / wb:6.2f}"
                  f" {cb:10.0f} ms {ct:5.0f} ms {ct / cb:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
