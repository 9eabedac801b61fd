"""Unpack a layer tar stream into a snapshot directory, safely.

The stream may be an uncompressed tar, gzip (also multi-member, as eStargz) or zstd (also
multi-frame, as zstd:chunked); the format is detected by its magic bytes. The diffID (sha256
of the uncompressed tar) is computed while streaming.

OCI whiteouts become overlayfs ones: ``.wh.<name>`` -> a 0/0 character device ``<name>``,
``.wh..wh..opq`` -> xattr ``trusted.overlay.opaque=y`` on its directory.

Safety: the layer is hostile input. Names with a ``..`` component or starting with ``/``
are rejected. Every path is resolved one component at a time from a file descriptor of the
snapshot directory, opening each directory with ``O_NOFOLLOW`` relative to its parent
(``dir_fd``), and each final component is created with ``*at`` calls relative to its
parent's descriptor; an existing final component is removed (unlinked, never followed)
before it is replaced. So no symlink, planted by an earlier entry or otherwise, is ever
followed while writing, and nothing can be created outside the directory. Hardlinks must
name an entry inside the directory that is not a directory and not a symlink pointing
outside. ``trusted.overlay.*`` xattrs from the layer are dropped: they would steer overlayfs
(opaque, redirect, metacopy) in ways only the unpacker may decide. Sizes are bounded (the
uncompressed stream, each entry's claimed size, the bytes written, the entry count), so a
compression bomb or a header claiming a terabyte stops at the limit. On any error the
partial output is removed and one error names the layer and the entry.
"""

from __future__ import annotations

import contextlib
import decimal
import errno
import gzip
import hashlib
import io
import logging
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, cast

import zstandard

from ipfsnap.errors import IpfsnapError
from ipfsnap.estargz.types import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME
from ipfsnap.oci.tarheaders import MAX_SPECIAL_HEADER, BoundedTarInfo, EndGuard  # noqa: F401 (its bound, named by tests from here)
from ipfsnap.snapshot.errors import (
    DiffIDMismatch,
    LayerFormatError,
    LayerTooLarge,
    LayerUnsafeEntry,
    LayerWriteError,
)
from ipfsnap.whiteouts import OPAQUE_WHITEOUT, OPAQUE_XATTR, WHITEOUT_PREFIX

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: The entries an eStargz layer adds to the image's files (TOC and prefetch landmarks).
ESTARGZ_METADATA = frozenset({TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})
_GIB = 1 << 30
# Copy buffer: large enough to amortise syscalls, small enough to stay cache-friendly.
_COPY_CHUNK = 1 << 20
# Directory lookups never follow a symlink; O_PATH-free so the fd can be used for fchown.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Decimal digits of the integer part of the largest settable mtime in seconds:
# (2**63 - 1) ns is about 9.2e18 ns = 9.2e9 s, ten digits.
_MTIME_MAX_DIGITS = 10


@dataclass(frozen=True)
class ApplyLimits:
    """Bounds for hostile layers; all configurable."""

    #: uncompressed tar bytes (and, separately, file bytes written; sparse files count
    #: their full size). 64 GiB is far above real images (the python image is ~0.6 GiB).
    max_size: int = 64 * _GIB
    max_entries: int = 4_000_000
    #: PATH_MAX on Linux.
    max_name_length: int = 4096


DEFAULT_APPLY_LIMITS = ApplyLimits()


@dataclass(frozen=True)
class ApplyResult:
    diff_id: str  # "sha256:<hex>" of the uncompressed tar
    size: int  # uncompressed tar bytes


