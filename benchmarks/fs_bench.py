"""Lazy layer filesystem: worker memory for a big TOC, and read throughput through FUSE.

Usage (root, /dev/fuse)::

    .venv/bin/python benchmarks/fs_bench.py memory [--entries 100000]
    .venv/bin/python benchmarks/fs_bench.py throughput [--size-mib 100]

``memory`` builds a layer of N tiny files, mounts it with one worker (no prefetch, no
background fetch), and prints the worker's RSS after mounting and after ``stat`` of every
entry. ``throughput`` mounts a layer holding one incompressible file and prints sequential
read MB/s: cold (fetched from a local blob file, verified, cached), warm (page cache), after
dropping the page cache (served from the chunk cache), and the same file on local disk.
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time
from pathlib import Path

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
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            ti = tarfile.TarInfo("big.bin")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        labels = build_layer(buf.getvalue(), tmp / "big.blob")
        del data, buf
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


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    pm = sub.add_parser("memory")
    pm.add_argument("--entries", type=int, default=100_000)
    pt = sub.add_parser("throughput")
    pt.add_argument("--size-mib", type=int, default=100)
    args = p.parse_args()
    if args.cmd == "memory":
        memory(args.entries)
    else:
        throughput(args.size_mib)


if __name__ == "__main__":
    main()
