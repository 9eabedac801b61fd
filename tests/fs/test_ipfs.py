"""Lazy layers served from real IPFS daemons (the managed node), reads crossing bitswap."""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipfsnap.config import Config
from ipfsnap.estargz import FileRangeReader, open_layer
from ipfsnap.fs import LAYER_DIGEST_LABEL, TOC_DIGEST_LABEL, URLS_LABEL, LayerMounter
from ipfsnap.ipfs import IPFSClient
from ipfsnap.ipfs.node import ManagedNode
from tests.fixtures.ipfs import require_ipfs_implementation
from tests.fs.layers import Blob, every_type_items, expected_tree, snapshot_tree
from tests.fs.mounts import fresh_status, mounted
from tests.fs.proxy import StallingProxy
from tests.support import require_fuse


def ipfs_labels(blob: Blob, cid: str) -> dict[str, str]:
    return {
        LAYER_DIGEST_LABEL: blob.digest,
        TOC_DIGEST_LABEL: blob.toc_digest,
        URLS_LABEL: f"https://example.invalid/x,ipfs://{cid}",
    }


def ipfs_mounter(state: Path, api: str, *, background: bool, timeout: int = 20) -> LayerMounter:
    cfg = Config(state_dir=state, ipfs_api=api)
    cfg.no_background_fetch = not background
    cfg.blob.fetching_timeout_sec = timeout
    cfg.blob.max_retries = 2
    cfg.blob.neighbour_span = 0  # tests count the bytes of exactly the chunks they read
    opts: dict[str, Any] = {"status_interval": 0.1, "log_level": "DEBUG"}
    return LayerMounter(cfg, ready_timeout=120, extra=opts)


def extents(blob: Blob, path: str) -> int:
    with open(blob.path, "rb") as f:
        index = open_layer(FileRangeReader(f), blob.size)
        return sum(c.end - c.offset for c in index.chunks(path))


def test_layer_added_on_a_mounted_through_b(every_type_blob: Blob, ipfs_pair: Any,
                                            tmp_path: Path) -> None:
    require_fuse()
    with IPFSClient(ipfs_pair.a.api_url) as a:
        cid = a.add(every_type_blob.path).cid
    ipfs_pair.connect()
    m = ipfs_mounter(tmp_path / "state", ipfs_pair.b.api_url, background=False)
    mp = tmp_path / "mp"
    with mounted(m, mp, ipfs_labels(every_type_blob, cid)):
        st = m.status(mp)
        assert st is not None and st["source"] == f"ipfs://{cid}"
        want = next(it.data for it in every_type_items() if it.name == "data/exact")
        assert (mp / "data" / "exact").read_bytes() == want
        assert fresh_status(m, mp)["fetched_bytes"] == extents(every_type_blob, "data/exact")
        # then the whole tree, byte for byte
        assert snapshot_tree(mp) == expected_tree(every_type_items())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def fixed_api_node(tmp_path: Path) -> Iterator[ManagedNode]:
    """A node whose API address survives a restart (the factory's nodes pick a new port)."""
    require_ipfs_implementation()
    node = ManagedNode(tmp_path / "repo", api=f"/ip4/127.0.0.1/tcp/{free_port()}",
                       offline=True)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def test_daemon_down_gives_eio_then_reads_recover(every_type_blob: Blob,
                                                  fixed_api_node: ManagedNode,
                                                  tmp_path: Path) -> None:
    require_fuse()
    node = fixed_api_node
    with IPFSClient(node.api_url) as c:
        cid = c.add(every_type_blob.path).cid
    api = node.api_url
    m = ipfs_mounter(tmp_path / "state", api, background=False, timeout=8)
    mp = tmp_path / "mp"
    with mounted(m, mp, ipfs_labels(every_type_blob, cid)):
        assert (mp / "etc" / "hostname").read_bytes() == b"lazy\n"
        node.stop()
        t0 = time.monotonic()
        with pytest.raises(OSError) as info:
            (mp / "data" / "exact").read_bytes()
        assert info.value.errno == errno.EIO
        assert time.monotonic() - t0 < 60  # bounded, not a hang (generous: 8 s configured)
        assert fresh_status(m, mp)["last_error"]
        node.start()
        assert node.api_url == api, "the restarted daemon must keep its API address"
        want = next(it.data for it in every_type_items() if it.name == "data/exact")
        assert (mp / "data" / "exact").read_bytes() == want


def test_hanging_daemon_gives_eio_within_the_timeout(every_type_blob: Blob,
                                                     fixed_api_node: ManagedNode,
                                                     tmp_path: Path) -> None:
    require_fuse()
    node = fixed_api_node
    with IPFSClient(node.api_url) as c:
        cid = c.add(every_type_blob.path).cid
    host, _, port = node.api_url.rpartition(":")
    proxy = StallingProxy((host.rpartition("/")[2], int(port)))
    try:
        m = ipfs_mounter(tmp_path / "state", proxy.url, background=False, timeout=5)
        mp = tmp_path / "mp"
        with mounted(m, mp, ipfs_labels(every_type_blob, cid)):
            assert (mp / "etc" / "hostname").read_bytes() == b"lazy\n"
            proxy.stalled.set()
            proxy.drop_connections()
            t0 = time.monotonic()
            with pytest.raises(OSError) as info:
                (mp / "data" / "exact").read_bytes()
            assert info.value.errno == errno.EIO
            # bounded by fetching_timeout_sec (5 s here), not a hang; generous for CI load
            assert time.monotonic() - t0 < 45
            assert "longer than" in fresh_status(m, mp)["last_error"]
            proxy.stalled.clear()
            proxy.drop_connections()
            want = next(it.data for it in every_type_items() if it.name == "data/exact")
            assert (mp / "data" / "exact").read_bytes() == want
    finally:
        proxy.close()
