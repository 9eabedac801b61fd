"""The fuzz campaign at CI size: every target under atheris for a fixed time (capped at
the full campaign's 100,000 inputs), failing on any crash, hang or memory blow-up.

The full campaign (100,000 inputs per target) is ``scripts/fuzz.py --cases 100000``; its
figures are in docs/reliability.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.fuzz.targets import TARGETS
from tests.support import ROOT, require, require_root

#: seconds per target: 19 targets, two at a time, ~3.5 minutes in all on 2 idle cores
#: (fast targets reach the 100,000-input cap well before; the decompressing and unpacking
#: ones run a few thousand inputs)
CI_SECONDS = 20
CI_CASES = 100_000
#: a target that ran fewer inputs than this did not really run (import error, stuck seed)
MIN_CASES = 200


def test_fuzz_campaign_ci_size(tmp_path: Path) -> None:
    require_root()  # snapshot_apply creates device nodes and chowns
    try:
        import atheris  # noqa: F401
    except ImportError:
        require(False, "atheris (pip install -e '.[dev]')")
    out = tmp_path / "summary.json"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "fuzz.py"),
        "--cases", str(CI_CASES), "--seconds", str(CI_SECONDS), "--jobs", "2",
        "--work", str(tmp_path / "work"), "--json", str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    results = {r["target"]: r for r in summary["targets"]}
    assert set(results) == set(TARGETS)
    crashed = {n: r["findings"] for n, r in results.items() if r["status"] != "ok"}
    assert not crashed, f"fuzz findings (reproducers under {tmp_path}/work): {crashed}"
    short = {n: r["cases"] for n, r in results.items() if r["cases"] < MIN_CASES}
    assert not short, f"targets that barely ran: {short}\n{proc.stdout[-3000:]}"
    assert proc.returncode == 0, proc.stdout[-3000:]
