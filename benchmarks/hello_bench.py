"""hello-bench: cold start of a python workload from IPFS: full vs lazy vs lazy-optimized.

The reference's hello-bench modes legacy / estargz-noopt / estargz, on ipfsnap. For each mode,
every run starts from nothing local:

* ``lazy``: the image pushed as eStargz; ``rpull --ipfs CID`` (stargz snapshotter) then
  ``run --snapshotter=stargz``: the layers are FUSE mounts whose chunks come from IPFS on
  demand.
* ``lazy-plain``: as ``lazy`` but pushed with ``ipfs-push --layout=plain``: every layer in
  its own order, as the reference's ipfs-push converts it (``lazy``'s default push puts the
  files the image's own command reads at its start first, image/startup.py, since
  2026-11-29).
* ``lazy-opt``: the image pushed with ``ipfs-push --optimize --args <the workload>``: the
  files the workload read when recorded come first in each layer, before
  ``.prefetch.landmark``, and the lazy mount prefetches them before the container starts.
* ``full``: the image pushed with ``--estargz=false``; ``rpull --ipfs CID --snapshotter
  overlayfs`` fetches and unpacks every layer, then ``run --snapshotter=overlayfs``.

Mode suffixes change the lazy configuration (for experiments): ``-nobg``
(``no_background_fetch = true``), ``-nb`` (``[blob] neighbour_span = 262144``), ``-nonb``
(``neighbour_span = 0``), ``-seqpf`` (the prefetch as before 2026-11-28: spans of up to 8
MiB, one request at a time), ``-ahead`` (rpull fetches every lazy layer's footer and TOC
ahead as soon as the manifest is verified: ``IPFSNAP_TOC_AHEAD=1``), ``-ahead1`` (the first
lazy layer's only, the default: ``IPFSNAP_TOC_AHEAD=first``), ``-noahead`` (none),
``-tail1m`` (layer workers read the blob's last 1 MiB in one request to open its TOC:
``IPFSNAP_TOC_TAIL=1048576``), ``-sp3``/``-sp1`` (three/one warm spares:
``IPFSNAP_WARM_SPARES``, default 3),
``-refill0`` (a used spare replaced at once, during the pull: ``IPFSNAP_REFILL_QUIET=0``; a
suffix's environment goes to the snapshotter too),
``-cold`` (this mode's snapshotter started on demand inside the timed pull, as
``--cold-snapshotter`` does for every mode), ``-mc4``/``-mc8`` (``max_concurrency = 4``/``8``),
``-nbnow`` (neighbour chunks stored before the read that fetched them is answered:
``IPFSNAP_NEIGHBOURS_LATER=0``),
``-nowarm`` (``run`` reads nothing of the command's executable and libraries ahead:
``[run] warm_bytes = 0``; also turns off the next), ``-nopw`` (rpull does not ask the
snapshotter to read the image's command ahead: ``[run] warm_on_pull = false``), ``-nosf``
(the warm-ups read the exec's files only, not the locale, zone and python start-up files:
``[run] warm_start_files = false``), e.g. ``lazy-nobg-nb``.

Workloads (``--workload``, default ``hello``): ``hello`` = ``python3 -c
'print("Hello, World!")'``; ``imports`` = ``python3 -c`` importing several stdlib packages
(json, decimal, email, http, xml, asyncio, unittest, argparse, logging, sqlite3).

The blobs live only on node A (the pusher). Each run gets a fresh node B (new repo, so no
block is cached) connected to A, a fresh ipfsnap state dir (no image, snapshot or chunk
cache), then the state dir's snapshotter is started (``ipfsnap snapshotter``) and the run
waits until it serves and its spare layer workers wait for a request, then the page cache is
dropped (``echo 3 > /proc/sys/vm/drop_caches``), and only then are pull and run timed;
everything crosses bitswap over loopback. Modes alternate (full, lazy, lazy-opt, full, ...).
Timed: pull (the rpull command; for lazy modes it mounts the layers, so the prefetch is in
it), run (the run command until it exits, its output checked), total.

Why the snapshotter runs before the timed pull: the reference's hello-bench
(containerd/stargz-snapshotter script/benchmark/hello-bench: ``run.sh`` calls
``reboot_containerd.sh`` before measuring each mode) kills containerd and
containerd-stargz-grpc, wipes their state, starts both again and waits until they answer
(``ls`` on the snapshotter's socket, ``ctr version``); only then does ``src/hello.py`` time
``ctr-remote images rpull`` and the run. So its pull starts from empty caches but with the
snapshotter already a running service, as on a deployed node; ipfsnap's snapshotter is the
same kind of service (systemd unit, or started by the first command). Until 2026-11-28 this
bench let rpull start the snapshotter on demand, so every run paid its start-up (~1.1 s
measured) inside the timed pull; ``--cold-snapshotter`` keeps that method, and the table's
notes say which one a run used and how long the start-up took. The benchmark also keeps
Python's compiled modules (it compiles ipfsnap's once and clears PYTHONDONTWRITEBYTECODE for
the ipfsnap commands), as an installed package has them.
Bytes fetched from IPFS = bytes node B received over bitswap (``stats/bitswap``
``DataReceived``), which counts each block once, whoever asked for it.

Image: a python image about the size of the seed's ``python:3.9`` (Debian bookworm + the
build tools the official image carries + python3; 4 layers, ~600 MB uncompressed), built
offline once with debootstrap + chroot apt-get and cached in /var/cache/ipfsnap-test.
``--quick`` uses the small python sample (ipfsnap.content.sample, 2 layers) and one run each.

    .venv/bin/python benchmarks/hello_bench.py [--runs 5] [--quick] [--image big|small]
        [--workload hello|imports|all] [--modes full,lazy,lazy-opt] [--json runs.json]
        [--runs-other 3] [--keep-logs DIR] [--cold-snapshotter]
    .venv/bin/python benchmarks/hello_bench.py --build-only     # just build/cache the image
    .venv/bin/python benchmarks/hello_bench.py --report runs.json  # table of saved runs
    .venv/bin/python benchmarks/hello_bench.py --phases DIR/hello-lazy-0 ...  # see below

``--keep-logs DIR`` keeps, per run, the snapshotter's and every layer worker's log and final
status (TOC open, prefetch, FUSE reads, foreground/background requests and their seconds),
the rpull and run commands' own ``-v`` logs, with the run's wall-clock phase times in
``times.json``; ``--phases RUN_DIR...`` reads them back as a table of where the cold start
spent its time (snapshotter start-up, CLI start-up, resolve, each layer, run).

Needs root, FUSE, runc, strace (lazy-opt), debootstrap and the managed IPFS node (js-ipfs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ipfsnap.content.sample import (
    DEFAULT_CACHE,
    SAMPLE_CREATED,
    apt_mirror,
    build_python,
    chroot_mounts,
    gzip_bytes,
    tar_directory,
    upperdir_to_tar,
    write_layout_index,
)
from ipfsnap.ipfs.node import ManagedNode, rpc_call
from ipfsnap.ipfs.pnet import generate_swarm_key, write_swarm_key
from ipfsnap.oci import (
    Descriptor,
    Manifest,
    canonical_json,
    digest_hex,
    host_platform,
    mediatypes,
    sha256_digest,
)

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
IPFSNAP = ROOT / ".venv" / "bin" / "ipfsnap"
GREETING = "Hello, World!"
HELLO_CMD = ["python3", "-c", f'print("{GREETING}")']

#: bump when the recipe changes, so the cached image is rebuilt. 2 (2026-11-28, fifth
#: session): the layers' .pyc files match their sources again (version 1's archives set every
#: mtime to a fixed value, so all its bytecode was stale: python read each module's source
#: too and compiled it at every start, in every mode; content/sample.py clamp_pyc)
BIG_IMAGE_VERSION = "2"
BIG_IMAGE_NAME = "ipfsnap-bench/python:bookworm-build"

#: layers 2..4 of the big image, as the official python image stacks them: buildpack-deps'
#: curl+scm layer, its compilers and -dev libraries, then python itself
BIG_LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "curl, ca-certificates, git, ssh client (buildpack-deps:bookworm-scm)",
        ("ca-certificates", "curl", "wget", "gnupg", "netbase", "git", "openssh-client",
         "procps", "unzip", "xz-utils"),
    ),
    (
        "build-essential and -dev libraries (buildpack-deps:bookworm)",
        ("build-essential", "autoconf", "automake", "libtool", "pkg-config", "make",
         "libssl-dev", "libffi-dev", "zlib1g-dev", "libbz2-dev", "liblzma-dev",
         "libsqlite3-dev", "libreadline-dev", "libncurses-dev", "libxml2-dev",
         "libxslt1-dev", "libyaml-dev", "libgdbm-dev", "libdb-dev", "uuid-dev",
         "libexpat1-dev", "libgmp-dev", "libcurl4-openssl-dev", "libpq-dev",
         "default-libmysqlclient-dev", "libjpeg-dev", "libpng-dev", "libwebp-dev",
         "libfreetype-dev", "libtiff-dev", "libglib2.0-dev"),
    ),
    (
        "python3, python3-dev, pip, venv",
        ("python3", "python3-dev", "python3-pip", "python3-venv", "python3-setuptools",
         "python3-wheel"),
    ),
)

#: lazy modes use the default configuration (background fetch on, as users run it) unless
#: a suffix says otherwise (see :func:`mode_config`)
DEFAULT_MODES = ("full", "lazy", "lazy-opt")
BASE_MODES = ("full", "lazy-opt", "lazy-plain", "lazy")
SUFFIXES = {
    "-nobg": ("", "no_background_fetch = true"),
    "-nb": ("blob", "neighbour_span = 262144"),
    "-nonb": ("blob", "neighbour_span = 0"),
    "-seqpf": ("", "prefetch_concurrency = 1\n[blob]\nprefetch_chunk_size = 0"),
    "-nb1m": ("blob", "neighbour_span = 1048576"),
    "-ra": ("blob", "readahead_chunks = 1"),
    # on-demand reads as concurrent 512 KiB range requests, up to 8 per layer at once
    "-split": ("", "max_concurrency = 8\n[blob]\nread_split_size = 524288"),
    # not config lines: the rpull command's environment (see SUFFIX_ENV), and the snapshotter
    # started on demand inside the timed pull (as --cold-snapshotter, for this mode only)
    "-ahead": ("env", ""),
    "-ahead1": ("env", ""),
    "-noahead": ("env", ""),
    "-tail1m": ("env", ""),
    "-sp3": ("env", ""),
    "-sp1": ("env", ""),
    "-refill0": ("env", ""),
    "-nbnow": ("env", ""),
    "-cold": ("run", ""),
    # four concurrent fetches per layer (default 2, the reference's value)
    "-mc4": ("", "max_concurrency = 4"),
    # eight (the reference bounds only background fetches, not on-demand reads)
    "-mc8": ("", "max_concurrency = 8"),
    # run reads nothing ahead of the command's exec (as before the fifth session)
    "-nowarm": ("config.run", "warm_bytes = 0"),
    # rpull does not ask the snapshotter to read the image's command ahead (as before the
    # sixth session; run still warms its own command)
    "-nopw": ("config.run", "warm_on_pull = false"),
    # the warm-ups read only the exec's files, not what the program's start reads after the
    # loader (as before the seventh session)
    "-nosf": ("config.run", "warm_start_files = false"),
}
#: the config tables of suffix kinds ("run" is taken: a suffix that changes the run itself)
CONFIG_TABLES = {"blob": "[blob]", "config.run": "[run]"}
#: suffixes that set the rpull command's environment instead of the config
SUFFIX_ENV = {"-ahead": {"IPFSNAP_TOC_AHEAD": "1"},
              # the first lazy layer's footer and TOC only, fetched by rpull ahead (default
              # since 2026-11-28's fourth session); -noahead: none
              "-ahead1": {"IPFSNAP_TOC_AHEAD": "first"},
              "-noahead": {"IPFSNAP_TOC_AHEAD": "0"},
              # the layer workers read the blob's last 1 MiB in one request to open the
              # TOC (default: the footer's block, then what the TOC needs before it)
              "-tail1m": {"IPFSNAP_TOC_TAIL": "1048576"},
              # three warm spares (the default since the fourth session), one (before):
              # the next layers' warm-ups in spares skip the imports
              "-sp3": {"IPFSNAP_WARM_SPARES": "3"},
              "-sp1": {"IPFSNAP_WARM_SPARES": "1"},
              # used spares replaced at once (during the pull), as before the refill
              "-refill0": {"IPFSNAP_REFILL_QUIET": "0"},
              # neighbour chunks stored before the read that fetched them is answered (as
              # before the fifth session; default: after)
              "-nbnow": {"IPFSNAP_NEIGHBOURS_LATER": "0"}}
IMPORTS = ("import json, decimal, email.parser, http.client, xml.etree.ElementTree, asyncio, "
           "unittest, argparse, logging, sqlite3; print('imports ok')")
#: workload -> (command, what its output must contain)
WORKLOADS: dict[str, tuple[list[str], str]] = {
    "hello": (HELLO_CMD, GREETING),
    "imports": (["python3", "-c", IMPORTS], "imports ok"),
}


def parse_mode(mode: str) -> tuple[str, list[str]]:
    """(base mode, suffixes) of a mode name such as ``lazy-opt-nobg``."""
    for base in BASE_MODES:
        if mode == base or mode.startswith(base + "-"):
            rest = mode[len(base):]
            sufs: list[str] = []
            while rest:
                for suf in sorted(SUFFIXES, key=len, reverse=True):
                    if rest.startswith(suf):
                        sufs.append(suf)
                        rest = rest[len(suf):]
                        break
                else:
                    raise ValueError(f"unknown mode {mode!r}")
            if base == "full" and sufs:
                raise ValueError(f"mode {mode!r}: full takes no suffix")
            return base, sufs
    raise ValueError(f"unknown mode {mode!r}")


def mode_config(mode: str) -> str:
    """The ipfsnap config.toml of a mode."""
    _, sufs = parse_mode(mode)
    # a suffix that opens a table goes last, so plain top-level keys stay above it
    top = sorted((SUFFIXES[s][1] for s in sufs if SUFFIXES[s][0] == ""),
                 key=lambda line: "[" in line)
    text = "".join(f"{line}\n" for line in top)
    for kind, header in CONFIG_TABLES.items():
        lines = [SUFFIXES[s][1] for s in sufs if SUFFIXES[s][0] == kind]
        if lines:
            if header not in text:
                text += f"{header}\n"
            text += "".join(f"{line}\n" for line in lines)
    return text


class BenchError(Exception):
    """The benchmark could not be set up or a run failed."""


# ---------------------------------------------------------------------------------------------
# the big python image (built once, cached)


def _sh(cmd: Sequence[str], what: str, timeout: float = 1800) -> None:
    log.info("build: %s", " ".join(cmd))
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise BenchError(f"image build: {what} exited {proc.returncode}: {' | '.join(tail)}")


def _mount_overlay(lowers: Sequence[Path], target: Path, upper: Path | None = None,
                   work: Path | None = None) -> None:
    """Overlay of ``lowers`` (top first) at ``target``; read-only without an upperdir."""
    opts = "lowerdir=" + ":".join(str(p) for p in lowers)
    if upper is not None and work is not None:
        opts += f",upperdir={upper},workdir={work}"
    elif len(lowers) == 1:
        # overlay needs two lowers when read-only; one directory is just a bind mount
        _sh(["mount", "--bind", "-o", "ro", str(lowers[0]), str(target)], f"bind {target}")
        return
    _sh(["mount", "-t", "overlay", "overlay", "-o", opts, str(target)], f"overlay {target}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-R", str(path)], capture_output=True)


def _apt_layer(work: Path, n: int, lowers: list[Path], packages: Sequence[str]) -> Path:
    """Install ``packages`` with chroot apt-get on an overlay of ``lowers`` (top first);
    return the layer tar built from the overlay's upperdir."""
    upper, ovwork, merged, below = (work / f"{name}{n}" for name in
                                    ("upper", "ovwork", "merged", "below"))
    for d in (upper, ovwork, merged, below):
        d.mkdir()
    _mount_overlay(lowers, merged, upper, ovwork)
    try:
        # the chroot's own /dev and read-only /proc, /sys: maintainer scripts run as root
        with chroot_mounts(merged):
            shutil.copy("/etc/resolv.conf", merged / "etc/resolv.conf")
            env = ["/usr/bin/env", "DEBIAN_FRONTEND=noninteractive"]
            _sh(["chroot", str(merged), *env, "apt-get", "update", "-q"], "apt-get update")
            _sh(["chroot", str(merged), *env, "apt-get", "install", "-y", "-q",
                 "--no-install-recommends", *packages], f"apt-get install ({n})")
            _sh(["chroot", str(merged), "apt-get", "clean"], "apt-get clean")
    finally:
        _umount(merged)
    # images ship neither the package lists nor the .deb cache
    for junk in ("var/lib/apt/lists", "var/cache/apt", "etc/resolv.conf", "var/log/apt",
                 "var/cache/debconf/templates.dat-old"):
        p = upper / junk
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    out = work / f"layer{n}.tar"
    # the "lower" view tells upperdir_to_tar which opaque dirs also exist below
    _mount_overlay(lowers, below)
    try:
        upperdir_to_tar(upper, below, out)
    finally:
        _umount(below)
    lowers.insert(0, upper)
    return out


