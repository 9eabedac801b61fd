#!/usr/bin/env python3
"""Fuzz every parser of hostile input with atheris (coverage-guided libFuzzer).

    .venv/bin/python scripts/fuzz.py --cases 100000            # the full campaign
    .venv/bin/python scripts/fuzz.py --seconds 60 -t ipfs_cid  # one target for a minute

Each target (tests/fuzz/targets.py) runs in its own process, seeded with
tests/fuzz/corpus/<target>/, under a per-input timeout (a hang), libFuzzer's RSS limit and
an address-space rlimit (a memory blow-up), until it has run ``--cases`` inputs or
``--seconds`` passed. Prints per target: cases run, crashes (inputs that raised anything but
a clean ipfsnap error, or failed the target's own checks, or hung, or ran out of memory),
distinct findings, time; writes the same as JSON (``--json``). Exit status 1 when any
target crashed. ``--keep-corpus`` minimises each run's corpus into tests/fuzz/corpus/ (to
commit); ``--save-crashes`` copies reproducers into tests/fuzz/crashes/ (commit them once
the bug is fixed: the normal test run replays them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fuzz.targets import (  # noqa: E402
    CORPUS_DIR,
    CRASHES_DIR,
    SANDBOX_ENV,
    TARGETS,
    default_sandbox_parent,
)

#: address-space cap of a fuzz process: generous for CPython + libFuzzer (~0.5 GiB), far
#: below what an unbounded decompression would take
AS_LIMIT_MB = 4096
#: libFuzzer's own RSS watchdog, below the cap so it reports (oom-*) before malloc fails
RSS_LIMIT_MB = 2048
#: one input may take this long before it counts as a hang (inputs take milliseconds;
#: the margin is for a loaded CI machine)
INPUT_TIMEOUT_S = 60
#: corpus files kept per target by --keep-corpus (the minimised corpus is usually smaller)
MAX_KEPT = 300


@dataclass
class Result:
    target: str
    cases: int = 0
    crashes: int = 0
    seconds: float = 0.0
    status: str = "ok"  # ok | crashed | hang | oom | error
    findings: list[dict[str, Any]] = field(default_factory=list)


def _limits() -> None:
    cap = AS_LIMIT_MB << 20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def _child(cmd: list[str], log: Path) -> int:
    """Run a fuzz process under the limits, output to ``log``, in a scratch directory of
    its own that is removed afterwards (also when libFuzzer killed it)."""
    sandbox = tempfile.mkdtemp(prefix="ipfsnap-fuzz-", dir=default_sandbox_parent())
    try:
        with open(log, "wb") as out:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                  preexec_fn=_limits, check=False,
                                  env={**os.environ, SANDBOX_ENV: sandbox})
        return proc.returncode
    finally:
        shutil.rmtree(sandbox, ignore_errors=True)


def run_target(name: str, args: argparse.Namespace, work: Path) -> Result:
    twork = work / name
    report = twork / "report.json"
    twork.mkdir(parents=True, exist_ok=True)
    cases = TARGETS[name].ci_cases if args.ci else args.cases
    cmd = [
        sys.executable, "-m", "tests.fuzz.atheris_main", name,
        "--cases", str(cases), "--seconds", str(args.seconds),
        "--report", str(report), "--work", str(twork),
        "--timeout", str(args.timeout), "--rss-mb", str(RSS_LIMIT_MB), "--seed", str(args.seed),
    ]
    log = twork / "libfuzzer.log"
    t0 = time.monotonic()
    returncode = _child(cmd, log)
    res = Result(name, seconds=round(time.monotonic() - t0, 1))
    stats: dict[str, Any] = json.loads(report.read_text()) if report.exists() else {}
    res.cases = int(stats.get("cases", 0))
    res.crashes = int(stats.get("crashes", 0))
    for key, f in stats.get("unique", {}).items():
        res.findings.append({"key": key, **f})
    if res.crashes:
        res.status = "crashed"
    if returncode != 0 or not stats.get("done"):
        # libFuzzer stopped the process: a hang or memory blow-up left an artifact
        artifacts = sorted((twork / "crashes").glob("[a-z]*-*"))
        kinds = [a.name.split("-")[0] for a in artifacts if not a.name.startswith("finding-")]
        res.status = {"timeout": "hang", "oom": "oom"}.get(kinds[0], "error") if kinds else "error"
        res.crashes += 1
        tail = log.read_text(errors="replace").splitlines()[-15:]
        res.findings.append({"key": res.status, "message": " | ".join(tail)[-600:],
                             "file": str(artifacts[0]) if artifacts else "", "count": 1})
    if args.keep_corpus and res.status == "ok":
        keep(name, args, twork)
    if args.save_crashes:
        for f in res.findings:
            if f.get("file"):
                dest = CRASHES_DIR / name
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy(f["file"], dest / Path(f["file"]).name)
    return res


def keep(name: str, args: argparse.Namespace, twork: Path) -> None:
    """Minimise the run's corpus (libFuzzer -merge) and keep it beside the seeds."""
    merged = twork / "merged"
    cmd = [sys.executable, "-m", "tests.fuzz.atheris_main", name, "--report",
           str(twork / "merge.json"), "--work", str(twork), "--merge-into", str(merged)]
    _child(cmd, twork / "merge.log")
    dest = CORPUS_DIR / name
    seeds = {p.read_bytes() for p in dest.glob("seed-*")}
    for old in dest.iterdir():
        if not old.name.startswith("seed-"):
            old.unlink()
    files = sorted(merged.iterdir(), key=lambda p: p.stat().st_size) if merged.is_dir() else []
    for p in files[:MAX_KEPT]:
        if p.read_bytes() not in seeds:
            shutil.copy(p, dest / p.name)


