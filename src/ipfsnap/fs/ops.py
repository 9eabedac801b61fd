"""The FUSE adapter: pyfuse3 operations over a :class:`LazyLayer`.

It only adapts. Every handler goes through :func:`fuse_errors`, the ONE place where
exceptions become errno values (and are logged, once).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from ipfsnap.errors import (
    FormatError,
    IntegrityError,
    IPFSError,
    IpfsnapError,
    NotFoundError,
)
from ipfsnap.fs.inodes import Inode
from ipfsnap.fs.layer import LazyLayer
from ipfsnap.fs.spec import DEFAULT_READ_AHEAD_KB

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
Ctx = pyfuse3.RequestContext | None

#: st_blksize reported: 128 KiB, the kernel's default FUSE read size, so tools like cp
#: ask for reads the kernel can pass through in one request
BLOCK_SIZE = 128 * 1024


#: where the kernel lists mounts (device numbers) and backing devices (read-ahead)
MOUNTINFO = Path("/proc/self/mountinfo")
BDI_ROOT = Path("/sys/class/bdi")


def _unescape_mountinfo(field: str) -> str:
    """Undo mountinfo's octal escapes (space, tab, newline, backslash as ``\\NNN``)."""
    if "\\" not in field:
        return field
    out = bytearray()
    i = 0
    raw = field.encode("utf-8", "surrogateescape")
    while i < len(raw):
        if raw[i] == 0x5C and i + 4 <= len(raw) and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8) & 0xFF)
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def fuse_device(mountpoint: str, mountinfo: str | None = None) -> str | None:
    """``major:minor`` of the FUSE filesystem mounted at ``mountpoint`` (the topmost one),
    from mountinfo: no request reaches the mount, so its own handlers may call this."""
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text(encoding="utf-8", errors="surrogateescape")
        except OSError:
            return None
    target = os.path.abspath(mountpoint)
    found = None
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if not sep or len(fields) < 5 or not tail.startswith("fuse"):
            continue
        if _unescape_mountinfo(fields[4]) == target:
            found = fields[2]
    return found


def set_read_ahead(mountpoint: str, kib: int, *, bdi_root: Path = BDI_ROOT,
                   mountinfo: str | None = None) -> bool:
    """Set the kernel read-ahead (KiB) of the FUSE mount at ``mountpoint``; whether it took.

    Must run after the FUSE INIT exchange: the kernel lowers the mount's read-ahead to what
    INIT negotiated (at most its 128 KiB default), so a value set before is lost. Needs root
    (sysfs); failing only costs throughput, so it is logged, never raised."""
    dev = fuse_device(mountpoint, mountinfo)
    if dev is None:
        log.warning("%s: no FUSE mount found in %s; read-ahead left at the kernel default",
                    mountpoint, MOUNTINFO)
        return False
    path = bdi_root / dev / "read_ahead_kb"
    try:
        path.write_text(f"{kib}\n", encoding="ascii")
        got = int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError) as exc:
        log.warning("%s: cannot set read-ahead to %d KiB through %s: %s", mountpoint, kib,
                    path, exc)
        return False
    log.debug("%s: kernel read-ahead %d KiB (%s)", mountpoint, got, path)
    return got == kib


