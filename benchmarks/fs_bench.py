"""Lazy layer filesystem: worker memory for a big TOC, and read throughput through FUSE.

Usage (root, /dev/fuse)::

    .venv/bin/python benchmarks/fs_bench.py memory [--entries 100000]
    .venv/bin/python benchmarks/fs_bench.py throughput [--size-mib 100]
    .venv/bin/python benchmarks/fs_bench.py warm [--size-mib 100] [--rounds 15]

``memory`` builds a layer of N tiny files, mounts it with one worker (no prefetch, no
background fetch), and prints the worker's RSS after mounting and after ``stat`` of every
entry. ``throughput`` mounts a layer holding one incompressible file and prints sequential
read MB/s: cold (fetched from a local blob file, verified, cached), warm (page cache), after
dropping the page cache (served from the chunk cache), and the same file on local disk.

``warm`` compares page-cache reads of the same bytes through the lazy layer, through the
simplest possible pyfuse3 filesystem (one file served from memory, ``keep_cache``, defaults
otherwise: :class:`MemoryFS`), on the local disk (ext4 here) and on tmpfs, rounds
interleaved, and prints medians: if the trivial FUSE filesystem is as far from ext4 as the
lazy layer is, the gap is the kernel's FUSE read path, not ipfsnap's. It also prints the
size of the page-cache folios holding each file (``/proc/kpageflags``), which is where
that gap comes from on this kernel.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import errno
import io
import mmap
import os
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pyfuse3

from ipfsnap.config import Config
from ipfsnap.estargz import BuildOptions, build
from ipfsnap.fs import (
    LAYER_DIGEST_LABEL,
    LOCAL_PATH_LABEL,
    SIZE_LABEL,
    TOC_DIGEST_LABEL,
    LayerMounter,
)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def build_layer(tar_bytes: bytes, out: Path, chunk: int = 4 << 20) -> dict[str, str]:
    with open(out, "wb") as dst:
        res = build(io.BytesIO(tar_bytes), dst, BuildOptions(chunk_size=chunk, level=1))
    return {
        LAYER_DIGEST_LABEL: res.blob_digest,
        TOC_DIGEST_LABEL: res.toc_digest,
        LOCAL_PATH_LABEL: str(out),
        SIZE_LABEL: str(res.blob_size),
    }


def one_file_layer(data: bytes, out: Path) -> dict[str, str]:
    """An eStargz layer holding ``data`` as ``big.bin``; its mount labels."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("big.bin")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    return build_layer(buf.getvalue(), out)


def mounter(state: Path, background: bool = False) -> LayerMounter:
    cfg = Config(state_dir=state)
    cfg.no_background_fetch = not background
    return LayerMounter(cfg, ready_timeout=600)


