"""The snapshotter client: the ``Snapshotter`` protocol over the state dir's socket.

``SnapshotterClient(state_dir)`` behaves like an in-process :class:`SnapshotStore`: same
methods, same results, and the same exception classes (``SnapshotExists`` from a remote
prepare, ``SnapshotNotFound``, ...), so image code cannot tell them apart.
:func:`connect_or_start` starts the daemon on demand.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from ipfsnap.config import Config
from ipfsnap.service import paths
from ipfsnap.service.errors import (
    DaemonStartError,
    ProtocolError,
    ServiceUnavailable,
)
from ipfsnap.service.protocol import (
    LayerState,
    encode,
    error_from_json,
    info_from_json,
    info_to_json,
    mounts_from_json,
    read_message,
    usage_from_json,
)
from ipfsnap.snapshot.types import Info, Mount, Usage

# The label names of ipfsnap.fs.mounter (a test checks they agree), not imported from there:
# that module loads trio and the IPFS client (0.1-0.2 s), which a client never needs.
#: the remote layer's urls (a lazy prepare carries it)
URLS_LABEL = "containerd.io/snapshot/remote/urls"
#: the IPFS API the layer worker fetches from
IPFS_API_LABEL = "ipfsnap.io/ipfs.api"

log = logging.getLogger(__name__)

#: seconds a ping (or status) may take: the daemon answers it without touching a mount
QUICK_TIMEOUT = 10.0
#: seconds a daemon started on demand may take until it answers. Start-up is ~1 s; it also
#: checks (and re-mounts, verifying each TOC) every remote snapshot before serving, which on
#: a loaded 2-core machine with many layers takes tens of seconds
START_TIMEOUT = 120.0


def request_timeout(config: Config) -> float:
    """How long one request may take: a lazy mount's own bound (fetch + prefetch timeouts +
    30 s start-up, see ``LayerMounter``) plus a margin for the store's work."""
    return float(config.blob.fetching_timeout_sec + config.prefetch_timeout_sec + 60)


