"""Where the snapshotter keeps its files under a state dir.

::

    <state>/snapshotter.sock     the unix socket of the CLI API (0600)
    <state>/snapshotter.pid      pid file, fcntl-locked while a snapshotter runs
    <state>/snapshotter.log      log of a snapshotter started on demand
    <state>/snapshots/stargz/    the snapshot store the snapshotter serves (metadata.db, ...)
    <state>/fs/workers/<id>/     one run dir per lazy layer (spec, status, worker log)
    <state>/fs/cache/<layer>/    verified chunks of each lazy layer (survive restarts)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
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


def lock_holder(state_dir: Path) -> int | None:
    """The pid of the snapshotter holding ``state_dir``'s lock, or None if none does."""
    try:
        fd = os.open(pid_path(state_dir), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            with contextlib.suppress(OSError, ValueError):
                return int(os.read(fd, 64).decode().strip() or "0") or -1
            return -1  # held, pid not written yet
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
