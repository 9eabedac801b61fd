"""The Kubo side of ManagedNode against a stand-in ``ipfs`` executable.

No Kubo binary can be installed on this machine (FACTS.md section 4), so this checks only
ipfsnap's half of the contract: which commands it runs, with which environment, how it edits
the repo config, waits for the api file and stops the daemon. The stand-in records its
arguments and serves ``id`` like ``ipfs daemon``. Real-Kubo behaviour is covered by
test_kubo_interop.py (bitswap with embedded Kubo 0.22).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from ipfsnap.ipfs.node import (
    ManagedNode,
    api_url_from_multiaddr,
    choose_implementation,
    private_config,
)

FAKE_IPFS = r'''#!PYTHON
"""Stand-in for Kubo's `ipfs` CLI: `init ...` and `daemon [--offline]`."""
import http.server, json, os, signal, sys, threading
repo = os.environ["IPFS_PATH"]
with open(os.path.join(os.environ["FAKE_IPFS_LOG"]), "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\n")
if sys.argv[1] == "init":
    os.makedirs(repo, exist_ok=True)
    cfg = {"Identity": {"PeerID": "12D3KooWFake"}, "Bootstrap": ["/dnsaddr/bootstrap.libp2p.io"],
           "Addresses": {"API": "/ip4/127.0.0.1/tcp/5001", "Swarm": ["/ip4/0.0.0.0/tcp/4001"]},
           "Discovery": {"MDNS": {"Enabled": True}}}
    json.dump(cfg, open(os.path.join(repo, "config"), "w"))
    sys.exit(0)
assert sys.argv[1] == "daemon"
cfg = json.load(open(os.path.join(repo, "config")))
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.dumps({"ID": "12D3KooWFake", "AgentVersion": "kubo/fake",
                           "Addresses": ["/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWFake"]}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("127.0.0.1", 0), H)
api = os.path.join(repo, "api")
def stop(*_):
    os.unlink(api); print("Received interrupt signal, shutting down...", flush=True); os._exit(0)
signal.signal(signal.SIGTERM, stop)
open(api, "w").write(f"/ip4/127.0.0.1/tcp/{srv.server_port}\n")
print("Daemon is ready", flush=True)
srv.serve_forever()
'''


@pytest.fixture
def fake_kubo(tmp_path: Path) -> dict[str, str]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "ipfs"
    exe.write_text(FAKE_IPFS.replace("PYTHON", sys.executable, 1))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_IPFS_LOG": str(tmp_path / "calls.log"),
    }


def test_kubo_chosen_when_ipfs_on_path(
    fake_kubo: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", fake_kubo["PATH"])
    assert choose_implementation({}) == "kubo"
    assert choose_implementation({"IPFSNAP_IPFS_IMPL": "js"}) == "js"
    monkeypatch.setenv("PATH", "/nonexistent")
    assert choose_implementation({}) == "js"


def test_kubo_init_config_start_stop(fake_kubo: dict[str, str], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    node = ManagedNode(
        repo, swarm=["/ip4/127.0.0.1/tcp/0"], offline=True, implementation="kubo", env=fake_kubo
    )
    with node:
        assert node.peer_id == "12D3KooWFake"
        assert node.agent_version == "kubo/fake"
        assert node.api_url == api_url_from_multiaddr(node.api_multiaddr)
        assert node.api_url.startswith("http://127.0.0.1:")
    calls = [json.loads(line) for line in (tmp_path / "calls.log").read_text().splitlines()]
    assert calls == [["init", "--profile", "test", "--empty-repo"], ["daemon", "--offline"]]
    cfg = json.loads((repo / "config").read_text())
    assert cfg["Bootstrap"] == []
    assert cfg["Discovery"]["MDNS"]["Enabled"] is False
    assert cfg["Routing"]["Type"] == "none"
    assert cfg["Addresses"]["API"] == "/ip4/127.0.0.1/tcp/0"
    assert cfg["Addresses"]["Swarm"] == ["/ip4/127.0.0.1/tcp/0"]
    assert cfg["Swarm"]["Transports"]["Network"]["QUIC"] is False
    assert cfg["Identity"]["PeerID"] == "12D3KooWFake"  # init's own settings kept
    assert not (repo / "api").exists()
    assert "shutting down" in (repo / "daemon.log").read_text()


def test_private_config_is_loopback_only() -> None:
    for impl in ("kubo", "js"):
        cfg: dict[str, object] = {"Addresses": {"Swarm": ["/ip4/0.0.0.0/tcp/4001"]}}
        private_config(cfg, impl)
        addrs = cfg["Addresses"]
        assert isinstance(addrs, dict)
        listen = [addrs["API"], addrs["Gateway"], *addrs["Swarm"]]
        assert all(a.startswith("/ip4/127.0.0.1/") for a in listen)
        assert cfg["Bootstrap"] == []


@pytest.mark.parametrize(
    ("maddr", "url"),
    [
        ("/ip4/127.0.0.1/tcp/5001", "http://127.0.0.1:5001"),
        ("/ip4/127.0.0.1/tcp/5002/http", "http://127.0.0.1:5002"),
        ("/ip6/::1/tcp/5001", "http://[::1]:5001"),
    ],
)
def test_api_url_from_multiaddr(maddr: str, url: str) -> None:
    assert api_url_from_multiaddr(maddr) == url
