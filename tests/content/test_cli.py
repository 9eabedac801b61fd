"""`ipfsnap image` commands: outputs, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ipfsnap.cli.main import main
from ipfsnap.content import ImageStore
from ipfsnap.content.sample import SampleImage


def run(state: Path, *args: str) -> int:
    return main(["--state-dir", str(state), "image", *args])


def test_image_commands(
    state_dir: Path, tmp_path: Path, busybox_image: SampleImage, capsys: pytest.CaptureFixture[str]
) -> None:
    assert busybox_image.oci_archive is not None
    assert run(state_dir, "import", str(busybox_image.oci_archive)) == 0
    out = capsys.readouterr().out
    assert out == f"{busybox_image.name} {busybox_image.target.digest}\n"
    assert run(state_dir, "tag", busybox_image.name, "localhost:5000/copy:2") == 0
    assert capsys.readouterr().out == "localhost:5000/copy:2\n"
    # stdout is not a terminal here: JSON lines
    assert run(state_dir, "ls") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["name"] for x in lines] == [busybox_image.name, "localhost:5000/copy:2"]
    assert all(x["digest"] == busybox_image.target.digest for x in lines)
    blob_sizes = sum(p.stat().st_size for p in busybox_image.blobs.iterdir())
    assert lines[0]["size"] == blob_sizes
    assert run(state_dir, "ls", "-q") == 0
    assert capsys.readouterr().out.split() == [busybox_image.name, "localhost:5000/copy:2"]
    out_file = tmp_path / "exported.tar"
    assert run(state_dir, "export", "localhost:5000/copy:2", str(out_file)) == 0
    assert out_file.is_file()
    assert run(state_dir, "rm", busybox_image.name, "localhost:5000/copy:2") == 0
    capsys.readouterr()
    assert run(state_dir, "gc") == 0
    assert capsys.readouterr().out.startswith("removed 4 blobs")
    assert list(ImageStore(state_dir).blobs.list()) == []
    assert run(state_dir, "import", str(out_file), "--name", "again:1") == 0
    assert capsys.readouterr().out.startswith("docker.io/library/again:1 ")


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["rm", "nope"], 1, "image docker.io/library/nope:latest: not in the local store"),
        (["tag", "nope", "x"], 1, "not in the local store"),
        (["export", "nope", "/tmp/x.tar"], 1, "not in the local store"),
        (["import", "/nonexistent/file.tar"], 1, "/nonexistent/file.tar: no such file"),
        (["rm", "Bad:Name:x"], 2, "invalid image reference"),
        (["pull", "--platform", "linux", "x"], 2, "invalid platform 'linux'"),
        (
            ["pull", "ipfs://bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"],
            2,
            "rpull",
        ),
    ],
)
def test_errors(
    state_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], code: int, needle: str
) -> None:
    assert run(state_dir, *args) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("ipfsnap: ") and captured.err.count("\n") == 1
    assert needle in captured.err


def test_import_corrupt_exit_code(
    state_dir: Path, tmp_path: Path, busybox_image: SampleImage, capsys: pytest.CaptureFixture[str]
) -> None:
    assert busybox_image.oci_archive is not None
    data = busybox_image.oci_archive.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    assert run(state_dir, "import", str(cut)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(cut) in err
    assert ImageStore(state_dir).list() == []
    assert list(ImageStore(state_dir).blobs.list()) == []


def test_ls_table_on_terminal(
    state_dir: Path,
    busybox_image: SampleImage,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert run(state_dir, "import", str(busybox_image.layout)) == 0
    capsys.readouterr()
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert run(state_dir, "ls") == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "DIGEST", "TYPE", "SIZE", "UPDATED"]
    assert row.startswith(busybox_image.name + "  ")
    assert busybox_image.target.digest[:19] in row and "manifest" in row
    assert run(state_dir, "ls", "--json") == 0
    assert json.loads(capsys.readouterr().out)["name"] == busybox_image.name
