#!/usr/bin/env python3
"""Fuzz every parser of hostile input with atheris (coverage-guided libFuzzer).

    .venv/bin/python scripts/fuzz.py --cases 100000            # the full campaign
    .venv/bin/python scripts/fuzz.py --seconds 60 -t ipfs_cid  # one target for a minute
    .venv/bin/python scripts/fuzz.py --replay snapshot_apply FILE  # one input, as CI ran it

Each target (tests/fuzz/targets.py) runs in its own process, seeded with
tests/fuzz/corpus/<target>/, under a per-input timeout (a hang, wall-clock), a per-input
CPU-time bound (a slow input), libFuzzer's RSS limit and an address-space rlimit (a memory
blow-up), until it has run ``--cases`` inputs or ``--seconds`` passed. Prints per target:
cases run, crashes (inputs that raised anything but a clean ipfsnap error, or failed the
target's own checks, or were slow, hung, or ran out of memory), distinct findings, time;
writes the same as JSON (``--json``). Exit status 1 when any target crashed.
``--keep-corpus`` minimises each run's corpus into tests/fuzz/corpus/ (to commit);
``--save-crashes`` copies reproducers into tests/fuzz/crashes/ (commit them once the bug is
fixed: the normal test run replays them).

Reproducible: each target's libFuzzer ``-seed`` (and the process's ``PYTHONHASHSEED``, as
set iteration order steers coverage) derives from one base seed and the target's name.
``--ci`` uses the fixed :data:`CI_SEED`, so CI explores the same inputs on every run of
the same tree and a CI failure replays on any machine; other runs draw a random base
seed, printed and kept in the summary (``--seed`` repeats a run). Each finding carries its
input, gzip + base64 (:func:`encode_input`), in the summary and the printed report: a CI
machine is thrown away with its work dir, the bytes in the log are what is left.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
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
    check,
    default_sandbox_parent,
    remove_sandbox,
)

#: address-space cap of a fuzz process: generous for CPython + libFuzzer (~0.5 GiB), far
#: below what an unbounded decompression would take
AS_LIMIT_MB = 4096
#: libFuzzer's own RSS watchdog, below the cap so it reports (oom-*) before malloc fails
RSS_LIMIT_MB = 2048
#: one input may take this long (wall-clock) before libFuzzer stops it as a hang (inputs
#: take milliseconds; the margin is for a loaded CI machine)
INPUT_TIMEOUT_S = 60
#: CPU seconds after which an input that did finish is a finding (``slow``): ~1000x what
#: any input takes, and CPU time barely moves when other jobs share the machine, so it
#: catches the 10-60 s inputs the wall-clock timeout must leave alone without flaking (the
#: CI campaign's hang, PAX mtime 1e999990, took 32 s of CPU)
SLOW_CPU_S = 10.0
#: base seed of ``--ci`` (any fixed value: the date the gate became reproducible)
CI_SEED = 20261128
#: a finding's input is put in the report (gzip + base64) up to this size; targets
#: generate at most 16 KiB, committed seeds and corpus files may be larger
REPORT_INPUT_MAX = 256 << 10
#: corpus files kept per target by --keep-corpus (the minimised corpus is usually smaller)
MAX_KEPT = 300


@dataclass
class Result:
    target: str
    #: the libFuzzer seed this target ran with (also its PYTHONHASHSEED)
    seed: int = 0
    #: inputs it was to run (``cases``: how many it did)
    planned: int = 0
    cases: int = 0
    crashes: int = 0
    seconds: float = 0.0
    status: str = "ok"  # ok | crashed | hang | oom | error
    findings: list[dict[str, Any]] = field(default_factory=list)


def target_seed(base: int, name: str) -> int:
    """The target's libFuzzer seed: fixed by the base seed, different across targets."""
    return zlib.crc32(f"{base}:{name}".encode()) % ((1 << 31) - 2) + 1


def encode_input(data: bytes) -> str:
    """``data`` gzip-compressed and base64-encoded, one line: ``base64 -d | gunzip``."""
    return base64.b64encode(gzip.compress(data, 9, mtime=0)).decode("ascii")


