"""Lazy pull vs full pull of the python sample image over two IPFS nodes, and FUSE read
throughput of a 100 MiB file. Prints the Markdown tables of docs/benchmarks.md ("Lazy pull").

Usage (root, /dev/fuse, the managed IPFS node's js-ipfs, strace)::

    .venv/bin/python benchmarks/lazy_bench.py [--size-mib 100]

Set-up: node A holds the image (the python sample of ``ipfsnap.content.sample``, Debian
bookworm + python3, ipfs-pushed as eStargz by ``ipfsnap.image.push``); each pull runs on its
own fresh node (B1 lazy, B2 full, B3 raw cat) in the same private network, so every byte
crosses bitswap over loopback. Bytes fetched = growth of the pulling node's repo (whole
256 KiB blocks plus DAG nodes: what really crossed the network).

* ready: ``rpull`` until the rootfs is mountable; lazy = stargz snapshotter (documents +
  each layer's footer and TOC; no prefetch landmark in ipfs-pushed images; background fetch
  off so the bytes are what reads need), full = overlayfs snapshotter (every layer fetched,
  verified and unpacked).
* ``python3 -c pass`` files: the files it opens, recorded once with
  ``strace -f -e trace=open,openat`` in a chroot of the full rootfs, then read (whole,
  cold: page cache dropped) through each rootfs.
* 100 MiB: one incompressible file in a single-layer eStargz image (4 MiB chunks):
  sequential 1 MiB reads through the lazy mount, cold (fetched from A through B1), warm
  (page cache), chunk cache only (page cache dropped), vs the same bytes on local disk,
  and vs a plain ``cat`` of a same-sized blob through B1 (what IPFS itself delivers, catted
  right before the cold read), and vs ``cat``s of a third blob in 4 MiB ranges, 2 in flight
  (the requests a lazy read makes of IPFS, right after the cold read). The cold read also
  prints how busy the workers kept IPFS: summed seconds of their chunk requests / the read's
  wall time (>= 1: IPFS was never idle, the rate is IPFS's).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ipfsnap.config import Config
from ipfsnap.content import ImageStore, import_image
from ipfsnap.content.sample import build_python
from ipfsnap.fs import LayerMounter
from ipfsnap.image.push import push_image
from ipfsnap.image.rpull import rpull
from ipfsnap.image.snapshotters import snapshotter_root
from ipfsnap.ipfs import IPFSClient
from ipfsnap.ipfs.node import ManagedNode, rpc_call
from ipfsnap.ipfs.pnet import generate_swarm_key, write_swarm_key
from ipfsnap.snapshot import SnapshotStore, mount_all, unmount

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.image.rpull_helpers import push  # the tests' small image pusher

MB = 1e6
#: the eStargz builder's default chunk size (the reference's)
CHUNK = 4 << 20
_OPEN = re.compile(r'open(?:at)?\((?:AT_FDCWD, )?"([^"]+)", [^)]*\) = (\d+)')


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def drop_count() -> int:
    """How many times anyone wrote /proc/sys/vm/drop_caches since boot."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("drop_pagecache "):
            return int(line.split()[1])
    return 0


def received(node: ManagedNode) -> int:
    """Bytes of blocks this node holds (``repo/stat`` RepoSize): every block a pull needs
    comes from node A, so the growth is what crossed bitswap. (js-ipfs's ``stats/bitswap``
    counters lag behind and often stay 0, so they cannot be used.)"""
    stats = rpc_call(node.api_url, "repo/stat", timeout=30.0)
    return int(stats.get("RepoSize", 0))


def read_all(path: Path, bs: int = 1 << 20) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while b := f.read(bs):
            n += len(b)
    return n


def resolve_in(root: Path, path: str, depth: int = 0) -> Path | None:
    """``path`` inside ``root`` with symlinks resolved relative to ``root`` (an absolute
    link must not escape to the host)."""
    if depth > 40:
        return None
    parts = [p for p in path.split("/") if p and p != "."]
    cur: list[str] = []
    for i, part in enumerate(parts):
        if part == "..":
            if cur:
                cur.pop()
            continue
        p = root.joinpath(*cur, part)
        if p.is_symlink():
            target = os.readlink(p)
            rest = "/".join(parts[i + 1:])
            base = target if target.startswith("/") else "/".join([*cur, target])
            return resolve_in(root, base + ("/" + rest if rest else ""), depth + 1)
        cur.append(part)
    return root.joinpath(*cur)