def _write_blob(layout: Path, data: bytes) -> str:
    digest = sha256_digest(data)
    path = layout / "blobs" / "sha256" / digest_hex(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(data)
    return digest


def _assemble(base: Path, tars: Sequence[Path], history: Sequence[str]) -> Path:
    layout = base / "layout"
    if layout.exists():
        shutil.rmtree(layout)
    layers = []
    diff_ids = []
    for t in tars:
        raw = t.read_bytes()
        diff_ids.append(sha256_digest(raw))
        gz = gzip_bytes(raw)
        del raw
        layers.append(Descriptor(mediatypes.OCI_LAYER_GZIP, _write_blob(layout, gz), len(gz)))
    plat = host_platform()
    config = {
        "created": SAMPLE_CREATED,
        "architecture": plat.architecture,
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "LANG=C.UTF-8"],
            "Cmd": ["python3"],
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": SAMPLE_CREATED, "created_by": h} for h in history],
    }
    cbytes = canonical_json(config)
    cdesc = Descriptor(mediatypes.OCI_CONFIG, _write_blob(layout, cbytes), len(cbytes))
    mbytes = Manifest(mediatypes.OCI_MANIFEST, cdesc, tuple(layers)).to_bytes()
    target = Descriptor(mediatypes.OCI_MANIFEST, _write_blob(layout, mbytes), len(mbytes))
    write_layout_index(layout, BIG_IMAGE_NAME, target)
    archive = base / "image.oci.tar"
    tar_directory(layout, archive)
    shutil.rmtree(layout)  # the archive is what the benchmark imports
    return archive