class SnapshotterClient:
    """Talks to the snapshotter of ``state_dir``; thread-safe (one request at a time)."""

    def __init__(
        self,
        state_dir: Path | str,
        *,
        timeout: float | None = 600.0,
        ipfs_api: Callable[[], str | None] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).absolute()
        #: the caller's IPFS API (asked once, on the first lazy layer): sent with each
        #: request for a lazy layer, so a snapshotter started by an earlier command with
        #: another API fetches this command's layers from this command's API
        self.ipfs_api = ipfs_api
        self._api: str | None = None
        self.socket_path = paths.socket_path(self.state_dir)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._rfile: IO[bytes] | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    # ---- plumbing -------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._disconnect()

    def __enter__(self) -> SnapshotterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _disconnect(self) -> None:
        if self._rfile is not None:
            with contextlib.suppress(OSError):
                self._rfile.close()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self._rfile = None

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        address, dirfd = (str(self.socket_path), None)
        try:
            address, dirfd = paths.socket_address(self.socket_path)
            sock.settimeout(QUICK_TIMEOUT)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            raise ServiceUnavailable(
                f"snapshotter socket {self.socket_path}: cannot connect: {exc.strerror or exc}"
            ) from None
        finally:
            if dirfd is not None:
                os.close(dirfd)
        self._sock = sock
        self._rfile = sock.makefile("rb")
        return sock

    def call(self, op: str, args: Mapping[str, Any] | None = None, *,
             timeout: float | None = -1.0) -> Any:
        """Send one request and return its result, or raise the error it carries."""
        rid = next(self._ids)
        data = encode({"id": rid, "op": op, "args": dict(args or {})})
        wait = self.timeout if timeout == -1.0 else timeout
        reply: dict[str, Any] | None = None
        with self._lock:
            # A connection the daemon closed (it restarted) fails on send or answers EOF:
            # the request was not received, so sending it once more on a new one is safe.
            for attempt in (1, 2):
                sock = self._connect()
                try:
                    sock.settimeout(QUICK_TIMEOUT)
                    sock.sendall(data)
                    sock.settimeout(wait)
                    assert self._rfile is not None
                    reply = read_message(self._rfile, peer=f"snapshotter {self.socket_path}")
                except TimeoutError:
                    self._disconnect()
                    raise ServiceUnavailable(
                        f"snapshotter {self.socket_path}: no answer to {op} within {wait:g}s"
                    ) from None
                except (BrokenPipeError, ConnectionResetError) as exc:
                    self._disconnect()
                    if attempt == 1:
                        continue
                    raise ServiceUnavailable(
                        f"snapshotter {self.socket_path}: connection lost during {op}: {exc}"
                    ) from None
                except ProtocolError:
                    self._disconnect()
                    raise
                if reply is None:
                    self._disconnect()
                    if attempt == 1 and op in _IDEMPOTENT:
                        continue
                    raise ServiceUnavailable(
                        f"snapshotter {self.socket_path}: connection closed during {op}"
                    )
                break
        assert reply is not None
        if reply.get("id") != rid:
            with self._lock:
                self._disconnect()
            raise ProtocolError(f"snapshotter {self.socket_path}: answer to request "
                                f"{reply.get('id')!r}, expected {rid}")
        if not reply.get("ok"):
            raise error_from_json(reply.get("error"))
        return reply.get("result")

    # ---- the Snapshotter protocol ---------------------------------------------------------

    def _request_labels(self, labels: Mapping[str, str] | None) -> dict[str, str]:
        """``labels``, plus the caller's IPFS API when they ask for a lazy (remote) layer."""
        out = dict(labels or {})
        if self.ipfs_api is None or URLS_LABEL not in out or IPFS_API_LABEL in out:
            return out
        if self._api is None:
            self._api = self.ipfs_api() or ""
        if self._api:
            out[IPFS_API_LABEL] = self._api
        return out

    def prepare(self, key: str, parent: str = "",
                labels: Mapping[str, str] | None = None) -> list[Mount]:
        return mounts_from_json(self.call(
            "prepare", {"key": key, "parent": parent, "labels": self._request_labels(labels)}))

    def view(self, key: str, parent: str = "",
             labels: Mapping[str, str] | None = None) -> list[Mount]:
        return mounts_from_json(self.call(
            "view", {"key": key, "parent": parent, "labels": dict(labels or {})}))

    def mounts(self, key: str) -> list[Mount]:
        return mounts_from_json(self.call("mounts", {"key": key}))

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        self.call("commit", {"name": name, "key": key, "labels": dict(labels or {})})

    def remove(self, key: str) -> None:
        self.call("remove", {"key": key})

    def stat(self, key: str) -> Info:
        return info_from_json(self.call("stat", {"key": key}))

    def update(self, info: Info, fieldpaths: Sequence[str] | None = None) -> Info:
        return info_from_json(self.call("update", {
            "info": info_to_json(info),
            "fieldpaths": list(fieldpaths) if fieldpaths is not None else None,
        }))

    def walk(self, filters: Sequence[str] = ()) -> list[Info]:
        result = self.call("walk", {"filters": list(filters)})
        if not isinstance(result, list):
            raise ProtocolError(f"snapshotter {self.socket_path}: walk answer is not a list")
        return [info_from_json(i) for i in result]

    def usage(self, key: str) -> Usage:
        return usage_from_json(self.call("usage", {"key": key}))

    # ---- service ------------------------------------------------------------------------

    def ping(self, timeout: float = QUICK_TIMEOUT) -> dict[str, Any]:
        result = self.call("ping", timeout=timeout)
        if not isinstance(result, dict):
            raise ProtocolError(f"snapshotter {self.socket_path}: bad ping answer")
        return result

    def warm(self, key: str, args: Sequence[str], env: Sequence[str] = (),
             cwd: str = "/") -> bool:
        """Ask the snapshotter to read ahead the files the process ``args`` (with ``env``,
        in ``cwd``) will exec, in the layers of committed snapshot ``key``
        (service/warmups.py); whether a warm-up was started."""
        result = self.call("warm", {"key": key, "args": list(args), "env": list(env),
                                    "cwd": cwd}, timeout=QUICK_TIMEOUT * 3)
        return bool(isinstance(result, dict) and result.get("started"))

    def status(self) -> list[LayerState]:
        result = self.call("status", timeout=QUICK_TIMEOUT * 3)
        if not isinstance(result, list):
            raise ProtocolError(f"snapshotter {self.socket_path}: status answer is not a list")
        return [LayerState.from_json(s) for s in result]

    def stop(self, wait: float = 120.0) -> int:
        """Ask the daemon to unmount everything it serves and exit; wait (bounded) until it
        has. Returns its pid."""
        result = self.call("stop", timeout=QUICK_TIMEOUT)
        pid = int(result.get("pid", 0)) if isinstance(result, dict) else 0
        self.close()
        deadline = time.monotonic() + wait
        while paths.lock_holder(self.state_dir) is not None:
            if time.monotonic() > deadline:
                raise ServiceUnavailable(
                    f"snapshotter (pid {pid}) of {self.state_dir} did not exit within {wait:g}s"
                )
            time.sleep(0.05)
        return pid