def memory(entries: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        buf = io.BytesIO()
        per_dir = 100
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for i in range(entries):
                if i % per_dir == 0:
                    ti = tarfile.TarInfo(f"d{i // per_dir:05d}")
                    ti.type = tarfile.DIRTYPE
                    ti.mode = 0o755
                    tf.addfile(ti)
                data = f"file {i}\n".encode()
                ti = tarfile.TarInfo(f"d{i // per_dir:05d}/file-with-a-typical-name-{i:06d}.py")
                ti.size = len(data)
                ti.mode = 0o644
                tf.addfile(ti, io.BytesIO(data))
        t0 = time.monotonic()
        labels = build_layer(buf.getvalue(), tmp / "many.blob")
        print(f"built {entries} files + {entries // per_dir} dirs in "
              f"{time.monotonic() - t0:.1f}s, blob {os.path.getsize(tmp / 'many.blob')} bytes")
        m = mounter(tmp / "state")
        mp = tmp / "mp"
        t0 = time.monotonic()
        m.mount(mp, labels)
        try:
            ready = time.monotonic() - t0
            st = m.status(mp)
            assert st is not None
            pid = int(st["pid"])
            after_mount = rss_kib(pid)
            t0 = time.monotonic()
            n = 0
            for root, dirs, files in os.walk(mp):
                for name in dirs + files:
                    os.lstat(os.path.join(root, name))
                    n += 1
            walk = time.monotonic() - t0
            after_walk = rss_kib(pid)
            print(f"mount ready in {ready:.2f}s; worker RSS {after_mount / 1024:.1f} MiB after "
                  f"mount, {after_walk / 1024:.1f} MiB after stat of all {n} entries "
                  f"({walk:.2f}s)")
        finally:
            m.unmount(mp)


def read_all(path: Path, bs: int = 1 << 20) -> tuple[int, float]:
    t0 = time.monotonic()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(bs)
            if not b:
                break
            n += len(b)
    return n, time.monotonic() - t0


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def throughput(size_mib: int) -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        tmp = Path(d)
        data = os.urandom(size_mib << 20)
        local = tmp / "local.bin"
        local.write_bytes(data)
        labels = one_file_layer(data, tmp / "big.blob")
        del data
        m = mounter(tmp / "state")
        mp = tmp / "mp"
        m.mount(mp, labels)
        try:
            rows = []
            drop_caches()
            n, t = read_all(mp / "big.bin")
            rows.append(("FUSE cold (fetch+verify+cache)", n, t))
            n, t = read_all(mp / "big.bin")
            rows.append(("FUSE warm (page cache)", n, t))
            drop_caches()
            n, t = read_all(mp / "big.bin")
            rows.append(("FUSE, chunk cache only", n, t))
            drop_caches()
            n, t = read_all(local)
            rows.append(("local disk, cold", n, t))
            n, t = read_all(local)
            rows.append(("local disk, warm", n, t))
        finally:
            m.unmount(mp)
        for name, n, t in rows:
            print(f"{name:34s} {n / t / 1e6:8.1f} MB/s")


class MemoryFS(pyfuse3.Operations):
    """``big.bin`` (``data``) in the root, served from memory: the simplest pyfuse3
    filesystem, to tell the kernel's FUSE costs from the lazy layer's."""

    FILE_INODE = pyfuse3.ROOT_INODE + 1

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.attr_timeout = a.entry_timeout = 1.0
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink = 0o40755, 2
        else:
            a.st_mode, a.st_nlink, a.st_size = 0o100644, 1, len(self.data)
        a.st_blksize = 128 * 1024
        return a

    async def getattr(self, inode: int, ctx: object = None) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: object = None
                     ) -> pyfuse3.EntryAttributes:
        if name != b"big.bin":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(self.FILE_INODE)

    async def open(self, inode: int, flags: int, ctx: object = None) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.data[off:off + size]