def build_big_image(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The ~600 MB 4-layer python image's oci-archive (built once, then cached)."""
    base = cache_dir / f"hello-bench-python-{BIG_IMAGE_VERSION}"
    archive = base / "image.oci.tar"
    if archive.is_file():
        return archive
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        raise BenchError("building the benchmark image needs root and debootstrap")
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=base))
    try:
        rootfs = work / "rootfs"
        t0 = time.monotonic()
        _sh(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), apt_mirror()],
            "debootstrap")
        for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        for index in (rootfs / "var/lib/apt/lists").glob("*"):
            if index.is_file():
                index.unlink()
        tars = [work / "layer1.tar"]
        tar_directory(rootfs, tars[0], root_owned=False)
        log.info("build: base layer in %.0f s", time.monotonic() - t0)
        lowers = [rootfs]
        history = ["debootstrap --variant=minbase bookworm"]
        for n, (what, packages) in enumerate(BIG_LAYERS, start=2):
            t0 = time.monotonic()
            tars.append(_apt_layer(work, n, lowers, packages))
            history.append(f"apt-get install {what}")
            log.info("build: layer %d (%s) in %.0f s", n, what, time.monotonic() - t0)
        _assemble(base, tars, history)
    finally:
        _umount(work / "merged")
        shutil.rmtree(work, ignore_errors=True)
    return archive


