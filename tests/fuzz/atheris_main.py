"""Run one fuzz target under atheris (libFuzzer, coverage of ``ipfsnap`` instrumented).

Started by ``scripts/fuzz.py``, one process per target:

    python -m tests.fuzz.atheris_main TARGET --cases N --report R.json --work DIR

Every input goes through :func:`tests.fuzz.targets.check`. A finding does not stop the run:
it is counted, deduplicated by exception type and place, and its smallest input is saved
in ``DIR/crashes``. An input that finishes but takes more than ``--slow`` seconds of CPU
time (CPU, not wall-clock: the machine may be shared) is a finding too (``slow``).
libFuzzer itself stops the process on a hang (``-timeout``, wall-clock) or memory blow-up
(``-rss_limit_mb``) and writes the input to ``DIR/crashes`` (``timeout-*``, ``oom-*``); the
caller counts those. The process exits after ``--cases`` inputs or ``--seconds``,
whichever comes first, having written its report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=0.0, help="0 = no time limit")
    ap.add_argument("--report", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="corpus and crash output")
    ap.add_argument("--timeout", type=int, default=60, help="seconds one input may take")
    ap.add_argument("--slow", type=float, default=10.0,
                    help="CPU seconds above which an input that finished is a finding")
    ap.add_argument("--rss-mb", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0, help="libFuzzer -seed (0 = random)")
    ap.add_argument("--merge-into", type=Path, help="minimise the work corpus into this dir")
    # libFuzzer's merge re-runs this command with extra libFuzzer flags: pass them through
    args, libfuzzer_extra = ap.parse_known_args(argv)

    import atheris

    with atheris.instrument_imports(include=["ipfsnap"]):
        from tests.fuzz import targets

    target = targets.TARGETS[args.target]
    corpus = args.work / "corpus"
    crashes = args.work / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    stats: dict[str, Any] = {"target": target.name, "cases": 0, "crashes": 0, "unique": {}}
    last_write = [start]

    def write_report(done: bool) -> None:
        stats["seconds"] = round(time.monotonic() - start, 2)
        stats["done"] = done
        tmp = args.report.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats, indent=1))
        os.replace(tmp, args.report)

    def one(data: bytes) -> None:
        cpu = time.process_time()
        finding = targets.check(target, data)
        cpu = time.process_time() - cpu
        if finding is None and cpu > args.slow:
            finding = targets.slow_finding(target, data, cpu)
        stats["cases"] += 1
        if finding is not None:
            stats["crashes"] += 1
            seen = stats["unique"].get(finding.key)
            if seen is None or len(data) < seen["size"]:
                if seen is not None:
                    Path(seen["file"]).unlink(missing_ok=True)
                name = "finding-" + hashlib.sha1(data).hexdigest()[:16]
                path = crashes / name
                path.write_bytes(data)
                stats["unique"][finding.key] = {
                    "message": finding.message,
                    "file": str(path),
                    "size": len(data),
                    "count": (seen or {}).get("count", 0),
                }
            stats["unique"][finding.key]["count"] += 1
        now = time.monotonic()
        if not args.merge_into and (
            stats["cases"] >= args.cases or (args.seconds and now - start >= args.seconds)
        ):
            write_report(True)
            targets.remove_sandbox()
            os._exit(0)
        if now - last_write[0] > 5:
            last_write[0] = now
            write_report(False)

    # argv[0] is what libFuzzer's merge runs again (through the shell): this whole command
    me = [sys.executable, "-m", "tests.fuzz.atheris_main", *(argv or sys.argv[1:])]
    lf = [
        " ".join(shlex.quote(a) for a in me if a not in libfuzzer_extra),
        f"-max_len={target.max_len}",
        f"-timeout={args.timeout}",
        f"-rss_limit_mb={args.rss_mb}",
        f"-artifact_prefix={crashes}/",
        f"-seed={args.seed}",
        "-print_final_stats=0",
        # no re-reading of the corpus dirs every second (only this process writes them):
        # the reload is timed, the one thing that made runs of one seed differ
        "-reload=0",
    ]
    if target.tokens:
        lf.append(f"-dict={targets.DICTS_DIR / (target.tokens + '.dict')}")
    if libfuzzer_extra:  # an inner merge process: libFuzzer says what to do
        lf += libfuzzer_extra
    elif args.merge_into:
        args.merge_into.mkdir(parents=True, exist_ok=True)
        # the kept corpus and this run's new inputs, minimised together
        lf += ["-merge=1", str(args.merge_into), str(targets.CORPUS_DIR / target.name),
               str(corpus)]
    else:
        lf += [str(corpus), str(targets.CORPUS_DIR / target.name)]
    atheris.Setup(lf, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