def folio_sizes(path: Path) -> dict[int, int]:
    """Page-cache folios of a cached file, {size in 4 KiB pages: count}: the file is mapped
    privately (read faults map its page-cache pages), every page touched, the PFNs read
    from /proc/self/pagemap and the compound-page flags from /proc/kpageflags (root)."""
    head, tail = 1 << 15, 1 << 16  # KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL
    page = os.sysconf("SC_PAGE_SIZE")
    sizes: collections.Counter[int] = collections.Counter()
    with open(path, "rb") as f:
        n = os.fstat(f.fileno()).st_size // page
        m = mmap.mmap(f.fileno(), n * page, access=mmap.ACCESS_COPY)
        try:
            for i in range(n):
                m[i * page]  # fault the page in
            base = ctypes.addressof(ctypes.c_char.from_buffer(m))
            with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
                pm.seek(base // page * 8)
                raw = pm.read(8 * n)
                run = 0
                for i in range(n):
                    entry = struct.unpack_from("Q", raw, 8 * i)[0]
                    flags = 0
                    if entry >> 63:  # present
                        kf.seek((entry & ((1 << 55) - 1)) * 8)
                        flags = struct.unpack("Q", kf.read(8))[0]
                    if flags & tail:
                        run += 1
                        continue
                    if run:
                        sizes[run] += 1
                    run = 1 if flags & head else 0
                    if not flags & head:
                        sizes[1] += 1
                if run:
                    sizes[run] += 1
        finally:
            del m  # the exported buffer must go before close
    return dict(sorted(sizes.items()))


def serve_memory_fs(mountpoint: str, size: int) -> None:
    """Child process: mount :class:`MemoryFS` and serve until unmounted."""
    import trio

    pyfuse3.init(MemoryFS(os.urandom(size)), mountpoint,
                 set(pyfuse3.default_options) | {"ro"})
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


def warm(size_mib: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d, \
            tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        tmp = Path(d)
        data = os.urandom(size_mib << 20)
        local = tmp / "local.bin"
        local.write_bytes(data)
        (Path(shm) / "local.bin").write_bytes(data)
        labels = one_file_layer(data, tmp / "big.blob")
        del data
        m = mounter(tmp / "state")
        mp = tmp / "mp"
        mem_mp = tmp / "memfs"
        mem_mp.mkdir()
        child = subprocess.Popen([sys.executable, __file__, "serve-memory-fs", str(mem_mp),
                                  str(size_mib << 20)], stdout=subprocess.PIPE, text=True)
        m.mount(mp, labels)
        try:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
            files = {"lazy layer (ipfsnap)": mp / "big.bin",
                     "trivial pyfuse3 memory FS": mem_mp / "big.bin",
                     "local disk (ext4)": local, "tmpfs": Path(shm) / "local.bin"}
            for path in files.values():  # fill the page cache
                read_all(path)
                read_all(path)
            folios = {name: folio_sizes(path) for name, path in files.items()}
            rates: dict[str, list[float]] = {k: [] for k in files}
            cpu_rates: dict[str, list[float]] = {k: [] for k in files}
            for _ in range(rounds):
                for name, path in files.items():
                    c0 = time.thread_time()
                    n, t = read_all(path)
                    rates[name].append(n / t / 1e6)
                    cpu_rates[name].append(n / max(time.thread_time() - c0, 1e-6) / 1e6)
        finally:
            m.unmount(mp)
            subprocess.run(["fusermount3", "-u", str(mem_mp)], check=False)
            child.wait(timeout=30)
        # wall time counts every preemption on a loaded machine; the reading thread's CPU
        # time (user + system: the copy out of the page cache is system time) does not
        local_med = statistics.median(rates["local disk (ext4)"])
        local_cpu = statistics.median(cpu_rates["local disk (ext4)"])
        print(f"| warm sequential read, {size_mib} MiB, 1 MiB reads, median of {rounds} "
              "| MB/s wall | min-max | / ext4 | MB per CPU-second of the reader | / ext4 |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, r in rates.items():
            med = statistics.median(r)
            cpu = statistics.median(cpu_rates[name])
            print(f"| {name} | {med:.0f} | {min(r):.0f}-{max(r):.0f} | "
                  f"{med / local_med:.2f} | {cpu:.0f} | {cpu / local_cpu:.2f} |")
        print()
        print("page-cache folios of each file, {size in 4 KiB pages: count}:")
        for name, sizes in folios.items():
            print(f"  {name}: {sizes}")


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    pm = sub.add_parser("memory")
    pm.add_argument("--entries", type=int, default=100_000)
    pt = sub.add_parser("throughput")
    pt.add_argument("--size-mib", type=int, default=100)
    pw = sub.add_parser("warm")
    pw.add_argument("--size-mib", type=int, default=100)
    pw.add_argument("--rounds", type=int, default=15)
    ps = sub.add_parser("serve-memory-fs")
    ps.add_argument("mountpoint")
    ps.add_argument("size", type=int)
    args = p.parse_args()
    if args.cmd == "memory":
        memory(args.entries)
    elif args.cmd == "warm":
        warm(args.size_mib, args.rounds)
    elif args.cmd == "serve-memory-fs":
        serve_memory_fs(args.mountpoint, args.size)
    else:
        throughput(args.size_mib)


if __name__ == "__main__":
    main()