def markdown(summary: dict[str, Any]) -> str:
    """The docs/reliability.md table of a campaign summary."""
    rows = ["| target | cases | crashes | time (s) | cases/s | reproduce |",
            "|---|---|---|---|---|---|"]
    for r in summary["targets"]:
        t = TARGETS[r["target"]]
        rate = round(r["cases"] / r["seconds"]) if r["seconds"] else 0
        cmd = f"`scripts/fuzz.py --cases {r['cases']} -t {t.name}`"
        rows.append(f"| `{t.name}` | {r['cases']:,} | {r['crashes']} | "
                    f"{r['seconds']:.0f} | {rate} | {cmd} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=100_000, help="inputs per target")
    ap.add_argument("--ci", action="store_true",
                    help="each target's CI size (Target.ci_cases) instead of --cases")
    ap.add_argument("--seconds", type=float, default=0.0, help="time per target (0 = none)")
    ap.add_argument("-t", "--target", action="append", choices=sorted(TARGETS),
                    help="only these targets (repeatable; default all)")
    ap.add_argument("--jobs", type=int, default=1, help="targets run at once")
    ap.add_argument("--timeout", type=int, default=INPUT_TIMEOUT_S)
    ap.add_argument("--seed", type=int, default=0, help="libFuzzer seed (0 = random)")
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument("--work", type=Path, help="work dir (default: a temporary one)")
    ap.add_argument("--keep-corpus", action="store_true")
    ap.add_argument("--save-crashes", action="store_true")
    ap.add_argument("--render", type=Path, metavar="SUMMARY",
                    help="print the markdown table of a --json summary and exit")
    args = ap.parse_args(argv)
    if args.render:
        print(markdown(json.loads(args.render.read_text())))
        return 0
    names = args.target or list(TARGETS)
    if os.geteuid() != 0:
        skipped = [n for n in names if TARGETS[n].needs_root]
        names = [n for n in names if not TARGETS[n].needs_root]
        if skipped:
            print(f"not root: skipping {', '.join(skipped)}", file=sys.stderr)
    work = args.work or Path(tempfile.mkdtemp(prefix="ipfsnap-fuzz-work-"))
    t0 = time.monotonic()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(lambda n: run_target(n, args, work), names))
    total = round(time.monotonic() - t0, 1)
    print(f"{'target':22} {'cases':>8} {'crashes':>8} {'distinct':>8} {'time s':>8}  status")
    for r in results:
        print(f"{r.target:22} {r.cases:>8} {r.crashes:>8} {len(r.findings):>8} "
              f"{r.seconds:>8}  {r.status}")
        for f in r.findings:
            print(f"    {f['key']}: {f['message'][:160]!r} ({f.get('file', '')})")
    print(f"total {total} s, work dir {work}")
    summary = {
        "cases_per_target": "ci" if args.ci else args.cases,
        "seconds_per_target": args.seconds,
        "total_seconds": total,
        "targets": [asdict(r) for r in results],
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    if not args.work and all(r.status == "ok" for r in results):
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r.status != "ok" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
