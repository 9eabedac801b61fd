"""``ipfsnap ipfs cid`` (offline) and the client commands against a scripted daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ipfsnap.cli.main import main
from ipfsnap.ipfs.unixfs import compute_cid
from tests.ipfs.fakekubo import FakeKubo, Seen, kubo_cat, kubo_json


def test_cid_of_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "blob"
    data = bytes(range(256)) * 3000  # 768000 bytes: 3 chunks, one dag-pb node
    f.write_bytes(data)
    assert main(["ipfs", "cid", str(f)]) == 0
    out = capsys.readouterr().out
    assert out == compute_cid(data) + "\n" and out.startswith("bafybei")
    assert main(["ipfs", "cid", "--json", str(f)]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["size"] == len(data) and obj["blocks"] == 4 and obj["cid"] == out.strip()


def test_cid_of_stdin_and_missing_file(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ipfsnap.cli.main", "ipfs", "cid", "-"],
                          input=b"hello", capture_output=True, check=True)
    assert proc.stdout.decode().strip() == compute_cid(b"hello")
    proc = subprocess.run([sys.executable, "-m", "ipfsnap.cli.main", "ipfs", "cid",
                           str(tmp_path / "nope")], capture_output=True)
    assert proc.returncode != 0 and proc.stdout == b""
    assert str(tmp_path / "nope") in proc.stderr.decode()


def test_id_and_cat_through_the_api(tmp_path: Path) -> None:
    data = b"0123456789" * 100

    def handler(seen: Seen) -> bytes:
        if seen.path.endswith("/cat"):
            p = dict(seen.params)
            off, n = int(p.get("offset", 0)), int(p.get("length", len(data)))
            return kubo_cat(data[off:off + n])
        return kubo_json({"ID": "12D3KooWtest", "AgentVersion": "kubo"})

    srv = FakeKubo(handler)
    try:
        cfg = tmp_path / "c.toml"
        cfg.write_text("")
        base = [sys.executable, "-m", "ipfsnap.cli.main", "--config", str(cfg), "--state-dir",
                str(tmp_path), "--ipfs-api", srv.api, "ipfs"]
        proc = subprocess.run([*base, "id"], capture_output=True, check=True)
        assert json.loads(proc.stdout)["ID"] == "12D3KooWtest"
        cid = compute_cid(data)
        proc = subprocess.run([*base, "cat", cid, "--offset", "15", "--length", "20"],
                              capture_output=True, check=True)
        assert proc.stdout == data[15:35]
    finally:
        srv.close()
