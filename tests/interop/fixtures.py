"""Tar fixtures for the interop tests, and what a reader must find in them.

The tars are written with the standard library's ``tarfile`` (PAX format), never with
ipfsnap or the reference, so that both are checked against a third party. ``expected_entries``
parses a tar back, again with ``tarfile`` only, into the metadata and content digest a
correct eStargz reader must report for every path.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

#: small chunks, so that multi-chunk files stay cheap (a 4 MiB default would need big files)
SMALL_CHUNK = 64 << 10
#: the issue's "a 50 MiB file", in its own fixture shared by the few tests that need it
BIG_FILE_SIZE = 50 << 20
BIG_FILE_NAME = "big/fifty-mib.bin"

#: a fixed clock for every entry that does not test time itself (2023-11-14T22:13:20Z)
BASE_MTIME = 1_700_000_000

#: uid/gid above 65535 fit the 7-digit octal ustar field (max 2097151); the "huge" ones do
#: not, so tarfile must write them as PAX records
BIG_UID, BIG_GID = 100_000, 200_000
HUGE_UID, HUGE_GID = 3_000_000, 4_000_000

LONG_DIR = "long/" + "/".join(f"{'d' * 60}{i}" for i in range(4))
LONG_NAME = f"{LONG_DIR}/{'f' * 120}.txt"  # > 255 bytes in all: needs a PAX path record
LONG_TARGET = "../" * 3 + "x" * 150  # symlink target > 100 bytes: needs a PAX linkpath


@dataclass(frozen=True)
class Expected:
    """What a reader must report for one path of a fixture."""

    path: str  # clean relative path ("" is the root)
    type: str  # TOC type names: dir reg symlink hardlink char block fifo
    size: int = 0
    mode: int = 0  # permission bits with setuid/setgid/sticky (mode & 0o7777)
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    link_name: str = ""  # symlink target, or hardlink target as written in the tar
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    modtime: str = ""  # as the reference writes it: RFC 3339 UTC, rounded to the second
    sha256: str = ""  # hex digest of the content (regular files and hardlinks to them)


def clean(name: str) -> str:
    """Clean relative form of a tar name, as both readers key their entries."""
    parts: list[str] = []
    for p in PurePosixPath("/" + name).parts[1:]:
        if p == "..":
            if parts:
                parts.pop()
        elif p != ".":
            parts.append(p)
    return "/".join(parts)


def rfc3339(mtime: float) -> str:
    """The reference's modtime: UTC, rounded to the nearest second, empty for the epoch."""
    # Go's time.Round rounds halves away from zero; fixtures avoid exact halves anyway.
    secs = int(mtime + 0.5) if mtime >= 0 else -int(-mtime + 0.5)
    if secs == 0:
        return ""
    return datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _payload(rng: random.Random, size: int) -> bytes:
    """Half incompressible, half text-like bytes, so chunks differ and compress unevenly."""
    half = size // 2
    text = b"".join(b"line %08d of the fixture\n" % i for i in range(size // 26 + 1))
    return rng.randbytes(half) + text[: size - half]


class _TarBuilder:
    def __init__(self, out: tarfile.TarFile) -> None:
        self.tar = out

    def add(
        self,
        name: str,
        kind: bytes,
        data: bytes = b"",
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        uname: str = "root",
        gname: str = "root",
        linkname: str = "",
        devmajor: int = 0,
        devminor: int = 0,
        mtime: float = BASE_MTIME,
        xattrs: dict[str, str] | None = None,
    ) -> None:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.uid, ti.gid, ti.uname, ti.gname = uid, gid, uname, gname
        ti.linkname = linkname
        ti.devmajor, ti.devminor = devmajor, devminor
        ti.mtime = mtime
        if xattrs:
            ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        if kind == tarfile.REGTYPE:
            ti.size = len(data)
            self.tar.addfile(ti, io.BytesIO(data))
        else:
            self.tar.addfile(ti)

    def dir(self, name: str, **kw: object) -> None:
        kw.setdefault("mode", 0o755)
        self.add(name, tarfile.DIRTYPE, **kw)  # type: ignore[arg-type]

    def file(self, name: str, data: bytes, **kw: object) -> None:
        self.add(name, tarfile.REGTYPE, data, **kw)  # type: ignore[arg-type]


def write_feature_tar(path: Path, chunk_size: int = SMALL_CHUNK, *, prefix: str = "") -> Path:
    """Write the tar with every entry kind and edge case of issue 2 (except the 50 MiB file).

    ``prefix`` (e.g. ``"./"``) is put before every name, as ``tar -C dir .`` does.
    """
    rng = random.Random(20240217)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        b = _TarBuilder(tf)
        p = prefix
        if prefix:
            b.dir(p)
        # sizes around the chunk size: 0, 1, one chunk -1/exact/+1, N chunks exact and +1
        b.dir(p + "files")
        b.file(p + "files/empty", b"")
        b.file(p + "files/one-byte", b"\x00")
        b.file(p + "files/chunk-minus-1", _payload(rng, chunk_size - 1))
        b.file(p + "files/chunk-exact", _payload(rng, chunk_size))
        b.file(p + "files/chunk-plus-1", _payload(rng, chunk_size + 1))
        b.file(p + "files/3-chunks-exact", _payload(rng, 3 * chunk_size))
        b.file(p + "files/3-chunks-plus-1", _payload(rng, 3 * chunk_size + 1))
        b.file(p + "files/zeros-5-chunks", bytes(5 * chunk_size + 17))
        b.file(p + "files/text.txt", b"hello, estargz\n" * 100)
        # links: relative, absolute (legal in images: resolved against the container root),
        # dangling, long target; hardlinks in the same dir, across dirs and to a hardlink
        b.dir(p + "links")
        b.add(p + "links/sym-rel", tarfile.SYMTYPE, linkname="../files/one-byte", mode=0o777)
        b.add(p + "links/sym-abs", tarfile.SYMTYPE, linkname="/files/text.txt", mode=0o777)
        b.add(p + "links/sym-dangling", tarfile.SYMTYPE, linkname="nowhere", mode=0o777)
        b.add(p + "links/sym-dir", tarfile.SYMTYPE, linkname="../files", mode=0o777)
        b.add(p + "links/sym-long", tarfile.SYMTYPE, linkname=LONG_TARGET, mode=0o777)
        b.add(p + "files/hard-same-dir", tarfile.LNKTYPE, linkname=p + "files/3-chunks-plus-1")
        b.dir(p + "other")
        b.dir(p + "other/deeper")
        b.add(p + "other/deeper/hard-other-dir", tarfile.LNKTYPE, linkname=p + "files/text.txt")
        b.add(p + "other/hard-to-hard", tarfile.LNKTYPE,
              linkname=p + "other/deeper/hard-other-dir")
        b.add(p + "other/hard-empty", tarfile.LNKTYPE, linkname=p + "files/empty")
        # devices and fifos
        b.dir(p + "dev")
        b.add(p + "dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3)
        b.add(p + "dev/loop0", tarfile.BLKTYPE, mode=0o660, devmajor=7, devminor=0, gid=6)
        b.add(p + "dev/big-dev", tarfile.CHRTYPE, mode=0o600, devmajor=259, devminor=70000)
        b.add(p + "dev/fifo", tarfile.FIFOTYPE, mode=0o640)
        # xattrs (PAX SCHILY.xattr.*), on files and dirs
        b.dir(p + "xattr", xattrs={"user.dir-attr": "on a dir"})
        b.file(p + "xattr/file", b"with xattrs\n",
               xattrs={"user.comment": "hello", "user.empty": "", "trusted.md5sum": "abc"})
        b.file(p + "xattr/utf8", b"x", xattrs={"user.name": "café ☕"})
        # whiteouts: a removed file and an opaque dir
        b.dir(p + "wh")
        b.file(p + "wh/.wh.removed", b"")
        b.dir(p + "wh/opaque", xattrs={"trusted.overlay.opaque": "y"})
        b.file(p + "wh/opaque/.wh..wh..opq", b"")
        b.file(p + "wh/opaque/kept", b"kept\n")
        # long names (PAX path) and non-ASCII names
        b.dir(p + "long")
        for i in range(4):
            b.dir(p + "long/" + "/".join(f"{'d' * 60}{j}" for j in range(i + 1)))
        b.file(p + LONG_NAME, b"long name\n")
        b.dir(p + "unicode")
        b.dir(p + "unicode/日本語")
        b.file(p + "unicode/日本語/файл-é.txt", "non-ASCII ✓\n".encode())
        b.file(p + "unicode/emoji-🐳", b"whale\n")
        b.file(p + "unicode/space and\ttab", b"ws\n")
        # permission bits: setuid, setgid, sticky, unusual modes
        b.dir(p + "perm", mode=0o2775)
        b.file(p + "perm/setuid", b"#!/bin/sh\n", mode=0o4755)
        b.file(p + "perm/setgid", b"#!/bin/sh\n", mode=0o2711)
        b.dir(p + "perm/sticky", mode=0o1777)
        b.file(p + "perm/no-perms", b"locked\n", mode=0o000)
        # owners: > 65535, > the ustar octal limit, names repeated and changed per id
        b.dir(p + "ids")
        b.file(p + "ids/big", b"b\n", uid=BIG_UID, gid=BIG_GID, uname="big", gname="biggrp")
        b.file(p + "ids/huge", b"h\n", uid=HUGE_UID, gid=HUGE_GID, uname="huge", gname="hg")
        b.file(p + "ids/big-again", b"b2\n", uid=BIG_UID, gid=BIG_GID, uname="big",
               gname="biggrp")
        b.file(p + "ids/no-names", b"n\n", uid=1234, gid=5678, uname="", gname="")
        b.file(p + "ids/renamed", b"r\n", uid=BIG_UID, gid=BIG_GID, uname="big2",
               gname="biggrp")
        # times: the epoch (the reference writes no modtime), fractional (rounded), old
        b.dir(p + "times")
        b.file(p + "times/epoch", b"0\n", mtime=0)
        b.file(p + "times/fractional", b"f\n", mtime=BASE_MTIME + 0.6)
        b.file(p + "times/old", b"o\n", mtime=86_400 * 365)
        # a file whose parent dirs have no entries of their own
        b.file(p + "implicit/parent/dirs/file", b"implicit\n")
    return path


def write_duplicates_tar(path: Path) -> Path:
    """A tar naming one file twice (layers made by appending do): the last one wins."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        b = _TarBuilder(tf)
        b.dir("a")
        b.file("a/f", b"first version\n", mode=0o600)
        b.file("a/g", b"between\n")
        b.file("a/f", b"second, longer version\n", mode=0o644, uid=7)
    return path


def write_big_tar(path: Path) -> Path:
    """A tar with one 50 MiB file (not a multiple of any power-of-two chunk size + 1 byte)."""
    rng = random.Random(7)
    size = BIG_FILE_SIZE + 12_345
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        b = _TarBuilder(tf)
        b.dir("big")
        ti = tarfile.TarInfo(BIG_FILE_NAME)
        ti.size = size
        ti.mode = 0o644
        ti.mtime = BASE_MTIME
        # a TOC omits a name equal to the last one for that id, so readers fill it in:
        # an empty name after "root" for uid 0 would read back as "root"
        ti.uname = ti.gname = "root"
        tf.addfile(ti, _BigPayload(rng, size))
        b.file("big/after", b"the entry after the big one\n")
    return path


class _BigPayload(io.RawIOBase):
    """Streams the big file (1 MiB pieces alternating random and repetitive) without
    holding 50 MiB in memory."""

    PIECE = 1 << 20

    def __init__(self, rng: random.Random, size: int) -> None:
        self._rng = rng
        self._left = size
        self._buf = b""
        self._n = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if not self._buf and self._left > 0:
            piece = min(self.PIECE, self._left)
            if self._n % 2 == 0:
                self._buf = self._rng.randbytes(piece)
            else:
                self._buf = (b"%016x" % self._n) * (piece // 16) + b"z" * (piece % 16)
            self._n += 1
            self._left -= piece
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _kind(ti: tarfile.TarInfo) -> str:
    if ti.isdir():
        return "dir"
    if ti.islnk():
        return "hardlink"
    if ti.issym():
        return "symlink"
    if ti.ischr():
        return "char"
    if ti.isblk():
        return "block"
    if ti.isfifo():
        return "fifo"
    if ti.isreg():
        return "reg"
    raise ValueError(f"fixture entry {ti.name!r} has unexpected tar type {ti.type!r}")


def iter_tar(path: Path) -> Iterator[tuple[tarfile.TarInfo, str]]:
    """(member, hex sha256 of its content, "" when it has none) for every member."""
    with tarfile.open(path, "r:*") as tf:
        for ti in tf:
            digest = ""
            if ti.isreg():
                h = hashlib.sha256()
                f = tf.extractfile(ti)
                assert f is not None
                while piece := f.read(1 << 20):
                    h.update(piece)
                digest = h.hexdigest()
            yield ti, digest


def expected_entries(path: Path) -> dict[str, Expected]:
    """Every path a reader of a blob built from this tar must show (landmarks excluded),
    keyed by clean path; implicit parent dirs appear as the reference synthesises them.
    Hardlinks report their target's content digest."""
    out: dict[str, Expected] = {}
    for ti, digest in iter_tar(path):
        name = clean(ti.name)
        kind = _kind(ti)
        xattrs = {
            k.removeprefix("SCHILY.xattr."): v.encode("utf-8", "surrogateescape")
            for k, v in ti.pax_headers.items()
            if k.startswith("SCHILY.xattr.")
        }
        link = ti.linkname if kind in ("symlink", "hardlink") else ""
        if kind == "hardlink":
            digest = out[clean(link)].sha256
        out[name] = Expected(
            path=name,
            type=kind,
            size=ti.size if kind == "reg" else 0,
            mode=ti.mode & 0o7777,
            uid=ti.uid,
            gid=ti.gid,
            uname=ti.uname,
            gname=ti.gname,
            link_name=link,
            dev_major=ti.devmajor if kind in ("char", "block") else 0,
            dev_minor=ti.devminor if kind in ("char", "block") else 0,
            xattrs=xattrs,
            modtime=rfc3339(ti.mtime),
            sha256=digest,
        )
    for name in list(out):
        parent = name.rpartition("/")[0]
        while parent and parent not in out:
            out[parent] = Expected(path=parent, type="dir", mode=0o755)
            parent = parent.rpartition("/")[0]
    out.pop("", None)  # the root ("./") is not compared: readers synthesise it
    return out