def _attach_input(finding: dict[str, Any]) -> None:
    """Put the finding's input (its file, in a work dir that may not survive) in it."""
    path = Path(finding.get("file") or "")
    if not path.is_file():
        return
    data = path.read_bytes()
    finding["size"] = len(data)
    finding["sha256"] = hashlib.sha256(data).hexdigest()
    if len(data) <= REPORT_INPUT_MAX:
        finding["input_gz_b64"] = encode_input(data)


def _limits() -> None:
    cap = AS_LIMIT_MB << 20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def _child(cmd: list[str], log: Path, seed: int = 0) -> int:
    """Run a fuzz process under the limits, output to ``log``, in a scratch directory of
    its own that is removed afterwards (also when libFuzzer killed it)."""
    sandbox = tempfile.mkdtemp(prefix="ipfsnap-fuzz-", dir=default_sandbox_parent())
    try:
        with open(log, "wb") as out:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                  preexec_fn=_limits, check=False,
                                  env={**os.environ, SANDBOX_ENV: sandbox,
                                       "PYTHONHASHSEED": str(seed)})
        return proc.returncode
    finally:
        shutil.rmtree(sandbox, ignore_errors=True)


def run_target(name: str, args: argparse.Namespace, work: Path) -> Result:
    twork = work / name
    report = twork / "report.json"
    twork.mkdir(parents=True, exist_ok=True)
    cases = TARGETS[name].ci_cases if args.ci else args.cases
    seed = target_seed(args.seed, name)
    cmd = [
        sys.executable, "-m", "tests.fuzz.atheris_main", name,
        "--cases", str(cases), "--seconds", str(args.seconds),
        "--report", str(report), "--work", str(twork),
        "--timeout", str(args.timeout), "--rss-mb", str(RSS_LIMIT_MB), "--seed", str(seed),
        "--slow", str(args.slow),
    ]
    log = twork / "libfuzzer.log"
    t0 = time.monotonic()
    returncode = _child(cmd, log, seed)
    res = Result(name, seed=seed, planned=cases, seconds=round(time.monotonic() - t0, 1))
    stats: dict[str, Any] = json.loads(report.read_text()) if report.exists() else {}
    res.cases = int(stats.get("cases", 0))
    res.crashes = int(stats.get("crashes", 0))
    for key, f in stats.get("unique", {}).items():
        res.findings.append({"key": key, **f})
    if res.crashes:
        slow_only = all(f["key"].startswith("slow:") for f in res.findings)
        res.status = "slow" if slow_only else "crashed"
    if returncode != 0 or not stats.get("done"):
        # libFuzzer stopped the process: a hang or memory blow-up left an artifact
        artifacts = sorted((twork / "crashes").glob("[a-z]*-*"))
        kinds = [a.name.split("-")[0] for a in artifacts if not a.name.startswith("finding-")]
        res.status = {"timeout": "hang", "oom": "oom"}.get(kinds[0], "error") if kinds else "error"
        res.crashes += 1
        res.findings.append({"key": res.status, "message": _stop_message(log),
                             "file": str(artifacts[0]) if artifacts else "", "count": 1})
    for f in res.findings:
        _attach_input(f)
    if args.keep_corpus and res.status == "ok":
        keep(name, args, twork)
    if args.save_crashes:
        for f in res.findings:
            if f.get("file"):
                dest = CRASHES_DIR / name
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy(f["file"], dest / Path(f["file"]).name)
    return res


def _stop_message(log: Path) -> str:
    """Why libFuzzer stopped the process, from its log: its error line and the Python
    stack it printed (innermost frames, down to the target), else the log's last lines."""
    lines = log.read_text(errors="replace").splitlines()
    error = [ln.strip() for ln in lines if "ERROR: libFuzzer" in ln][:1]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("Current thread")), None)
    if start is None:
        return " | ".join(error + lines[-15:])[-1500:]
    frames = []
    for ln in lines[start + 1 : start + 40]:
        if not ln.startswith("  File "):
            break
        frames.append(ln.strip().removeprefix("File ").replace(str(ROOT) + "/", ""))
        if "/tests/fuzz/targets.py" in ln or "tests/fuzz/targets.py" in frames[-1]:
            break
    return " | ".join(error + frames)[-1500:]


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


