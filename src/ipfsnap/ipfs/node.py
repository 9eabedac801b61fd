"""The managed IPFS node: a real daemon ipfsnap starts and stops when the user runs none.

Kubo is used when an ``ipfs`` executable is on PATH; otherwise js-ipfs 0.66.1 from the
``node/`` directory of the checkout (installed by ``scripts/setup.sh`` with ``npm ci``), run
through ``node/daemon.js`` which adds what js-ipfs lacks: ``swarm.key`` private networks,
``LIBP2P_FORCE_PNET`` and TCP_NODELAY on its sockets (``node/nodelay.js``).

A repo ipfsnap creates is private to the machine: the API, gateway and swarm listen on
loopback only, there is no public bootstrap list, no mDNS and no DHT. Ports left unspecified
are ``/tcp/0`` (the kernel picks a free one at each start); the real API address is read back
from the daemon's ``api`` file.

Use it as a context manager::

    with ManagedNode(repo) as node:
        node.api_multiaddr, node.api_url, node.peer_id, node.swarm_addrs
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

from ipfsnap.docparse import MalformedDocument, parse_json
from ipfsnap.errors import IPFSError
from ipfsnap.ipfs.pnet import ENV_FORCE_PNET, SWARM_KEY_FILE, force_pnet, repo_swarm_key

log = logging.getLogger(__name__)

ENV_JSIPFS_DIR = "IPFSNAP_JSIPFS_DIR"
#: "kubo", "js" or "auto" (default): which implementation ManagedNode runs
ENV_IMPLEMENTATION = "IPFSNAP_IPFS_IMPL"
#: "0" runs js-ipfs without the TCP_NODELAY preload (benchmarks only: bitswap gets ~10x slower)
ENV_NODELAY = "IPFSNAP_JSIPFS_NODELAY"

Implementation = Literal["kubo", "js"]

#: js-ipfs needs 2-4 s to start on this class of machine (FACTS.md); a loaded 2-core CI box
#: running other daemons is several times slower, hence the generous bound
DEFAULT_START_TIMEOUT = 90.0
#: after SIGTERM both daemons close their repo within a second or two; past this we kill
DEFAULT_STOP_GRACE = 15.0
#: one `id` probe while waiting for readiness; the API answers it in milliseconds once up
_PROBE_TIMEOUT = 3.0
_POLL_INTERVAL = 0.1
#: our own record of the daemon process, so a second start on the same repo is refused and a
#: crashed one is recognised as stale
PID_FILE = "ipfsnap-node.pid"
LOG_FILE = "daemon.log"
LOOPBACK_ANY_PORT = "/ip4/127.0.0.1/tcp/0"
#: umask of the daemon: what it writes into the repo (config with the node's private key,
#: blocks, datastore, api file) is owner-only, whatever the caller's umask
REPO_UMASK = 0o077


class NodeError(IPFSError):
    """The managed IPFS node could not be set up, started or stopped."""


class NodeNotInstalled(NodeError):
    """No IPFS implementation is available (no ``ipfs`` on PATH, js-ipfs not installed)."""


class NodeStartError(NodeError):
    """The daemon exited or did not become ready while starting."""


class NodeAlreadyRunning(NodeError):
    """Another daemon already runs on the repo."""


class PrivateNetworkRequired(NodeError):
    """``LIBP2P_FORCE_PNET=1`` but the repo has no ``swarm.key``."""


@dataclass(frozen=True)
class NodeIdentity:
    """What ``id`` says about a running node."""

    peer_id: str
    addresses: tuple[str, ...]
    agent_version: str


# --------------------------------------------------------------------------------------------
# locating the implementations


def repo_root() -> Path:
    """The checkout this module runs from (src/ipfsnap/ipfs/node.py -> the repo)."""
    return Path(__file__).resolve().parents[3]


def jsipfs_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Directory holding ``daemon.js`` and ``node_modules`` (env IPFSNAP_JSIPFS_DIR)."""
    env = os.environ if environ is None else environ
    if env.get(ENV_JSIPFS_DIR):
        return Path(env[ENV_JSIPFS_DIR]).resolve()
    return repo_root() / "node"


