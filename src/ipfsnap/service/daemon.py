"""The snapshotter daemon: one per state dir, it owns the snapshot store and the lazy mounts.

FUSE needs a process that outlives the CLI: each lazy layer is served by its own worker
process (``ipfsnap.fs``), and this daemon is the one that starts, checks and stops them, on
behalf of CLI commands talking to it over ``<state>/snapshotter.sock``
(:mod:`ipfsnap.service.protocol`).

Life cycle
- Start: take the state dir's lock (``snapshotter.pid``, a POSIX lock; a second daemon refuses),
  open the store, re-mount every remote snapshot whose worker is gone or broken
  (``restore_remote``: their chunk caches are reused), then serve.
- SIGTERM / SIGINT: stop accepting, let requests in flight finish (bounded), exit. Mounts
  stay: the layer workers are separate processes in their own sessions, so restarting the
  snapshotter (``systemctl restart``, an upgrade, a crash) does not disturb running
  containers; the next start finds the workers again by their status files.
- ``ipfsnap snapshotter stop`` (the ``stop`` request): the same, and then every remote
  layer is unmounted (its worker exits) before the daemon exits.

Threads: the main thread accepts connections; one thread per connection runs its requests.
The store serialises its metadata transactions itself, and a lazy mount (which may take up
to the configured fetch and prefetch timeouts) does not hold its lock, so ``status`` and
``ping`` answer while a ``prepare`` is mounting.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from ipfsnap.config import Config
from ipfsnap.errors import IpfsnapError
from ipfsnap.fs import LayerMounter
from ipfsnap.fs.mounter import is_mountpoint, pid_alive
from ipfsnap.service import paths
from ipfsnap.service.errors import DaemonAlreadyRunning, ProtocolError, ServiceUnavailable
from ipfsnap.service.protocol import (
    OPS,
    VERSION,
    LayerState,
    encode,
    error_to_json,
    info_from_json,
    info_to_json,
    mount_to_json,
    read_message,
    usage_to_json,
)
from ipfsnap.service.warmups import GuardedRemote, WarmRequest, WarmUps, exec_warmer
from ipfsnap.snapshot import REMOTE_LABEL, TARGET_SNAPSHOT_LABEL, Kind, SnapshotStore
from ipfsnap.snapshot.errors import SnapshotNotFound

log = logging.getLogger(__name__)

#: seconds requests in flight may still run after a stop before the daemon exits anyway.
#: Ordinary requests take milliseconds; a lazy mount in progress can take minutes and is the
#: one thing this cuts short (its worker keeps running and is found again at the next start).
STOP_GRACE = 10.0
#: listen backlog: CLI commands connect one at a time; this only absorbs bursts (parallel
#: `ipfsnap run`s) while the accept loop is busy
BACKLOG = 64


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"snapshotter request: {what} must be an object")
    return {str(k): str(v) for k, v in value.items()}


def _str(args: Mapping[str, Any], name: str, default: str | None = None) -> str:
    value = args.get(name, default)
    if value is None:
        raise ProtocolError(f"snapshotter request: missing argument {name!r}")
    if not isinstance(value, str):
        raise ProtocolError(f"snapshotter request: argument {name!r} must be a string")
    return value


def _str_list(args: Mapping[str, Any], name: str) -> list[str]:
    value = args.get(name) or []
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ProtocolError(f"snapshotter request: argument {name!r} must be a list of strings")
    return value


def _state_of(st: Mapping[str, Any], background: bool) -> str:
    """The user-facing state of a layer from its worker's status file."""
    state = str(st.get("state", "starting"))
    if state == "failed":
        return "error"
    if state == "ready":
        complete = float(st.get("percent", 0.0)) >= 100.0
        if complete:
            return "complete"
        return "background" if background else "ready"
    return state


#: umask of the snapshotter process (a Daemon is one) and so of its layer workers: what they
#: create (sqlite store, chunk cache, worker specs with the API token, logs) is ipfsnap's own
#: state, owner-only. Image content keeps its modes: snapshot dirs are chmod-ed explicitly and
#: the FUSE mounts take theirs from the TOC.
PRIVATE_UMASK = 0o077