def python_files(rootfs: Path, tmp: Path) -> list[str]:
    """Regular files ``python3 -c pass`` opens, paths inside the image."""
    trace = tmp / "strace.txt"
    subprocess.run(["strace", "-f", "-qq", "-e", "trace=open,openat,execve", "-o", str(trace),
                    "chroot", str(rootfs), "/usr/bin/python3", "-c", "pass"], check=True)
    seen: dict[str, None] = {}
    started = False  # chroot's own opens (host files) come before python's execve
    for line in trace.read_text().splitlines():
        if 'execve("/usr/bin/python3"' in line:
            started = True
        if not started:
            continue
        m = _OPEN.search(line)
        if m is None:
            continue
        real = resolve_in(rootfs, m.group(1))
        if real is not None and real.is_file():
            seen["/" + str(real.relative_to(rootfs))] = None
    return list(seen)


@contextlib.contextmanager
def nodes(base: Path, count: int) -> Iterator[list[ManagedNode]]:
    key = generate_swarm_key()
    started: list[ManagedNode] = []
    try:
        for i in range(count):
            repo = base / f"node{i}"
            write_swarm_key(repo, key)
            started.append(ManagedNode(repo).start())
        for n in started[1:]:
            rpc_call(n.api_url, "swarm/connect", timeout=30.0, arg=started[0].swarm_addrs[0])
        yield started
    finally:
        for n in reversed(started):
            n.stop()


def worker_bytes(store: SnapshotStore, chains: tuple[str, ...]) -> int:
    """Bytes the lazy layers' workers read from IPFS (chunk reads; the TOC read at mount
    time is not included)."""
    mounter = store.remote
    assert isinstance(mounter, LayerMounter)
    time.sleep(0.6)  # the workers rewrite their status every 0.2 s
    total = 0
    for chain in chains:
        st = mounter.status(store.path(chain)) or {}
        total += int(st.get("fetched_bytes", 0))
    return total


