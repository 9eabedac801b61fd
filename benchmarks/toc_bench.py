#!/usr/bin/env python3
"""Opening a lazy layer: ``estargz.open_layer`` and the tables the FUSE mount keeps.

Layers (built once, cached under /tmp/ipfsnap-toc-bench):

- a synthetic eStargz layer of N tiny files in N/100 directories (names and metadata like a
  typical Python image layer: owner names, distinct modtimes, digests);
- with ``--hello-bench``, the 4 layers of hello-bench's python image
  (``benchmarks/hello_bench.py``, its cached oci-archive), converted to eStargz (gzip
  level 1: the compression level changes offsets, not the TOC's shape).

For each layer, fresh child processes measure what a lazy layer's start costs, step by step
as ``ipfsnap.fs.worker`` does it: ``open_layer`` with the TOC digest (footer, TOC read,
inflate, digest, JSON parse, validation, index), ``LayerTables.from_index`` (inode and chunk
tables), pickling them (the TOC parser child sends them to the worker, or the warm-up stores
them), unpickling, and ``LazyLayer`` start-up; CPU seconds of each (``process_time``),
median of ``--runs``, and the child's peak RSS (``VmHWM``).

``--baseline SRC`` runs every measurement also with the ``src`` directory of another
checkout first on ``PYTHONPATH`` (e.g. a ``git worktree`` of an older commit), alternating
baseline and current runs, and prints the ratios: on a shared, loaded machine only ratios
from the same run compare.

For the synthetic layer it also reports, as before, the peak RSS of a process that only
opens the layer and the ``tracemalloc`` peak and what the index keeps.

    .venv/bin/python benchmarks/toc_bench.py [--entries 100000] [--runs 3] [--hello-bench]
        [--baseline /var/tmp/old/src] [--json out.json]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

CACHE = Path("/tmp/ipfsnap-toc-bench")
PER_DIR = 100
#: the steps a child measures, in order
STEPS = ("open_layer", "from_index", "pickle", "unpickle", "lazy_layer")


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _store(blob: Path, meta: Path, tar_bytes: bytes) -> tuple[Path, str]:
    from ipfsnap.estargz import BuildOptions, build

    tmp = blob.with_suffix(".tmp")
    with open(tmp, "wb") as dst:
        res = build(io.BytesIO(tar_bytes), dst, BuildOptions(level=1))
    tmp.rename(blob)
    meta.write_text(json.dumps({"tocDigest": res.toc_digest, "blobSize": res.blob_size}))
    return blob, res.toc_digest


def _cached(name: str) -> tuple[Path, Path, str | None]:
    blob = CACHE / f"{name}.blob"
    meta = CACHE / f"{name}.json"
    if blob.exists() and meta.exists():
        return blob, meta, str(json.loads(meta.read_text())["tocDigest"])
    return blob, meta, None


def build_layer(entries: int) -> tuple[Path, str]:
    """The cached synthetic blob and its TOC digest (rebuilt when missing)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    blob, meta, digest = _cached(f"layer-{entries}")
    if digest is not None:
        return blob, digest
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
    return _store(blob, meta, buf.getvalue())


def hello_bench_layers() -> list[tuple[str, Path, str]]:
    """hello-bench's python image layers as eStargz blobs (converted once, cached)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import hello_bench

    archive = hello_bench.build_big_image()
    CACHE.mkdir(parents=True, exist_ok=True)
    out: list[tuple[str, Path, str]] = []
    with tarfile.open(archive) as tf:

        def member(path: str) -> bytes:
            f = tf.extractfile(path)
            assert f is not None, path
            return f.read()

        index = json.loads(member("index.json"))
        mdigest = index["manifests"][0]["digest"]
        manifest = json.loads(member("blobs/sha256/" + mdigest.split(":")[1]))
        for n, layer in enumerate(manifest["layers"], start=1):
            hexd = layer["digest"].split(":")[1]
            name = f"hello-{n}-{hexd[:12]}"
            blob, meta, digest = _cached(name)
            if digest is None:
                blob, digest = _store(blob, meta, gzip.decompress(member("blobs/sha256/" + hexd)))
            out.append((f"hello-bench layer {n}", blob, digest))
    return out


def child_steps(blob: str, toc_digest: str) -> dict[str, float]:
    """CPU seconds of each step of a lazy layer's start, and the peak RSS (this process)."""
    import pickle

    from ipfsnap.estargz import open_layer
    from ipfsnap.estargz.reader import decompress_chunk
    from ipfsnap.fs.cache import ChunkCache
    from ipfsnap.fs.layer import LayerTables, LazyLayer
    from ipfsnap.fs.source import LocalFileSource

    src = LocalFileSource(Path(blob))
    out: dict[str, float] = {"base_mib": rss_kib() / 1024}
    clock = time.process_time
    t = clock()
    index = open_layer(src, os.path.getsize(blob), toc_digest=toc_digest, name=blob)
    out["entries"] = len(index)
    t, out["open_layer"] = clock(), clock() - t
    tables = LayerTables.from_index(index)
    del index
    t, out["from_index"] = clock(), clock() - t
    data = pickle.dumps(tables, protocol=pickle.HIGHEST_PROTOCOL)
    t, out["pickle"] = clock(), clock() - t
    out["parser_peak_mib"] = rss_kib("VmHWM") / 1024
    del tables
    tables = pickle.loads(data)
    t, out["unpickle"] = clock(), clock() - t
    out["pickle_mib"] = len(data) / (1 << 20)
    del data
    with tempfile.TemporaryDirectory(prefix="toc-bench-") as d:
        cache = ChunkCache(Path(d) / "layer", limit=1 << 30)
        layer = LazyLayer(tables, src, cache,
                          decompress=lambda comp, data, c: decompress_chunk(comp, data, c))
        out["lazy_layer"] = clock() - t
        out["inodes"] = len(layer.table)
    src.close()
    out["total"] = sum(out[s] for s in STEPS)
    out["peak_mib"] = rss_kib("VmHWM") / 1024
    return out


