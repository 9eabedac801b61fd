"""Where the snapshotter keeps its files under a state dir.

::

    <state>/snapshotter.sock     the unix socket of the CLI API (0600)
    <state>/snapshotter.pid      pid file, locked (fcntl F_SETLK) while a snapshotter runs
    <state>/snapshotter.log      log of a snapshotter started on demand
    <state>/snapshots/stargz/    the snapshot store the snapshotter serves (metadata.db, ...)
    <state>/fs/workers/<id>/     one run dir per lazy layer (spec, status, worker log)
    <state>/fs/cache/<layer>/    verified chunks of each lazy layer (survive restarts)
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

from ipfsnap.image.snapshotters import SNAPSHOTS_DIR, STARGZ, snapshotter_root

SOCKET_NAME = "snapshotter.sock"
PID_NAME = "snapshotter.pid"
LOG_NAME = "snapshotter.log"

#: the store of the lazy (stargz) snapshotter, relative to the state dir (the one definition
#: of the snapshotters' roots is :mod:`ipfsnap.image.snapshotters`)
STARGZ_ROOT = Path(SNAPSHOTS_DIR) / STARGZ


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


def pid_path(state_dir: Path) -> Path:
    return state_dir / PID_NAME


def log_path(state_dir: Path) -> Path:
    return state_dir / LOG_NAME


def stargz_root(state_dir: Path) -> Path:
    return snapshotter_root(state_dir, STARGZ)


#: unix socket paths are limited to 108 bytes (sun_path) including the NUL
_SUN_PATH_MAX = 107


def socket_address(path: Path) -> tuple[str, int | None]:
    """An address to bind/connect ``path`` by, and a directory fd to close afterwards.

    A path too long for ``sun_path`` is reached through ``/proc/self/fd/<dirfd>/<name>``, which
    the kernel resolves like the real directory (deep test or state dirs still work).
    """
    text = os.fspath(path)
    if len(os.fsencode(text)) <= _SUN_PATH_MAX:
        return text, None
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{path.name}", fd


#: struct flock on Linux x86_64/arm64: short l_type, short l_whence, off_t l_start,
#: off_t l_len, pid_t l_pid (+ padding to 32 bytes)
_FLOCK = "hhqqi4x"


def take_lock(fd: int) -> bool:
    """Take the snapshotter lock on ``fd`` (open for writing); False if another holds it.

    A POSIX record lock (not flock): :func:`lock_holder` can then *test* it with F_GETLK,
    which takes nothing, so probing never makes a starting daemon fail to lock; and it names
    the holder's pid; and it is never inherited by the worker processes the daemon forks.
    """
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


def lock_holder(state_dir: Path) -> int | None:
    """The pid of the snapshotter holding ``state_dir``'s lock, or None if none does."""
    try:
        fd = os.open(pid_path(state_dir), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        l_type, _, _, _, l_pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    finally:
        os.close(fd)
    if l_type == fcntl.F_UNLCK:
        return None
    return int(l_pid) if l_pid > 0 else -1
