"""End to end: ``ipfsnap run`` of the busybox sample image imported into a private state dir
(layers unpacked into committed snapshots keyed by chain ID, an active snapshot per container).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ipfsnap.cli.run import SNAPSHOT_ROOT
from ipfsnap.content import ImageStore
from ipfsnap.content.archive import import_image
from ipfsnap.content.sample import SampleImage
from ipfsnap.image.unpack import chain_ids
from ipfsnap.runtime.containers import mountinfo_targets
from ipfsnap.snapshot import Kind, SnapshotStore
from tests.support import require_root, require_tool

pytestmark = pytest.mark.integration

TIMEOUT = 120
#: a syntactically valid CIDv1 (the image is only tagged with it, never fetched)
CID = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"


@pytest.fixture(autouse=True)
def _needs_runc() -> None:
    require_root()
    require_tool("runc")


@pytest.fixture
def imported(runtime_state: Path, busybox_image: SampleImage) -> str:
    store = ImageStore(runtime_state)
    records = import_image(store, busybox_image.layout)
    assert records
    return records[0].name


def ipfsnap(state: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipfsnap.cli.main", "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        input=stdin,
    )


def snapshots(state: Path) -> dict[str, Kind]:
    with SnapshotStore(state / SNAPSHOT_ROOT, restore=False) as s:
        return {i.name: i.kind for i in s.walk()}


def no_mounts(state: Path) -> bool:
    return not [m for m in mountinfo_targets() if m.startswith(str(state) + "/")]


def test_run_image_files_and_cache(
    runtime_state: Path, imported: str, busybox_image: SampleImage
) -> None:
    p = ipfsnap(runtime_state, "run", "--rm", imported, "c1", "cat", "/hello.txt")
    assert p.returncode == 0, p.stderr
    assert p.stdout.encode() == busybox_image.files["hello.txt"]
    chains = chain_ids(busybox_image.diff_ids)
    assert snapshots(runtime_state) == {c: Kind.COMMITTED for c in chains}
    assert no_mounts(runtime_state)
    assert not (runtime_state / "containers" / "c1").exists()
    # whiteouts of the upper layer applied
    for removed in busybox_image.removed:
        p = ipfsnap(runtime_state, "run", "--rm", imported, "c2", "test", "-e", "/" + removed)
        assert p.returncode == 1, (removed, p.stderr)
    # the cache: a second run reuses the committed snapshots (same directories, same inodes)
    with SnapshotStore(runtime_state / SNAPSHOT_ROOT, restore=False) as s:
        bottom = s.path(chains[0]) / "bin" / "busybox"
        before = bottom.stat().st_ino
    p = ipfsnap(runtime_state, "run", "--rm", imported, "c3", "true")
    assert p.returncode == 0, p.stderr
    assert bottom.stat().st_ino == before
    assert snapshots(runtime_state) == {c: Kind.COMMITTED for c in chains}


def test_image_cmd_and_overrides(runtime_state: Path, imported: str) -> None:
    # no CMD: the image's Cmd (/bin/sh) runs, reading the script from stdin
    p = ipfsnap(runtime_state, "run", "--rm", imported, "c1", stdin="echo fromsh; exit 4\n")
    assert p.returncode == 4 and p.stdout == "fromsh\n", p.stderr
    # the image's Env and the command line's --env, --user, --cwd
    script = 'echo "$PATH"; echo "$X"; id -u; pwd'
    p = ipfsnap(runtime_state, "run", "--rm", "--env", "X=1", "--user", "1000", "--cwd", "/tmp",
                imported, "c2", "sh", "-c", script)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "1",
        "1000",
        "/tmp",
    ]


def test_cid_refs_and_snapshotter_option(runtime_state: Path, imported: str) -> None:
    ImageStore(runtime_state).tag(imported, "ipfs://" + CID)
    for i, ref in enumerate((CID, "ipfs://" + CID, "/ipfs/" + CID)):
        p = ipfsnap(runtime_state, "run", "--snapshotter=stargz", "--rm", ref, f"c{i}",
                    "cat", "/hello.txt")  # fmt: skip
        assert p.returncode == 0, (ref, p.stderr)
        assert p.stdout.startswith("Hello")
    p = ipfsnap(runtime_state, "run", "--rm", "no/such:image", "c9", "true")
    assert p.returncode != 0 and "no/such" in p.stderr
    assert not (runtime_state / "containers" / "c9").exists()


def test_container_writes_stay_in_its_snapshot(
    runtime_state: Path, imported: str, busybox_image: SampleImage
) -> None:
    p = ipfsnap(runtime_state, "run", imported, "w1", "sh", "-c", "echo changed > /hello.txt")
    assert p.returncode == 0, p.stderr
    kinds = snapshots(runtime_state)
    assert sorted(kinds.values()).count(Kind.ACTIVE) == 1
    p = ipfsnap(runtime_state, "run", "--rm", imported, "w2", "cat", "/hello.txt")
    assert p.stdout.encode() == busybox_image.files["hello.txt"]
    # ps shows the image; rm releases the snapshot and the mount
    rows = [json.loads(x) for x in ipfsnap(runtime_state, "ps").stdout.splitlines()]
    assert [(r["id"], r["image"], r["status"]) for r in rows] == [("w1", imported, "exited")]
    assert ipfsnap(runtime_state, "rm", "w1").returncode == 0
    assert Kind.ACTIVE not in snapshots(runtime_state).values()
    assert no_mounts(runtime_state)


def test_detached_image_container(runtime_state: Path, imported: str) -> None:
    p = ipfsnap(runtime_state, "run", "-d", imported, "d1", "sleep", "1000")
    assert p.returncode == 0, p.stderr
    rows = {
        json.loads(x)["id"]: json.loads(x)
        for x in ipfsnap(runtime_state, "ps").stdout.split("\n")
        if x
    }
    assert rows["d1"]["status"] == "running" and rows["d1"]["image"] == imported
    dup = ipfsnap(runtime_state, "run", "--rm", imported, "d1", "true")
    assert dup.returncode != 0 and "already in use" in dup.stderr
    assert ipfsnap(runtime_state, "rm", "-f", "d1").returncode == 0
    assert Kind.ACTIVE not in snapshots(runtime_state).values()
    assert no_mounts(runtime_state)


@pytest.mark.slow
def test_seed_hello_world_python(runtime_state: Path, python_image: SampleImage) -> None:
    """The seed workflow's container step on a real Debian + python3 image (full unpack)."""
    records = import_image(ImageStore(runtime_state), python_image.layout)
    ref = records[0].name
    p = ipfsnap(runtime_state, "run", "--rm", "-t", ref, "foo",
                "python3", "-c", 'print("Hello, World!")')  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout == "Hello, World!\n"
    assert no_mounts(runtime_state)
    assert Kind.ACTIVE not in snapshots(runtime_state).values()