#: requests that may be sent again when the connection closed before their answer
_IDEMPOTENT = frozenset({"ping", "mounts", "stat", "walk", "usage", "status"})


def daemon_command(config: Config) -> list[str]:
    """The command line of a snapshotter for ``config`` (what on-demand start runs)."""
    cmd = [sys.executable, "-m", "ipfsnap.cli.main", "--state-dir", str(config.state_dir)]
    if config.config_path.exists():
        cmd += ["--config", str(config.config_path)]
    if config.ipfs_api:
        cmd += ["--ipfs-api", config.ipfs_api]
    return [*cmd, "snapshotter", "--foreground"]


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return " | ".join([ln for ln in text.splitlines() if ln.strip()][-lines:])


def start_daemon(config: Config, *, timeout: float = START_TIMEOUT) -> int:
    """Start a snapshotter for ``config`` in the background and wait until it answers.

    It runs in its own session (it outlives the caller), stdout/stderr appended to
    ``<state>/snapshotter.log``. Another one that won a start race counts as success.
    Returns the pid of the snapshotter that answers.
    """
    state_dir = config.state_dir
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    logfile = paths.log_path(state_dir)
    fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        proc = subprocess.Popen(
            daemon_command(config), stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
            start_new_session=True, close_fds=True, cwd="/",
        )
    finally:
        os.close(fd)
    client = SnapshotterClient(state_dir)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                pid = int(client.ping(timeout=2.0).get("pid", 0))
            except ServiceUnavailable:
                pass
            else:
                if pid == proc.pid:
                    log.info("started snapshotter (pid %d), log %s", pid, logfile)
                else:  # a concurrent start won; ours refused and exits
                    proc.wait()
                return pid
            code = proc.poll()
            if code is not None and paths.lock_holder(state_dir) is None:
                raise DaemonStartError(
                    f"snapshotter for {state_dir} exited with status {code} at start-up: "
                    f"{_log_tail(logfile) or 'no output'} (log {logfile})"
                )
            if time.monotonic() > deadline:
                raise DaemonStartError(
                    f"snapshotter for {state_dir} (pid {proc.pid}) does not answer after "
                    f"{timeout:g}s (log {logfile})"
                )
            time.sleep(0.05)
    finally:
        client.close()


def connect_if_running(
    config: Config,
    *,
    timeout: float | None = None,
    ipfs_api: Callable[[], str | None] | None = None,
) -> SnapshotterClient | None:
    """A client of ``config.state_dir``'s snapshotter if one runs, else None (nothing is
    started: read-only queries use this, so they never leave a daemon behind).

    A snapshotter that holds the state dir's lock but does not answer yet (it restores its
    mounts at start-up) is waited for, up to ``START_TIMEOUT``. ``ipfs_api``: see
    :class:`SnapshotterClient`.
    """
    client = _client_for(config, timeout, ipfs_api)
    try:
        client.ping()
        return client
    except ServiceUnavailable:
        client.close()
    holder = paths.lock_holder(config.state_dir)
    if holder is None:
        return None
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and paths.lock_holder(config.state_dir) is not None:
        try:
            client.ping(timeout=2.0)
            return client
        except ServiceUnavailable:
            client.close()
            time.sleep(0.1)
    if paths.lock_holder(config.state_dir) is not None:
        raise ServiceUnavailable(
            f"snapshotter (pid {holder}) of {config.state_dir} holds its lock but does not "
            f"answer on {client.socket_path} (log {paths.log_path(config.state_dir)})"
        )
    return None  # it exited while we waited


def _client_for(
    config: Config, timeout: float | None, ipfs_api: Callable[[], str | None] | None
) -> SnapshotterClient:
    return SnapshotterClient(
        config.state_dir,
        timeout=timeout if timeout is not None else request_timeout(config),
        ipfs_api=ipfs_api,
    )


def connect_or_start(
    config: Config,
    *,
    timeout: float | None = None,
    ipfs_api: Callable[[], str | None] | None = None,
) -> SnapshotterClient:
    """A client of ``config.state_dir``'s snapshotter, starting one when none answers.

    ``timeout`` bounds each request (default: :func:`request_timeout` of ``config``);
    ``ipfs_api``: see :class:`SnapshotterClient`.
    """
    client = connect_if_running(config, timeout=timeout, ipfs_api=ipfs_api)
    if client is not None:
        return client
    start_daemon(config)
    client = _client_for(config, timeout, ipfs_api)
    client.ping()
    return client