def small_image() -> Path:
    image = build_python()
    if image.oci_archive is None:
        raise BenchError("small python sample has no oci-archive")
    return image.oci_archive


def image_sizes(archive: Path) -> tuple[int, int, int]:
    """(layers, compressed bytes, uncompressed bytes) of a single-manifest oci-archive."""
    import tarfile

    with tarfile.open(archive) as tar:
        def blob(digest: str) -> bytes:
            f = tar.extractfile(f"blobs/sha256/{digest_hex(digest)}")
            assert f is not None
            return f.read()

        index = json.loads(blob_index(tar))
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        compressed = sum(int(layer["size"]) for layer in manifest["layers"])
        uncompressed = 0
        for layer in manifest["layers"]:
            f = tar.extractfile(f"blobs/sha256/{digest_hex(layer['digest'])}")
            assert f is not None
            import gzip

            with gzip.GzipFile(fileobj=f) as gz:
                while chunk := gz.read(1 << 20):
                    uncompressed += len(chunk)
        return len(manifest["layers"]), compressed, uncompressed


def blob_index(tar: object) -> bytes:
    import tarfile

    assert isinstance(tar, tarfile.TarFile)
    f = tar.extractfile("index.json")
    assert f is not None
    return f.read()


# ---------------------------------------------------------------------------------------------
# the runs


@dataclass
class Run:
    mode: str
    pull: float
    run: float
    #: bytes of blocks node B holds after the run (its repo was empty): what came over IPFS
    fetched: int
    #: node B's bitswap DataReceived over the run (js-ipfs undercounts range reads: see docs)
    bitswap: int = 0
    #: lazy modes: fetched bytes the layer filesystem reports (snapshot status), else -1
    layer_fetched: int = -1
    workload: str = "hello"
    #: seconds from launching ``ipfsnap snapshotter`` until it served and its spare layer
    #: worker waited for a mount (before the timed pull); -1: not measured
    ready: float = -1.0
    #: the snapshotter was started on demand by rpull, inside the timed pull
    #: (``--cold-snapshotter``), instead of before it
    cold: bool = False

    @property
    def total(self) -> float:
        return self.pull + self.run


@dataclass
class Bench:
    work: Path
    node_a: ManagedNode
    key_dir: Path
    #: "full", "lazy", or "lazy-opt:<workload>" -> CID
    cids: dict[str, str] = field(default_factory=dict)
    keep_logs: Path | None = None
    #: the old method: no snapshotter before the timed pull, rpull starts it on demand
    cold_snapshotter: bool = False


