#!/usr/bin/env python3
"""``estargz.open_layer`` on a big TOC: time and peak memory.

Builds (once, cached under /tmp) an eStargz layer of N tiny files in N/100 directories
(names and metadata like a typical Python image layer: owner names, modtimes, digests),
then in fresh child processes:

- times ``open_layer`` (TOC read + inflate + digest + JSON parse + validation + index),
  median of ``--runs``, plus one ``walk()`` over every path (what the FUSE layer does next);
- peak RSS of a child that only imports the library and opens the layer once (the number
  that matters for the forked TOC parser of ``ipfsnap.fs.worker``), minus the RSS before
  ``open_layer``, and the peak of Python allocations under ``tracemalloc``.

    .venv/bin/python benchmarks/toc_bench.py [--entries 100000] [--runs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

CACHE = Path("/tmp/ipfsnap-toc-bench")
PER_DIR = 100


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def build_layer(entries: int) -> tuple[Path, str]:
    """The cached blob and its TOC digest (rebuilt when missing)."""
    from ipfsnap.estargz import BuildOptions, build

    CACHE.mkdir(parents=True, exist_ok=True)
    blob = CACHE / f"layer-{entries}.blob"
    meta = CACHE / f"layer-{entries}.json"
    if blob.exists() and meta.exists():
        return blob, json.loads(meta.read_text())["tocDigest"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(entries):
            if i % PER_DIR == 0:
                ti = tarfile.TarInfo(f"usr/lib/python3/d{i // PER_DIR:05d}")
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
                ti.uname = ti.gname = "root"
                ti.mtime = 1_700_000_000
                tf.addfile(ti)
            data = f"file {i}\n".encode()
            ti = tarfile.TarInfo(
                f"usr/lib/python3/d{i // PER_DIR:05d}/file-with-a-typical-name-{i:06d}.py"
            )
            ti.size = len(data)
            ti.mode = 0o644
            ti.uname = ti.gname = "root"
            ti.mtime = 1_700_000_000 + i
            tf.addfile(ti, io.BytesIO(data))
    tmp = blob.with_suffix(".tmp")
    with open(tmp, "wb") as dst:
        res = build(io.BytesIO(buf.getvalue()), dst, BuildOptions(level=1))
    tmp.rename(blob)
    meta.write_text(json.dumps({"tocDigest": res.toc_digest, "blobSize": res.blob_size}))
    return blob, res.toc_digest


def child(blob: str, toc_digest: str, mode: str) -> None:
    """One measurement in this (fresh) process; prints a JSON object."""
    from ipfsnap.estargz import FileRangeReader, open_layer

    size = os.path.getsize(blob)
    out: dict[str, float] = {}
    with open(blob, "rb") as f:
        rr = FileRangeReader(f)
        if mode == "time":
            t0, c0 = time.perf_counter(), time.process_time()
            index = open_layer(rr, size, toc_digest=toc_digest)
            out["open_s"] = time.perf_counter() - t0
            out["open_cpu_s"] = time.process_time() - c0
            t0 = time.perf_counter()
            n = sum(1 for _ in index.walk())
            out["walk_s"] = time.perf_counter() - t0
            out["paths"] = n
        elif mode == "rss":
            base = rss_kib()
            index = open_layer(rr, size, toc_digest=toc_digest)
            out["base_mib"] = base / 1024
            out["peak_mib"] = rss_kib("VmHWM") / 1024
            out["after_mib"] = rss_kib() / 1024
            out["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        else:
            import tracemalloc

            tracemalloc.start()
            index = open_layer(rr, size, toc_digest=toc_digest)
            cur, peak = tracemalloc.get_traced_memory()
            out["traced_peak_mib"] = peak / (1 << 20)
            out["traced_kept_mib"] = cur / (1 << 20)
        del index
    print(json.dumps(out))


def run_child(blob: Path, toc_digest: str, mode: str) -> dict[str, float]:
    res = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(blob), toc_digest],
        check=True, capture_output=True, text=True,
    )
    result: dict[str, float] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=3, metavar=("MODE", "BLOB", "DIGEST"))
    args = ap.parse_args()
    if args.child:
        child(args.child[1], args.child[2], args.child[0])
        return
    t0 = time.monotonic()
    blob, digest = build_layer(args.entries)
    n_dirs = -(-args.entries // PER_DIR)
    print(f"layer: {args.entries} files + {n_dirs} dirs, blob {blob.stat().st_size} bytes "
          f"({blob}, ready in {time.monotonic() - t0:.1f}s)")
    times = [run_child(blob, digest, "time") for _ in range(args.runs)]
    open_s = statistics.median(t["open_s"] for t in times)
    walk_s = statistics.median(t["walk_s"] for t in times)
    cpu_s = statistics.median(t["open_cpu_s"] for t in times)
    rss = run_child(blob, digest, "rss")
    traced = run_child(blob, digest, "trace")
    print(f"open_layer: median {open_s:.2f}s of {[round(t['open_s'], 2) for t in times]} "
          f"(CPU {cpu_s:.2f}s, load average {os.getloadavg()[0]:.1f}); "
          f"walk() of {int(times[0]['paths'])} paths {walk_s:.2f}s")
    print(f"RSS: {rss['base_mib']:.1f} MiB before open_layer, peak {rss['peak_mib']:.1f} MiB "
          f"(+{rss['peak_mib'] - rss['base_mib']:.1f}), {rss['after_mib']:.1f} MiB after")
    print(f"tracemalloc: peak {traced['traced_peak_mib']:.1f} MiB, index keeps "
          f"{traced['traced_kept_mib']:.1f} MiB")
    if args.json:
        args.json.write_text(json.dumps(
            {"entries": args.entries, "open_s": open_s, "open_cpu_s": cpu_s, "walk_s": walk_s,
             "runs": times, **rss, **traced}, indent=1))


if __name__ == "__main__":
    main()
