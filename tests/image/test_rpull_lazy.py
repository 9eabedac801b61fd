"""rpull with two real IPFS nodes (push on A, pull through B: reads cross bitswap), real FUSE
and overlayfs: the lazily mounted rootfs equals the fully unpacked one, and reads fetch only
what they need."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ipfsnap.content import ImageStore
from ipfsnap.estargz import BytesRangeReader, open_layer
from ipfsnap.fs import LayerMounter
from ipfsnap.image.resolve import fetching_line
from ipfsnap.image.rpull import PulledImage, rpull
from ipfsnap.image.unpack import chain_ids
from ipfsnap.ipfs import IPFSClient
from ipfsnap.snapshot import (
    REMOTE_LABEL,
    Mount,
    SnapshotStore,
    apply_layer,
    mount_all,
    unmount,
)
from tests.fs.layers import Item, make_tar, pseudo_random, snapshot_tree
from tests.fs.mounts import fresh_status
from tests.image.rpull_helpers import (
    CHUNK,
    PushedImage,
    closing_lazy,
    full_store,
    lazy_config,
    lazy_store,
    push,
)
from tests.support import require_fuse

pytestmark = pytest.mark.integration

BIG = pseudo_random(6 * CHUNK + 77, 7)


def lower_items() -> list[Item]:
    return [
        Item("etc", "dir", mode=0o755),
        Item("etc/hostname", "file", b"lower\n"),
        Item("etc/gone", "file", b"whited out by layer 2\n"),
        Item("etc/keep", "file", b"kept\n", mode=0o640, uid=33, gid=44),
        Item("bin", "dir", mode=0o755),
        Item("bin/suid", "file", b"#!/bin/sh\n", mode=0o4755),
        Item("bin/sgid", "file", b"#!/bin/sh\n", mode=0o2711),
        Item("bin/sh", "symlink", link="/bin/busybox", mode=0o777),
        Item("bin/rel", "symlink", link="../etc/hostname", mode=0o777),
        Item("data", "dir", mode=0o750, uid=100000, gid=100001),
        Item("data/big", "file", BIG, uid=70000, gid=70001),
        Item("data/exact", "file", pseudo_random(2 * CHUNK, 2), mode=0o600),
        Item("data/xattr", "file", b"attrs", xattrs={"user.k": "v1", "user.empty": ""}),
        Item("links", "dir", mode=0o755),
        Item("links/hard", "hardlink", link="data/big"),
        Item("dev", "dir", mode=0o755),
        Item("dev/null", "char", mode=0o666, major=1, minor=3),
        Item("dev/sda", "block", mode=0o660, major=8, minor=0),
        Item("dev/fifo", "fifo", mode=0o644),
        Item("opq", "dir", mode=0o755),
        Item("opq/old1", "file", b"hidden by the opaque dir above\n"),
        Item("opq/sub", "dir", mode=0o700),
        Item("opq/sub/old2", "file", b"hidden too\n"),
        Item("ünïcødé", "file", "ü".encode() * 10),
        Item("long/" + "n" * 200, "file", b"long name"),
    ]


def middle_items() -> list[Item]:
    return [
        Item("etc", "dir", mode=0o755),
        Item("etc/.wh.gone", "file", b""),
        Item("etc/hostname", "file", b"middle\n", mode=0o600),
        Item("opq", "dir", mode=0o711, xattrs={"user.dir": "yes"}),
        Item("opq/.wh..wh..opq", "file", b""),
        Item("opq/new", "file", b"only file left in opq\n"),
        Item("bin", "dir", mode=0o755),
        Item("bin/.wh.rel", "file", b""),
        Item("bin/tool", "file", pseudo_random(3 * CHUNK + 5, 3), mode=0o755),
        Item("bin/tool-link", "hardlink", link="bin/tool"),
        Item("implicit/child/file", "file", b"parents not in the tar"),
    ]


def upper_items() -> list[Item]:
    # a plain gzip layer (not eStargz): always fetched whole
    return [
        Item("data", "dir", mode=0o751, uid=100000, gid=100001),
        Item("data/.wh.exact", "file", b""),
        Item("data/plain", "file", b"from a non-eStargz layer\n", uid=5, gid=6),
        Item("bin", "dir", mode=0o755),
        Item("bin/.wh.tool-link", "file", b""),
    ]


def tars() -> list[bytes]:
    return [make_tar(lower_items()), make_tar(middle_items()), make_tar(upper_items())]


@pytest.fixture(scope="module")
def pushed(ipfs_pair: Any) -> PushedImage:
    with IPFSClient(ipfs_pair.a.api_url) as a:
        image = push(a, tars(), [True, True, False])
    ipfs_pair.connect()
    return image


@pytest.fixture(scope="module")
def reference_tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[object, ...]]:
    """The rootfs from the original tars, independent of IPFS and eStargz: apply_layer into
    plain directories, stacked with overlayfs."""
    require_fuse()
    base = tmp_path_factory.mktemp("reference")
    dirs: list[Path] = []
    for i, tar in enumerate(tars()):
        d = base / f"l{i}"
        d.mkdir()
        apply_layer(d, io.BytesIO(tar), parents=list(reversed(dirs)))
        dirs.append(d)
    mp = base / "merged"
    mp.mkdir()
    lower = "lowerdir=" + ":".join(str(d) for d in reversed(dirs))
    mount_all([Mount("overlay", "overlay", [lower, "ro"])], mp)
    try:
        return snapshot_tree(mp)
    finally:
        unmount(mp)


@contextmanager
def view_mounted(store: SnapshotStore, top: str, mp: Path) -> Iterator[Path]:
    key = f"view {mp}"
    mounts = store.view(key, top)
    mp.mkdir(exist_ok=True)
    mount_all(mounts, mp)
    try:
        yield mp
    finally:
        unmount(mp)
        store.remove(key)


def pull(store: SnapshotStore, state: Path, api: str, cid: str, *, lazy: bool,
         lines: list[str]) -> PulledImage:
    with IPFSClient(api) as c:
        return rpull(cid, store, client=c, images=ImageStore(state), lazy=lazy,
                     report=lines.append)


def extents(blob: bytes, path: str) -> int:
    """Compressed bytes of the chunks of ``path`` in an eStargz blob."""
    index = open_layer(BytesRangeReader(blob), len(blob))
    return sum(c.end - c.offset for c in index.chunks(path))


def test_lazy_rootfs_equals_reference_and_reads_fetch_only_their_chunks(
    pushed: PushedImage, ipfs_pair: Any, reference_tree: dict[str, tuple[object, ...]],
    tmp_path: Path,
) -> None:
    require_fuse()
    state = tmp_path / "state"
    cfg = lazy_config(state, ipfs_pair.b.api_url)
    lines: list[str] = []
    with closing_lazy(lazy_store(cfg)) as store:
        img = pull(store, state, ipfs_pair.b.api_url, pushed.cid, lazy=True, lines=lines)
        assert img.unpacked is not None
        assert [r.how for r in img.unpacked.layers] == ["lazy", "lazy", "full"]
        # one line per blob fetched: the documents, and only the non-eStargz layer
        assert lines == [fetching_line(d) for d in
                         (pushed.index, pushed.manifest, pushed.config, pushed.layers[2])]
        chains = chain_ids(pushed.diff_ids)
        assert list(img.chain_ids) == chains
        assert img.name == f"ipfs://{pushed.cid}"
        record = ImageStore(state).get(img.name)
        assert record.remote_layers and record.target.digest == pushed.index.digest
        images = ImageStore(state)
        assert not images.blobs.exists(pushed.layers[0].digest)
        assert not images.blobs.exists(pushed.layers[1].digest)
        assert images.blobs.exists(pushed.layers[2].digest)
        labels = [store.stat(c).labels for c in chains]
        assert [REMOTE_LABEL in lb for lb in labels] == [True, True, False]

        mounter = store.remote
        assert isinstance(mounter, LayerMounter)
        layer_mps = [store.path(c) for c in chains[:2]]
        with view_mounted(store, img.chain_ids[-1], tmp_path / "rootfs") as root:
            assert (root / "data" / "big").read_bytes() == BIG
            blob0 = pushed.blobs[pushed.layers[0].digest]
            st0 = fresh_status(mounter, layer_mps[0])
            assert st0["fetched_bytes"] == extents(blob0, "data/big")
            # data/exact (another 2 chunks of incompressible bytes) was not fetched
            assert st0["fetched_bytes"] <= len(blob0) - extents(blob0, "data/exact")
            assert fresh_status(mounter, layer_mps[1])["fetched_bytes"] == 0
            # then everything: the same tree as the reference, byte for byte
            assert snapshot_tree(root) == reference_tree

        # a second rpull fetches nothing and unpacks nothing
        again: list[str] = []
        img2 = pull(store, state, ipfs_pair.b.api_url, pushed.cid, lazy=True, lines=again)
        assert again == []
        assert img2.unpacked is not None
        assert [r.how for r in img2.unpacked.layers] == ["existing"] * 3


def test_full_pull_equals_reference(
    pushed: PushedImage, ipfs_pair: Any, reference_tree: dict[str, tuple[object, ...]],
    tmp_path: Path,
) -> None:
    require_fuse()
    state = tmp_path / "state"
    cfg = lazy_config(state, ipfs_pair.b.api_url)
    lines: list[str] = []
    with full_store(cfg) as store:
        img = pull(store, state, ipfs_pair.b.api_url, pushed.cid, lazy=False, lines=lines)
        assert img.unpacked is not None
        assert [r.how for r in img.unpacked.layers] == ["full"] * 3
        assert lines == [fetching_line(d) for d in
                         (pushed.index, pushed.manifest, pushed.config, *pushed.layers)]
        assert all(REMOTE_LABEL not in store.stat(c).labels for c in img.chain_ids)
        with view_mounted(store, img.chain_ids[-1], tmp_path / "rootfs") as root:
            assert snapshot_tree(root) == reference_tree
        for c in reversed(img.chain_ids):
            store.remove(c)