def ipfsnap_env() -> dict[str, str]:
    """The environment of every ipfsnap command (and so of the snapshotter and its workers
    they start): as on an installed node, Python keeps the compiled modules
    (PYTHONDONTWRITEBYTECODE, which a development shell may set, would make every ipfsnap
    process compile its modules again: ~0.2-0.3 s per command measured under load)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["IPFSNAP_TEST_NO_TTY"] = "1"
    return env


def precompile() -> None:
    """Compile ipfsnap's modules once (pip does it at install time for a deployed node), so
    the first run does not pay for it either."""
    import compileall

    compileall.compile_dir(str(ROOT / "src" / "ipfsnap"), quiet=1)


def ipfsnap(state: Path, *args: str, api: str | None = None, timeout: float = 3600,
            capture: bool = True, verbose: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [str(IPFSNAP), "--state-dir", str(state)]
    config = state.with_name(state.name + ".toml")
    if config.is_file():
        cmd += ["--config", str(config)]
    if api:
        cmd += ["--ipfs-api", api]
    if verbose:
        cmd.append("-v")
    proc = subprocess.run([*cmd, *args], capture_output=capture, text=True, timeout=timeout,
                          env={**ipfsnap_env(), **(env or {})})
    if proc.returncode != 0:
        err = (proc.stderr or "").strip().splitlines()[-3:]
        raise BenchError(f"ipfsnap {' '.join(args[:3])} exited {proc.returncode}: "
                         + " | ".join(err))
    return proc


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def bitswap_received(api_url: str) -> int:
    stats = rpc_call(api_url, "stats/bitswap", timeout=30.0)
    return int(stats.get("DataReceived", 0))


def blockstore_bytes(repo: Path) -> int:
    """Bytes of the block files in an IPFS repo (js-ipfs and Kubo keep them in blocks/)."""
    total = 0
    for root, _dirs, files in os.walk(repo / "blocks"):
        for name in files:
            if name.endswith(".data"):
                with contextlib.suppress(OSError):
                    total += os.path.getsize(os.path.join(root, name))
    return total


def layer_fetched(state: Path, api: str) -> int:
    """Sum of ``fetched`` over the lazy layers (``snapshot status``; starts the snapshotter,
    which the cleanup stops)."""
    out = ipfsnap(state, "snapshot", "status", "--json", api=api).stdout
    return sum(int(json.loads(line)["fetched"]) for line in out.splitlines() if line.strip())


def cleanup_state(state: Path) -> None:
    """Stop what a run left (snapshotter, lazy mounts) and delete its state dir."""
    subprocess.run([str(IPFSNAP), "--state-dir", str(state), "snapshotter", "stop"],
                   capture_output=True, timeout=120, env=ipfsnap_env())
    out = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True)
    for m in sorted(out.stdout.split("\n"), reverse=True):
        if m.startswith(str(state) + "/"):
            subprocess.run(["umount", "-l", m], capture_output=True)
    shutil.rmtree(state, ignore_errors=True)


def keep_logs(state: Path, dest: Path, times: dict[str, float],
              cli_logs: dict[str, str] | None = None) -> None:
    """Copy the snapshotter's and the layer workers' logs and statuses to ``dest``, with the
    timed commands' own (``-v``) logs in ``cli_logs`` (name -> text)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "times.json").write_text(json.dumps(times, indent=1))
    for name, text in (cli_logs or {}).items():
        (dest / f"{name}.log").write_text(text)
    with contextlib.suppress(OSError):
        shutil.copy(state / "snapshotter.log", dest / "snapshotter.log")
    workers = state / "fs" / "workers"
    if workers.is_dir():
        for n, wdir in enumerate(sorted(workers.iterdir())):
            for name in ("worker.log", "status.json"):
                with contextlib.suppress(OSError):
                    shutil.copy(wdir / name, dest / f"layer{n}-{name}")


