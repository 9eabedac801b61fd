"""Test layers: tars with every entry type, built into eStargz blobs with the real builder."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ipfsnap.estargz import BuildOptions, build

#: small chunks so that files span several chunks without big fixtures
CHUNK = 64 * 1024
MTIME = 1_600_000_000


@dataclass
class Item:
    """One tar entry and what the mounted tree must show for it."""

    name: str
    kind: str  # file|dir|symlink|hardlink|char|block|fifo
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    major: int = 0
    minor: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)


def pseudo_random(n: int, seed: int) -> bytes:
    """Incompressible-ish deterministic bytes (so chunks have real compressed extents)."""
    out = bytearray()
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


def every_type_items() -> list[Item]:
    return [
        Item("etc", "dir", mode=0o755),
        Item("etc/hostname", "file", b"lazy\n", uid=0, gid=0),
        Item("etc/empty", "file", b""),
        Item("etc/one", "file", b"x"),
        Item("bin", "dir", mode=0o755),
        Item("bin/suid", "file", b"#!/bin/sh\n", mode=0o4755),
        Item("bin/sh", "symlink", link="/bin/busybox", mode=0o777),
        Item("bin/rel", "symlink", link="../etc/hostname", mode=0o777),
        Item("data", "dir", mode=0o750, uid=100000, gid=100001),
        Item("data/big", "file", pseudo_random(5 * CHUNK + 123, 1), uid=70000, gid=70001),
        Item("data/exact", "file", pseudo_random(2 * CHUNK, 2), mode=0o600),
        Item("data/zeros", "file", bytes(3 * CHUNK)),
        Item("data/xattr", "file", b"attrs", xattrs={"user.k": "v1", "user.empty": ""}),
        Item("links", "dir", mode=0o755),
        Item("links/hard", "hardlink", link="data/big"),
        Item("links/hard2", "hardlink", link="data/big"),
        Item("dev", "dir", mode=0o755),
        Item("dev/null", "char", mode=0o666, major=1, minor=3),
        Item("dev/sda", "block", mode=0o660, major=8, minor=0),
        Item("dev/fifo", "fifo", mode=0o644),
        Item("dirx", "dir", mode=0o755, xattrs={"user.dir": "yes"}),
        Item("dirx/.wh.gone", "file", b""),
        Item("opaque", "dir", mode=0o755),
        Item("opaque/.wh..wh..opq", "file", b""),
        Item("opaque/kept", "file", b"kept\n"),
        Item("ünïcødé", "file", "ü".encode() * 10),
        Item("long/" + "n" * 200, "file", b"long name"),
        Item("implicit/child/file", "file", b"parent dirs not in the tar"),
    ]


def make_tar(items: list[Item]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for it in items:
            ti = tarfile.TarInfo(it.name)
            ti.mode = it.mode
            ti.uid, ti.gid = it.uid, it.gid
            ti.mtime = MTIME
            if it.xattrs:
                ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in it.xattrs.items()}
            data = None
            if it.kind == "file":
                ti.type = tarfile.REGTYPE
                ti.size = len(it.data)
                data = io.BytesIO(it.data)
            elif it.kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif it.kind == "symlink":
                ti.type = tarfile.SYMTYPE
                ti.linkname = it.link
            elif it.kind == "hardlink":
                ti.type = tarfile.LNKTYPE
                ti.linkname = it.link
            elif it.kind in ("char", "block"):
                ti.type = tarfile.CHRTYPE if it.kind == "char" else tarfile.BLKTYPE
                ti.devmajor, ti.devminor = it.major, it.minor
            elif it.kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            tf.addfile(ti, data)
    return buf.getvalue()


@dataclass
class Blob:
    path: Path
    toc_digest: str
    digest: str
    size: int
    items: list[Item] = field(repr=False)


def build_blob(items: list[Item], path: Path, prioritize: tuple[str, ...] = (),
               compression: str = "gzip") -> Blob:
    tar = make_tar(items)
    with open(path, "wb") as dst:
        res = build(io.BytesIO(tar), dst, BuildOptions(chunk_size=CHUNK, level=1, workers=1,
                                                       prioritize=prioritize,
                                                       compression=compression))
    return Blob(path, res.toc_digest, res.blob_digest, res.blob_size, items)


def expected_tree(items: list[Item]) -> dict[str, tuple[object, ...]]:
    """What ``snapshot_tree`` must return for a mounted layer of ``items``."""
    out: dict[str, tuple[object, ...]] = {}
    content = {it.name: it for it in items}
    dirs = {"": ("dir", 0o755, 0, 0)}
    opaque: set[str] = set()
    for it in items:
        parent = os.path.dirname(it.name)
        base = os.path.basename(it.name)
        p = parent
        while p and p not in dirs:
            dirs[p] = ("dir", 0o755, 0, 0)
            p = os.path.dirname(p)
        if base == ".wh..wh..opq":
            opaque.add(parent)
            continue
        if base.startswith(".wh."):
            out[os.path.join(parent, base[4:])] = ("char", 0, 0, 0, os.makedev(0, 0))
            continue
        if it.kind == "dir":
            dirs[it.name] = ("dir", it.mode, it.uid, it.gid)
        elif it.kind == "file":
            out[it.name] = ("file", it.mode, it.uid, it.gid, it.data,
                            1 + sum(1 for o in items if o.kind == "hardlink" and o.link == it.name))
        elif it.kind == "hardlink":
            t = content[it.link]
            out[it.name] = ("file", t.mode, t.uid, t.gid, t.data,
                            1 + sum(1 for o in items if o.kind == "hardlink" and o.link == t.name))
        elif it.kind == "symlink":
            out[it.name] = ("symlink", 0o777, it.uid, it.gid, it.link)
        elif it.kind in ("char", "block"):
            out[it.name] = (it.kind, it.mode, it.uid, it.gid, os.makedev(it.major, it.minor))
        elif it.kind == "fifo":
            out[it.name] = ("fifo", it.mode, it.uid, it.gid)
    for d, v in dirs.items():
        out[d] = v
    xattrs: dict[str, dict[str, bytes]] = {}
    for it in items:
        if it.xattrs:
            xattrs[it.name] = {k: v.encode() for k, v in it.xattrs.items()}
    for d in opaque:
        xattrs.setdefault(d, {})["trusted.overlay.opaque"] = b"y"
    for name, xs in xattrs.items():
        out[name + "#xattrs"] = tuple(sorted(xs.items()))
    return out


def snapshot_tree(root: Path) -> dict[str, tuple[object, ...]]:
    """The tree under ``root`` in the form of :func:`expected_tree` (reads every file)."""
    out: dict[str, tuple[object, ...]] = {}

    def visit(rel: str) -> None:
        p = root / rel if rel else root
        st = os.lstat(p)
        perm = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", perm, st.st_uid, st.st_gid)
            for name in sorted(os.listdir(p)):
                visit(os.path.join(rel, name))
        elif stat.S_ISREG(st.st_mode):
            out[rel] = ("file", perm, st.st_uid, st.st_gid, p.read_bytes(), st.st_nlink)
        elif stat.S_ISLNK(st.st_mode):
            out[rel] = ("symlink", perm, st.st_uid, st.st_gid, os.readlink(p))
        elif stat.S_ISCHR(st.st_mode):
            if st.st_rdev == 0 and perm == 0:
                out[rel] = ("char", 0, st.st_uid, st.st_gid, st.st_rdev)
            else:
                out[rel] = ("char", perm, st.st_uid, st.st_gid, st.st_rdev)
        elif stat.S_ISBLK(st.st_mode):
            out[rel] = ("block", perm, st.st_uid, st.st_gid, st.st_rdev)
        elif stat.S_ISFIFO(st.st_mode):
            out[rel] = ("fifo", perm, st.st_uid, st.st_gid)
        if not stat.S_ISLNK(st.st_mode):
            names = os.listxattr(p, follow_symlinks=False)
            if names:
                out[rel + "#xattrs"] = tuple(sorted(
                    (n, os.getxattr(p, n, follow_symlinks=False)) for n in names
                ))

    visit("")
    return out


class CountingSource:
    """A BlobSource over a local file that counts calls and bytes, and can fail or stall."""

    def __init__(self, path: Path, delay: float = 0.0) -> None:
        self.name = str(path)
        self._data = path.read_bytes()
        self.delay = delay
        self.calls: list[tuple[int, int]] = []
        self.fail_next = 0
        self.stall = threading.Event()  # set = stall until released
        self.release = threading.Event()
        self._lock = threading.Lock()

    @property
    def bytes_read(self) -> int:
        return sum(n for _, n in self.calls)

    def size(self) -> int:
        return len(self._data)

    def read_at(self, offset: int, length: int) -> bytes:
        from ipfsnap.fs.errors import FetchError

        with self._lock:
            self.calls.append((offset, length))
            failing = self.fail_next > 0
            if failing:
                self.fail_next -= 1
        if self.stall.is_set():
            self.release.wait(30)
        if self.delay:
            time.sleep(self.delay)
        if failing:
            raise FetchError(f"{self.name}: injected failure")
        return self._data[offset : offset + length]

    def close(self) -> None:
        pass
