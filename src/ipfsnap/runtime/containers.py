"""Container records under ``<state_dir>/containers/<id>/`` and the run/rm lifecycle.

Layout of one container directory (it is also the OCI bundle)::

    state.json      the record: id, image, snapshot key, snapshotter, created, exit code...
    config.json     the runtime spec (runtime/spec.py)
    resolv.conf, hosts, hostname   bind mounted into the container's /etc
    rootfs/         the mountpoint of the container's snapshot
    log             stdout+stderr of a detached container
    monitor.log     messages of a detached container's monitor (runtime/monitor.py)

This module knows nothing about images or snapshots: the caller hands in a function that mounts
the rootfs (``mount_rootfs(target)``) and one that releases the snapshot given the record
(``release(record)``), so ``ipfsnap rm`` in another process can release it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from ipfsnap.errors import MountError, RuntimeFailure
from ipfsnap.runtime.errors import (
    BadRunOption,
    ContainerExists,
    ContainerNotFound,
    ContainerRunning,
    Interrupted,
    RuncError,
)
from ipfsnap.runtime.runc import FORWARDED_SIGNALS, Runc
from ipfsnap.runtime.spec import ContainerConfig, write_bundle
from ipfsnap.runtime.warm import ExecWarmer

log = logging.getLogger(__name__)

#: runc's own id rule (letters, digits, _ + - .), minus ids starting with '.' (hidden dirs,
#: "..") and bounded so the id stays a sane file name
_ID_RE = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,127}$")

#: umount2 flag: detach now, finish when the mount is no longer busy
_MNT_DETACH = 2

RECORD = "state.json"


def validate_id(container_id: str) -> str:
    if not _ID_RE.match(container_id):
        raise BadRunOption(
            f"container id {container_id!r}: use 1-128 of A-Z a-z 0-9 _ + - . (not starting with .)"
        )
    return container_id


@dataclass
class ContainerRecord:
    """The persistent description of a container (``state.json``)."""

    id: str
    image: str = ""
    snapshot_key: str = ""
    snapshotter: str = ""
    created: str = ""
    detached: bool = False
    rm: bool = False
    args: list[str] = field(default_factory=list)
    #: set when the container ended: by the foreground run, or by a detached container's
    #: monitor (None if it is still running or its monitor was killed)
    exit_code: int | None = None
    #: when the container ended (ISO 8601 UTC; "" while it runs)
    finished: str = ""
    #: free-form data for the caller's release callback
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ContainerStatus:
    record: ContainerRecord
    #: created | running | paused | stopped (runc, exit status unknown) | exited (ended,
    #: ``record.exit_code`` set) | prepared
    status: str
    pid: int = 0


def _cgroup_prefix(state_dir: Path) -> str:
    # a per-state-dir hierarchy, so two instances never share (or clean up) each other's cgroups
    tag = hashlib.sha256(str(state_dir.absolute()).encode()).hexdigest()[:12]
    return f"ipfsnap-{tag}"


def mountinfo_targets() -> list[str]:
    """Mount points of this mount namespace (decoded from /proc/self/mountinfo)."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                out.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return out


def is_mountpoint(path: Path) -> bool:
    return str(path.absolute()) in set(mountinfo_targets())


