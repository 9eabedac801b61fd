"""ipfsnap as containerd's proxy snapshotter, driven by ``ctr`` against a private containerd:
snapshots round trip, then an image imported and run with ``--snapshotter ipfsnap``."""

from __future__ import annotations

import json
import time

import pytest

from ipfsnap.content.sample import SampleImage
from tests.containerd.conftest import ContainerdFactory
from tests.containerd.env import ContainerdEnv

pytestmark = pytest.mark.integration


def ls(env: ContainerdEnv, snapshotter: str = "ipfsnap") -> dict[str, tuple[str, str]]:
    """``ctr snapshots ls`` as {key: (parent, kind)}."""
    out = env.ctr("snapshots", "--snapshotter", snapshotter, "ls").stdout.splitlines()[1:]
    rows = {}
    for line in out:
        parts = line.split()
        if len(parts) == 3:
            rows[parts[0]] = (parts[1], parts[2])
        else:
            rows[parts[0]] = ("", parts[1])
    return rows


def test_snapshots_round_trip_through_containerd(containerd_env: ContainerdFactory) -> None:
    env = containerd_env()
    snap = ("snapshots", "--snapshotter", "ipfsnap")
    env.ctr(*snap, "prepare", "base-key")
    assert ls(env) == {"base-key": ("", "Active")}
    mounts = env.ctr(*snap, "mounts", "/mnt/x", "base-key").stdout
    # containerd hands our mount back verbatim: a bind of the snapshot's dir in our store
    src = str(env.state / "snapshots" / "stargz" / "snapshots")
    assert mounts.startswith(f"mount -t bind {src}/") and "-o rw,rbind" in mounts
    upper = mounts.split()[3]
    with open(f"{upper}/file", "w") as f:
        f.write("data\n")
    env.ctr(*snap, "commit", "base", "base-key")
    env.ctr(*snap, "prepare", "child", "base")
    env.ctr(*snap, "view", "view", "base")
    assert ls(env) == {"base": ("", "Committed"), "child": ("base", "Active"),
                       "view": ("base", "View")}
    overlay = env.ctr(*snap, "mounts", "/mnt/x", "child").stdout
    assert overlay.startswith("mount -t overlay overlay") and f"lowerdir={upper}" in overlay

    env.ctr(*snap, "label", "base", "team=ipfsnap")
    info = json.loads(env.ctr(*snap, "info", "base").stdout)
    assert info["Kind"] == "Committed" and info["Labels"]["team"] == "ipfsnap"
    usage = env.ctr(*snap, "usage", "base").stdout
    assert "base" in usage

    # errors come back as containerd's errdefs (our gRPC codes mapped by its proxy)
    res = env.ctr(*snap, "rm", "base", check=False)
    assert res.returncode != 0 and "failed precondition" in res.stderr
    res = env.ctr(*snap, "prepare", "child", "base", check=False)
    assert res.returncode != 0 and "already exists" in res.stderr
    res = env.ctr(*snap, "info", "missing", check=False)
    assert res.returncode != 0 and "not found" in res.stderr

    env.ctr(*snap, "rm", "child", "view")
    env.ctr(*snap, "rm", "base")
    assert ls(env) == {}
    # containerd's view and ours agree: nothing left in the store either. containerd removes
    # snapshots from its metadata at once and from the backend (us) in its garbage
    # collector, asynchronously, so wait (bounded) for the backend's Remove calls. The
    # collector's next run may be far off (it is paced by past GC pauses), so force one: a
    # lease deleted with --sync runs a collection before the call returns.
    lease = env.ctr("leases", "create").stdout.split()[0]
    env.ctr("leases", "rm", "--sync", lease)
    snapdir = env.state / "snapshots" / "stargz" / "snapshots"
    deadline = time.monotonic() + 60
    while list(snapdir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(snapdir.iterdir()) == [], (
        f"snapshotter log:\n{env.snapshotter_log()[-4000:]}\ncontainerd log:\n"
        f"{(env.dir / 'containerd.log').read_text(errors='replace')[-4000:]}")


def test_import_and_run_busybox(containerd_env: ContainerdFactory,
                                busybox_image: SampleImage) -> None:
    env = containerd_env()
    env.ctr("images", "import", "--snapshotter", "ipfsnap", str(busybox_image.oci_archive))
    keys = ls(env)
    assert len(keys) == 2 and all(kind == "Committed" for _, kind in keys.values())
    out = env.ctr("run", "--rm", "--snapshotter", "ipfsnap", busybox_image.name, "bb1",
                  "/bin/busybox", "cat", "/hello.txt", "/etc/passwd").stdout
    assert out == (busybox_image.files["hello.txt"] + busybox_image.files["etc/passwd"]).decode()
    # the whiteout of layer 2 hides the file of layer 1
    res = env.ctr("run", "--rm", "--snapshotter", "ipfsnap", busybox_image.name, "bb2",
                  "/bin/busybox", "ls", "/etc/removed.txt", check=False)
    assert res.returncode != 0
    # the container's snapshot is gone with it; the image's layers stay
    assert ls(env) == keys