def worker_stats(store: SnapshotStore, chains: tuple[str, ...]) -> dict[str, float]:
    """Summed status counters of the lazy layers' workers, plus their CPU seconds."""
    mounter = store.remote
    assert isinstance(mounter, LayerMounter)
    time.sleep(0.6)  # the workers rewrite their status every 0.2 s
    out: dict[str, float] = {}
    for chain in chains:
        st = mounter.status(store.path(chain)) or {}
        for key in ("fetched_bytes", "source_calls", "foreground_seconds", "read_requests"):
            out[key] = out.get(key, 0.0) + float(st.get(key, 0) or 0)
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{int(st.get('pid', 0))}/stat").read_text()
            ticks = fields.rsplit(")", 1)[1].split()
            out["cpu_seconds"] = out.get("cpu_seconds", 0.0) + \
                (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")
    return out


def worker_requests(store: SnapshotStore, chains: tuple[str, ...]) -> int:
    """FUSE read requests the lazy layers' workers served so far."""
    mounter = store.remote
    assert isinstance(mounter, LayerMounter)
    time.sleep(0.6)  # the workers rewrite their status every 0.2 s
    return sum(int((mounter.status(store.path(c)) or {}).get("read_requests", 0))
               for c in chains)


@contextlib.contextmanager
def mounted_view(store: SnapshotStore, top: str, mp: Path) -> Iterator[Path]:
    mp.mkdir(parents=True, exist_ok=True)
    key = f"bench {mp}"
    mount_all(store.view(key, top), mp)
    try:
        yield mp
    finally:
        unmount(mp)
        store.remove(key)


def pull_once(state: Path, node: ManagedNode, cid: str, lazy: bool,
              readahead: int | None = None) -> tuple[SnapshotStore, Any, float, int]:
    cfg = Config(state_dir=state, ipfs_api=node.api_url)
    cfg.no_background_fetch = True
    extra: dict[str, Any] = {"status_interval": 0.2}
    if readahead is not None:
        extra["readahead"] = readahead  # chunks the workers fetch ahead of sequential reads
    if lazy:
        store = SnapshotStore(snapshotter_root(state, "stargz"),
                              remote=LayerMounter(cfg, ready_timeout=600, extra=extra))
    else:
        store = SnapshotStore(snapshotter_root(state, "overlayfs"), restore=False)
    before = received(node)
    t0 = time.monotonic()
    with IPFSClient(node.api_url) as client:
        img = rpull(cid, store, client=client, images=ImageStore(state), lazy=lazy)
    return store, img, time.monotonic() - t0, received(node) - before


def throughput(tmp: Path, a: ManagedNode, b: ManagedNode, size_mib: int,
               readahead: int | None = None) -> list[tuple[str, float]]:
    data = os.urandom(size_mib << 20)
    local = tmp / "local.bin"
    local.write_bytes(data)

    def tar_of(payload: bytes) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            ti = tarfile.TarInfo("big.bin")
            ti.size = len(payload)
            tf.addfile(ti, io.BytesIO(payload))
        return buf.getvalue()

    with IPFSClient(a.api_url) as ca:
        image = push(ca, [tar_of(data)], [True], chunk_size=CHUNK)
        # blobs of the same size, each catted once through B right before / after the cold
        # read (IPFS's own rate at that moment; the load on a shared machine drifts)
        other = ca.add(io.BytesIO(os.urandom(size_mib << 20))).cid
        ranged = ca.add(io.BytesIO(os.urandom(size_mib << 20))).cid
    del data
    rows: list[tuple[str, float]] = []
    state = tmp / "tp-state"
    store, img, _, _ = pull_once(state, b, image.cid, lazy=True, readahead=readahead)
    try:
        with mounted_view(store, img.chain_ids[-1], tmp / "tp-mp") as mp:
            with IPFSClient(b.api_url) as cb:
                t0 = time.monotonic()
                got = cb.cat_into(other, 0, None, lambda _d: None)
                plain_rate = got / (time.monotonic() - t0) / MB
            drop_caches()
            drops = drop_count()
            before = worker_stats(store, img.chain_ids)
            t0 = time.monotonic()
            n = read_all(mp / "big.bin")
            cold_s = time.monotonic() - t0
            after = worker_stats(store, img.chain_ids)
            d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
            per_call = d.get("fetched_bytes", 0) / max(d.get("foreground_seconds", 0), 1e-9)
            # source busy = summed seconds of the chunk requests to IPFS / wall time of the
            # read: about 1 or more (several in flight) means IPFS was never left idle
            print(f"cold read: page cache dropped {drop_count() - drops} times meanwhile; "
                  f"{d.get('read_requests', 0):.0f} FUSE requests, "
                  f"{d.get('source_calls', 0):.0f} IPFS requests "
                  f"({d.get('fetched_bytes', 0) / MB:.1f} MB, "
                  f"{per_call / MB:.1f} MB/s each), "
                  f"source busy {d.get('foreground_seconds', 0) / cold_s:.2f} "
                  f"of the read; worker CPU {d.get('cpu_seconds', 0):.2f} s "
                  f"({d.get('cpu_seconds', 0) / cold_s * 100:.0f}% of a core)", flush=True)
            rows.append(("lazy mount, cold (bitswap from A, verify, cache)", n / cold_s / MB))
            rows.append(("IPFS cat in 4 MiB ranges, 2 in flight (the requests a lazy read "
                         "makes)", ranged_cat(b, ranged, size_mib << 20, CHUNK, 2)))
            # reads the page cache answers never reach the worker: a request during a warm
            # read means pages were dropped meanwhile (another benchmark on the machine
            # writing drop_caches during the long cold read): then the read is repeated
            for attempt in range(3):
                drops = drop_count()
                requests = worker_requests(store, img.chain_ids)
                t0, c0 = time.monotonic(), time.thread_time()
                n = read_all(mp / "big.bin")
                rate = n / (time.monotonic() - t0) / MB
                # per CPU-second of the reading thread (the copy out of the page cache is
                # its system time): preemption on a loaded machine does not count
                lazy_cpu_rate = n / max(time.thread_time() - c0, 1e-6) / MB
                requests = worker_requests(store, img.chain_ids) - requests
                print(f"warm read {attempt + 1}: {rate:.1f} MB/s, {requests} FUSE read "
                      f"requests reached the worker, page cache dropped "
                      f"{drop_count() - drops} times meanwhile", flush=True)
                if requests == 0:
                    break
            rows.append(("lazy mount, warm (page cache)", rate))
            drop_caches()
            before = worker_stats(store, img.chain_ids)
            t0 = time.monotonic()
            n = read_all(mp / "big.bin")
            cc_s = time.monotonic() - t0
            after = worker_stats(store, img.chain_ids)
            print(f"chunk-cache read: "
                  f"{after['read_requests'] - before['read_requests']:.0f} FUSE requests, "
                  f"worker CPU {after.get('cpu_seconds', 0) - before.get('cpu_seconds', 0):.2f}"
                  f" s over {cc_s:.2f} s", flush=True)
            rows.append(("lazy mount, chunk cache (page cache dropped)", n / cc_s / MB))
    finally:
        store.close(unmount_remote=True)
    drop_caches()
    t0 = time.monotonic()
    n = read_all(local)
    rows.append(("local disk, cold", n / (time.monotonic() - t0) / MB))
    t0 = time.monotonic()
    n = read_all(local)
    rows.append(("local disk, warm (page cache)", n / (time.monotonic() - t0) / MB))
    c0 = time.thread_time()
    n = read_all(local)
    rows.append(("lazy mount, warm, per CPU-second of the reader", lazy_cpu_rate))
    rows.append(("local disk, warm, per CPU-second of the reader",
                 n / max(time.thread_time() - c0, 1e-6) / MB))
    rows.append(("plain IPFS cat through B (bitswap from A)", plain_rate))
    return rows


def ranged_cat(node: ManagedNode, cid: str, size: int, span: int, in_flight: int) -> float:
    """MB/s of reading ``cid`` through ``node`` as ``span``-byte ``cat``s, ``in_flight`` at
    a time (what a sequential cold read through a lazy layer asks of IPFS)."""
    from concurrent.futures import ThreadPoolExecutor

    with IPFSClient(node.api_url) as client, ThreadPoolExecutor(in_flight) as pool:
        t0 = time.monotonic()
        got = sum(pool.map(lambda off: len(client.cat(cid, offset=off,
                                                       length=min(span, size - off))),
                           range(0, size, span)))
        return got / (time.monotonic() - t0) / MB


def print_throughput(tp: list[tuple[str, float]], size_mib: int) -> None:
    print(f"| sequential read, {size_mib} MiB file, 1 MiB reads | MB/s |")
    print("|---|---:|")
    for label, rate in tp:
        print(f"| {label} | {rate:.1f} |")
    rates = dict(tp)
    print()
    print(f"warm lazy / warm local: {rates['lazy mount, warm (page cache)'] / rates['local disk, warm (page cache)']:.2f} "  # noqa: E501
          f"(per CPU-second: {rates['lazy mount, warm, per CPU-second of the reader'] / rates['local disk, warm, per CPU-second of the reader']:.2f}); "  # noqa: E501
          f"chunk cache / local cold: {rates['lazy mount, chunk cache (page cache dropped)'] / rates['local disk, cold']:.2f}; "  # noqa: E501
          f"cold lazy / plain IPFS cat: {rates['lazy mount, cold (bitswap from A, verify, cache)'] / rates['plain IPFS cat through B (bitswap from A)']:.2f}; "  # noqa: E501
          f"cold lazy / ranged cats: {rates['lazy mount, cold (bitswap from A, verify, cache)'] / rates['IPFS cat in 4 MiB ranges, 2 in flight (the requests a lazy read makes)']:.2f}")  # noqa: E501


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=100)
    ap.add_argument("--throughput-only", action="store_true",
                    help="only the sequential-read table (2 nodes, no python image)")
    ap.add_argument("--readahead", type=int, default=None,
                    help="chunks the lazy workers fetch ahead of a sequential reader "
                         "(default: the worker's, off)")
    args = ap.parse_args()
    if args.throughput_only:
        with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="lazy-bench-") as d, \
                nodes(Path(d), 2) as (a, b):
            print_throughput(throughput(Path(d), a, b, args.size_mib, args.readahead),
                             args.size_mib)
        return 0
    for tool in ("strace", "chroot"):
        if shutil.which(tool) is None:
            sys.exit(f"lazy_bench: {tool} not found")
    sample = build_python()
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="lazy-bench-") as d, \
            nodes(Path(d), 4) as (a, b1, b2, b3):
        tmp = Path(d)
        state_a = tmp / "state-a"
        images_a = ImageStore(state_a)
        name = import_image(images_a, sample.layout)[0].name
        with IPFSClient(a.api_url) as ca:
            pushed = push_image(images_a, name, ca, state_dir=state_a)
        cid = pushed.cid
        blob_total = sum(layer.size for layer in images_a.resolve(pushed.name).layers)
        print(f"image {name}: {len(sample.layer_digests)} layers, eStargz blobs "
              f"{blob_total / MB:.1f} MB, pushed as {cid} (convert {pushed.convert_seconds:.1f}"
              f" s, add {pushed.add_seconds:.1f} s)", flush=True)

        lazy_store, lazy_img, lazy_ready, lazy_bytes = pull_once(tmp / "lazy", b1, cid, True)
        full_store, full_img, full_ready, full_bytes = pull_once(tmp / "full", b2, cid, False)
        try:
            with mounted_view(lazy_store, lazy_img.chain_ids[-1], tmp / "lazy-mp") as lmp, \
                    mounted_view(full_store, full_img.chain_ids[-1], tmp / "full-mp") as fmp:
                files = python_files(fmp, tmp)
                drop_caches()
                t0 = time.monotonic()
                full_read = sum(read_all(resolve_in(fmp, f) or fmp / f.lstrip("/"))
                                for f in files)
                full_files_s = time.monotonic() - t0
                drop_caches()
                before = received(b1)
                worker_before = worker_bytes(lazy_store, lazy_img.chain_ids)
                t0 = time.monotonic()
                lazy_read = sum(read_all(resolve_in(lmp, f) or lmp / f.lstrip("/"))
                                for f in files)
                lazy_files_s = time.monotonic() - t0
                lazy_files_bytes = received(b1) - before
                lazy_worker_bytes = worker_bytes(lazy_store, lazy_img.chain_ids) - worker_before
                assert lazy_read == full_read
        finally:
            lazy_store.close(unmount_remote=True)
            full_store.close()
        tp = throughput(tmp, a, b3, args.size_mib)

    print()
    print("| python image (" + f"{blob_total / MB:.1f} MB of eStargz blobs) | lazy (stargz) "
          "| full (overlayfs) | full/lazy |")
    print("|---|---:|---:|---:|")
    print(f"| rpull until the rootfs is ready | {lazy_ready:.2f} s | {full_ready:.2f} s | "
          f"{full_ready / lazy_ready:.1f}x |")
    print(f"| bytes fetched by rpull | {lazy_bytes / MB:.2f} MB | {full_bytes / MB:.2f} MB | "
          f"{full_bytes / max(lazy_bytes, 1):.1f}x |")
    print(f"| read the {len(files)} files `python3 -c pass` opens ({full_read / MB:.1f} MB), "
          f"cold | {lazy_files_s:.2f} s | {full_files_s:.2f} s | |")
    print(f"| bytes fetched for those reads (blocks) | {lazy_files_bytes / MB:.2f} MB | 0 | |")
    print(f"| bytes the lazy layers read from the IPFS API for them | "
          f"{lazy_worker_bytes / MB:.2f} MB | 0 | |")
    print(f"| ready + python files | {lazy_ready + lazy_files_s:.2f} s | "
          f"{full_ready + full_files_s:.2f} s | "
          f"{(full_ready + full_files_s) / (lazy_ready + lazy_files_s):.1f}x |")
    print(f"| total fetched | {(lazy_bytes + lazy_files_bytes) / MB:.2f} MB "
          f"({(lazy_bytes + lazy_files_bytes) / blob_total * 100:.1f}% of the blobs) | "
          f"{full_bytes / MB:.2f} MB | |")
    print()
    print_throughput(tp, args.size_mib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
