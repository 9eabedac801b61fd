#!/usr/bin/env python3
"""eStargz build and verify: ipfsnap against the reference library, in one run.

Makes (and caches) a ~150 MiB tar of mixed files from /usr/lib, then for each
configuration (gzip level 9, gzip level 6, zstd:chunked) builds it N times with ipfsnap
(``ipfsnap estargz build --workers W``) and with the reference (``estargz.Build`` through
the Go checker of tests/interop, GOMAXPROCS=W, which is also how many parts it splits the
tar into), alternating which goes first. Then it verifies every chunk of both blobs with
both tools (``ipfsnap estargz verify --toc-digest`` and the checker's ``verify``, i.e.
``estargz.Open`` + ``VerifyTOC`` + every chunk read through the reference reader and
checked), alternating too. Prints a table of medians and the ipfsnap/reference ratios.

Both sides are timed as whole processes (wall clock), start-up included.

    .venv/bin/python benchmarks/estargz_bench.py [--runs 3] [--workers 2]
        [--configs gzip-9,gzip-6,zstd] [--size-mib 150] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.interop.gochecker import build_checker  # noqa: E402

log = logging.getLogger("estargz_bench")

#: most of the tar is files up to SMALL_FILE (as in a typical layer: ~20 KiB on average)...
SMALL_FILE = 1 << 20
#: ...plus bigger ones up to MAX_FILE (several 4 MiB chunks each), as long as they make up
#: at most BIG_SHARE of the bytes
MAX_FILE = 16 << 20
BIG_SHARE = 0.2


@dataclass(frozen=True)
class Config:
    name: str
    ipfsnap_args: tuple[str, ...]
    reference_args: tuple[str, ...]


CONFIGS = {
    "gzip-9": Config("gzip-9", ("--compression", "gzip", "--level", "9"), ("-level", "9")),
    "gzip-6": Config("gzip-6", ("--compression", "gzip", "--level", "6"), ("-level", "6")),
    # ipfsnap's zstd level 3 is zstd's default; klauspost's SpeedDefault (the checker's
    # default -zstd-level) is its equivalent of zstd level 3
    "zstd": Config("zstd", ("--compression", "zstd", "--level", "3"), ("-zstd",)),
}


@dataclass
class Timing:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def median(self) -> float:
        return statistics.median(self.wall)

    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def emit(text: str = "") -> None:
    """The benchmark's result goes to stdout (logs go to stderr)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _iter_usr_lib(limit: int) -> Iterator[Path]:
    """Dirs, symlinks and regular files of /usr/lib in a stable order until ``limit``
    bytes of file content."""
    total = big = 0
    for dirpath, dirnames, filenames in os.walk("/usr/lib"):
        dirnames.sort()
        d = Path(dirpath)
        yield d
        for name in sorted(filenames):
            p = d / name
            try:
                st = p.lstat()
            except OSError:
                continue
            if p.is_symlink():
                yield p
            elif p.is_file() and st.st_size <= MAX_FILE and os.access(p, os.R_OK):
                if st.st_size > SMALL_FILE:
                    if big + st.st_size > BIG_SHARE * limit:
                        continue
                    big += st.st_size
                yield p
                total += st.st_size
                if total >= limit:
                    return


def make_tar(cache_dir: Path, size_mib: int) -> Path:
    out = cache_dir / f"usr-lib-{size_mib}mib-mixed.tar"
    if out.exists():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    log.info("writing %s (~%d MiB of /usr/lib)", out, size_mib)
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for p in _iter_usr_lib(size_mib << 20):
            try:
                tf.add(p, arcname=str(p.relative_to("/")), recursive=False)
            except OSError as e:
                log.warning("skipping %s: %s", p, e)
    tmp.rename(out)
    return out


def tar_stats(tar: Path) -> tuple[int, int, int]:
    """Entries, regular files, and files of more than one 4 MiB chunk."""
    entries = files = multi = 0
    with tarfile.open(tar) as tf:
        for ti in tf:
            entries += 1
            files += ti.isreg()
            multi += ti.isreg() and ti.size > 4 << 20
    return entries, files, multi


