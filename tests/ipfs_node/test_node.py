"""The managed IPFS node with real daemons on loopback: private networks, lifecycle, CLI."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipfsnap.cli.main import main
from ipfsnap.config import load_config
from ipfsnap.errors import IPFSError
from ipfsnap.ipfs import IPFSClient, RetryPolicy
from ipfsnap.ipfs.node import (
    PID_FILE,
    ManagedNode,
    NodeAlreadyRunning,
    PrivateNetworkRequired,
    jsipfs_dir,
    node_identity,
    read_api_file,
)
from ipfsnap.ipfs.pnet import SwarmKeyError, generate_swarm_key
from tests.fixtures.ipfs import NodeFactory, NodePair, require_ipfs_implementation
from tests.images.registry import free_port
from tests.support import require_tool

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: 256 KiB is the daemons' default chunk size: 1.25 MiB spans five full blocks and a partial
#: one, so ranges below cross block boundaries
BLOCK = 256 * 1024
DATA = os.urandom(5 * BLOCK + 4321)
#: a bounded wait for content nobody in the network can deliver
UNREACHABLE_TIMEOUT = 8.0
NO_RETRY = RetryPolicy(max_retries=0)


def _listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A = TCP_LISTEN
                continue
            hexaddr, hexport = local.split(":")
            assert len(hexaddr) == width
            raw = bytes.fromhex(hexaddr)
            if width == 8:
                addr = ".".join(str(b) for b in reversed(raw))
            else:  # four little-endian 32-bit words
                words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
                addr = b"".join(words).hex()
            out.append((addr, int(hexport, 16)))
    return out


def test_private_network_bitswap_and_isolation(
    ipfs_pair: NodePair, ipfs_node_factory: NodeFactory, ipfs_node: ManagedNode
) -> None:
    a, b = ipfs_pair.a, ipfs_pair.b
    # C: another private network; started under LIBP2P_FORCE_PNET=1, which a key satisfies
    c = ipfs_node_factory(
        generate_swarm_key(), env={**os.environ, "LIBP2P_FORCE_PNET": "1"}, name="other-net"
    )
    with IPFSClient(a.api_url) as ca:
        added = ca.add(DATA, name="payload.bin")
    assert added.size == len(DATA)

    ipfs_pair.connect()
    with IPFSClient(b.api_url) as cb:
        # ranges first, so B fetches blocks on demand, not after a full read cached them
        for offset, length in [
            (BLOCK - 100, 200),  # across the first block boundary
            (3 * BLOCK + 7, 2 * BLOCK),  # three blocks
            (len(DATA) - 10, 10),  # tail of the short last block
            (0, 1),
        ]:
            assert cb.cat(added.cid, offset, length) == DATA[offset : offset + length]
        assert cb.cat(added.cid) == DATA
        assert cb.file_size(added.cid) == len(DATA)

    # neither a node with another key nor one with no key can connect to A or fetch from it
    for outsider in (c, ipfs_node):
        with IPFSClient(outsider.api_url, retry=NO_RETRY) as co:
            with pytest.raises(IPFSError):
                co.swarm_connect(a.swarm_addrs[0], timeout=UNREACHABLE_TIMEOUT)
            with pytest.raises(IPFSError):
                co.cat(added.cid, 0, 100, timeout=UNREACHABLE_TIMEOUT)
            assert a.peer_id not in {p.peer_id for p in co.swarm_peers()}
    # ... and A still serves its own network
    with IPFSClient(b.api_url) as cb:
        assert a.peer_id in {p.peer_id for p in cb.swarm_peers()}


def test_force_pnet_without_key_refuses_to_start(tmp_path: Path) -> None:
    require_ipfs_implementation()
    env = {**os.environ, "LIBP2P_FORCE_PNET": "1"}
    node = ManagedNode(tmp_path / "repo", env=env)
    with pytest.raises(PrivateNetworkRequired) as err:
        node.start()
    message = str(err.value)
    assert "LIBP2P_FORCE_PNET=1" in message and str(tmp_path / "repo" / "swarm.key") in message
    assert not node.running
    assert read_api_file(tmp_path / "repo") is None


def test_daemon_script_itself_refuses_without_key(tmp_path: Path) -> None:
    """The check is also in node/daemon.js, for anyone who runs it without ipfsnap."""
    require_ipfs_implementation()
    repo = tmp_path / "repo"
    res = subprocess.run(
        ["node", str(jsipfs_dir() / "daemon.js")],
        env={**os.environ, "IPFS_PATH": str(repo), "LIBP2P_FORCE_PNET": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 3, res.stderr
    assert "LIBP2P_FORCE_PNET=1" in res.stderr and "swarm.key" in res.stderr
    assert "refusing to start" in res.stderr
    assert not (repo / "api").exists()


def test_malformed_swarm_key_refuses_to_start(tmp_path: Path) -> None:
    require_ipfs_implementation()
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "swarm.key").write_text("/key/swarm/psk/1.0.0/\n/base16/\nnot-a-key\n")
    with pytest.raises(SwarmKeyError, match=str(repo / "swarm.key")):
        ManagedNode(repo).start()


def test_api_and_swarm_listen_on_loopback_only(ipfs_node: ManagedNode) -> None:
    assert ipfs_node.pid is not None
    listening = _listening_addresses(ipfs_node.pid)
    ports = {port for _, port in listening}
    api_port = int(ipfs_node.api_multiaddr.split("/")[4])
    swarm_port = int(ipfs_node.swarm_addrs[0].split("/")[4])
    assert {api_port, swarm_port} <= ports
    loopback = {"127.0.0.1", "00000000000000000000000000000001"}
    assert all(addr in loopback for addr, _ in listening), listening
    assert all(a.startswith("/ip4/127.0.0.1/") for a in ipfs_node.swarm_addrs)


def test_offline_node_serves_local_content_only(
    ipfs_node_factory: NodeFactory, ipfs_node: ManagedNode
) -> None:
    off = ipfs_node_factory(offline=True, name="offline")
    # no swarm address to dial, and it dials nobody
    assert off.swarm_addrs == []
    with IPFSClient(off.api_url, retry=NO_RETRY) as c:
        cid = c.add(DATA).cid
        assert c.cat(cid, BLOCK - 5, 10) == DATA[BLOCK - 5 : BLOCK + 5]
        with pytest.raises(IPFSError):
            c.swarm_connect(ipfs_node.swarm_addrs[0], timeout=UNREACHABLE_TIMEOUT)
        assert c.swarm_peers() == []
    with IPFSClient(ipfs_node.api_url) as other:
        assert off.peer_id not in {p.peer_id for p in other.swarm_peers()}


def test_cli_daemon_foreground_stops_on_sigterm(tmp_path: Path) -> None:
    require_ipfs_implementation()
    repo = tmp_path / "repo"
    api_port, swarm_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ipfsnap.cli.main",
            "--state-dir",
            str(tmp_path / "state"),
            "ipfs",
            "daemon",
            "--repo",
            str(repo),
            "--api",
            f"/ip4/127.0.0.1/tcp/{api_port}",
            "--swarm",
            f"/ip4/127.0.0.1/tcp/{swarm_port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("IPFS node ready: API /ip4/127.0.0.1/tcp/"), (
            line + proc.stderr.read() if proc.stderr else line
        )
        api = line.split()[4]
        assert read_api_file(repo) == api
        daemon_pid = int((repo / PID_FILE).read_text())
        # the addresses asked for on the command line
        assert api.split("/")[4] == str(api_port)
        ident = node_identity(f"http://127.0.0.1:{api_port}")
        assert ident.peer_id in line
        assert any(f"/ip4/127.0.0.1/tcp/{swarm_port}" in a for a in ident.addresses)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the daemon is gone and left a clean repo: no api file, no lock, no pid file
    assert not Path(f"/proc/{daemon_pid}").exists()
    assert not (repo / "api").exists()
    assert not (repo / "repo.lock").exists()
    assert not (repo / PID_FILE).exists()
    assert "stopped" in (repo / "daemon.log").read_text()


def test_stale_files_after_crash_are_recovered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_ipfs_implementation()
    repo = tmp_path / "repo"
    first = ManagedNode(repo).start()
    peer = first.peer_id
    try:
        with pytest.raises(NodeAlreadyRunning):
            ManagedNode(repo).start()
        assert first.pid is not None
        os.killpg(first.pid, signal.SIGKILL)  # a crash: nothing gets cleaned up
        assert first.wait() == -signal.SIGKILL
        first.detach()
        assert (repo / "api").exists()  # what a crash leaves behind
        assert (repo / PID_FILE).exists()
        stale = [n for n in ("api", "repo.lock", PID_FILE) if (repo / n).exists()]
        caplog.set_level(logging.WARNING, logger="ipfsnap.ipfs.node")
        with ManagedNode(repo) as second:
            assert second.peer_id == peer  # same repo, same identity
            with IPFSClient(second.api_url) as client:
                cid = client.add(b"after the crash").cid
                assert client.cat(cid) == b"after the crash"
        assert any("removed stale" in r.getMessage() for r in caplog.records)
        assert all(n in caplog.text for n in stale)
    finally:
        first.stop()


def test_cli_bootstrap_on_real_node(
    ipfs_node: ManagedNode,
    ipfs_pair: NodePair,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    peer = ipfs_pair.a.swarm_addrs[0]
    base = ["--state-dir", str(tmp_path / "state")]
    api = ["--ipfs-api", ipfs_node.api_multiaddr]
    assert main([*base, *api, "ipfs", "bootstrap", "add", peer]) == 0
    assert capsys.readouterr().out == f"added {peer}\n"
    # discovery through $IPFS_PATH/api, no explicit address
    monkeypatch.setenv("IPFS_PATH", str(ipfs_node.repo))
    monkeypatch.delenv("IPFSNAP_IPFS_API", raising=False)
    assert main([*base, "ipfs", "bootstrap", "list"]) == 0
    assert capsys.readouterr().out == f"{peer}\n"
    assert main([*base, "ipfs", "bootstrap", "rm", "--all"]) == 0
    assert capsys.readouterr().out == f"removed {peer}\n"
    assert main([*base, "ipfs", "bootstrap", "list"]) == 0
    assert capsys.readouterr().out == ""
    assert main([*base, "ipfs", "bootstrap", "rm"]) == 2  # --all is required


def test_ensure_api_starts_a_managed_node_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    require_ipfs_implementation()
    from ipfsnap.cli.ipfs_node import ensure_api

    monkeypatch.delenv("IPFS_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(state_dir=tmp_path / "state", environ={})
    caplog.set_level(logging.WARNING)
    url = ensure_api(cfg)
    repo = cfg.ipfs_repo
    pid = int((repo / PID_FILE).read_text())
    try:
        assert "starting a managed IPFS node" in caplog.text
        assert url.startswith("http://127.0.0.1:")
        with IPFSClient(url) as client:
            assert client.id()["ID"]
        caplog.clear()
        assert ensure_api(cfg) == url  # found the running one, started nothing
        assert "starting" not in caplog.text
        assert (repo / "daemon.log").exists()
    finally:
        os.kill(pid, signal.SIGTERM)
        for _ in range(300):  # 30 s: js-ipfs closes its repo in about a second
            if _proc_state(pid) in ("gone", "Z"):
                break
            time.sleep(0.1)
    assert not (repo / "api").exists()


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


NODELAY_PROBE = """
import net from 'node:net'
const srv = net.createServer(s => { s.end('x') })
srv.listen(0, '127.0.0.1', () => {
  const c = net.connect(srv.address().port, '127.0.0.1')
  c.on('data', () => { c.end(); srv.close() })
})
"""


@pytest.mark.parametrize("preload", [True, False])
def test_nodelay_preload_sets_tcp_nodelay_both_ways(tmp_path: Path, preload: bool) -> None:
    """node/nodelay.js turns Nagle off on dialled and accepted sockets (bitswap latency)."""
    require_ipfs_implementation()
    strace = require_tool("strace")
    probe = tmp_path / "probe.mjs"
    probe.write_text(NODELAY_PROBE)
    cmd = ["node", str(probe)]
    if preload:
        cmd[1:1] = ["--import", (jsipfs_dir() / "nodelay.js").as_uri()]
    res = subprocess.run(
        [strace, "-f", "-e", "trace=setsockopt", *cmd],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    calls = [line for line in res.stderr.splitlines() if "TCP_NODELAY, [1]" in line]
    # one for the client socket, one for the accepted one; none without the preload
    assert len(calls) == (2 if preload else 0), res.stderr


STARTER = """
import sys
from pathlib import Path
from ipfsnap.ipfs.node import ManagedNode
node = ManagedNode(Path(sys.argv[1])).start()
print(node.pid, flush=True)
sys.stdin.read()
"""


def test_daemon_stops_when_its_starter_is_killed(tmp_path: Path) -> None:
    """A SIGKILLed test run or CLI leaves no js-ipfs daemon behind (IPFSNAP_PARENT_PID)."""
    require_ipfs_implementation()
    repo = tmp_path / "repo"
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(repo)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert starter.stdout is not None
        daemon_pid = int(starter.stdout.readline())
        assert _proc_state(daemon_pid) not in ("gone", "Z")
        starter.kill()
        starter.wait()
        for _ in range(600):  # bound: 60 s; the watchdog polls every second
            if _proc_state(daemon_pid) in ("gone", "Z"):
                break
            time.sleep(0.1)
        assert _proc_state(daemon_pid) in ("gone", "Z")
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()
    assert not (repo / "api").exists()  # it stopped cleanly, not killed
    assert "parent exited: stopping" in (repo / "daemon.log").read_text()