class _HashingReader(io.RawIOBase):
    """Counts and hashes what is read from ``inner``; fails past ``limit`` bytes."""

    def __init__(self, inner: IO[bytes], limit: int, layer: str) -> None:
        self.inner = inner
        self.limit = limit
        self.layer = layer
        self.hash = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = _COPY_CHUNK
        # Never ask for more than one byte beyond the limit: a bomb is noticed while it
        # is still being decompressed, not after.
        n = min(n, self.limit + 1 - self.count)
        data = self.inner.read(n) if n > 0 else b""
        self.count += len(data)
        if self.count > self.limit:
            raise LayerTooLarge(
                f"layer {self.layer}: uncompressed size exceeds the limit of {self.limit} bytes"
            )
        self.hash.update(data)
        return data

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class _Prefixed(io.RawIOBase):
    """``head`` followed by the rest of ``inner`` (for sniffing magic bytes)."""

    def __init__(self, head: bytes, inner: BinaryIO) -> None:
        self.head = head
        self.inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.head:
            n = min(len(b), len(self.head))
            b[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.inner.read(len(b))
        b[: len(data)] = data
        return len(data)


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = stream.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def decompressed(stream: BinaryIO) -> tuple[str, IO[bytes]]:
    """Detect the compression of ``stream`` by magic; return (name, uncompressed reader)."""
    head = _read_exactly(stream, len(ZSTD_MAGIC))
    raw = io.BufferedReader(_Prefixed(head, stream), buffer_size=_COPY_CHUNK)
    if head.startswith(GZIP_MAGIC):
        return "gzip", cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
    if head == ZSTD_MAGIC:
        reader = zstandard.ZstdDecompressor().stream_reader(
            raw, read_across_frames=True, closefd=False
        )
        return "zstd", reader
    return "none", raw


def _clean_parts(name: str, layer: str, what: str = "entry") -> list[str]:
    """Split a tar name into components, rejecting absolute names and ``..``."""
    if "\x00" in name:
        raise LayerUnsafeEntry(f"layer {layer}: {what} {name!r}: NUL in name")
    if name.startswith("/"):
        raise LayerUnsafeEntry(f"layer {layer}: {what} {name!r}: absolute name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerUnsafeEntry(f"layer {layer}: {what} {name!r}: name contains '..'")
    return parts


def _symlink_escapes(link_parts: list[str], target: str) -> bool:
    """Whether symlink ``link_parts`` with text ``target`` resolves (lexically) outside the
    layer root. Absolute targets count as outside: on the host they are."""
    if target.startswith("/"):
        return True
    depth = len(link_parts) - 1  # directory holding the link
    for comp in target.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            depth -= 1
            if depth < 0:
                return True
        else:
            depth += 1
    return False


class _Writer:
    def __init__(
        self,
        root_fd: int,
        layer: str,
        limits: ApplyLimits,
        parent_fds: Sequence[int] = (),
        skip: Collection[str] = (),
    ) -> None:
        self.root_fd = root_fd
        self.skip = skip
        self._cached: tuple[tuple[str, ...], int] | None = None
        self.parent_fds = parent_fds
        self.layer = layer
        self.limits = limits
        self.written = 0
        # (parts, atime_ns, mtime_ns) of directories: set last, since writing their
        # children changes them.
        self.dir_times: list[tuple[list[str], int, int]] = []

    def err(self, name: str, problem: str) -> str:
        return f"layer {self.layer}: entry {name!r}: {problem}"

    @contextlib.contextmanager
    def parent(self, parts: list[str], name: str, create: bool = True) -> Iterator[int]:
        """Yield an fd of the directory ``parts`` (creating missing ones), never following
        a symlink. The last one is cached (tar entries come directory by directory); any
        removal in the tree drops the cache, so a cached fd never outlives its path."""
        key = tuple(parts)
        if self._cached is not None and self._cached[0] == key:
            # A duplicate: callers nest parent() (a hardlink's target dir inside its own
            # dir), and the cache may move on while the outer fd is still in use.
            fd = os.dup(self._cached[1])
            try:
                yield fd
            finally:
                os.close(fd)
            return
        fd = os.dup(self.root_fd)
        try:
            for i, comp in enumerate(parts):
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                    self.implied_dir(nfd, parts[: i + 1])
                except OSError as exc:
                    st = os.stat(comp, dir_fd=fd, follow_symlinks=False)
                    where = "/".join(parts[: i + 1])
                    if stat.S_ISLNK(st.st_mode):
                        raise LayerUnsafeEntry(
                            self.err(name, f"would be written through symlink {where!r}")
                        ) from exc
                    raise LayerFormatError(
                        self.err(name, f"parent {where!r} is not a directory")
                    ) from exc
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        try:
            self.drop_cache()
            self._cached = (key, os.dup(fd))
            yield fd
        finally:
            os.close(fd)

    def drop_cache(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def implied_dir(self, fd: int, parts: list[str]) -> None:
        """Give a directory the layer implies (no entry of its own) the metadata of the
        same directory in the nearest lower layer, so that it does not mask that one's
        mode and owner in the merged view (as containerd does)."""
        for pfd in self.parent_fds:
            cur = os.dup(pfd)
            try:
                for comp in parts:
                    nxt = os.open(comp, _DIR_FLAGS, dir_fd=cur)
                    os.close(cur)
                    cur = nxt
                st = os.fstat(cur)
            except OSError:
                continue  # not in this lower layer (or not a plain directory path)
            finally:
                os.close(cur)
            os.fchown(fd, st.st_uid, st.st_gid)
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
            self.dir_times.append((list(parts), st.st_atime_ns, st.st_mtime_ns))
            return

    def clear(self, dfd: int, base: str, keep_dir: bool) -> bool:
        """Remove ``base`` in ``dfd`` unless it is a directory and ``keep_dir``; return
        whether a (kept) directory exists."""
        try:
            st = os.stat(base, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            self.drop_cache()
            shutil.rmtree(base, dir_fd=dfd)
        else:
            os.unlink(base, dir_fd=dfd)
        return False

    def meta_fd(self, fd: int, m: tarfile.TarInfo) -> None:
        # chown first: it clears setuid/setgid, which chmod then sets.
        os.fchown(fd, m.uid, m.gid)
        os.fchmod(fd, m.mode & 0o7777)
        for k, v in self.xattrs(m):
            self.setxattr(fd, k, v, m, special=False)

    def setxattr(
        self, target: int | str, k: str, v: bytes, m: tarfile.TarInfo, special: bool
    ) -> None:
        try:
            if isinstance(target, int):
                os.setxattr(target, k, v)
            else:
                os.setxattr(target, k, v, follow_symlinks=False)
        except OSError as exc:
            # As containerd: an xattr the filesystem does not support is skipped (with a
            # warning); so is one the kernel refuses on symlinks and device nodes (user.*
            # exists only on regular files and directories). Others fail the layer.
            if exc.errno == errno.ENOTSUP or (special and exc.errno == errno.EPERM):
                log.warning("%s", self.err(m.name, f"cannot set xattr {k!r}: {exc.strerror}"))
                return
            raise

    def meta_path(self, dfd: int, base: str, m: tarfile.TarInfo, chmod: bool) -> None:
        os.chown(base, m.uid, m.gid, dir_fd=dfd, follow_symlinks=False)
        if chmod:  # a node just created by us (not a symlink): following is harmless
            os.chmod(base, m.mode & 0o7777, dir_fd=dfd)
        # setxattr has no *at form: go through this process's fd table, not following
        # the final component.
        proc = f"/proc/self/fd/{dfd}/{base}"
        for k, v in self.xattrs(m):
            self.setxattr(proc, k, v, m, special=True)
        ns = self.mtime_ns(m)
        os.utime(base, ns=(ns, ns), dir_fd=dfd, follow_symlinks=False)

    def xattrs(self, m: tarfile.TarInfo) -> list[tuple[str, bytes]]:
        out = []
        for k, v in m.pax_headers.items():
            if not k.startswith("SCHILY.xattr."):
                continue
            name = k[len("SCHILY.xattr.") :]
            if name.startswith("trusted.overlay."):
                log.warning("%s", self.err(m.name, f"dropping xattr {name!r}"))
                continue
            out.append((name, v.encode("utf-8", "surrogateescape")))
        return out

    @staticmethod
    def mtime_ns(m: tarfile.TarInfo) -> int:
        # A PAX mtime has up to nanosecond decimals, more than a float holds at today's
        # epoch (~19 significant digits): parse the text exactly.
        text = m.pax_headers.get("mtime")
        if text is not None:
            with contextlib.suppress(decimal.InvalidOperation, ValueError):
                value = decimal.Decimal(text)
                # Refused before the integer is built: int() of 1e999990 builds a
                # million-digit number, 32 s of CPU (found by fuzzing). The kernel takes
                # signed 64-bit nanoseconds, under 1e19, so seconds of 1e10 or more can
                # never be set anyway.
                if value.is_finite() and value.adjusted() >= _MTIME_MAX_DIGITS:
                    raise OverflowError(f"PAX mtime {text[:40]!r} out of range")
                return int(value.scaleb(9).to_integral_value(decimal.ROUND_FLOOR))
        return int(m.mtime) * 1_000_000_000

    # ---- entries ----------------------------------------------------------------------

    def entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = _clean_parts(m.name, self.layer)
        if len(m.name.encode("utf-8", "surrogateescape")) > self.limits.max_name_length:
            raise LayerUnsafeEntry(self.err(m.name[:100], "name too long"))
        if self.skip and "/".join(parts) in self.skip:
            log.debug("%s", self.err(m.name, "skipped"))
            return
        if not parts:  # the layer's root directory itself
            if m.isdir():
                self.meta_fd(self.root_fd, m)
                self.dir_times.append(([], self.mtime_ns(m), self.mtime_ns(m)))
            return
        *dirs, base = parts
        if base.startswith(WHITEOUT_PREFIX):
            self.whiteout(dirs, base, m)
            return
        # (an entry's size is checked against the limit in _run, before any entry is applied)
        with self.parent(dirs, m.name) as dfd:
            if m.isdir():
                if not self.clear(dfd, base, keep_dir=True):
                    os.mkdir(base, 0o700, dir_fd=dfd)
                fd = os.open(base, _DIR_FLAGS, dir_fd=dfd)
                try:
                    self.meta_fd(fd, m)
                finally:
                    os.close(fd)
                self.dir_times.append((parts, self.mtime_ns(m), self.mtime_ns(m)))
            elif m.isreg():
                self.clear(dfd, base, keep_dir=False)
                self.regular(tf, m, dfd, base)
            elif m.issym():
                self.clear(dfd, base, keep_dir=False)
                os.symlink(m.linkname, base, dir_fd=dfd)
                self.meta_path(dfd, base, m, chmod=False)
            elif m.islnk():
                self.hardlink(m, dfd, base, parts)
            elif m.ischr() or m.isblk() or m.isfifo():
                self.clear(dfd, base, keep_dir=False)
                if m.isfifo():
                    os.mkfifo(base, 0o600, dir_fd=dfd)
                else:
                    kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                    dev = os.makedev(m.devmajor, m.devminor)
                    os.mknod(base, kind | 0o600, dev, dir_fd=dfd)
                self.meta_path(dfd, base, m, chmod=True)
            else:
                log.warning("%s", self.err(m.name, f"skipping unsupported type {m.type!r}"))

    def regular(self, tf: tarfile.TarFile, m: tarfile.TarInfo, dfd: int, base: str) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(base, flags, 0o600, dir_fd=dfd)
        try:
            src = tf.extractfile(m)
            if src is not None and m.size:
                # A GNU sparse member: only its data extents are written, at their offsets,
                # and the holes stay holes. Written out in full, a few KiB of tar claiming a
                # 60 GiB file would fill the disk (issue 8). ``raw``: the member's own
                # reader, which seeks forward without the buffered layer's seekable() check.
                sparse = cast("list[tuple[int, int]] | None", m.sparse)
                raw: IO[bytes] = getattr(src, "raw", src) if sparse else src
                for start, length in sparse or [(0, m.size)]:
                    if sparse:
                        raw.seek(start)
                    pos, stop = start, start + length
                    while pos < stop and (chunk := raw.read(min(_COPY_CHUNK, stop - pos))):
                        self.written += len(chunk)
                        if self.written > self.limits.max_size:
                            raise LayerTooLarge(self.err(
                                m.name, f"layer writes more than {self.limits.max_size} bytes"
                            ))
                        view = memoryview(chunk)
                        while view:
                            n = os.pwrite(fd, view, pos)
                            pos += n
                            view = view[n:]
                if sparse:
                    os.ftruncate(fd, m.size)
            self.meta_fd(fd, m)
            ns = self.mtime_ns(m)
            os.utime(fd, ns=(ns, ns))
        finally:
            os.close(fd)

    def hardlink(self, m: tarfile.TarInfo, dfd: int, base: str, parts: list[str]) -> None:
        tparts = _clean_parts(m.linkname, self.layer, what=f"hardlink {m.name!r} -> target")
        if not tparts:
            raise LayerUnsafeEntry(self.err(m.name, "hardlink to the layer root"))
        if tparts == parts:
            raise LayerFormatError(self.err(m.name, "hardlink to itself"))
        *tdirs, tbase = tparts
        try:
            with self.parent(tdirs, m.name, create=False) as tfd:
                st = os.stat(tbase, dir_fd=tfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    raise LayerUnsafeEntry(self.err(m.name, "hardlink to a directory"))
                if stat.S_ISLNK(st.st_mode):
                    text = os.readlink(tbase, dir_fd=tfd)
                    if _symlink_escapes(tparts, text):
                        raise LayerUnsafeEntry(
                            self.err(
                                m.name,
                                f"hardlink to symlink {m.linkname!r} pointing "
                                f"outside the layer ({text!r})",
                            )
                        )
                self.clear(dfd, base, keep_dir=False)
                # follow_symlinks=False: linkat without AT_SYMLINK_FOLLOW links the
                # symlink itself, never what it points to.
                os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError as exc:
            raise LayerFormatError(
                self.err(m.name, f"hardlink target {m.linkname!r} is not in the layer")
            ) from exc

    def whiteout(self, dirs: list[str], base: str, m: tarfile.TarInfo) -> None:
        if base == OPAQUE_WHITEOUT:
            with self.parent(dirs, m.name) as dfd:
                os.setxattr(dfd, OPAQUE_XATTR, b"y")
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            # Other AUFS metadata (.wh..wh.plnk, .wh..wh.aufs): meaningless for overlayfs.
            log.debug("%s", self.err(m.name, "skipping AUFS metadata"))
            return
        target = base[len(WHITEOUT_PREFIX) :]
        if target in ("", ".", ".."):
            raise LayerUnsafeEntry(self.err(m.name, f"whiteout of {target!r}"))
        with self.parent(dirs, m.name) as dfd:
            self.clear(dfd, target, keep_dir=False)
            # overlayfs' whiteout: a character device with device number 0/0.
            os.mknod(target, stat.S_IFCHR | 0, os.makedev(0, 0), dir_fd=dfd)
            os.chown(target, m.uid, m.gid, dir_fd=dfd, follow_symlinks=False)

    def finish(self) -> None:
        # Deepest first is not required (utime of a dir does not touch its parent), but
        # later entries for the same dir win, as in the tar.
        for parts, atime, mtime in self.dir_times:
            try:
                with self.parent(parts, "/".join(parts) or ".", create=False) as fd:
                    os.utime(fd, ns=(atime, mtime))
            except (FileNotFoundError, LayerUnsafeEntry, LayerFormatError):
                continue  # replaced by a later entry


def _clear_dir(root_fd: int) -> None:
    for name in os.listdir(root_fd):
        st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=root_fd)
        else:
            os.unlink(name, dir_fd=root_fd)
    with contextlib.suppress(OSError):
        os.removexattr(root_fd, OPAQUE_XATTR)


def apply_layer(
    dest: Path | str,
    stream: BinaryIO,
    *,
    expected_diff_id: str | None = None,
    limits: ApplyLimits = DEFAULT_APPLY_LIMITS,
    layer: str | None = None,
    parents: Sequence[Path | str] = (),
    skip: Collection[str] = (),
) -> ApplyResult:
    """Unpack the (compressed or not) layer tar ``stream`` into directory ``dest``.

    ``layer`` names the layer in errors (default: ``dest``). ``parents`` are the lower
    layers' directories, nearest first: a directory the layer only implies (an entry
    ``a/b`` with no ``a``) gets the metadata of ``a`` there. Entries whose clean path
    (``a/b``, no leading ``./``) is in ``skip`` are not written; pass
    :data:`ESTARGZ_METADATA` for an eStargz layer, whose TOC and landmark entries the lazy
    filesystem hides too, so both paths give the same tree. With ``expected_diff_id``,
    the uncompressed stream must hash to it. On any error the partial output in ``dest``
    is removed before the error is raised.
    """
    name = layer or str(dest)
    root_fd = os.open(dest, _DIR_FLAGS)
    parent_fds: list[int] = []
    try:
        for p in parents:
            parent_fds.append(os.open(p, _DIR_FLAGS))
        try:
            result = _apply(root_fd, stream, name, limits, parent_fds, skip)
            if expected_diff_id is not None and result.diff_id != expected_diff_id:
                raise DiffIDMismatch(
                    f"layer {name}: diffID is {result.diff_id}, expected {expected_diff_id}"
                )
        except BaseException:
            try:
                _clear_dir(root_fd)
            except OSError as exc:
                log.error("layer %s: cannot remove partial output in %s: %s", name, dest, exc)
            raise
        return result
    finally:
        for fd in [root_fd, *parent_fds]:
            os.close(fd)


def _apply(
    root_fd: int,
    stream: BinaryIO,
    name: str,
    limits: ApplyLimits,
    parent_fds: Sequence[int],
    skip: Collection[str],
) -> ApplyResult:
    writer = _Writer(root_fd, name, limits, parent_fds, frozenset(skip))
    try:
        return _run(writer, stream, name, limits)
    finally:
        writer.drop_cache()


def _run(writer: _Writer, stream: BinaryIO, name: str, limits: ApplyLimits) -> ApplyResult:
    current = ""
    try:
        compression, plain = decompressed(stream)
        hashing = _HashingReader(plain, limits.max_size, name)
        log.debug("layer %s: %s compressed", name, compression)
        with tarfile.open(
            fileobj=EndGuard(hashing), mode="r|", encoding="utf-8", errors="surrogateescape",
            tarinfo=BoundedTarInfo,
        ) as tf:
            count = 0
            while (m := tf.next()) is not None:
                current = m.name
                count += 1
                if count > limits.max_entries:
                    raise LayerTooLarge(f"layer {name}: more than {limits.max_entries} entries")
                if m.size > limits.max_size:  # of any type: its data is skipped or read
                    raise LayerTooLarge(f"layer {name}: entry {m.name!r} claims {m.size} bytes, "
                                        f"over the {limits.max_size} limit")
                writer.entry(tf, m)
                # The stream reader keeps every member; we need none of them.
                tf.members.clear()  # type: ignore[attr-defined]
            writer.finish()
            # Hash the end-of-archive padding too: the diffID covers the whole stream.
            while hashing.read(_COPY_CHUNK):
                pass
    except IpfsnapError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as exc:
        where = f" at entry {current!r}" if current else ""
        raise LayerFormatError(f"layer {name}: unreadable tar stream{where}: {exc}") from exc
    except OSError as exc:
        raise LayerWriteError(f"layer {name}: entry {current!r}: {exc}") from exc
    except (ArithmeticError, ValueError) as exc:
        # a header value the kernel cannot take: uid/gid or time out of range (also
        # decimal.Overflow of a PAX mtime like 1e999999999), NaN mtime, a NUL inside a link
        # target or xattr name (found by fuzzing, issue 8)
        raise LayerFormatError(f"layer {name}: entry {current!r}: unusable header: {exc}") from exc
    return ApplyResult(diff_id="sha256:" + hashing.hash.hexdigest(), size=hashing.count)