def timed(cmd: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``cmd``; return wall seconds, CPU seconds (user+sys of the child) and stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        list(cmd), capture_output=True, text=True, check=False,
        env=None if env is None else {**os.environ, **env},
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="ipfsnap workers = GOMAXPROCS")
    ap.add_argument("--configs", default="gzip-9,gzip-6,zstd")
    ap.add_argument("--size-mib", type=int, default=150)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "ipfsnap-bench")
    ap.add_argument("--ipfsnap", default=str(Path(sys.executable).with_name("ipfsnap")))
    ap.add_argument("--json", type=Path, help="also write the raw timings here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    configs = [CONFIGS[c] for c in args.configs.split(",")]

    checker = build_checker(args.cache_dir / "go-checker")
    tar = make_tar(args.cache_dir, args.size_mib)
    entries, files, multi = tar_stats(tar)
    tar_size = tar.stat().st_size
    ref_env = {"GOMAXPROCS": str(args.workers)}
    # what every ipfsnap row pays for starting Python and importing the CLI
    startup = statistics.median(
        timed([args.ipfsnap, "estargz", "verify", "--help"])[0] for _ in range(3)
    )
    load_start = os.getloadavg()

    results: dict[str, Timing] = {}
    sizes: dict[str, int] = {}
    rows: list[tuple[str, str, str]] = []  # (label, ipfsnap key, reference key)
    with tempfile.TemporaryDirectory(prefix="estargz-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for cfg in configs:
            blob = {"ipfsnap": tmp / f"{cfg.name}.ipfsnap.blob",
                    "reference": tmp / f"{cfg.name}.reference.blob"}
            toc: dict[str, str] = {}

            def build(tool: str, cfg: Config = cfg, blob: dict[str, Path] = blob,
                      toc: dict[str, str] = toc) -> None:
                if tool == "ipfsnap":
                    cmd = [args.ipfsnap, "estargz", "build", str(tar), str(blob[tool]),
                           "--workers", str(args.workers), *cfg.ipfsnap_args]
                    env = None
                else:
                    cmd = [str(checker), "build", "-in", str(tar), "-out", str(blob[tool]),
                           "-procs", str(args.workers), *cfg.reference_args]
                    env = ref_env
                wall, cpu, out = timed(cmd, env)
                t = results.setdefault(f"build {cfg.name} {tool}", Timing())
                t.wall.append(wall)
                t.cpu.append(cpu)
                toc[tool] = json.loads(out)["tocDigest"]
                sizes[f"{cfg.name} {tool}"] = blob[tool].stat().st_size
                log.info("build %-7s %-9s %6.2f s wall %6.2f s cpu", cfg.name, tool, wall, cpu)

            for run in range(args.runs):
                for tool in (("ipfsnap", "reference") if run % 2 == 0
                             else ("reference", "ipfsnap")):
                    build(tool)
            rows.append((f"build {cfg.name}", f"build {cfg.name} ipfsnap",
                         f"build {cfg.name} reference"))

            for made_by in ("ipfsnap", "reference"):
                for run in range(args.runs):
                    for tool in (("ipfsnap", "reference") if run % 2 == 0
                                 else ("reference", "ipfsnap")):
                        if tool == "ipfsnap":
                            cmd = [args.ipfsnap, "estargz", "verify", str(blob[made_by]),
                                   "--toc-digest", toc[made_by]]
                            env = None
                        else:
                            cmd = [str(checker), "verify", "-blob", str(blob[made_by]),
                                   "-toc-digest", toc[made_by]]
                            env = ref_env
                        wall, cpu, _ = timed(cmd, env)
                        t = results.setdefault(f"verify {cfg.name} {made_by} {tool}", Timing())
                        t.wall.append(wall)
                        t.cpu.append(cpu)
                        log.info("verify %-7s blob by %-9s with %-9s %6.2f s", cfg.name,
                                 made_by, tool, wall)
                rows.append((f"verify {cfg.name} ({made_by}'s blob)",
                             f"verify {cfg.name} {made_by} ipfsnap",
                             f"verify {cfg.name} {made_by} reference"))
    load_end = os.getloadavg()

    emit(f"input: {tar} ({tar_size / 2**20:.1f} MiB, {entries} entries, {files} files, "
         f"{multi} over 4 MiB); "
         f"{args.runs} runs, workers/GOMAXPROCS={args.workers}, {os.cpu_count()} CPUs; "
         f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end; "
         f"ipfsnap CLI start-up (included in its times) {startup:.2f} s")
    emit()
    emit("| step | ipfsnap median s | reference median s | ipfsnap/reference "
         "| ipfsnap CPU s | reference CPU s |")
    emit("|---|---:|---:|---:|---:|---:|")
    for label, a, b in rows:
        ta, tb = results[a], results[b]
        emit(f"| {label} | {ta.median():.2f} | {tb.median():.2f} | "
             f"{ta.median() / tb.median():.2f} | {ta.cpu_median():.2f} | "
             f"{tb.cpu_median():.2f} |")
    emit()
    emit("| blob | ipfsnap MiB | reference MiB |")
    emit("|---|---:|---:|")
    for cfg in configs:
        emit(f"| {cfg.name} | {sizes[f'{cfg.name} ipfsnap'] / 2**20:.1f} | "
             f"{sizes[f'{cfg.name} reference'] / 2**20:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({
            "tar": {"path": str(tar), "bytes": tar_size, "entries": entries, "files": files,
                    "multi_chunk_files": multi},
            "runs": args.runs, "workers": args.workers,
            "load": [load_start, load_end], "ipfsnap_startup": startup,
            "timings": {k: asdict(v) for k, v in results.items()},
            "blob_sizes": sizes,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
