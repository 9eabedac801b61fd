"""The CLI: ``image rpull --ipfs``, ``image mount``/``unmount``, and the seed workflow end to
end over two IPFS nodes (import + ipfs-push on A; rpull + run on B, lazy and full)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipfsnap.content import ImageStore
from ipfsnap.content.sample import SampleImage
from ipfsnap.image.resolve import fetching_line
from ipfsnap.image.snapshotters import snapshotter_root
from ipfsnap.image.unpack import chain_ids
from ipfsnap.ipfs import IPFSClient
from ipfsnap.service.client import SnapshotterClient
from ipfsnap.snapshot import REMOTE_LABEL, Kind, SnapshotStore
from ipfsnap.snapshot.mount import is_mountpoint, mount_points
from tests.fs.layers import Item, make_tar
from tests.image.rpull_helpers import push, unmount_state
from tests.support import require_fuse, require_tool

pytestmark = pytest.mark.integration

TIMEOUT = 300


def ipfsnap(state: Path, api: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipfsnap.cli.main", "--state-dir", str(state), "--ipfs-api", api,
         *args],
        capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    require_fuse()
    s = tmp_path / "state"
    s.mkdir()
    try:
        yield s
    finally:
        unmount_state(s)
        left = [m for m in mount_points() if m.startswith(str(tmp_path) + "/")]
        assert not left, f"mounts left behind: {left}"


def test_rpull_mount_unmount(ipfs_pair: Any, state: Path, tmp_path: Path) -> None:
    tars = [
        make_tar([Item("a", "dir", mode=0o755), Item("a/one", "file", b"one\n"),
                  Item("a/lazy", "file", b"from the lazy layer\n")]),
        make_tar([Item("a", "dir", mode=0o755), Item("a/two", "file", b"two\n"),
                  Item("a/.wh.one", "file", b"")]),
    ]
    with IPFSClient(ipfs_pair.a.api_url) as a:
        image = push(a, tars, [True, False])
    ipfs_pair.connect()
    api = ipfs_pair.b.api_url

    p = ipfsnap(state, api, "image", "rpull", "--ipfs", image.cid)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        fetching_line(d) for d in (image.index, image.manifest, image.config, image.layers[1])
    ]
    # fetched once: a second rpull prints nothing
    p = ipfsnap(state, api, "image", "rpull", "--ipfs", f"ipfs://{image.cid}")
    assert p.returncode == 0 and p.stdout == "", p.stderr
    # the full path in its own store: only the layer not yet in the content store is fetched
    p = ipfsnap(state, api, "image", "rpull", "--ipfs", "--snapshotter", "overlayfs",
                f"/ipfs/{image.cid}")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [fetching_line(image.layers[0])]

    chains = chain_ids(image.diff_ids)
    with SnapshotterClient(state) as snaps:
        assert [REMOTE_LABEL in snaps.stat(c).labels for c in chains] == [True, False]
    with SnapshotStore(snapshotter_root(state, "overlayfs"), restore=False) as full:
        assert {i.name: i.kind for i in full.walk()} == {c: Kind.COMMITTED for c in chains}
        assert not any(REMOTE_LABEL in i.labels for i in full.walk())

    for snapshotter in ("stargz", "overlayfs"):
        target = tmp_path / f"mnt-{snapshotter}"
        target.mkdir()
        p = ipfsnap(state, api, "image", "mount", "--snapshotter", snapshotter, image.cid,
                    str(target))
        assert p.returncode == 0, p.stderr
        assert is_mountpoint(target)
        assert sorted(x.name for x in (target / "a").iterdir()) == ["lazy", "two"]
        assert (target / "a" / "lazy").read_bytes() == b"from the lazy layer\n"
        p = ipfsnap(state, api, "image", "unmount", str(target))
        assert p.returncode == 0, p.stderr
        assert not is_mountpoint(target)
    p = ipfsnap(state, api, "image", "unmount", str(tmp_path / "mnt-stargz"))
    assert p.returncode != 0 and "no image is mounted" in p.stderr
    p = ipfsnap(state, api, "image", "rpull", image.cid)
    assert p.returncode == 2 and "--ipfs" in p.stderr


def test_seed_workflow_busybox_two_nodes(
    ipfs_pair: Any, busybox_image: SampleImage, tmp_path: Path, state: Path
) -> None:
    """import + ipfs-push on node A; rpull + run (stargz lazily, then overlayfs fully) on B."""
    require_tool("runc")
    state_a = tmp_path / "state-a"
    p = ipfsnap(state_a, ipfs_pair.a.api_url, "image", "import", str(busybox_image.layout))
    assert p.returncode == 0, p.stderr
    p = ipfsnap(state_a, ipfs_pair.a.api_url, "image", "ipfs-push", busybox_image.name)
    assert p.returncode == 0, p.stderr
    cid = p.stdout.strip()
    ipfs_pair.connect()
    api = ipfs_pair.b.api_url

    p = ipfsnap(state, api, "image", "rpull", "--ipfs", cid)
    assert p.returncode == 0, p.stderr
    kinds = [line.rsplit(" ", 1)[1] for line in p.stdout.splitlines()]
    # documents only (the root is the manifest of this single-platform image): no layer
    assert kinds == ["application/vnd.oci.image.manifest.v1+json",
                     "application/vnd.oci.image.config.v1+json"], p.stdout
    script = "cat /hello.txt; test -e /etc/removed.txt || echo removed"
    p = ipfsnap(state, api, "run", "--snapshotter=stargz", "--rm", "-t", cid, "foo",
                "sh", "-c", script)
    assert p.returncode == 0, p.stderr
    assert p.stdout == busybox_image.files["hello.txt"].decode() + "removed\n"
    image = ImageStore(state).resolve(f"ipfs://{cid}")
    chains = chain_ids(image.config.diff_ids)
    with SnapshotterClient(state) as snaps:
        infos = {i.name: i for i in snaps.walk()}
        assert set(infos) == set(chains), "the container's snapshot went with --rm"
        assert all(REMOTE_LABEL in infos[c].labels for c in chains)
    blobs = ImageStore(state).blobs
    assert not any(blobs.exists(d.digest) for d in image.layers), "lazy: no layer fetched"

    # the same image through the overlayfs snapshotter: layers fetched whole from IPFS
    p = ipfsnap(state, api, "run", "--snapshotter=overlayfs", "--rm", f"ipfs://{cid}", "foo2",
                "cat", "/hello.txt")
    assert p.returncode == 0, p.stderr
    assert p.stdout == busybox_image.files["hello.txt"].decode()
    assert all(blobs.exists(d.digest) for d in image.layers)
    with SnapshotStore(snapshotter_root(state, "overlayfs"), restore=False) as full:
        assert {i.name for i in full.walk()} == set(chains)
        assert not any(REMOTE_LABEL in i.labels for i in full.walk())