def jsipfs_problem(directory: Path | None = None) -> str | None:
    """Why js-ipfs cannot run from ``directory`` (None when it can)."""
    d = directory or jsipfs_dir()
    if shutil.which("node") is None:
        return "executable 'node' (Node.js >= 18) not on PATH"
    if not (d / "daemon.js").is_file():
        return f"{d / 'daemon.js'}: missing"
    if not (d / "node_modules" / "ipfs-daemon").is_dir():
        return f"{d / 'node_modules'}: js-ipfs not installed (run scripts/setup.sh or npm ci)"
    return None


def choose_implementation(environ: Mapping[str, str] | None = None) -> Implementation:
    """Kubo if ``ipfs`` is on PATH, else js-ipfs; IPFSNAP_IPFS_IMPL=kubo|js forces one."""
    env = os.environ if environ is None else environ
    forced = env.get(ENV_IMPLEMENTATION, "auto").strip().lower()
    if forced in ("kubo", "go"):
        return "kubo"
    if forced in ("js", "js-ipfs", "jsipfs"):
        return "js"
    return "kubo" if shutil.which("ipfs") else "js"


# --------------------------------------------------------------------------------------------
# small RPC helper (the managed node only needs `id`; everything else goes through IPFSClient)


def api_url_from_multiaddr(maddr: str) -> str:
    """``/ip4/127.0.0.1/tcp/5001[/http]`` -> ``http://127.0.0.1:5001``."""
    parts = maddr.strip().split("/")
    if len(parts) < 5 or parts[0] != "":
        raise NodeError(f"API address {maddr!r}: not a multiaddr")
    proto, host, tproto, port = parts[1], parts[2], parts[3], parts[4]
    if tproto != "tcp" or not port.isdigit():
        raise NodeError(f"API address {maddr!r}: expected /tcp/PORT")
    scheme = "https" if "https" in parts[5:] else "http"
    if proto == "ip6":
        host = f"[{host}]"
    elif proto not in ("ip4", "dns", "dns4", "dns6"):
        raise NodeError(f"API address {maddr!r}: unsupported protocol {proto!r}")
    return f"{scheme}://{host}:{port}"


def rpc_call(api_url: str, command: str, *, timeout: float, **params: str) -> Any:
    """POST ``/api/v0/<command>`` and decode the JSON reply (raises NodeError)."""
    query = "&".join(f"{k}={urllib.parse.quote(v, safe='')}" for k, v in params.items())
    url = f"{api_url}/api/v0/{command}" + (f"?{query}" if query else "")
    req = urllib.request.Request(url, method="POST", data=b"")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace").strip()
        with contextlib.suppress(MalformedDocument):
            reply = parse_json(detail)
            if isinstance(reply, dict):
                detail = str(reply.get("Message", detail))
        raise NodeError(f"IPFS API {api_url}: {command}: HTTP {exc.code}: {detail}") from None
    except (OSError, urllib.error.URLError) as exc:
        raise NodeError(f"IPFS API {api_url}: {command}: unreachable: {exc}") from None
    try:
        return parse_json(body) if body.strip() else None
    except MalformedDocument:
        raise NodeError(f"IPFS API {api_url}: {command}: reply is not JSON") from None


def node_identity(api_url: str, timeout: float = _PROBE_TIMEOUT) -> NodeIdentity:
    reply = rpc_call(api_url, "id", timeout=timeout)
    if not isinstance(reply, dict) or not isinstance(reply.get("ID"), str):
        raise NodeError(f"IPFS API {api_url}: id: unexpected reply")
    addrs = tuple(str(a) for a in reply.get("Addresses") or ())
    return NodeIdentity(reply["ID"], addrs, str(reply.get("AgentVersion", "")))


def read_api_file(repo: Path) -> str | None:
    """The API multiaddr a running daemon wrote into ``$repo/api`` (None if absent)."""
    try:
        text = (repo / "api").read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise NodeError(f"{repo / 'api'}: cannot read: {exc}") from None
    return text or None


# --------------------------------------------------------------------------------------------
# repo configuration


def _load_config(repo: Path) -> dict[str, Any]:
    path = repo / "config"
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, MalformedDocument) as exc:
        raise NodeError(f"{path}: cannot read IPFS repo config: {exc}") from None
    if not isinstance(data, dict):
        raise NodeError(f"{path}: IPFS repo config is not a JSON object")
    return data