#: x86_64 syscall numbers of select(2) and pselect6(2): a spare layer worker waits in one
#: of them for its spec (``fs.worker.wait_for_spec``) once its imports are done
_SELECT_SYSCALLS = {"x86_64": ("23", "270"), "aarch64": ("72",)}
#: seconds the snapshotter's spare worker may take to finish its imports (~1 s idle; a
#: heavily loaded 2-core machine took ~6 s, docs/benchmarks.md)
SPARE_TIMEOUT = 60.0


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def spare_waiting(snapshotter_pid: int) -> bool:
    """Whether the snapshotter's spare layer workers (children ``python -m ipfsnap.fs.worker
    --stdin``: the mounter starts one for mounts and three for warm-ups) all wait for
    a request, blocked in select (imports done); False while there is none."""
    calls = _SELECT_SYSCALLS.get(os.uname().machine, ())
    spares = waiting = 0
    for child in _children(snapshotter_pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            syscall = Path(f"/proc/{child}/syscall").read_text().split()
        except OSError:
            continue
        if b"ipfsnap.fs.worker" in argv and b"--stdin" in argv:
            spares += 1
            waiting += bool(syscall[:1] and syscall[0] in calls)
    return spares > 0 and waiting == spares


def start_snapshotter(state: Path, api: str, env: dict[str, str] | None = None) -> float:
    """Start the state dir's snapshotter (``ipfsnap snapshotter``, which returns once it
    answers) and wait until its spare layer workers are ready too, as on a node where the
    snapshotter runs as a service; the seconds it took."""
    from ipfsnap.service.paths import lock_holder

    t0 = time.perf_counter()
    ipfsnap(state, "snapshotter", api=api, timeout=300, env=env)
    pid = lock_holder(state)
    if pid is None:
        raise BenchError(f"snapshotter of {state}: not running after 'ipfsnap snapshotter'")
    deadline = time.monotonic() + SPARE_TIMEOUT
    while not spare_waiting(pid):
        if time.monotonic() > deadline:
            log.warning("snapshotter %d: spare layer workers not ready after %.0f s; timing "
                        "the pull anyway", pid, SPARE_TIMEOUT)
            break
        time.sleep(0.02)
    return time.perf_counter() - t0


def one_run(bench: Bench, mode: str, n: int, workload: str = "hello") -> Run:
    base, sufs = parse_mode(mode)
    # node B joins A's private network (same swarm.key), so it can fetch only from A
    repo = bench.work / f"node-b-{workload}-{mode}-{n}"
    shutil.copy(bench.key_dir / "swarm.key", _mkdir(repo) / "swarm.key")
    node_b = ManagedNode(repo).start()
    state = bench.work / f"state-{workload}-{mode}-{n}"
    state.mkdir()
    state.with_name(state.name + ".toml").write_text(mode_config(mode))
    try:
        rpc_call(node_b.api_url, "swarm/connect", timeout=30.0, arg=bench.node_a.swarm_addrs[0])
        api = node_b.api_multiaddr
        snapshotter = "overlayfs" if base == "full" else "stargz"
        cid = bench.cids[f"lazy-opt:{workload}" if base == "lazy-opt" else base]
        argv, expect = WORKLOADS[workload]
        ready = -1.0
        w_ready = time.time()
        cold = bench.cold_snapshotter or "-cold" in sufs
        # a suffix's environment goes to every ipfsnap command of the run (the snapshotter
        # started here too)
        rpull_env = {k: v for suf in sufs for k, v in SUFFIX_ENV.get(suf, {}).items()}
        if not cold:
            ready = start_snapshotter(state, api, rpull_env)
        verbose = bench.keep_logs is not None
        drop_caches()
        before = bitswap_received(node_b.api_url)
        w0 = time.time()
        t0 = time.perf_counter()
        pulled = ipfsnap(state, "image", "rpull", "--ipfs", "--snapshotter", snapshotter, cid,
                         api=api, verbose=verbose, env=rpull_env)
        t1 = time.perf_counter()
        proc = ipfsnap(state, "run", f"--snapshotter={snapshotter}", "--rm", cid, "hello",
                       *argv, api=api, verbose=verbose, env=rpull_env)
        t2 = time.perf_counter()
        if expect not in proc.stdout:
            raise BenchError(f"{workload}/{mode} run {n}: unexpected output: "
                             f"{proc.stdout!r} {proc.stderr[-500:]!r}")
        bitswap = bitswap_received(node_b.api_url) - before
        fetched = blockstore_bytes(repo)
        if bench.keep_logs is not None:
            times = {"start": w0, "pulled": w0 + t1 - t0, "ran": w0 + t2 - t0}
            if ready >= 0:
                times["snapshotter_launched"] = w_ready
                times["snapshotter_ready"] = w_ready + ready
            keep_logs(state, bench.keep_logs / f"{workload}-{mode}-{n}", times,
                      {"rpull": pulled.stderr, "run": proc.stderr})
        lf = layer_fetched(state, api) if base != "full" else -1
        return Run(mode, t1 - t0, t2 - t1, fetched, bitswap, lf, workload, ready, cold)
    finally:
        cleanup_state(state)
        state.with_name(state.name + ".toml").unlink(missing_ok=True)
        node_b.stop()
        shutil.rmtree(repo, ignore_errors=True)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def setup(archive: Path, work: Path, workloads: Sequence[str] = ("hello",),
          optimized: bool = False, full: bool = True, plain: bool = False
          ) -> Iterator[Bench]:
    """Node A with the image pushed as eStargz (lazy), not converted (full, if ``full``),
    as eStargz in the layers' own order (lazy-plain, if ``plain``) and, if ``optimized``,
    optimized for each workload (lazy-opt)."""
    key = generate_swarm_key()
    repo_a = work / "node-a"
    write_swarm_key(repo_a, key)
    key_dir = repo_a
    node_a = ManagedNode(repo_a).start()
    state_a = work / "state-a"
    state_a.mkdir()
    try:
        bench = Bench(work, node_a, key_dir)
        api = node_a.api_multiaddr
        ipfsnap(state_a, "image", "import", str(archive), "--name", "hello-bench", api=api)

        def push(what: str, *args: str) -> None:
            t0 = time.perf_counter()
            proc = ipfsnap(state_a, "image", "ipfs-push", *args, "hello-bench", api=api)
            bench.cids[what] = proc.stdout.strip().splitlines()[-1]
            print(f"# pushed for {what}: {bench.cids[what]} "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)

        push("lazy", "--estargz=true")
        if full:
            push("full", "--estargz=false")
        if plain:
            push("lazy-plain", "--estargz=true", "--layout=plain")
        if optimized:
            for w in workloads:
                push(f"lazy-opt:{w}", "--optimize", "--args", json.dumps(WORKLOADS[w][0]))
        yield bench
    finally:
        cleanup_state(state_a)
        node_a.stop()


# ---------------------------------------------------------------------------------------------
# report


def _fmt_s(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def report(runs: Sequence[Run], image_bytes: tuple[int, int, int]) -> str:
    layers, compressed, uncompressed = image_bytes
    lines = [
        f"image: {layers} layers, {_mb(compressed)} compressed, {_mb(uncompressed)} "
        "uncompressed",
        "",
        "| workload | mode | runs | pull s | run s | total s | fetched from IPFS "
        "| fetched / image | lazy layers' fetched |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    for w in WORKLOADS:
        medians: dict[str, float] = {}
        modes = list(dict.fromkeys(r.mode for r in runs if r.workload == w))
        for mode in modes:
            rs = [r for r in runs if r.mode == mode and r.workload == w]
            fetched = statistics.median(r.fetched for r in rs)
            medians[mode] = statistics.median(r.total for r in rs)
            lf = statistics.median(r.layer_fetched for r in rs)
            lines.append(
                f"| {w} | {mode} | {len(rs)} | {_fmt_s([r.pull for r in rs])} | "
                f"{_fmt_s([r.run for r in rs])} | {_fmt_s([r.total for r in rs])} | "
                f"{_mb(fetched)} | {100 * fetched / compressed:.1f}% | "
                f"{_mb(lf) if lf >= 0 else '-'} |"
            )
        for mode in modes:
            if mode != "full" and "full" in medians:
                notes.append(f"{w}: full/{mode} (median total): "
                             f"{medians['full'] / medians[mode]:.1f}x")
        for mode in modes:
            base, sufs = parse_mode(mode)
            plain = "lazy" + "".join(sufs)
            if base == "lazy-opt" and plain in medians:
                gain = 100 * (1 - medians[mode] / medians[plain])
                notes.append(f"{w}: {mode} total is {gain:.0f}% below {plain} "
                             f"({medians[plain]:.2f} s -> {medians[mode]:.2f} s, medians)")
            if sufs and base in medians:  # a variant against its plain mode, same round
                rs = [r for r in runs if r.workload == w]
                pull = {m: statistics.median(r.pull for r in rs if r.mode == m)
                        for m in (base, mode)}
                notes.append(f"{w}: {mode} vs {base} (medians): pull {pull[mode]:.2f} vs "
                             f"{pull[base]:.2f} s, total {medians[mode]:.2f} vs "
                             f"{medians[base]:.2f} s")
    warm = [r.ready for r in runs if not r.cold and r.ready >= 0]
    cold = sum(1 for r in runs if r.cold)
    if warm:
        notes.append(f"snapshotter: started before each timed pull in {len(warm)} runs (as the "
                     "reference's reboot_containerd.sh), serving with its spare layer workers "
                     f"ready after {_fmt_s(warm)} s, not in the pull")
    elif len(runs) > cold:
        notes.append("snapshotter: started before each timed pull (not timed)")
    if cold:
        notes.append(f"snapshotter: started on demand by rpull, inside the timed pull, in "
                     f"{cold} runs (--cold-snapshotter or a -cold mode)")
    lines += ["", *notes]
    lines.append("seconds: median (min-max); fetched from IPFS = bytes of the blocks node B "
                 "holds after the run (its repo starts empty); fetched / image = of the "
                 "compressed layer bytes; lazy layers' fetched = sum of `snapshot status` "
                 "fetched (medians)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# phases of one kept run (--keep-logs), from its logs


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_LAYER_DONE = re.compile(r"layer (sha256:[0-9a-f]{64}): (mounted lazily|unpacked) as snapshot")
_TOC = re.compile(r"TOC (.*?) in ([\d.]+) s(?:: (\d+) entries)?")


def _stamped(path: Path) -> list[tuple[float, str]]:
    """(wall-clock time, line) of a log's lines that carry a logging timestamp."""
    import datetime

    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            m = _STAMP.match(line)
            if m:
                t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
                out.append((t.timestamp(), line))  # naive = local time, as logging writes
    return out


def phases(run_dir: Path) -> list[tuple[str, float, str]]:
    """Where one kept run spent its time: (phase, seconds, detail) rows, from its
    ``times.json``, the rpull command's ``-v`` log and the layer workers' logs/statuses."""
    times = json.loads((run_dir / "times.json").read_text())
    rows: list[tuple[str, float, str]] = []
    if "snapshotter_ready" in times:
        rows.append(("snapshotter start-up, before the timed pull (not timed)",
                     times["snapshotter_ready"] - times["snapshotter_launched"],
                     "`ipfsnap snapshotter` until it serves and its spare workers wait"))
    rpull = _stamped(run_dir / "rpull.log")
    if not rpull:
        return rows
    start = times["start"]
    rows.append(("rpull CLI start-up (to its first log line)", rpull[0][0] - start,
                 "interpreter, imports, IPFS API"))
    t = rpull[0][0]
    tocs: dict[str, str] = {}
    for status in sorted(run_dir.glob("layer*-status.json")):
        st = json.loads(status.read_text())
        wlog = status.with_name(status.name.replace("-status.json", "-worker.log"))
        for _, line in _stamped(wlog):
            m = _TOC.search(line)
            if m:
                tocs[st.get("layer", "")] = (f"TOC {m.group(1)} in {m.group(2)} s"
                                             + (f", {m.group(3)} entries" if m.group(3) else ""))
    # warm-ups (started when the first layer's prepare names the next ones) log per digest
    for wlog in sorted(run_dir.glob("layer*-worker.log")):
        for _, line in _stamped(wlog):
            m = re.search(r"warm-up of (sha256:[0-9a-f]{64}): (TOC .*? in [\d.]+ s)", line)
            if m:
                tocs[m.group(1)] = f"warm-up: {m.group(2)}; " + tocs.get(m.group(1), "")
    n = 0
    for when, line in rpull[1:]:
        m = re.search(r"resolved in ([\d.]+) s", line)
        if m:
            rows.append(("resolve (root descriptor, index/manifest, config; verified)",
                         when - t, line.split("resolved in", 1)[1].strip()))
            t = when
            continue
        if "ready for the pull after" in line:  # the CLI's background snapshotter opening
            if any(r[0].startswith("resolve") for r in rows):  # it made the pull wait
                rows.append(("waiting for the snapshotter after resolve", when - t,
                             line.split("ready for the pull", 1)[1].strip()))
                t = when
            continue
        m = _LAYER_DONE.search(line)
        if m:
            n += 1
            rows.append((f"layer {n} {m.group(2)} (from the previous step)", when - t,
                         tocs.get(m.group(1), "")))
            t = when
    rows.append(("rest of rpull (store the name, exit)", times["pulled"] - start - (t - start),
                 ""))
    rows.append(("pull total (timed)", times["pulled"] - start, ""))
    fg = [json.loads(s.read_text()) for s in run_dir.glob("layer*-status.json")]
    detail = ""
    if fg:
        detail = (f"{sum(int(x.get('foreground_calls', 0)) for x in fg)} IPFS requests from "
                  f"the layers, {sum(float(x.get('foreground_seconds', 0)) for x in fg):.2f} s "
                  "summed")
    rows.append(("run (timed)", times["ran"] - times["pulled"], detail))
    return rows


def phases_table(run_dir: Path) -> str:
    lines = [f"{run_dir.name}:", "", "| phase | seconds | detail |", "|---|---:|---|"]
    lines += [f"| {name} | {sec:.2f} | {detail} |" for name, sec, detail in phases(run_dir)]
    return "\n".join(lines)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="cold start from IPFS: full vs lazy vs lazy-optimized")
    parser.add_argument("--runs", type=int, default=5, help="runs per mode (default 5)")
    parser.add_argument("--runs-other", type=int, default=None,
                        help="runs per mode of the workloads after the first (default: --runs;"
                        " full runs for the first workload only)")
    parser.add_argument("--quick", action="store_true",
                        help="small python sample, 1 run each (smoke run)")
    parser.add_argument("--image", choices=("big", "small"), default=None,
                        help="big: ~600 MB 4-layer image (default); small: the python sample")
    parser.add_argument("--build-only", action="store_true", help="build/cache the image, exit")
    parser.add_argument("--json", metavar="FILE", help="also write every run as JSON")
    parser.add_argument("--workload", choices=(*WORKLOADS, "all"), default="hello",
                        help="what the container runs (default hello)")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help="comma-separated modes, alternated in each round (default "
                        f"{','.join(DEFAULT_MODES)}; see the module docstring for suffixes)")
    parser.add_argument("--keep-logs", metavar="DIR", type=Path,
                        help="keep each run's snapshotter/worker logs and statuses here")
    parser.add_argument("--cold-snapshotter", action="store_true",
                        help="the old method: no snapshotter runs before the timed pull, "
                        "rpull starts it on demand (its start-up is then in the pull)")
    parser.add_argument("--report", metavar="FILE",
                        help="print the table for the runs saved by --json FILE, then exit")
    parser.add_argument("--phases", metavar="RUN_DIR", type=Path, nargs="+",
                        help="print where each run kept by --keep-logs spent its time, exit")
    args = parser.parse_args(argv)
    if args.phases:
        print("\n\n".join(phases_table(d) for d in args.phases))
        return 0
    if args.report:
        which = args.image or ("small" if args.quick else "big")
        archive = build_big_image() if which == "big" else small_image()
        saved = json.loads(Path(args.report).read_text())
        # runs saved before 2026-11-28's third session have no "ready": their snapshotter
        # was started on demand inside the pull
        print(report([Run(**{"cold": "ready" not in r, **r}) for r in saved],
                     image_sizes(archive)))
        return 0
    logging.basicConfig(level=logging.INFO, format="# %(message)s", stream=sys.stderr)
    # stopping the benchmark must still stop its nodes and unmount its layers (finally
    # blocks); a background job inherits SIGINT ignored, so install both handlers
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_on_signal)
    if os.geteuid() != 0:
        print("hello_bench: needs root", file=sys.stderr)
        return 1
    which = args.image or ("small" if args.quick else "big")
    runs_per_mode = 1 if args.quick else args.runs
    modes = [m for m in args.modes.split(",") if m]
    try:
        for m in modes:
            parse_mode(m)
    except ValueError as exc:
        parser.error(str(exc))
    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
    optimized = any(parse_mode(m)[0] == "lazy-opt" for m in modes)
    plain = any(parse_mode(m)[0] == "lazy-plain" for m in modes)
    try:
        t0 = time.monotonic()
        archive = build_big_image() if which == "big" else small_image()
        print(f"# image {archive} ready ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
        sizes = image_sizes(archive)
        precompile()
        if args.build_only:
            print(f"{archive} layers={sizes[0]} compressed={sizes[1]} uncompressed={sizes[2]}")
            return 0
        runs: list[Run] = []
        with tempfile.TemporaryDirectory(prefix="hello-bench-", dir="/var/tmp") as tmp, \
                setup(archive, Path(tmp), workloads, optimized, "full" in modes,
                      plain) as bench:
            bench.keep_logs = args.keep_logs
            bench.cold_snapshotter = args.cold_snapshotter
            # full fetches the whole image whatever the workload: it runs for the first
            # workload only; the other workloads get --runs-other rounds
            other = args.runs_other if args.runs_other is not None else runs_per_mode
            rounds = [(n, w, m) for n in range(max(runs_per_mode, other))
                      for i, w in enumerate(workloads) for m in modes
                      if (i == 0 and n < runs_per_mode)
                      or (i > 0 and n < other and parse_mode(m)[0] != "full")]
            loads: list[float] = []
            for n, w, mode in rounds:
                r = one_run(bench, mode, n, w)
                loads.append(os.getloadavg()[0])
                print(f"# {w} {mode} run {n + 1}: pull {r.pull:.2f} s, run {r.run:.2f} s, "
                      f"total {r.total:.2f} s, fetched {_mb(r.fetched)} (bitswap "
                      f"{_mb(r.bitswap)}, layers "
                      f"{_mb(r.layer_fetched) if r.layer_fetched >= 0 else '-'}), "
                      + (f"snapshotter ready in {r.ready:.2f} s, " if r.ready >= 0 else "")
                      + f"load {loads[-1]:.1f}", file=sys.stderr, flush=True)
                runs.append(r)
                if args.json:  # as we go: a long run interrupted still leaves its data
                    _write_json(Path(args.json), runs)
    except BenchError as exc:
        print(f"hello_bench: {exc}", file=sys.stderr)
        return 1
    print(f"hello-bench {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, image {which}, "
          f"{os.cpu_count()} cores, 1-min load average after each run "
          f"{min(loads):.1f}-{max(loads):.1f} (median {statistics.median(loads):.1f})")
    print(report(runs, sizes))
    return 0


def _write_json(path: Path, runs: Sequence[Run]) -> None:
    path.write_text(json.dumps(
        [{"mode": r.mode, "pull": r.pull, "run": r.run, "fetched": r.fetched,
          "bitswap": r.bitswap, "layer_fetched": r.layer_fetched, "workload": r.workload,
          "ready": r.ready, "cold": r.cold}
         for r in runs],
        indent=1))


if __name__ == "__main__":
    sys.exit(main())
