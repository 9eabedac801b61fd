"""``ipfsnap --containerd SOCK image rpull --ipfs CID`` into a private containerd, run with
``ctr run --snapshotter ipfsnap``: the rootfs equals a plain overlayfs import of the same
layers; eStargz layers are mounted lazily, the others fetched whole; the snapshotter reads
the image's command ahead; restarting the snapshotter under a running containerd keeps
every snapshot and lazy mount."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipfsnap.content.sample import SampleImage
from ipfsnap.estargz import TOC_DIGEST_ANNOTATION
from ipfsnap.image.unpack import chain_ids
from ipfsnap.ipfs import IPFSClient
from ipfsnap.ipfs.node import ManagedNode
from ipfsnap.oci import Descriptor
from tests.containerd.conftest import ContainerdFactory
from tests.containerd.env import ContainerdEnv
from tests.image.rpull_helpers import PushedImage, push

pytestmark = pytest.mark.integration

#: everything of the rootfs but what the runtime adds (/proc, /sys, /dev are other mounts;
#: -xdev keeps to the rootfs): type, mode, owner, size and link target per path, then the
#: md5 of every regular file
LIST_ROOTFS = (
    "cd / && /bin/busybox find . -xdev ! -path ./proc ! -path ./sys ! -path ./dev "
    "! -path ./etc/resolv.conf | /bin/busybox sort | while read -r p; do "
    # a directory's size is the filesystem's business (ext4 4096, the lazy fs 0)
    'if [ -d "$p" ] && [ ! -L "$p" ]; then /bin/busybox stat -c "%n %F %a %u:%g" "$p"; '
    'else /bin/busybox stat -c "%n %F %a %u:%g %s %N" "$p"; fi; done; '
    "/bin/busybox find . -xdev -type f | /bin/busybox sort | "
    "/bin/busybox xargs /bin/busybox md5sum"
)


@pytest.fixture(scope="module")
def pushed(ipfs_node: ManagedNode, busybox_image: SampleImage) -> Iterator[PushedImage]:
    """The busybox sample on IPFS: layer 1 (busybox) eStargz, layer 2 plain gzip."""
    with IPFSClient(ipfs_node.api_url) as client:
        yield push(client, busybox_image.layer_tars, [True, False])


def remote_label(env: ContainerdEnv, name: str) -> str | None:
    info = json.loads(env.ctr("snapshots", "--snapshotter", "ipfsnap", "info", name).stdout)
    labels: dict[str, str] = info.get("Labels") or {}
    return labels.get("containerd.io/snapshot/remote")


def lazy_mountpoints(state: Path) -> list[str]:
    root = str(state / "snapshots" / "stargz" / "snapshots") + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return sorted(line.split()[4] for line in f
                      if line.split()[4].startswith(root) and " - fuse" in line)


def test_rpull_through_containerd_runs_lazily_and_matches_overlayfs(
    containerd_env: ContainerdFactory, ipfs_node: ManagedNode, busybox_image: SampleImage,
    pushed: PushedImage,
) -> None:
    env = containerd_env(ipfs_api=ipfs_node.api_url)
    res = env.ipfsnap("image", "rpull", "--ipfs", pushed.cid)
    fetched = res.stdout.splitlines()
    # documents and the plain layer are fetched; the eStargz layer is not (lazy)
    assert f"fetching {pushed.layers[1].digest[:15]}... {pushed.layers[1].media_type}" \
        in fetched
    assert not any(pushed.layers[0].digest[:15] in line for line in fetched)
    assert pushed.cid in env.ctr("images", "ls", "-q").stdout.split()

    chains = chain_ids(pushed.diff_ids)
    assert remote_label(env, chains[0]) == "remote snapshot"
    assert remote_label(env, chains[1]) is None
    assert len(lazy_mountpoints(env.state)) == 1
    # as for its own pulls, rpull had the snapshotter read the image's command (/bin/sh ->
    # busybox in the lazy layer) ahead, in the top snapshot under containerd's name for it
    deadline = time.monotonic() + 60
    while not re.search(rf"pull of {env.namespace}/\d+/{chains[1]}: warmed [1-9]",
                        env.snapshotter_log()):
        assert time.monotonic() < deadline, env.snapshotter_log()[-4000:]
        time.sleep(0.1)

    lazy = env.ctr("run", "--rm", "--snapshotter", "ipfsnap", pushed.cid, "lazy1",
                   "/bin/busybox", "sh", "-c", LIST_ROOTFS).stdout
    assert "./hello.txt regular file 644 0:0 19" in lazy
    assert "./etc/removed.txt" not in lazy
    # the same layers imported the ordinary way, unpacked by containerd into overlayfs
    env.ctr("images", "import", "--snapshotter", "overlayfs", str(busybox_image.oci_archive))
    full = env.ctr("run", "--rm", "--snapshotter", "overlayfs", busybox_image.name, "full1",
                   "/bin/busybox", "sh", "-c", LIST_ROOTFS).stdout
    assert lazy.splitlines() == full.splitlines()

    # containerd's garbage collector (run synchronously by an image removal) keeps the
    # pulled image's snapshots: its config's gc.ref.snapshot label holds the chain
    before = env.ctr("snapshots", "--snapshotter", "ipfsnap", "ls").stdout
    env.ctr("images", "rm", "--sync", busybox_image.name)
    assert env.ctr("snapshots", "--snapshotter", "overlayfs", "ls").stdout.count("\n") == 1
    # pulling again: everything is there, nothing fetched, same snapshots
    again = env.ipfsnap("image", "rpull", "--ipfs", pushed.cid)
    assert again.stdout == ""
    assert env.ctr("snapshots", "--snapshotter", "ipfsnap", "ls").stdout == before
    assert len(lazy_mountpoints(env.state)) == 1

    # removing the image lets the collector remove its snapshots, lazy mount included
    env.ctr("images", "rm", "--sync", pushed.cid)
    assert env.ctr("snapshots", "--snapshotter", "ipfsnap", "ls").stdout.count("\n") == 1
    assert lazy_mountpoints(env.state) == []


def test_fallback_when_a_layer_cannot_be_mounted_lazily(
    containerd_env: ContainerdFactory, ipfs_node: ManagedNode, busybox_image: SampleImage,
) -> None:
    """An eStargz layer whose TOC digest annotation is wrong is refused by the lazy fs; the
    snapshotter falls back to a normal snapshot, and the layer is fetched whole, checked
    against its diffID and unpacked into the mounts containerd hands over."""
    bad_toc = "sha256:" + "0" * 64

    def wrong_toc(i: int, desc: Descriptor) -> Descriptor:
        annotations = {**desc.annotations, TOC_DIGEST_ANNOTATION: bad_toc}
        return dataclasses.replace(desc, annotations=annotations)

    with IPFSClient(ipfs_node.api_url) as client:
        image = push(client, busybox_image.layer_tars[:1], [True], layer_hook=wrong_toc)
    env = containerd_env(ipfs_api=ipfs_node.api_url)
    fetched = env.ipfsnap("image", "rpull", "--ipfs", image.cid).stdout
    assert f"fetching {image.layers[0].digest[:15]}..." in fetched
    assert remote_label(env, chain_ids(image.diff_ids)[0]) is None
    assert lazy_mountpoints(env.state) == []
    out = env.ctr("run", "--rm", "--snapshotter", "ipfsnap", image.cid, "fb",
                  "/bin/busybox", "cat", "/etc/passwd").stdout
    assert out == busybox_image.files["etc/passwd"].decode()


def test_snapshotter_restart_under_running_containerd(
    containerd_env: ContainerdFactory, ipfs_node: ManagedNode, busybox_image: SampleImage,
    pushed: PushedImage,
) -> None:
    env = containerd_env(ipfs_api=ipfs_node.api_url)
    env.ipfsnap("image", "rpull", "--ipfs", pushed.cid)
    # a container that stays prepared (its snapshot is active) across the restart
    env.ctr("containers", "create", "--snapshotter", "ipfsnap", pushed.cid, "kept",
            "/bin/busybox", "cat", "/hello.txt")
    snaps = env.ctr("snapshots", "--snapshotter", "ipfsnap", "ls").stdout
    mounted = lazy_mountpoints(env.state)
    assert len(mounted) == 1

    env.kill_snapshotter()  # SIGTERM: what a service restart does
    assert lazy_mountpoints(env.state) == mounted  # lazy layers stay mounted meanwhile
    env.start_snapshotter()
    env.wait_reconnected()

    assert env.ctr("snapshots", "--snapshotter", "ipfsnap", "ls").stdout == snaps
    assert lazy_mountpoints(env.state) == mounted
    assert "remote snapshots: 1 mounted, 0 failed" in env.snapshotter_log()
    # a new container reads the whole lazy busybox binary through the restored mount
    out = env.ctr("run", "--rm", "--snapshotter", "ipfsnap", pushed.cid, "after",
                  "/bin/busybox", "sha256sum", "/bin/busybox").stdout
    assert out.split()[0] == hashlib.sha256(busybox_image.files["bin/busybox"]).hexdigest()
    # and the container prepared before the restart still starts
    assert env.ctr("tasks", "start", "kept").stdout == \
        busybox_image.files["hello.txt"].decode()
    env.ctr("containers", "delete", "kept")


def test_rpull_into_containerd_overlayfs(
    containerd_env: ContainerdFactory, ipfs_node: ManagedNode, busybox_image: SampleImage,
    pushed: PushedImage,
) -> None:
    """``--snapshotter overlayfs``: containerd's own snapshotter; every layer is fetched
    whole through IPFS, verified and unpacked into the mounts containerd hands over."""
    env = containerd_env(ipfs_api=ipfs_node.api_url)
    fetched = env.ipfsnap("image", "rpull", "--snapshotter", "overlayfs", "--ipfs",
                          pushed.cid).stdout
    for layer in pushed.layers:
        assert f"fetching {layer.digest[:15]}..." in fetched
    chains = chain_ids(pushed.diff_ids)
    listed = env.ctr("snapshots", "--snapshotter", "overlayfs", "ls").stdout
    assert all(c in listed for c in chains)
    assert env.ctr("snapshots", "--snapshotter", "ipfsnap", "ls").stdout.count("\n") == 1
    out = env.ctr("run", "--rm", "--snapshotter", "overlayfs", pushed.cid, "ov",
                  "/bin/busybox", "sh", "-c", LIST_ROOTFS).stdout
    env.ctr("images", "import", "--snapshotter", "overlayfs", str(busybox_image.oci_archive))
    full = env.ctr("run", "--rm", "--snapshotter", "overlayfs", busybox_image.name, "ref",
                   "/bin/busybox", "sh", "-c", LIST_ROOTFS).stdout
    assert out.splitlines() == full.splitlines()