def child(blob: str, toc_digest: str, mode: str) -> None:
    """One measurement in this (fresh) process; prints a JSON object."""
    if mode == "steps":
        print(json.dumps(child_steps(blob, toc_digest)))
        return
    from ipfsnap.estargz import FileRangeReader, open_layer

    size = os.path.getsize(blob)
    out: dict[str, float] = {}
    with open(blob, "rb") as f:
        rr = FileRangeReader(f)
        if mode == "rss":
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


def run_child(blob: Path, toc_digest: str, mode: str, src: str | None = None
              ) -> dict[str, float]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                   else "")
    res = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(blob), toc_digest],
        check=True, capture_output=True, text=True, env=env,
    )
    result: dict[str, float] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def measure(label: str, blob: Path, digest: str, runs: int, baseline: str | None
            ) -> dict[str, object]:
    cur: list[dict[str, float]] = []
    base: list[dict[str, float]] = []
    for _ in range(runs):  # alternating, so both see the same load
        if baseline is not None:
            base.append(run_child(blob, digest, "steps", baseline))
        cur.append(run_child(blob, digest, "steps"))
    entries = int(cur[0]["entries"])
    print(f"\n{label}: {entries} TOC entries, blob {blob.stat().st_size} bytes, "
          f"median of {runs} (CPU seconds), load average {os.getloadavg()[0]:.1f}")
    cols = [*STEPS, "total"]
    print(f"{'':10} " + " ".join(f"{c:>11}" for c in cols) + "  parser peak RSS  peak RSS")
    rows = [("baseline", base), ("current", cur)] if base else [("current", cur)]
    for name, rs in rows:
        print(f"{name:10} " + " ".join(f"{_median(rs, c):11.3f}" for c in cols)
              + f"  {_median(rs, 'parser_peak_mib'):11.1f} MiB {_median(rs, 'peak_mib'):5.1f} MiB")
    if base:
        print(f"{'ratio':10} " + " ".join(
            f"{_median(base, c) / max(_median(cur, c), 1e-9):10.2f}x" for c in cols))
    return {"layer": label, "entries": entries, "current": cur, "baseline": base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hello-bench", action="store_true",
                    help="also the layers of hello-bench's python image")
    ap.add_argument("--baseline", metavar="SRC",
                    help="src directory of another checkout to compare with")
    ap.add_argument("--no-memory", action="store_true",
                    help="skip the open_layer-only RSS and tracemalloc children")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=3, metavar=("MODE", "BLOB", "DIGEST"))
    args = ap.parse_args()
    if args.child:
        child(args.child[1], args.child[2], args.child[0])
        return
    if args.baseline and not (Path(args.baseline) / "ipfsnap").is_dir():
        ap.error(f"--baseline {args.baseline}: no ipfsnap package there")
    t0 = time.monotonic()
    blob, digest = build_layer(args.entries)
    layers = [(f"synthetic {args.entries} files", blob, digest)]
    if args.hello_bench:
        layers = hello_bench_layers() + layers
    print(f"layers ready in {time.monotonic() - t0:.1f}s ({CACHE})")
    results = [measure(label, b, d, args.runs, args.baseline) for label, b, d in layers]
    report: dict[str, object] = {"layers": results}
    if not args.no_memory:
        rss = run_child(blob, digest, "rss")
        traced = run_child(blob, digest, "trace")
        print(f"\nopen_layer alone, synthetic layer: RSS {rss['base_mib']:.1f} MiB before, "
              f"peak {rss['peak_mib']:.1f} MiB, {rss['after_mib']:.1f} MiB after; "
              f"tracemalloc peak {traced['traced_peak_mib']:.1f} MiB, index keeps "
              f"{traced['traced_kept_mib']:.1f} MiB")
        report.update(rss=rss, traced=traced)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