def finding_report(r: Result, f: dict[str, Any], args: argparse.Namespace) -> str:
    """A finding as a block of text that reproduces it without the work dir."""
    lines = [f"FINDING {r.target} {r.status}: {f['key']}", f"  message: {f['message'][:1500]}"]
    if "input_gz_b64" in f:
        lines += [
            f"  input: {f['size']} bytes, sha256 {f['sha256']}; to replay it:",
            f"    echo '{f['input_gz_b64']}' | base64 -d | gunzip > /tmp/{r.target}.input",
            f"    .venv/bin/python scripts/fuzz.py --replay {r.target} /tmp/{r.target}.input",
        ]
    elif "size" in f:
        lines.append(f"  input: {f['size']} bytes, sha256 {f['sha256']} (too large to print)")
    else:
        lines.append("  input: none saved (libFuzzer stopped before writing one: see message)")
    ci = " --ci" if args.ci else f" --cases {r.planned}"
    lines.append(f"  the run: scripts/fuzz.py{ci} -t {r.target} --seed {args.seed} "
                 f"(libFuzzer -seed={r.seed})")
    return "\n".join(lines)


def replay(name: str, path: str) -> int:
    """Run one input through a target in this process (plain Python, as the committed
    reproducers run): what it raised, its CPU time; 1 when it is a finding."""
    if name not in TARGETS:
        print(f"unknown target {name!r}; targets: {', '.join(sorted(TARGETS))}")
        return 2
    data = Path(path).read_bytes()
    cpu = time.process_time()
    try:
        finding = check(TARGETS[name], data)
    finally:
        remove_sandbox()
    cpu = time.process_time() - cpu
    verdict = "ok" if finding is None else f"{finding.key}: {finding.message}"
    print(f"{name} on {path} ({len(data)} bytes): {verdict} ({cpu:.2f} s CPU)")
    return 0 if finding is None else 1


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
    ap.add_argument("--timeout", type=int, default=INPUT_TIMEOUT_S,
                    help="wall-clock seconds before an input is a hang")
    ap.add_argument("--slow", type=float, default=SLOW_CPU_S,
                    help="CPU seconds after which a finished input is a finding")
    ap.add_argument("--seed", type=int,
                    help=f"base seed (default: {CI_SEED} with --ci, else random)")
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument("--work", type=Path, help="work dir (default: a temporary one)")
    ap.add_argument("--keep-corpus", action="store_true")
    ap.add_argument("--save-crashes", action="store_true")
    ap.add_argument("--render", type=Path, metavar="SUMMARY",
                    help="print the markdown table of a --json summary and exit")
    ap.add_argument("--replay", nargs=2, metavar=("TARGET", "FILE"),
                    help="run one input through a target (no atheris) and say what it did")
    args = ap.parse_args(argv)
    if args.render:
        print(markdown(json.loads(args.render.read_text())))
        return 0
    if args.replay:
        return replay(*args.replay)
    if args.seed is None:
        args.seed = CI_SEED if args.ci else random.SystemRandom().randrange(1, 1 << 31)
    names = args.target or list(TARGETS)
    if os.geteuid() != 0:
        skipped = [n for n in names if TARGETS[n].needs_root]
        names = [n for n in names if not TARGETS[n].needs_root]
        if skipped:
            print(f"not root: skipping {', '.join(skipped)}", file=sys.stderr)
    work = args.work or Path(tempfile.mkdtemp(prefix="ipfsnap-fuzz-work-"))
    t0 = time.monotonic()
    from concurrent.futures import ThreadPoolExecutor

    def cost(name: str) -> float:
        t = TARGETS[name]
        return t.idle_seconds * (t.ci_cases if args.ci else args.cases)

    order = list(TARGETS)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # the longest first: jobs end together
        results = list(pool.map(lambda n: run_target(n, args, work),
                                sorted(names, key=cost, reverse=True)))
    results.sort(key=lambda r: order.index(r.target))
    total = round(time.monotonic() - t0, 1)
    print(f"{'target':22} {'cases':>8} {'crashes':>8} {'distinct':>8} {'time s':>8}  status")
    for r in results:
        print(f"{r.target:22} {r.cases:>8} {r.crashes:>8} {len(r.findings):>8} "
              f"{r.seconds:>8}  {r.status}")
        for f in r.findings:
            print(f"    {f['key']}: {f['message'][:160]!r} ({f.get('file', '')})")
    print(f"total {total} s, base seed {args.seed}, work dir {work}")
    for r in results:
        for f in r.findings:
            print(finding_report(r, f, args))
    summary = {
        "base_seed": args.seed,
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
