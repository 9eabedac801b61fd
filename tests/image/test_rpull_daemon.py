"""An rpulled image keeps working across a killed and restarted IPFS daemon: reads while it
is down fail with EIO within the configured bounds (never hang), and succeed again once it is
back (the missing chunks then come from node A over bitswap)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipfsnap.content import ImageStore
from ipfsnap.image.rpull import rpull
from ipfsnap.ipfs import IPFSClient
from ipfsnap.ipfs.node import ManagedNode, rpc_call
from ipfsnap.ipfs.pnet import write_swarm_key
from ipfsnap.snapshot import mount_all, unmount
from tests.fixtures.ipfs import require_ipfs_implementation
from tests.fs.layers import Item, make_tar, pseudo_random
from tests.image.rpull_helpers import CHUNK, closing_lazy, lazy_config, lazy_store, push
from tests.support import require_fuse

pytestmark = pytest.mark.integration

FIRST = pseudo_random(3 * CHUNK, 11)
SECOND = pseudo_random(3 * CHUNK, 12)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def node_b(ipfs_pair: Any, tmp_path: Path) -> Iterator[ManagedNode]:
    """A node in the pair's private network whose API address survives a restart."""
    require_ipfs_implementation()
    repo = tmp_path / "repo-b"
    write_swarm_key(repo, ipfs_pair.swarm_key)
    node = ManagedNode(repo, api=f"/ip4/127.0.0.1/tcp/{free_port()}")
    node.start()
    try:
        yield node
    finally:
        node.stop()


def connect(node: ManagedNode, to: ManagedNode) -> None:
    rpc_call(node.api_url, "swarm/connect", timeout=30.0, arg=to.swarm_addrs[0])


def test_daemon_killed_and_restarted_during_reads(
    ipfs_pair: Any, node_b: ManagedNode, tmp_path: Path
) -> None:
    require_fuse()
    tar = make_tar([Item("d", "dir", mode=0o755), Item("d/first", "file", FIRST),
                    Item("d/second", "file", SECOND)])
    with IPFSClient(ipfs_pair.a.api_url) as a:
        image = push(a, [tar, make_tar([Item("x", "file", b"x")])], [True, True])
    connect(node_b, ipfs_pair.a)
    api = node_b.api_url
    state = tmp_path / "state"
    timeout = 8
    cfg = lazy_config(state, api, timeout=timeout)
    with closing_lazy(lazy_store(cfg)) as store, IPFSClient(api) as b:
        img = rpull(image.cid, store, client=b, images=ImageStore(state))
        mp = tmp_path / "rootfs"
        mp.mkdir()
        mount_all(store.view("v", img.chain_ids[-1]), mp)
        try:
            assert (mp / "d" / "first").read_bytes() == FIRST
            pid = node_b.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            node_b.stop()
            t0 = time.monotonic()
            with pytest.raises(OSError) as info:
                (mp / "d" / "second").read_bytes()
            assert info.value.errno == errno.EIO
            # bounded by fetching_timeout_sec and the retries, not a hang (generous margin)
            assert time.monotonic() - t0 < 10 * timeout
            # what was read before is still served (verified chunks are cached)
            assert (mp / "d" / "first").read_bytes() == FIRST
            node_b.start()
            assert node_b.api_url == api
            connect(node_b, ipfs_pair.a)
            assert (mp / "d" / "second").read_bytes() == SECOND
        finally:
            unmount(mp)
            store.remove("v")
