"""The shared IPFS fixtures give running, loopback-only daemons."""

from __future__ import annotations

from ipfsnap.ipfs.node import ManagedNode, node_identity, rpc_call
from tests.fixtures.ipfs import NodePair


def test_session_node_answers_id(ipfs_node: ManagedNode) -> None:
    ident = node_identity(ipfs_node.api_url)
    assert ident.peer_id == ipfs_node.peer_id
    assert ipfs_node.api_multiaddr.startswith("/ip4/127.0.0.1/tcp/")
    assert (ipfs_node.repo / "api").exists()


def test_pair_is_connected(ipfs_pair: NodePair) -> None:
    reply = rpc_call(ipfs_pair.b.api_url, "swarm/peers", timeout=10.0)
    peers = [str(p.get("Peer")) for p in reply.get("Peers") or []]
    assert ipfs_pair.a.peer_id in peers