class Daemon:
    """The snapshotter for ``config.state_dir``. ``run()`` serves until stopped."""

    def __init__(self, config: Config, *, mounter: LayerMounter | None = None) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self.socket_path = paths.socket_path(self.state_dir)
        self.root = paths.stargz_root(self.state_dir)
        os.umask(PRIVATE_UMASK)  # before the mounter starts its spare worker
        # the layer workers log at debug level too when the snapshotter does (-vv)
        debug = {"log_level": "DEBUG"} if log.isEnabledFor(logging.DEBUG) else None
        self.mounter = mounter or LayerMounter(config, extra=debug)
        #: pulled images' commands read ahead (the ``warm`` request); a layer is unmounted
        #: only once no warm-up reads it
        self.warmups = WarmUps(config.run.warm_bytes, make_warmer=partial(
            exec_warmer, start_files=config.run.warm_start_files))
        self.store: SnapshotStore | None = None
        self._lock_fd: int | None = None
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = threading.Event()
        self._unmount_on_exit = False
        self._busy = 0
        self._busy_cond = threading.Condition()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        #: hooks run (in order) once the store is open, before serving: issue 7's gRPC
        #: server plugs in here; each returns a callable that stops it
        self.on_serve: list[Callable[[Daemon], Callable[[], None]]] = []

    # ---- start-up -------------------------------------------------------------------------

    def _prepare_state_dir(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        mode = self.state_dir.stat().st_mode & 0o777
        if mode != 0o700:
            # sockets, mounts of other users' images and the IPFS repo live here
            log.info("state dir %s: mode %o -> 700", self.state_dir, mode)
            os.chmod(self.state_dir, 0o700)

    def _take_lock(self) -> None:
        path = paths.pid_path(self.state_dir)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not paths.take_lock(fd):
            os.close(fd)
            other = paths.lock_holder(self.state_dir)
            raise DaemonAlreadyRunning(
                f"a snapshotter already serves state dir {self.state_dir} "
                f"(pid {other if other and other > 0 else 'unknown'}, lock {path})"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _listen(self) -> None:
        # We hold the lock, so a socket file left here is from a dead daemon.
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        address, dirfd = paths.socket_address(self.socket_path)
        old = os.umask(0o177)  # born 0600: no window in which others could connect
        try:
            sock.bind(address)
        finally:
            os.umask(old)
            if dirfd is not None:
                os.close(dirfd)
        os.chmod(self.socket_path, 0o600)
        sock.listen(BACKLOG)
        sock.setblocking(False)
        self._listener = sock

    def start(self) -> None:
        """Lock, open the store, restore remote snapshots, listen. Raises on failure."""
        self._prepare_state_dir()
        self._take_lock()
        try:
            self.store = SnapshotStore(self.root, remote=GuardedRemote(self.mounter, self.warmups),
                                       restore=False)
            failures = self.store.restore_remote()
            restored = sum(
                1 for i in self.store.walk() if REMOTE_LABEL in i.labels and i.name not in failures
            )
            log.info("remote snapshots: %d mounted, %d failed", restored, len(failures))
            for name, err in failures.items():
                log.error("remote snapshot %r could not be restored: %s", name, err)
            self._drop_interrupted_prepares()
            self._listen()
        except BaseException:
            self._release()
            raise

    def _drop_interrupted_prepares(self) -> None:
        """Remove the active snapshots of remote prepares a crash interrupted.

        Their client got an error (connection closed) and prepares again; the layer worker
        started for them runs on in its own session and would keep an orphan mount until
        ``snapshotter stop``. A prepare whose remote mount failed fell back to a normal
        active snapshot with the same labels: no live worker, no mount; left alone."""
        store = self.store
        assert store is not None
        for info in store.walk():
            if info.kind is not Kind.ACTIVE or TARGET_SNAPSHOT_LABEL not in info.labels:
                continue
            mp = store.path(info.name)
            pid = int((self.mounter.status(mp) or {}).get("pid", 0) or 0)
            if not (is_mountpoint(mp) or pid_alive(pid)):
                continue
            # a worker still starting: let it mount (or fail) first, then unmount it cleanly
            deadline = time.monotonic() + self.mounter.ready_timeout
            while pid_alive(pid) and time.monotonic() < deadline and (
                    self.mounter.status(mp) or {}).get("state") in ("starting", "prefetching"):
                time.sleep(0.05)
            try:
                self.mounter.unmount(mp)
                store.remove(info.name)
            except IpfsnapError as exc:
                log.error("snapshot %r of an interrupted remote prepare: cannot remove: %s",
                          info.name, exc)
                continue
            log.info("removed snapshot %r of an interrupted remote prepare (its layer worker "
                     "at %s stopped)", info.name, mp)

    # ---- serving ----------------------------------------------------------------------------

    def request_stop(self, *, unmount: bool = False) -> None:
        """Ask the accept loop to stop (thread- and signal-safe)."""
        if unmount:
            self._unmount_on_exit = True
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: stopping (mounts stay)", signal.Signals(signum).name)
        self.request_stop()

    def run(self) -> int:
        """Start, serve until a signal or a ``stop`` request, shut down. Returns 0."""
        self.start()
        stops: list[Callable[[], None]] = []
        previous = {
            s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for hook in self.on_serve:  # a failing hook still gets the clean shutdown below
                stops.append(hook(self))
            log.info("snapshotter (pid %d) serving %s on %s", os.getpid(), self.root,
                     self.socket_path)
            self._accept_loop()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            for stop in reversed(stops):
                try:
                    stop()
                except Exception:
                    log.exception("stopping a server hook failed")
            self.shutdown()
        return 0

    def _accept_loop(self) -> None:
        assert self._listener is not None
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.data == "wake":
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 4096)
                        continue
                    try:
                        conn, _ = self._listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    conn.setblocking(True)
                    with self._conns_lock:
                        self._conns.add(conn)
                    threading.Thread(
                        target=self._serve_conn, args=(conn,), name="snapshotter-conn",
                        daemon=True,
                    ).start()
        finally:
            sel.close()

    def _serve_conn(self, conn: socket.socket) -> None:
        peer = f"snapshotter connection {conn.fileno()}"
        try:
            with conn, conn.makefile("rb") as rf:
                while True:
                    try:
                        msg = read_message(rf, peer=peer)
                    except ProtocolError as exc:
                        log.warning("%s", exc)
                        with contextlib.suppress(OSError):
                            conn.sendall(encode({"id": None, "ok": False,
                                                 "error": error_to_json(exc)}))
                        return
                    if msg is None:
                        return
                    reply = self._handle(msg)
                    conn.sendall(encode(reply))
                    if msg.get("op") == "stop" and reply.get("ok"):
                        self.request_stop(unmount=True)
        except OSError as exc:  # the client went away mid-answer
            log.debug("%s: %s", peer, exc)
        finally:
            with self._conns_lock:
                self._conns.discard(conn)

    def _handle(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        rid = msg.get("id")
        op = msg.get("op")
        args = msg.get("args") or {}
        try:
            if op not in OPS or not isinstance(args, dict):
                raise ProtocolError(f"snapshotter: unknown request {op!r}")
            if self._stopping.is_set() and op != "ping":
                raise ServiceUnavailable(f"snapshotter for {self.state_dir} is stopping")
            with self._busy_cond:
                self._busy += 1
            try:
                started = time.monotonic()
                result = self._dispatch(str(op), args)
                log.debug("%s %s: %.3fs", op, args.get("key", ""), time.monotonic() - started)
            finally:
                with self._busy_cond:
                    self._busy -= 1
                    self._busy_cond.notify_all()
            return {"id": rid, "ok": True, "result": result}
        except IpfsnapError as exc:
            log.debug("%s %r failed: %s", op, args.get("key", ""), exc)
            return {"id": rid, "ok": False, "error": error_to_json(exc)}
        except Exception as exc:
            log.exception("%s: unexpected error", op)
            return {"id": rid, "ok": False, "error": error_to_json(exc)}

    def _dispatch(self, op: str, a: Mapping[str, Any]) -> Any:
        store = self.store
        assert store is not None
        if op == "ping":
            return {"pid": os.getpid(), "state_dir": str(self.state_dir), "root": str(self.root),
                    "version": VERSION}
        if op == "prepare":
            return [mount_to_json(m) for m in store.prepare(
                _str(a, "key"), _str(a, "parent", ""), _str_map(a.get("labels"), "labels"))]
        if op == "view":
            return [mount_to_json(m) for m in store.view(
                _str(a, "key"), _str(a, "parent", ""), _str_map(a.get("labels"), "labels"))]
        if op == "mounts":
            return [mount_to_json(m) for m in store.mounts(_str(a, "key"))]
        if op == "commit":
            store.commit(_str(a, "name"), _str(a, "key"), _str_map(a.get("labels"), "labels"))
            return None
        if op == "remove":
            store.remove(_str(a, "key"))
            return None
        if op == "stat":
            return info_to_json(store.stat(_str(a, "key")))
        if op == "update":
            fieldpaths = a.get("fieldpaths")
            if fieldpaths is not None and not (
                isinstance(fieldpaths, list) and all(isinstance(f, str) for f in fieldpaths)
            ):
                raise ProtocolError("snapshotter request: fieldpaths must be a list of strings")
            return info_to_json(store.update(info_from_json(a.get("info")), fieldpaths))
        if op == "walk":
            filters = a.get("filters") or []
            if not (isinstance(filters, list) and all(isinstance(f, str) for f in filters)):
                raise ProtocolError("snapshotter request: filters must be a list of strings")
            return [info_to_json(i) for i in store.walk(filters)]
        if op == "usage":
            return usage_to_json(store.usage(_str(a, "key")))
        if op == "status":
            return [s.to_json() for s in self.layer_states()]
        if op == "stop":
            return {"pid": os.getpid()}
        if op == "warm":
            return {"started": self._warm(a)}
        raise ProtocolError(f"snapshotter: unknown request {op!r}")  # pragma: no cover

    def _warm(self, a: Mapping[str, Any]) -> bool:
        """Start reading ahead the files of the process ``a`` describes in the layers of the
        committed snapshot ``a["key"]`` (service/warmups.py)."""
        store = self.store
        assert store is not None
        key = _str(a, "key")
        args, env = _str_list(a, "args"), _str_list(a, "env")
        cwd = _str(a, "cwd", "/")
        if store.stat(key).kind != Kind.COMMITTED:
            raise ProtocolError(f"snapshotter request: warm {key!r}: not a committed snapshot")
        layers = (store.path(key), *store.parent_paths(key))
        return self.warmups.start(WarmRequest(key, layers, tuple(args), tuple(env), cwd))

    # ---- status -------------------------------------------------------------------------

    def layer_states(self) -> list[LayerState]:
        """Every lazy layer this snapshotter serves (and live orphans), from worker status."""
        store = self.store
        assert store is not None
        by_mountpoint: dict[str, str] = {}
        for info in store.walk():
            if REMOTE_LABEL in info.labels:
                with contextlib.suppress(SnapshotNotFound):
                    by_mountpoint[os.path.abspath(store.path(info.name))] = info.name
        background = not self.config.no_background_fetch
        out: list[LayerState] = []
        for st in self.mounter.all_status():
            mp = str(st.get("mountpoint", ""))
            name = by_mountpoint.get(mp, "")
            pid = int(st.get("pid", 0) or 0)
            alive = pid_alive(pid)
            if not name and not alive:
                continue  # an old worker's leftover status file
            state = _state_of(st, background)
            last_error = str(st.get("last_error", "") or "")
            if not alive and state not in ("unmounted", "error"):
                state = "error"
                last_error = last_error or f"layer worker (pid {pid}) is not running"
            out.append(LayerState(
                snapshot=name,
                layer=str(st.get("layer", "")),
                mountpoint=mp,
                size=int(st.get("size", 0) or 0),
                fetched=int(st.get("cached_bytes", 0) or 0),
                total=int(st.get("chunk_bytes", 0) or 0),
                percent=float(st.get("percent", 0.0) or 0.0),
                state=state,
                last_error=last_error,
                pid=pid,
                read_bytes=int(st.get("fetched_bytes", 0) or 0),
            ))
        out.sort(key=lambda s: (s.snapshot == "", s.snapshot, s.mountpoint))
        return out

    # ---- shutdown -------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop listening, wait (bounded) for requests in flight, close the store
        (unmounting every remote layer after a ``stop`` request), release the lock."""
        self._stopping.set()
        self.warmups.stop_all()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            self._listener = None
        deadline = time.monotonic() + STOP_GRACE
        with self._busy_cond:
            while self._busy and time.monotonic() < deadline:
                self._busy_cond.wait(max(0.0, deadline - time.monotonic()))
            if self._busy:
                log.warning("exiting with %d request(s) still running", self._busy)
        if self.store is not None:
            if self._unmount_on_exit:
                self._unmount_all()
            with contextlib.suppress(Exception):
                self.store.close()
            self.store = None
        with self._conns_lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
        self._release()
        log.info("snapshotter (pid %d) stopped", os.getpid())

    def _unmount_all(self) -> None:
        store = self.store
        assert store is not None
        names = [i.name for i in store.walk() if REMOTE_LABEL in i.labels]
        # children before parents: a layer's mount may be the lower dir of a later one only
        # inside overlays, which are not ours, but keep the reverse order anyway
        for name in reversed(names):
            try:
                mp = store.path(name)
            except SnapshotNotFound:
                continue
            try:
                self.mounter.unmount(mp)
                log.info("unmounted remote snapshot %r (%s)", name, mp)
            except IpfsnapError as exc:
                log.error("cannot unmount remote snapshot %r at %s: %s", name, mp, exc)
        # workers whose snapshot row is gone (a crash between mount and commit)
        root = str(self.root) + os.sep
        for st in self.mounter.all_status():
            orphan = str(st.get("mountpoint", ""))
            if orphan.startswith(root) and is_mountpoint(Path(orphan)):
                try:
                    self.mounter.unmount(Path(orphan))
                    log.info("unmounted orphan lazy layer at %s", orphan)
                except IpfsnapError as exc:
                    log.error("cannot unmount orphan lazy layer at %s: %s", orphan, exc)

    def _release(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)
            self._lock_fd = None
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1


def serve(config: Config, *, extra: Mapping[str, Any] | None = None) -> int:
    """Run a snapshotter for ``config`` in this process until it is stopped."""
    os.umask(PRIVATE_UMASK)  # before the mounter starts its spare worker
    mounter = LayerMounter(config, extra=extra) if extra else None
    return Daemon(config, mounter=mounter).run()
