"""Mounting containerd-style :class:`Mount` lists with mount(2), and unmounting.

Overlay option strings are passed to the kernel as mount(2)'s ``data`` argument, which the
kernel copies as at most one page (``PAGE_SIZE``, 4096 bytes here), so a long ``lowerdir=``
list of absolute paths does not fit past a few dozen layers. As containerd does, when the
data would not fit we rewrite every overlay directory relative to their common parent
directory (for a snapshot store that is ``<root>/snapshots``, so a layer costs ``"<id>/fs:"``,
about 7 bytes, instead of the full path) and perform the mount with that directory as the
working directory. Changing the working directory of this (possibly multi-threaded) process
would race with other threads, so that mount runs in a child process: ``/bin/mount`` started
with ``cwd=`` the common directory (the kernel resolves relative overlay paths against the
calling process's cwd at mount time; they are not re-resolved later).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from ipfsnap.snapshot.errors import SnapshotMountError
from ipfsnap.snapshot.types import Mount

log = logging.getLogger(__name__)

# mount(2) flags from <linux/mount.h>.
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
# umount2(2) flag: detach now, finish when no longer busy.
MNT_DETACH = 2

#: The kernel copies at most one page of mount data (fs/namespace.c copy_mount_options).
PAGE_SIZE = os.sysconf("SC_PAGESIZE")

# option -> (flags to set, flags to clear); everything else is filesystem data.
_FLAG_OPTIONS: dict[str, tuple[int, int]] = {
    "ro": (MS_RDONLY, 0),
    "rw": (0, MS_RDONLY),
    "bind": (MS_BIND, 0),
    "rbind": (MS_BIND | MS_REC, 0),
    "nosuid": (MS_NOSUID, 0),
    "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0),
    "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0),
    "exec": (0, MS_NOEXEC),
}

_OVERLAY_DIR_KEYS = ("lowerdir", "upperdir", "workdir")

# dlopen(NULL): the C library this interpreter is linked with. ctypes.util.find_library
# would run ``ldconfig -p`` in a subprocess at every import (5-40 ms on the CLI's path).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _sys_mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    rc = _libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype is not None else None,
        flags,
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise SnapshotMountError(
            f"mount {fstype or 'bind'} {source} on {target} failed: {os.strerror(err)}"
        )


def parse_options(options: Iterable[str]) -> tuple[int, list[str]]:
    """Split mount options into mount(2) flags and filesystem data options."""
    flags = 0
    data: list[str] = []
    for opt in options:
        if opt in _FLAG_OPTIONS:
            setf, clear = _FLAG_OPTIONS[opt]
            flags = (flags | setf) & ~clear
        else:
            data.append(opt)
    return flags, data


def compact_overlay_options(data: Sequence[str]) -> tuple[str, list[str]]:
    """Rewrite overlay dir options relative to their common parent directory.

    Returns (common directory, rewritten options). Non-directory options are kept as is.
    """
    dirs: list[str] = []
    for opt in data:
        key, _, value = opt.partition("=")
        if key == "lowerdir":
            dirs.extend(value.split(":"))
        elif key in _OVERLAY_DIR_KEYS:
            dirs.append(value)
    if not dirs or not all(os.path.isabs(d) for d in dirs):
        return "", list(data)
    common = os.path.commonpath(dirs)
    if common in dirs:
        # One dir is the parent of the others (never the case for a snapshot store);
        # relative paths would need "." which gains little: go one level up.
        common = os.path.dirname(common)
    out: list[str] = []
    for opt in data:
        key, _, value = opt.partition("=")
        if key == "lowerdir":
            out.append("lowerdir=" + ":".join(os.path.relpath(d, common) for d in value.split(":")))
        elif key in _OVERLAY_DIR_KEYS:
            out.append(f"{key}={os.path.relpath(value, common)}")
        else:
            out.append(opt)
    return common, out


def _mount_overlay(m: Mount, target: str) -> None:
    flags, data = parse_options(m.options)
    joined = ",".join(data)
    # +1: the terminating NUL is part of the copied page.
    if len(joined.encode()) + 1 <= PAGE_SIZE:
        _sys_mount(m.source or "overlay", target, m.type, flags, joined)
        return
    common, compact = compact_overlay_options(data)
    joined = ",".join(compact)
    if not common or len(joined.encode()) + 1 > PAGE_SIZE:
        raise SnapshotMountError(
            f"overlay mount on {target}: options are {len(joined.encode())} bytes even with "
            f"relative layer paths, more than the kernel's {PAGE_SIZE}-byte limit"
        )
    log.debug(
        "overlay on %s: %d-byte options, mounting relative to %s", target, len(joined), common
    )
    flag_opts = [name for name, (setf, _) in _FLAG_OPTIONS.items() if setf and flags & setf]
    flag_opts = [o for o in flag_opts if o not in ("bind", "rbind")]
    cmd = ["mount", "-t", m.type, "-o", ",".join([*flag_opts, joined]), m.source or "overlay"]
    cmd.append(target)
    proc = subprocess.run(cmd, cwd=common, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SnapshotMountError(
            f"mount overlay on {target} failed: {proc.stderr.strip() or proc.returncode}"
        )


def _mount_one(m: Mount, target: str) -> None:
    flags, data = parse_options(m.options)
    if m.type == "bind" or flags & MS_BIND:
        bind_flags = MS_BIND | (flags & MS_REC)
        _sys_mount(m.source, target, None, bind_flags, None)
        # A bind mount ignores every flag but MS_BIND/MS_REC: read-only etc. need a remount.
        extra = flags & (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        if extra:
            try:
                _sys_mount("", target, None, MS_REMOUNT | MS_BIND | extra, None)
            except SnapshotMountError:
                _umount(target, MNT_DETACH)
                raise
        return
    if m.type == "overlay":
        _mount_overlay(m, target)
        return
    _sys_mount(m.source, target, m.type, flags, ",".join(data))


#: overlay option: never sync the upper filesystem (Linux 5.10+). Without it, the unmount of
#: an overlay syncs the whole filesystem holding the upper dir (``ovl_sync_fs`` ->
#: ``sync_filesystem``): every dirty page of every process on it, 0.1-1 s on a busy host.
VOLATILE = "volatile"


def _with_volatile(m: Mount) -> Mount:
    if m.type != "overlay" or VOLATILE in m.options:
        return m
    if not any(o.startswith("upperdir=") for o in m.options):
        return m  # read-only overlay: nothing to sync anyway
    return Mount(m.type, m.source, [*m.options, VOLATILE])


def mount_all(mounts: Sequence[Mount], target: str | Path, *, volatile: bool = False) -> None:
    """Mount each of ``mounts`` on ``target``, in order; on failure undo the earlier ones.

    ``volatile``: writable overlays get the ``volatile`` option, for snapshots that are thrown
    away after use (``run --rm``): their upper dir is never synced, and after a crash the
    kernel refuses to mount it again without ``volatile`` (it is to be removed, not reused).
    A kernel without the option (EINVAL) mounts as without ``volatile``.
    """
    if volatile:
        fast = [_with_volatile(m) for m in mounts]
        if fast != list(mounts):
            try:
                _mount_list(fast, target)
                return
            except SnapshotMountError as exc:
                log.debug("volatile overlay on %s refused, mounting without: %s", target, exc)
    _mount_list(mounts, target)


def _mount_list(mounts: Sequence[Mount], target: str | Path) -> None:
    tgt = os.path.abspath(target)
    done = 0
    try:
        for m in mounts:
            _mount_one(m, tgt)
            done += 1
    except BaseException:
        for _ in range(done):
            try:
                _umount(tgt, MNT_DETACH)
            except SnapshotMountError as exc:
                log.warning("undoing mount on %s: %s", tgt, exc)
        raise


def _umount(target: str, flags: int) -> None:
    if _libc.umount2(target.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise SnapshotMountError(f"unmount {target} failed: {os.strerror(err)}")


def unmount(target: str | Path, *, lazy: bool = False, all_layers: bool = True) -> None:
    """Unmount ``target``; with ``all_layers`` also mounts stacked on it. Not mounted: no-op.

    ``lazy`` detaches a busy mount (MNT_DETACH) instead of failing with EBUSY.
    """
    tgt = os.path.abspath(target)
    while is_mountpoint(tgt):
        try:
            _umount(tgt, MNT_DETACH if lazy else 0)
        except SnapshotMountError:
            if ctypes.get_errno() == errno.EINVAL:  # raced: no longer a mount point
                return
            raise
        if not all_layers:
            return


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points() -> list[str]:
    """Every mount point of this mount namespace, in mount order."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [_unescape(line.split()[4]) for line in f if line.strip()]


def is_mountpoint(path: str | Path) -> bool:
    p = os.path.abspath(path)
    return p in mount_points()


def mounts_under(path: str | Path) -> list[str]:
    """Mount points at or below ``path``, deepest (most recent) first, for unmounting."""
    p = os.path.abspath(path)
    prefix = p.rstrip("/") + "/"
    found = [m for m in mount_points() if m == p or m.startswith(prefix)]
    return list(reversed(found))