def errno_for(exc: BaseException) -> int:
    """The errno a FUSE request fails with for ``exc``."""
    if isinstance(exc, pyfuse3.FUSEError):
        return int(exc.errno)
    if isinstance(exc, NotFoundError):
        return errno.ENOENT
    if isinstance(exc, (IntegrityError, IPFSError, FormatError, IpfsnapError)):
        return errno.EIO
    if isinstance(exc, trio.TooSlowError):
        return errno.ETIMEDOUT
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def fuse_errors(
    fn: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn any exception of a handler into ``FUSEError(errno)``, logging real failures."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise  # an expected answer (ENOENT on lookup, ENODATA on getxattr ...)
        except Exception as exc:
            code = errno_for(exc)
            if isinstance(exc, IpfsnapError):
                log.error("%s: %s (-> %s)", fn.__name__, exc, errno.errorcode.get(code, code))
            else:
                log.exception("%s: unexpected error (-> %s)", fn.__name__,
                              errno.errorcode.get(code, code))
            raise pyfuse3.FUSEError(code) from None

    return wrapper


class LayerOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, layer: LazyLayer, *, attr_timeout: float = 1.0,
                 entry_timeout: float = 1.0, direct_io: bool = False, mountpoint: str = "",
                 read_ahead_kb: int = DEFAULT_READ_AHEAD_KB) -> None:
        super().__init__()
        self.layer = layer
        self.table = layer.table
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self.direct_io = direct_io
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}
        self._next_fh = 1
        self._debug = log.isEnabledFor(logging.DEBUG)
        self._total_size = -1
        self.mountpoint = mountpoint
        self.read_ahead_kb = read_ahead_kb
        #: read-ahead still to set: on the first open, which the kernel sends only after
        #: INIT (see :func:`set_read_ahead`) and before any read
        self._tune_pending = bool(mountpoint) and read_ahead_kb > 0

    # -- helpers --------------------------------------------------------------------------
    def _node(self, ino: int) -> Inode:
        node = self.table.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def attrs(self, node: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = self.entry_timeout
        a.attr_timeout = self.attr_timeout
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.rdev
        a.st_size = node.size
        a.st_blksize = BLOCK_SIZE
        a.st_blocks = (node.size + 511) // 512
        a.st_atime_ns = node.mtime_ns
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.mtime_ns
        return a

    # -- metadata -------------------------------------------------------------------------
    @fuse_errors
    async def getattr(self, inode: int, ctx: Ctx = None) -> pyfuse3.EntryAttributes:
        return self.attrs(self._node(inode))

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Ctx = None
                     ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if parent.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self.attrs(parent)
        if name == b"..":
            up = parent.path.rpartition("/")[0] if "/" in parent.path else ""
            up_ino = self.table.by_path.get(up, pyfuse3.ROOT_INODE)
            return self.attrs(self._node(up_ino))
        ino = parent.children.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs(self._node(ino))

    @fuse_errors
    async def opendir(self, inode: int, ctx: Ctx = None) -> int:
        node = self._node(inode)
        if node.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        # a snapshot per handle: readdir is resumed by index, O(1) per entry
        self._dirs[fh] = list(node.children.items())
        return fh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = self._dirs.get(fh)
        if entries is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            if not pyfuse3.readdir_reply(token, name, self.attrs(self._node(ino)), i + 1):
                break

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @fuse_errors
    async def readlink(self, inode: int, ctx: Ctx = None) -> bytes:
        node = self._node(inode)
        if not (node.mode & 0o170000) == 0o120000:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Ctx = None) -> bytes:
        node = self._node(inode)
        key = os.fsdecode(name)
        if node.xattrs is None or key not in node.xattrs:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return node.xattrs[key]

    @fuse_errors
    async def listxattr(self, inode: int, ctx: Ctx = None) -> list[bytes]:
        node = self._node(inode)
        return [os.fsencode(k) for k in (node.xattrs or {})]

    @fuse_errors
    async def statfs(self, ctx: Ctx = None) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = BLOCK_SIZE
        st.f_frsize = BLOCK_SIZE
        if self._total_size < 0:
            self._total_size = sum(n.size for n in self.table.inodes if n is not None and n.is_reg)
        total = self._total_size
        st.f_blocks = (total + BLOCK_SIZE - 1) // BLOCK_SIZE
        st.f_bfree = 0
        st.f_bavail = 0
        st.f_files = len(self.table)
        st.f_ffree = 0
        st.f_favail = 0
        st.f_namemax = 255
        return st

    # -- files ----------------------------------------------------------------------------
    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Ctx = None) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if not node.is_reg:
            raise pyfuse3.FUSEError(errno.EISDIR if node.children is not None else errno.EINVAL)
        if self._tune_pending:
            self._tune_pending = False
            set_read_ahead(self.mountpoint, self.read_ahead_kb)
        # content is immutable (named by digests): the page cache may keep it across opens.
        # direct_io (off by default) bypasses the page cache, and with libfuse 3.14 also
        # forbids shared mmap, which exec of binaries needs: only for benchmarks.
        if self.direct_io:
            return pyfuse3.FileInfo(fh=inode, direct_io=True)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if self._debug:
            log.debug("read inode %d offset %d size %d", fh, off, size)
        return await self.layer.read(self._node(fh), off, size)

    @fuse_errors
    async def release(self, fh: int) -> None:
        return None

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: Ctx = None) -> bool:
        # default_permissions makes the kernel check modes; only writes are refused here
        return not mode & os.W_OK

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None  # inodes live as long as the mount