def unmount_all(path: Path) -> None:
    """Unmount every mount stacked on ``path`` (lazily if it is busy)."""
    libc = ctypes.CDLL(None, use_errno=True)  # libc; find_library would run ldconfig
    target = str(path.absolute()).encode()
    for _ in range(64):  # bounded: a mountpoint never carries more than a few stacked mounts
        if not is_mountpoint(path):
            return
        if libc.umount2(target, 0) != 0:
            err = ctypes.get_errno()
            if err == errno.EBUSY and libc.umount2(target, _MNT_DETACH) == 0:
                continue
            if err == errno.EINVAL:  # not a mountpoint any more
                return
            raise MountError(f"unmount {path}: {os.strerror(err)}")
    raise MountError(f"unmount {path}: still mounted after 64 unmounts")


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While preparing a container, turn SIGTERM/SIGHUP/SIGINT into :class:`Interrupted`, so
    ``finally`` blocks run (Python's default SIGTERM action would end the process without
    them, leaving mounts and snapshots behind). Only possible in the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    sigs = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold back forwardable signals (Ctrl-C...) so cleanup is not interrupted halfway; they
    are dropped afterwards, having already caused the container to stop."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    try:
        yield
    finally:
        pending = signal.sigpending() & FORWARDED_SIGNALS
        if pending:
            log.debug("signals during cleanup: %s", sorted(int(s) for s in pending))
            while signal.sigtimedwait(pending, 0) is not None:
                pass
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def locked_dir(path: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on directory ``path``; yields False if it does not exist.

    The monitor writes a container's exit status and ``ipfsnap rm`` removes the container
    under this lock, so the two never interleave.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # releases the lock


Release = Callable[[ContainerRecord], None]
MountRootfs = Callable[[Path], None]


class ContainerStore:
    """Container records and their runc state for one ipfsnap state dir."""

    def __init__(self, state_dir: Path, runc_binary: str = "runc") -> None:
        self.state_dir = state_dir.absolute()
        self.root = self.state_dir / "containers"
        self.runc = Runc(self.state_dir, runc_binary)
        self.cgroup_prefix = _cgroup_prefix(self.state_dir)

    # -- records ------------------------------------------------------------------------------

    def path(self, container_id: str) -> Path:
        return self.root / validate_id(container_id)

    def rootfs(self, container_id: str) -> Path:
        return self.path(container_id) / "rootfs"

    def log_path(self, container_id: str) -> Path:
        return self.path(container_id) / "log"

    def cgroups_path(self, container_id: str) -> str:
        return f"/{self.cgroup_prefix}/{container_id}"

    def create(self, container_id: str, **fields: Any) -> ContainerRecord:
        """Reserve ``container_id`` (atomically: mkdir) and write its record."""
        d = self.path(container_id)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.runc.state(container_id) is not None:
            raise ContainerExists(f"container {container_id}: id already in use (runc knows it)")
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            raise ContainerExists(f"container {container_id}: id already in use") from None
        (d / "rootfs").mkdir()
        record = ContainerRecord(
            id=container_id,
            created=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            **fields,
        )
        self.save(record)
        return record

    def save(self, record: ContainerRecord) -> None:
        d = self.path(record.id)
        tmp = d / (RECORD + ".tmp")
        tmp.write_text(json.dumps(asdict(record), indent=2, sort_keys=True))
        os.replace(tmp, d / RECORD)

    def load(self, container_id: str) -> ContainerRecord:
        p = self.path(container_id) / RECORD
        try:
            doc = json.loads(p.read_text())
        except FileNotFoundError:
            raise ContainerNotFound(f"container {container_id}: no such container") from None
        except (OSError, ValueError) as exc:
            raise RuntimeFailure(f"container {container_id}: unreadable record {p}: {exc}") from exc
        known = set(ContainerRecord.__dataclass_fields__)
        return ContainerRecord(**{k: v for k, v in doc.items() if k in known})

    def ids(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / RECORD).exists())

    def status(self, container_id: str) -> ContainerStatus:
        record = self.load(container_id)
        st = self.runc.state(container_id)
        if st is not None and not (st.status == "stopped" and record.exit_code is not None):
            return ContainerStatus(record, st.status, st.pid)
        if record.exit_code is not None:
            return ContainerStatus(record, "exited")
        return ContainerStatus(record, "stopped" if record.detached else "prepared")

    def list(self) -> list[ContainerStatus]:
        out = []
        for cid in self.ids():
            with contextlib.suppress(ContainerNotFound):
                out.append(self.status(cid))
        return out

    # -- teardown -----------------------------------------------------------------------------

    def destroy(
        self, container_id: str, release: Release | None = None, *, force: bool = False
    ) -> None:
        """Delete the runc container, unmount the rootfs, release the snapshot, drop the record.

        Without ``force`` a running (or paused) container is refused.
        """
        d = self.path(container_id)
        try:
            record: ContainerRecord | None = self.load(container_id)
        except ContainerNotFound:
            record = None
            if not d.exists() and self.runc.state(container_id) is None:
                raise
        st = self.runc.state(container_id)
        if st is not None:
            if st.status in ("running", "paused") and not force:
                raise ContainerRunning(
                    f"container {container_id}: is {st.status} (stop it, or rm -f)"
                )
            if st.status in ("running", "paused", "created"):
                with contextlib.suppress(RuntimeFailure):
                    self.runc.kill(container_id, signal.SIGKILL, all_processes=True)
            self.runc.delete(container_id, force=True)
        rootfs = d / "rootfs"
        if rootfs.exists():
            unmount_all(rootfs)
        if record is not None and release is not None:
            release(record)
        # the monitor of a detached container may be writing its exit status right now
        with locked_dir(d):
            shutil.rmtree(d, ignore_errors=True)
        self._remove_cgroup_prefix()
        log.debug("container %s removed", container_id)

    def _remove_cgroup_prefix(self) -> None:
        # runc removes the container's own cgroup; the per-state-dir parent it created stays
        # behind. Remove it when empty (rmdir fails harmlessly while other containers use it).
        base = Path("/sys/fs/cgroup")
        candidates = [base / self.cgroup_prefix]
        with contextlib.suppress(OSError):
            candidates += [c / self.cgroup_prefix for c in base.iterdir() if c.is_dir()]
        for c in candidates:
            with contextlib.suppress(OSError):
                c.rmdir()

    # -- run ----------------------------------------------------------------------------------

    def run(
        self,
        record: ContainerRecord,
        cfg: ContainerConfig,
        *,
        mount_rootfs: MountRootfs,
        release: Release | None = None,
        stdin: IO[Any] | int | None = None,
        stdout: IO[Any] | int | None = None,
        stderr: IO[Any] | int | None = None,
        warm_bytes: int = 0,
        warm_start_files: bool = True,
    ) -> int:
        """Mount the rootfs, write the bundle and run the container created by :meth:`create`.

        Foreground (``record.detached`` false): returns the container's exit status; with
        ``record.rm`` everything is removed afterwards, also when a step fails or the run is
        interrupted. Detached: returns 0 once runc has started the container; a failure to
        start removes it again.

        ``warm_bytes`` > 0: once the rootfs is mounted, up to that many bytes of the files the
        command's exec reads (executable, interpreter, shared libraries) are read ahead, while
        the bundle is written and runc starts (runtime/warm.py; for lazily mounted rootfs),
        with ``warm_start_files`` also what the program's start reads next
        (runtime/startfiles.py).
        """
        d = self.path(record.id)
        started = False
        warmer: ExecWarmer | None = None
        with signals_raise():
            try:
                if record.detached and cfg.tty:
                    raise BadRunOption("-d with -t: a detached container cannot have a terminal")
                if record.detached and record.rm:
                    raise BadRunOption("-d with --rm: no monitor would remove it; use rm later")
                mount_rootfs(d / "rootfs")
                if warm_bytes > 0:
                    warmer = ExecWarmer(d / "rootfs", warm_bytes, name=f"container {record.id}",
                                        start_files=warm_start_files)
                    warmer.start(cfg.args, cfg.env, cfg.cwd)
                write_bundle(
                    d,
                    cfg,
                    container_id=record.id,
                    rootfs=d / "rootfs",
                    cgroups_path=self.cgroups_path(record.id),
                )
                if record.detached:
                    self._start_monitored(record.id)
                    started = True
                    return 0
                # forwardable signals are blocked and passed on to runc in there
                code = self.runc.run_foreground(
                    record.id, d, stdin=stdin, stdout=stdout, stderr=stderr
                )
                started = True
                record.exit_code = code
                self.save(record)
                return code
            finally:
                if warmer is not None:
                    # its open files would keep the rootfs busy at removal
                    warmer.stop()
                if record.rm or not started:
                    with signals_deferred():
                        self.destroy(record.id, release, force=True)

    def _start_monitored(self, container_id: str) -> int:
        """Start a detached container under its monitor (runtime/monitor.py), which records
        its exit status; returns the container's init pid once runc has started it."""
        d = self.path(container_id)
        r, w = os.pipe()
        try:
            with open(d / "monitor.log", "ab") as mlog:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "ipfsnap.runtime.monitor", str(self.state_dir),
                     container_id, self.runc.binary, str(w)],
                    pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=mlog, stderr=mlog,
                    start_new_session=True, cwd="/",
                )
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        # the first monitor process forks the real one and exits at once
        with os.fdopen(r, "r", encoding="utf-8") as ready:
            proc.wait()
            # one line once runc has started it (runc's calls are bounded), or EOF if the
            # monitor died
            answer = ready.readline().strip()
            word, _, rest = answer.partition(" ")
            if word == "error":
                ready.read()  # EOF: the monitor has exited (see monitor.monitor)
        if word == "ok":
            return int(rest)
        if word == "error":
            raise RuncError(rest)
        raise RuncError(
            f"container {container_id}: its monitor exited (status {proc.returncode}) "
            f"before starting it (see {d / 'monitor.log'})"
        )
