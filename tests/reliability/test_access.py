"""Access (issue 8): who can reach the snapshotter, its files, its mounts and the IPFS node.

One lazily pulled busybox image (pushed on node A, rpulled through node B by a snapshotter
running with debug logging and an API ``Authorization`` token), one detached container:

* the state dir is 0700, the socket 0600, and no file or directory ipfsnap keeps there
  (sqlite, cache, worker specs and status, logs, container records) is open to group/other;
  an unprivileged user (``nobody``) cannot connect to the socket;
* ``nobody`` can neither list nor read a lazily mounted layer, the container's overlay
  rootfs or the container's ``/proc/PID/root``; a container running as uid 65534 reads the
  same files (``allow_other``, protected by the 0700 state dir: see docs/reliability.md);
* the managed IPFS node listens only on loopback for its API and only on the configured
  swarm address; a private-network node cannot dial a peer without the key;
* the API token and the swarm key never show in logs, CLI output or command lines.

Needs root, FUSE, runc, setpriv and the managed IPFS node: FAILS (never skips) without them.
"""

from __future__ import annotations

import http.server
import os
import secrets
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ipfsnap.content.sample import HELLO, SampleImage
from ipfsnap.errors import IPFSError
from ipfsnap.ipfs import IPFSClient
from ipfsnap.ipfs.node import LOG_FILE, PID_FILE
from ipfsnap.ipfs.pnet import ENV_FORCE_PNET, generate_swarm_key, write_swarm_key
from ipfsnap.service import SnapshotterClient
from ipfsnap.service.errors import ServiceUnavailable
from ipfsnap.service.paths import socket_path
from tests.e2e.test_seed_workflow import Ipfsnap, _clean_env, push
from tests.fixtures.ipfs import NodeFactory, NodePair, require_ipfs_implementation
from tests.ipfs_node.test_node import NO_RETRY, UNREACHABLE_TIMEOUT, _listening_addresses
from tests.support import require_fuse, require_tool