def _save_config(repo: Path, data: Mapping[str, Any]) -> None:
    path = repo / "config"
    tmp = path.with_name("config.ipfsnap-tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _sub(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        value = {}
        data[key] = value
    return value


def private_config(data: dict[str, Any], impl: Implementation) -> None:
    """Make a fresh repo config machine-private: loopback only, no public peers, no DHT."""
    addresses = _sub(data, "Addresses")
    addresses["API"] = LOOPBACK_ANY_PORT
    addresses["Gateway"] = LOOPBACK_ANY_PORT
    addresses["Swarm"] = [LOOPBACK_ANY_PORT]
    addresses["Announce"] = []
    addresses["NoAnnounce"] = []
    if impl == "js":
        # js-ipfs also has a gRPC API and a webrtc-star transport; neither is needed
        addresses["RPC"] = LOOPBACK_ANY_PORT
        addresses["Delegates"] = []
    data["Bootstrap"] = []
    discovery = _sub(data, "Discovery")
    _sub(discovery, "MDNS")["Enabled"] = False
    if impl == "js":
        _sub(discovery, "webRTCStar")["Enabled"] = False
    routing = _sub(data, "Routing")
    routing["Type"] = "none"
    if impl == "kubo":
        swarm = _sub(data, "Swarm")
        swarm["DisableNatPortMap"] = True
        swarm["RelayClient"] = {"Enabled": False}
        swarm["RelayService"] = {"Enabled": False}
        # TCP only: pnet protects stream transports, Kubo refuses QUIC & co. with a swarm key
        network = _sub(_sub(swarm, "Transports"), "Network")
        network.update({"QUIC": False, "WebTransport": False, "WebRTCDirect": False})
        _sub(data, "AutoNAT")["ServiceMode"] = "disabled"
    else:
        _sub(data, "Pubsub")["Enabled"] = False
        _sub(data, "Preload")["Enabled"] = False


def set_listen_addresses(
    data: dict[str, Any], api: str | None, swarm: Sequence[str] | None
) -> None:
    addresses = _sub(data, "Addresses")
    if api is not None:
        addresses["API"] = api
    if swarm is not None:
        addresses["Swarm"] = list(swarm)


# --------------------------------------------------------------------------------------------
# process helpers


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live IPFS daemon (not a zombie, not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        cmdline = b""
    if cmdline and b"daemon.js" not in cmdline and b"ipfs" not in cmdline:
        return False  # the pid now belongs to some other program
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped) is not a running daemon
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


class ManagedNode:
    """A real IPFS daemon on ``repo``, started by :meth:`start`, stopped by :meth:`stop`."""

    def __init__(
        self,
        repo: Path,
        api: str | None = None,
        swarm: Sequence[str] | None = None,
        offline: bool = False,
        *,
        implementation: Implementation | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        stop_grace: float = DEFAULT_STOP_GRACE,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        stop_with_parent: bool = True,
    ) -> None:
        self.repo = Path(repo).absolute()
        self.api = api
        self.swarm = list(swarm) if swarm is not None else None
        self.offline = offline
        self._env = dict(os.environ if env is None else env)
        self.implementation: Implementation = implementation or choose_implementation(self._env)
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.log_path = log_path or self.repo / LOG_FILE
        #: js-ipfs stops by itself when this process dies (even by SIGKILL); False for a
        #: node meant to outlive us (see detach)
        self.stop_with_parent = stop_with_parent
        self._proc: subprocess.Popen[bytes] | None = None
        self._identity: NodeIdentity | None = None
        self._api_multiaddr: str | None = None
        self.start_seconds: float | None = None

    # ---- public state

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def api_multiaddr(self) -> str:
        if self._api_multiaddr is None:
            raise NodeError(f"IPFS node {self.repo}: not started")
        return self._api_multiaddr

    @property
    def api_url(self) -> str:
        return api_url_from_multiaddr(self.api_multiaddr)

    @property
    def peer_id(self) -> str:
        if self._identity is None:
            raise NodeError(f"IPFS node {self.repo}: not started")
        return self._identity.peer_id

    @property
    def swarm_addrs(self) -> list[str]:
        """Dialable swarm multiaddrs, each ending in ``/p2p/<peer id>``."""
        if self._identity is None:
            raise NodeError(f"IPFS node {self.repo}: not started")
        out = []
        for addr in self._identity.addresses:
            if "/p2p/" not in addr and "/ipfs/" not in addr:
                addr = f"{addr}/p2p/{self._identity.peer_id}"
            out.append(addr)
        return out

    @property
    def agent_version(self) -> str:
        return self._identity.agent_version if self._identity else ""

    # ---- context manager

    def __enter__(self) -> ManagedNode:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- start

    def check_private_network(self) -> None:
        """Validate ``swarm.key`` (if any) and refuse a missing one under LIBP2P_FORCE_PNET."""
        key = repo_swarm_key(self.repo)
        if key is None and force_pnet(self._env):
            raise PrivateNetworkRequired(
                f"IPFS repo {self.repo}: {ENV_FORCE_PNET}=1 but there is no "
                f"{self.repo / SWARM_KEY_FILE}; refusing to start outside a private network "
                f"(create one with: ipfsnap ipfs swarm-key-gen > {self.repo / SWARM_KEY_FILE})"
            )
        if key is not None:
            log.info("IPFS repo %s: private network (swarm key %s)", self.repo, key.fingerprint())

    def recover_stale(self) -> None:
        """Refuse a live daemon on the repo; remove what a crashed one left behind."""
        pid_path = self.repo / PID_FILE
        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int(pid_path.read_text().strip())
            if pid != os.getpid() and _pid_alive(pid):
                raise NodeAlreadyRunning(
                    f"IPFS repo {self.repo}: a daemon already runs on it (pid {pid})"
                )
        api = read_api_file(self.repo)
        if api is not None:
            try:
                node_identity(api_url_from_multiaddr(api), timeout=1.0)
            except NodeError:
                pass
            else:
                raise NodeAlreadyRunning(
                    f"IPFS repo {self.repo}: a daemon already serves its API at {api}"
                )
        removed = []
        for name in ("api", "repo.lock", PID_FILE):
            path = self.repo / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)  # js-ipfs' lock is a directory
                removed.append(name)
            elif path.exists() or path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(name)
        if removed:
            log.warning(
                "IPFS repo %s: removed stale %s left by a daemon that did not stop cleanly",
                self.repo,
                ", ".join(removed),
            )

    def _command(self, *args: str) -> list[str]:
        if self.implementation == "kubo":
            exe = shutil.which("ipfs", path=self._env.get("PATH"))
            if exe is None:
                raise NodeNotInstalled("Kubo: executable 'ipfs' not on PATH")
            return [exe, *args]
        d = jsipfs_dir(self._env)
        problem = jsipfs_problem(d)
        if problem is not None:
            raise NodeNotInstalled(f"js-ipfs: {problem}")
        node = shutil.which("node", path=self._env.get("PATH")) or "node"
        if self._env.get(ENV_NODELAY, "1") == "0":  # only to measure what it buys
            return [node, str(d / "daemon.js"), *args]
        preload = (d / "nodelay.js").as_uri()
        return [node, "--import", preload, str(d / "daemon.js"), *args]

    def _child_env(self) -> dict[str, str]:
        env = dict(self._env)
        env["IPFS_PATH"] = str(self.repo)
        env.pop("IPFSNAP_PARENT_PID", None)
        if self.stop_with_parent:
            env["IPFSNAP_PARENT_PID"] = str(os.getpid())
        # js-ipfs' update notifier and telemetry-ish checks must not reach out
        env.setdefault("NO_UPDATE_NOTIFIER", "1")
        return env

    def _init_config(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        private_config(data, self.implementation)
        set_listen_addresses(data, self.api, self.swarm)
        return data

    def init_repo(self) -> bool:
        """Create and configure the repo if it has no config yet; True if it did.

        The daemon's first start does this by itself for js-ipfs (saving one slow start of
        Node.js); call it to get a repo ready without running the daemon.
        """
        self.repo.mkdir(parents=True, exist_ok=True, mode=0o700)
        if (self.repo / "config").exists():
            return False
        env = self._child_env()
        if self.implementation == "kubo":
            cmd = self._command("init", "--profile", "test", "--empty-repo")
        else:
            cmd = self._command("--init")
            env["IPFSNAP_INIT_CONFIG"] = json.dumps(self._init_config())
        log.info("IPFS repo %s: initialising (%s)", self.repo, self.implementation)
        res = subprocess.run(cmd, env=env, capture_output=True, timeout=self.start_timeout,
                             umask=REPO_UMASK)
        if res.returncode != 0:
            detail = (res.stderr or res.stdout).decode("utf-8", "replace").strip()
            last = detail.splitlines()[-1] if detail else f"exit status {res.returncode}"
            raise NodeStartError(f"IPFS repo {self.repo}: init failed: {last}")
        if self.implementation == "kubo":
            data = _load_config(self.repo)
            private_config(data, self.implementation)
            _save_config(self.repo, data)
        return True

    def start(self) -> ManagedNode:
        """Init if needed, start the daemon and wait until its API answers ``id``."""
        if self.running:
            return self
        t0 = time.monotonic()
        self.repo.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.repo.stat().st_mode & 0o077:
            # the repo holds the node's private key, the swarm key and every block
            log.info("IPFS repo %s: mode -> 700", self.repo)
            os.chmod(self.repo, 0o700)
        self.check_private_network()
        self.recover_stale()
        env = self._child_env()
        if self.implementation == "kubo":
            self.init_repo()
        if not (self.repo / "config").exists():
            # js-ipfs: the daemon creates the repo with this config on its first start
            env["IPFSNAP_INIT_CONFIG"] = json.dumps(self._init_config())
            log.info("IPFS repo %s: new (js-ipfs creates it on start)", self.repo)
        elif self.api is not None or self.swarm is not None:
            data = _load_config(self.repo)
            set_listen_addresses(data, self.api, self.swarm)
            _save_config(self.repo, data)
        args = ["daemon"] if self.implementation == "kubo" else []
        if self.offline:
            args.append("--offline")
        cmd = self._command(*args)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf: IO[bytes] = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        logf.write(f"--- ipfsnap: starting {' '.join(cmd)}\n".encode())
        logf.flush()
        log.info("IPFS node %s: starting %s", self.repo, self.implementation)
        try:
            self._proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                # own session: a Ctrl-C in the terminal reaches us, and we stop it in order
                start_new_session=True,
                umask=REPO_UMASK,
            )
        finally:
            logf.close()
        (self.repo / PID_FILE).write_text(f"{self._proc.pid}\n")
        try:
            self._wait_ready(t0 + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        log.info(
            "IPFS node %s ready in %.1fs: API %s, peer %s",
            self.repo,
            self.start_seconds,
            self._api_multiaddr,
            self.peer_id,
        )
        return self

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        last_error = "no api file yet"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise NodeStartError(self._exit_message(code))
            api = read_api_file(self.repo)
            if api is not None:
                try:
                    self._identity = node_identity(api_url_from_multiaddr(api))
                    self._api_multiaddr = api
                    return
                except NodeError as exc:
                    last_error = str(exc)
            if time.monotonic() > deadline:
                raise NodeStartError(
                    f"IPFS node {self.repo}: not ready after {self.start_timeout:.0f}s "
                    f"({last_error}); see {self.log_path}"
                )
            time.sleep(_POLL_INTERVAL)

    def _exit_message(self, code: int) -> str:
        tail = _tail(self.log_path, 40)
        # the daemons' own one-line reasons, most specific first
        for line in reversed(tail.splitlines()):
            low = line.lower()
            if "ipfsnap-node:" in low or "error" in low or "refusing" in low:
                reason = line.strip()
                break
        else:
            reason = tail.splitlines()[-1].strip() if tail else ""
        return (
            f"IPFS node {self.repo}: daemon exited with status {code} while starting: "
            f"{reason or 'no output'} (log: {self.log_path})"
        )

    # ---- stop

    def stop(self) -> int | None:
        """SIGTERM, wait ``stop_grace`` seconds, then SIGKILL; clean up. Returns exit code."""
        proc = self._proc
        if proc is None:
            return None
        code = proc.poll()
        if code is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(self.stop_grace)
            except subprocess.TimeoutExpired:
                log.warning(
                    "IPFS node %s: no exit %.0fs after SIGTERM; killing pid %d",
                    self.repo,
                    self.stop_grace,
                    proc.pid,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
        self._proc = None
        with contextlib.suppress(FileNotFoundError):
            (self.repo / PID_FILE).unlink()
        if code != 0:
            # killed or crashed: what it left would block the next start
            with contextlib.suppress(NodeError):
                self.recover_stale()
        log.info("IPFS node %s stopped (status %s)", self.repo, code)
        return code

    def wait(self) -> int:
        """Block until the daemon exits on its own; returns its exit code."""
        if self._proc is None:
            raise NodeError(f"IPFS node {self.repo}: not started")
        return self._proc.wait()

    def detach(self) -> None:
        """Leave the daemon running after this object goes away.

        To outlive this process too, the node must be created with ``stop_with_parent=False``.
        """
        self._proc = None
