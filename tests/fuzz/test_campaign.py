"""The fuzz campaign at CI size: every target under atheris for its ``ci_cases`` inputs
(100,000 each: the full campaign), failing on any crash, slow input, hang or memory blow-up.

The seeds are fixed (``--ci``: ``scripts/fuzz.py``'s ``CI_SEED``), so the same tree explores
the same inputs on every machine; a failure names each finding's input, gzip + base64, and
the command that replays it (the CI machine and its work dir are gone by then).

The full campaign (100,000 inputs per target) is ``scripts/fuzz.py --cases 100000``; its
figures are in docs/reliability.md."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fuzz.targets import TARGETS
from tests.support import ROOT, require, require_root


# a guard against a stuck run only: ~4 minutes on an idle 2-core machine, far more when shared
@pytest.mark.timeout(1800)
def test_fuzz_campaign_ci_size(tmp_path: Path) -> None:
    require_root()  # snapshot_apply creates device nodes and chowns
    try:
        import atheris  # noqa: F401
    except ImportError:
        require(False, "atheris (pip install -e '.[dev]')")
    out = tmp_path / "summary.json"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "fuzz.py"),
        "--ci", "--jobs", "2",
        "--work", str(tmp_path / "work"), "--json", str(out),
    ]
    # its own session: whatever ends this test (a failure, pytest's timeout) ends the
    # fuzz processes with it
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        stdout, stderr = proc.communicate()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    # shown by pytest when the test fails: the table and each finding's replay block
    sys.stdout.write(stdout)
    assert out.exists(), stdout[-3000:] + stderr[-3000:]
    summary = json.loads(out.read_text())
    results = {r["target"]: r for r in summary["targets"]}
    assert set(results) == set(TARGETS)
    crashed = [r for r in summary["targets"] if r["status"] != "ok"]
    assert not crashed, "fuzz findings:\n" + "\n".join(_describe(r) for r in crashed)
    ran = {n: r["cases"] for n, r in results.items()}
    assert ran == {n: t.ci_cases for n, t in TARGETS.items()}, ran
    assert proc.returncode == 0, stdout[-3000:]


def _describe(r: dict[str, Any]) -> str:
    """One crashed target's findings, each with its input and how to replay it."""
    lines = [f"{r['target']} ({r['status']}, libFuzzer -seed={r['seed']}, {r['cases']} cases):"]
    for f in r["findings"]:
        lines.append(f"  {f['key']}: {f['message'][:1500]}")
        if "input_gz_b64" in f:
            lines.append(f"    input ({f['size']} bytes, sha256 {f['sha256']}), replay with "
                         f"echo '{f['input_gz_b64']}' | base64 -d | gunzip > in && "
                         f".venv/bin/python scripts/fuzz.py --replay {r['target']} in")
        else:
            lines.append(f"    input: {f.get('size', 'no')} bytes saved, not printable")
    return "\n".join(lines)
