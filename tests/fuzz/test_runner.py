"""scripts/fuzz.py as CI uses it: fixed seeds under ``--ci``, and every finding reported
with its input (gzip + base64) and the command that replays it, since a CI machine's work
dir is gone by the time anyone reads the log."""

from __future__ import annotations

import base64
import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from scripts.fuzz import CI_SEED, _stop_message, target_seed
from tests.fuzz.targets import CRASHES_DIR, TARGETS
from tests.fuzz.test_campaign import _describe
from tests.support import ROOT, require


def _require_atheris() -> None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        require(False, "atheris (pip install -e '.[dev]')")


def _fuzz(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_target_seeds_are_fixed_and_distinct() -> None:
    seeds = [target_seed(CI_SEED, n) for n in TARGETS]
    assert seeds == [target_seed(CI_SEED, n) for n in TARGETS]
    assert len(set(seeds)) == len(seeds)
    assert all(0 < s < 1 << 31 for s in seeds)
    assert target_seed(CI_SEED + 1, "ipfs_cid") != target_seed(CI_SEED, "ipfs_cid")


def test_ci_runs_use_the_ci_seed(tmp_path: Path) -> None:
    _require_atheris()
    out = tmp_path / "s.json"
    proc = _fuzz("--ci", "--seconds", "1", "-t", "estargz_footer", "--json", str(out),
                 "--work", str(tmp_path / "w"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["base_seed"] == CI_SEED
    assert summary["targets"][0]["seed"] == target_seed(CI_SEED, "estargz_footer")
    log = (tmp_path / "w" / "estargz_footer" / "libfuzzer.log").read_text()
    assert f"INFO: Seed: {target_seed(CI_SEED, 'estargz_footer')}" in log


def test_findings_carry_their_input(tmp_path: Path) -> None:
    # --slow 0: every input is a "slow" finding, a real finding through the whole path
    _require_atheris()
    out = tmp_path / "s.json"
    proc = _fuzz("--cases", "50", "-t", "ipfs_cid", "--slow", "0", "--seed", "5",
                 "--json", str(out), "--work", str(tmp_path / "w"))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["base_seed"] == 5
    r: dict[str, Any] = summary["targets"][0]
    assert (r["status"], r["seed"], r["cases"]) == ("slow", target_seed(5, "ipfs_cid"), 50)
    [f] = r["findings"]
    assert f["key"] == "slow:SlowInput@input"
    data = Path(f["file"]).read_bytes()
    assert gzip.decompress(base64.b64decode(f["input_gz_b64"])) == data
    assert f["size"] == len(data)
    # the printed report and the CI test's assertion message both hold the input
    assert f["input_gz_b64"] in proc.stdout
    assert "scripts/fuzz.py --replay ipfs_cid" in proc.stdout
    assert f"--seed 5 (libFuzzer -seed={r['seed']})" in proc.stdout
    described = _describe(r)
    assert f["input_gz_b64"] in described and "--replay ipfs_cid" in described


def test_replay_runs_one_input() -> None:
    repro = CRASHES_DIR / "config_toml" / "review-nan"
    proc = _fuzz("--replay", "config_toml", str(repro))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"config_toml on {repro} ({repro.stat().st_size} bytes): ok")


def test_hang_message_is_the_error_and_the_stack_down_to_the_target(tmp_path: Path) -> None:
    # what libFuzzer (through atheris) writes when an input times out, as seen in the
    # snapshot_apply hang of this session
    log = tmp_path / "libfuzzer.log"
    log.write_text("\n".join([
        "INFO: Seed: 1111",
        "#4096\tpulse  cov: 240 ft: 546 corp: 42/141Kb",
        "",
        " === Timeout: 85s elapsed, timeout=60s ===",
        "Current thread 0x00007f8089849b80 (most recent call first):",
        f'  File "{ROOT}/src/ipfsnap/oci/tarheaders.py", line 158 in _pax_records',
        '  File "/usr/lib/python3.11/tarfile.py", line 1317 in _proc_member',
        f'  File "{ROOT}/tests/fuzz/targets.py", line 360 in fuzz_apply',
        f'  File "{ROOT}/tests/fuzz/targets.py", line 594 in check',
        '  File "<frozen runpy>", line 88 in _run_code',
        "ALARM: working on the last Unit for 84 seconds",
        "==19879== ERROR: libFuzzer: timeout after 84 seconds",
        "SUMMARY: libFuzzer: timeout",
    ]))
    msg = _stop_message(log)
    assert msg.startswith("==19879== ERROR: libFuzzer: timeout after 84 seconds | ")
    assert '"src/ipfsnap/oci/tarheaders.py", line 158 in _pax_records' in msg
    assert msg.endswith('"tests/fuzz/targets.py", line 360 in fuzz_apply')
