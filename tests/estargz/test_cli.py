"""The `ipfsnap estargz` commands, in process and as a subprocess (exit codes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ipfsnap.cli.main import main
from tests.estargz.helpers import Item, make_tar, toc_of

ITEMS = [
    Item("etc", "dir"),
    Item("etc/conf", data=b"key=value\n" * 300),
    Item("bin/tool", data=bytes(range(256)) * 40, mode=0o755),
    Item("bin/alias", "symlink", link="tool"),
]


@pytest.fixture
def tar_path(tmp_path: Path) -> Path:
    p = tmp_path / "in.tar"
    p.write_bytes(make_tar(ITEMS))
    return p


def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "ipfsnap.cli.main", *args], capture_output=True, timeout=120
    )


def test_build_verify_ls_cat(
    tar_path: Path, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    out = tmp_path / "out.blob"
    argv = ["estargz", "build", str(tar_path), str(out), "--chunk-size", "4096", "--level", "1"]
    assert main([*argv, "--workers", "2"]) == 0
    doc = json.loads(capsysbinary.readouterr().out)
    assert {"tocDigest", "blobDigest", "blobSize", "diffID", "uncompressedSize"} <= set(doc)
    assert doc["blobSize"] == out.stat().st_size
    assert doc["annotations"]["containerd.io/snapshot/stargz/toc.digest"] == doc["tocDigest"]
    first = out.read_bytes()
    assert main([*argv, "--workers", "1"]) == 0  # same bytes with one worker
    capsysbinary.readouterr()
    assert out.read_bytes() == first

    assert main(["estargz", "verify", str(out), "--toc-digest", doc["tocDigest"]]) == 0
    v = json.loads(capsysbinary.readouterr().out)
    assert v["tocDigest"] == doc["tocDigest"] and v["compression"] == "gzip"
    assert v["entries"] == len(toc_of(first)["entries"])

    assert main(["estargz", "ls", str(out)]) == 0
    lines = [json.loads(x) for x in capsysbinary.readouterr().out.splitlines()]
    assert lines == toc_of(first)["entries"]
    assert {
        "name": "bin/alias",
        "type": "symlink",
        "linkName": "tool",
        "mode": 0o644,
        "modtime": "2020-09-13T12:26:40Z",
    }.items() <= lines[-1].items()

    assert main(["estargz", "cat", str(out), "bin/tool"]) == 0
    assert capsysbinary.readouterr().out == bytes(range(256)) * 40
    assert (
        main(["estargz", "cat", str(out), "bin/tool", "--offset", "4000", "--length", "200"]) == 0
    )
    assert capsysbinary.readouterr().out == (bytes(range(256)) * 40)[4000:4200]


def test_build_zstd_and_prioritize(
    tar_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "z.blob"
    assert (
        main(
            [
                "estargz",
                "build",
                str(tar_path),
                str(out),
                "--compression",
                "zstd",
                "--prioritize",
                "bin/tool",
                "--prioritize",
                "etc/conf",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["estargz", "verify", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["compression"] == "zstd"
    assert main(["estargz", "ls", str(out)]) == 0
    names = [json.loads(x)["name"] for x in capsys.readouterr().out.splitlines()]
    assert names[:4] == ["bin/tool", "etc/", "etc/conf", ".prefetch.landmark"]


def test_exit_codes(tar_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.blob"
    r = run_cli("estargz", "build", str(tar_path), str(out), "--level", "1")
    assert r.returncode == 0, r.stderr
    toc = json.loads(r.stdout)["tocDigest"]
    assert run_cli("estargz", "verify", str(out), "--toc-digest", toc).returncode == 0

    r = run_cli("estargz", "verify", str(out), "--toc-digest", "sha256:" + "0" * 64)
    assert r.returncode == 1 and b"TOC digest" in r.stderr and r.stdout == b""
    assert r.stderr.count(b"\n") == 1

    bad = tmp_path / "bad.blob"
    data = bytearray(out.read_bytes())
    data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    r = run_cli("estargz", "verify", str(bad))
    assert r.returncode == 1 and b"footer" in r.stderr

    assert run_cli("estargz", "verify", str(tmp_path / "nope")).returncode != 0
    assert run_cli("estargz", "cat", str(out), "no/such").returncode != 0
    assert run_cli("estargz", "build", str(tar_path), str(out), "--level", "42").returncode == 2


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x01" * 4096)
    outdir = tmp_path / "out"
    outdir.mkdir()
    r = run_cli("estargz", "build", str(junk), str(outdir / "x.blob"))
    assert r.returncode == 1 and b"tar" in r.stderr
    assert list(outdir.iterdir()) == []


def test_build_from_stdin(tar_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.blob"
    r = subprocess.run(
        [sys.executable, "-m", "ipfsnap.cli.main", "estargz", "build", "-", str(out)],
        input=tar_path.read_bytes(),
        capture_output=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["blobSize"] == out.stat().st_size


def test_unwritable_output_is_one_line_error(
    tar_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "x.blob"
    assert main(["estargz", "build", str(tar_path), str(missing)]) == 1
    err = capsys.readouterr().err
    assert "cannot create" in err and str(missing) in err and err.count("\n") == 1
    assert main(["estargz", "build", str(tmp_path / "absent.tar"), str(tmp_path / "y")]) != 0
    assert "absent.tar" in capsys.readouterr().err