NOBODY = 65534
#: seconds to wait for the snapshotter (a Python process on a loaded 2-core box) to answer
START_TIMEOUT = 60.0


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as uid/gid 65534 with no supplementary groups."""
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *argv],
        capture_output=True, text=True, timeout=60, cwd="/",
    )


def assert_denied(*argv: str) -> None:
    res = as_nobody(*argv)
    assert res.returncode != 0 and "Permission denied" in res.stderr, (argv, res)


def fuse_mounts() -> dict[str, str]:
    """mountpoint -> super options of every ipfsnap FUSE mount (/proc/self/mountinfo)."""
    out = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fstype, _source, super_opts = post.split(" ", 2)
        if fstype == "fuse.ipfsnap":
            out[pre.split(" ")[4].replace("\\040", " ")] = super_opts
    return out


@dataclass
class World:
    a: Ipfsnap
    b: Ipfsnap
    cid: str
    auth: str
    daemon_log: Path
    #: stdout + stderr of every CLI command run against B
    outputs: list[str] = field(default_factory=list)

    def run_b(self, *args: str, check: bool = True) -> str:
        proc = self.b("-vv", *args, check=check)
        self.outputs += [proc.stdout, proc.stderr]
        return proc.stdout

    def container_pid(self, name: str) -> int:
        import json

        rows = [json.loads(line) for line in self.run_b("ps", "--json").splitlines() if line]
        pid = next(int(r["pid"]) for r in rows if r["id"] == name)
        assert pid > 0
        return pid


def _wait_answering(state: Path, daemon: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with SnapshotterClient(state) as client:
                client.ping()
            return
        except ServiceUnavailable:
            assert daemon.poll() is None, f"snapshotter exited {daemon.returncode}"
            assert time.monotonic() < deadline, "snapshotter does not answer"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def world(
    ipfs_pair: NodePair, busybox_image: SampleImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    require_fuse()
    require_tool("runc")
    require_tool("setpriv")
    ipfs_pair.connect()
    base = tmp_path_factory.mktemp("access")
    # the token only has to be sent and never shown; js-ipfs accepts any Authorization
    auth = "Bearer ipfsnap-token-" + secrets.token_hex(16)
    (base / "a.toml").write_text("")
    (base / "b.toml").write_text(f'ipfs_auth = "{auth}"\n')
    a = Ipfsnap(base / "state-a", ipfs_pair.a.api_multiaddr, base / "a.toml")
    b = Ipfsnap(base / "state-b", ipfs_pair.b.api_multiaddr, base / "b.toml")
    a.state.mkdir()
    # a state dir made world-readable by someone else: the snapshotter must tighten it
    b.state.mkdir(mode=0o755)
    os.chmod(b.state, 0o755)
    assert busybox_image.oci_archive is not None
    cid = push(a, busybox_image.oci_archive, "busybox", estargz=True)
    daemon_log = base / "snapshotter-debug.log"
    with open(daemon_log, "wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "ipfsnap.cli.main", "--state-dir", str(b.state), "--config",
             str(b.config), "--ipfs-api", b.api, "-vv", "snapshotter", "--foreground"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=_clean_env(),
        )
    world = World(a, b, cid, auth, daemon_log)
    try:
        _wait_answering(b.state, daemon)
        world.run_b("image", "rpull", "--ipfs", cid)
        world.run_b("run", "-d", "--snapshotter=stargz", cid, "acc-sleep", "sleep", "600")
        yield world
    finally:
        b("rm", "-f", "acc-sleep", check=False)
        b("snapshotter", "stop", check=False)
        try:
            daemon.wait(timeout=120)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        b.teardown()
        a.teardown()


# ---- state dir, socket, files ---------------------------------------------------------------


def _content_dir(path: Path, state: Path) -> bool:
    """Image content, not ipfsnap's own files: a snapshot's ``fs``/``work`` dir
    (``snapshots/<snapshotter>/snapshots/<id>/fs``) or a mountpoint."""
    rel = path.relative_to(state).parts
    return os.path.ismount(path) or (
        len(rel) == 5 and rel[0] == "snapshots" and rel[2] == "snapshots"
        and rel[4] in ("fs", "work")
    )


#: what the snapshotter and its layer workers keep under the state dir (the rest, content/,
#: containers/ and runc/, belongs to the CLI's image store and containers: see
#: test_cli_state_reachable_only_through_the_state_dir)
SNAPSHOTTER_TREES = ("snapshots/stargz", "fs")


def test_state_dir_socket_and_files_are_root_only(world: World) -> None:
    state = world.b.state
    st = os.stat(state)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700), oct(st.st_mode)
    sock = os.lstat(socket_path(state))
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
    assert sock.st_uid == 0
    seen: dict[str, int] = {}
    open_to_others: list[str] = []
    tops = [*state.glob("snapshotter.*"), state / "snapshots"]
    for tree in SNAPSHOTTER_TREES:
        for dirpath, dirnames, filenames in os.walk(state / tree):
            d = Path(dirpath)
            dirnames[:] = [n for n in dirnames if not _content_dir(d / n, state)]
            tops += [d / n for n in [*dirnames, *filenames]]
        tops.append(state / tree)
    for p in tops:
        m = os.lstat(p)
        if stat.S_ISLNK(m.st_mode):
            continue
        kind = p.suffix or ("dir" if stat.S_ISDIR(m.st_mode) else p.name)
        seen[kind] = seen.get(kind, 0) + 1
        if m.st_mode & 0o077 or m.st_uid != 0:
            open_to_others.append(f"{p.relative_to(state)} {oct(m.st_mode)} uid {m.st_uid}")
    # the walk saw what the issue names: the sqlite store, logs, worker specs, cache entries
    for kind in (".db", ".log", ".json", "dir"):
        assert seen.get(kind), (kind, seen)
    cache = [p for p in (state / "fs" / "cache").rglob("*") if p.is_file()]
    assert cache, "no chunk cache under the state dir"
    assert not open_to_others, "\n".join(open_to_others)


def test_cli_state_reachable_only_through_the_state_dir(world: World) -> None:
    """The image store and container records the CLI writes keep ordinary modes; the 0700
    state dir above them is what keeps other users out."""
    state = world.b.state
    for rel in ("content/refs.json", "containers/acc-sleep/config.json"):
        assert (state / rel).is_file(), rel
        assert_denied("cat", str(state / rel))
        assert_denied("ls", str((state / rel).parent))


def test_other_users_cannot_connect_to_the_socket(world: World) -> None:
    probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n")
    res = as_nobody("/usr/bin/python3", "-c", probe, str(socket_path(world.b.state)))
    assert res.returncode == 13, res


# ---- FUSE mounts and the container rootfs ---------------------------------------------------


def test_lazy_layers_and_rootfs_hidden_from_other_users(world: World) -> None:
    state = world.b.state
    mounts = {mp: opts for mp, opts in fuse_mounts().items() if mp.startswith(f"{state}/")}
    assert len(mounts) == 2, mounts  # the busybox image's two layers, mounted lazily
    for mp, opts in mounts.items():
        # allow_other (containers run as any uid) ...
        assert "allow_other" in opts.split(","), (mp, opts)
        # ... so what keeps other users out is a root-only directory above the mount
        guards = [p for p in Path(mp).parents
                  if p.is_relative_to(state) and stat.S_IMODE(os.stat(p).st_mode) == 0o700]
        assert state in guards, (mp, guards)
        assert os.listdir(mp), mp  # root sees the layer: the denials below are permissions
        assert_denied("ls", mp)
        assert_denied("stat", mp)
    upper = next(mp for mp in mounts if (Path(mp) / "hello.txt").exists())
    assert_denied("cat", f"{upper}/hello.txt")

    rootfs = state / "containers" / "acc-sleep" / "rootfs"
    assert (rootfs / "hello.txt").read_bytes() == HELLO
    assert_denied("ls", str(rootfs))
    assert_denied("cat", str(rootfs / "hello.txt"))
    pid = world.container_pid("acc-sleep")
    assert Path(f"/proc/{pid}/root/hello.txt").read_bytes() == HELLO
    assert_denied("ls", f"/proc/{pid}/root/")


def test_container_user_reads_through_the_container(world: World) -> None:
    out = world.run_b("run", "--rm", "--snapshotter=stargz", "-u", str(NOBODY), world.cid,
                      "acc-nobody", "sh", "-c", "id -u; cat /hello.txt")
    assert out == f"{NOBODY}\n{HELLO.decode()}"


# ---- the managed IPFS node ------------------------------------------------------------------


def test_managed_node_listens_only_where_configured(tmp_path: Path) -> None:
    """``ipfsnap ipfs daemon`` with a swarm key and a swarm address on another loopback IP:
    the API on 127.0.0.1 only, the swarm on 127.0.0.2 only, repo and key root-only, and the
    key in none of its output, its log or its command line (debug logging on)."""
    require_ipfs_implementation()
    repo = tmp_path / "repo"
    key = generate_swarm_key()
    write_swarm_key(repo, key)
    key_hex = key.to_text().split()[-1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipfsnap.cli.main", "-vv", "--state-dir", str(tmp_path / "s"),
         "ipfs", "daemon", "--repo", str(repo), "--swarm", "/ip4/127.0.0.2/tcp/0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**_clean_env(), ENV_FORCE_PNET: "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("IPFS node ready: API /ip4/127.0.0.1/tcp/"), line
        api_port = int(line.split()[4].split("/")[4])
        pid = int((repo / PID_FILE).read_text().split()[0])
        listening = _listening_addresses(pid)
        assert ("127.0.0.1", api_port) in listening, listening
        swarm = [(addr, port) for addr, port in listening if port != api_port]
        assert swarm and all(addr == "127.0.0.2" for addr, _ in swarm if addr != "127.0.0.1")
        assert any(addr == "127.0.0.2" for addr, _ in swarm), listening
        # js-ipfs also serves a gateway and an RPC port, all loopback; nothing else
        assert all(addr.startswith("127.") for addr, _ in listening), listening
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert key_hex not in cmdline
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    for path, mode in ((repo, 0o700), (repo / "config", 0o600), (repo / "swarm.key", 0o600)):
        assert stat.S_IMODE(os.stat(path).st_mode) == mode, (path, oct(os.stat(path).st_mode))
    logged = line + out + err + (repo / LOG_FILE).read_text(errors="replace")
    assert key_hex not in logged and key_hex.upper() not in logged


def test_private_node_cannot_dial_a_peer_without_the_key(
    ipfs_pair: NodePair, ipfs_node_factory: NodeFactory
) -> None:
    """The other direction of tests/ipfs_node/test_node.py's isolation test: the private
    node dialing out to a key-less node fails too."""
    keyless = ipfs_node_factory(name="access-keyless")
    with IPFSClient(ipfs_pair.a.api_url, retry=NO_RETRY) as ca:
        with pytest.raises(IPFSError):
            ca.swarm_connect(keyless.swarm_addrs[0], timeout=UNREACHABLE_TIMEOUT)
        assert keyless.peer_id not in {p.peer_id for p in ca.swarm_peers()}


# ---- secrets --------------------------------------------------------------------------------


class _Refusing(http.server.BaseHTTPRequestHandler):
    """An IPFS API that refuses every call (401), echoing nothing of the request."""

    def do_POST(self) -> None:
        self.send_response(401)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"unauthorized\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_api_token_never_logged(world: World) -> None:
    token = world.auth.split(" ", 1)[1]
    # an API that refuses the token: the error path, at debug level
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    refused = Ipfsnap(world.b.state.parent / "state-refused",
                      f"http://127.0.0.1:{server.server_address[1]}", world.b.config)
    refused.state.mkdir(exist_ok=True)
    try:
        res = refused("-vv", "image", "rpull", "--ipfs", world.cid, check=False)
        assert res.returncode != 0 and "401" in res.stderr, res
        world.outputs += [res.stdout, res.stderr]
    finally:
        refused.teardown()  # the rpull started a snapshotter for that state dir
        server.shutdown()
        server.server_close()
    # B's own workers (running, with the token in their 0600 spec) and the daemon
    pids = [int(p.read_text().split()[0]) for p in world.b.state.glob("snapshotter.pid")]
    texts = {"cli output": "\n".join(world.outputs),
             "snapshotter debug log": world.daemon_log.read_text(errors="replace")}
    for state in (world.b.state, world.b.state.parent / "state-refused"):
        for log in state.rglob("*.log"):
            texts[str(log)] = log.read_text(errors="replace")
    for status in world.b.state.glob("fs/workers/*/status.json"):
        texts[str(status)] = status.read_text()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(world.b.state) in cmdline or proc.name in map(str, pids):
                texts[f"cmdline of {proc.name}"] = cmdline
    worker_logs = [t for name, t in texts.items() if name.endswith("worker.log")]
    assert worker_logs and all(" DEBUG " in t for t in worker_logs), list(texts)
    assert " DEBUG " in texts["snapshotter debug log"]
    # the token did reach the workers (in their 0600 specs), so any log of it would show
    specs = list(world.b.state.glob("fs/workers/*/spec.json"))
    assert specs and all(token in p.read_text() for p in specs)
    leaked = [name for name, text in texts.items() if token in text]
    assert not leaked, leaked
