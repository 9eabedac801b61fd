#!/usr/bin/env python3
"""ipfs-push of a realistic image, against the reference's ``ctr-remote image convert``.

Image: the Debian bookworm + python3 sample (``ipfsnap.content.sample.build_python``, built
offline with debootstrap and cached under /var/cache/ipfsnap-test; 2 layers, ~63 MB gzip).

ipfsnap side, per run, in a fresh state dir (so the conversion cache is empty):
``image import`` of the oci-archive, then :func:`ipfsnap.image.push.push_image` against a
managed IPFS node started for the benchmark; the push's own timers split it into conversion
(eStargz, gzip level 9, 4 MiB chunks: the reference's defaults) and add (every blob added to
IPFS, CIDs checked). A second push of the same image shows the cached case.

Reference side, same run: a private containerd (own root, state, sockets, opt path, CRI
disabled; FACTS.md section 5) with the same oci-archive imported (``ctr images import
--no-unpack``), then ``ctr-remote images convert --estargz --oci SRC DST`` timed as a whole
process. The two sides alternate which goes first.

    .venv/bin/python benchmarks/push_bench.py [--runs 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from ipfsnap.content import ImageStore, import_image  # noqa: E402
from ipfsnap.content.sample import build_python  # noqa: E402
from ipfsnap.image.push import PushOptions, push_image  # noqa: E402
from ipfsnap.ipfs import IPFSClient  # noqa: E402
from ipfsnap.ipfs.node import ManagedNode  # noqa: E402

log = logging.getLogger("push_bench")

NAMESPACE = "ipfsnap-bench"


@dataclass
class Run:
    ipfsnap_convert: float
    ipfsnap_convert_cpu: float
    ipfsnap_add: float
    ipfsnap_push: float
    ipfsnap_push_cached: float
    reference_convert: float
    reference_convert_cpu: float
    load_average: float
    layers: int
    source_bytes: int
    estargz_bytes: int
    cid: str


@dataclass
class Report:
    image: str
    cores: int
    runs: list[Run] = field(default_factory=list)


# -- private containerd ---------------------------------------------------------------------------


def containerd_config(base: Path) -> Path:
    """A config that keeps this containerd away from the system one (and from CRI)."""
    cfg = base / "config.toml"
    cfg.write_text(
        f"""version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{base}/containerd.sock"

[ttrpc]
  address = "{base}/containerd.sock.ttrpc"

[debug]
  address = "{base}/debug.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{base}/opt"
"""
    )
    return cfg


@contextlib.contextmanager
def private_containerd(base: Path) -> Iterator[Path]:
    """Run containerd on a private socket; yields the socket path."""
    base.mkdir(parents=True, exist_ok=True)
    cfg = containerd_config(base)
    sock = base / "containerd.sock"
    logf = open(base / "containerd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        ["containerd", "--config", str(cfg)], stdout=logf, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"containerd exited early, see {base / 'containerd.log'}")
            ok = subprocess.run(
                ["ctr", "--address", str(sock), "version"], capture_output=True, check=False
            )
            if ok.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not answer, see {base / 'containerd.log'}")
            time.sleep(0.2)
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logf.close()


def ctr(sock: Path, *args: str, tool: str = "ctr") -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [tool, "--address", str(sock), "--namespace", NAMESPACE, *args],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def reference_convert(sock: Path, archive: Path, run: int) -> tuple[float, float]:
    """Import the archive (untimed), then time ``ctr-remote images convert``."""
    out = ctr(sock, "images", "import", "--no-unpack", str(archive)).stdout
    names = [line.split()[1] for line in out.splitlines() if line.startswith("unpacking")]
    if not names:
        names = ctr(sock, "images", "ls", "-q").stdout.split()
    src = names[0]
    dst = f"localhost/bench/esgz:{run}"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    # the conversion runs in the ctr-remote process (containerd only serves the content)
    ctr(sock, "images", "convert", "--estargz", "--oci", src, dst, tool="ctr-remote")
    seconds = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    ctr(sock, "images", "rm", dst)
    return seconds, cpu


# -- ipfsnap --------------------------------------------------------------------------------------


def ipfsnap_push(archive: Path, state: Path, api: str) -> tuple[Run, str]:
    store = ImageStore(state)
    name = import_image(store, archive)[0].name
    with IPFSClient(api, timeout=300) as client:
        start = time.monotonic()
        first = push_image(store, name, client, PushOptions(), state_dir=state)
        total = time.monotonic() - start
        start = time.monotonic()
        again = push_image(store, name, client, PushOptions(), state_dir=state)
        cached = time.monotonic() - start
    assert again.cid == first.cid, (again.cid, first.cid)
    src = store.resolve(name)
    new = store.resolve(first.name)
    run = Run(
        ipfsnap_convert=first.convert_seconds,
        ipfsnap_convert_cpu=first.conversion.cpu_seconds,
        ipfsnap_add=first.add_seconds,
        ipfsnap_push=total,
        ipfsnap_push_cached=cached,
        reference_convert=0.0,
        reference_convert_cpu=0.0,
        load_average=os.getloadavg()[0],
        layers=len(src.layers),
        source_bytes=sum(x.size for x in src.layers),
        estargz_bytes=sum(x.size for x in new.layers),
        cid=first.cid,
    )
    return run, name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    for tool in ("containerd", "ctr", "ctr-remote"):
        if shutil.which(tool) is None:
            sys.exit(f"push_bench: {tool} not installed (apt-get install containerd "
                     "stargz-snapshotter)")
    image = build_python()
    assert image.oci_archive is not None
    report = Report(image.name, len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory(prefix="push-bench-") as tmp:
        base = Path(tmp)
        node = ManagedNode(base / "ipfs", offline=True)
        node.start()
        try:
            with private_containerd(base / "containerd") as sock:
                for i in range(args.runs):
                    state = base / f"state{i}"
                    if i % 2 == 0:
                        run, _ = ipfsnap_push(image.oci_archive, state, node.api_url)
                        ref = reference_convert(sock, image.oci_archive, i)
                    else:
                        ref = reference_convert(sock, image.oci_archive, i)
                        run, _ = ipfsnap_push(image.oci_archive, state, node.api_url)
                    run.reference_convert, run.reference_convert_cpu = ref
                    shutil.rmtree(state, ignore_errors=True)
                    report.runs.append(run)
                    print(f"run {i + 1}: {json.dumps(asdict(run))}", file=sys.stderr)
        finally:
            node.stop()
    med = {k: statistics.median(getattr(r, k) for r in report.runs)
           for k in ("ipfsnap_convert", "ipfsnap_convert_cpu", "ipfsnap_add", "ipfsnap_push",
                     "ipfsnap_push_cached", "reference_convert", "reference_convert_cpu",
                     "load_average")}
    r0 = report.runs[0]
    print(f"image {report.image}: {r0.layers} layers, {r0.source_bytes / 1e6:.1f} MB gzip -> "
          f"{r0.estargz_bytes / 1e6:.1f} MB eStargz; {report.cores} cores; "
          f"median of {len(report.runs)} runs; load average {med['load_average']:.1f}")
    print("| step | ipfsnap (s) | reference ctr-remote (s) | ratio ipfsnap/reference |")
    print("|---|---|---|---|")
    print(f"| convert to eStargz (gzip 9) | {med['ipfsnap_convert']:.1f} | "
          f"{med['reference_convert']:.1f} | "
          f"{med['ipfsnap_convert'] / med['reference_convert']:.2f} |")
    print(f"| convert, CPU seconds | {med['ipfsnap_convert_cpu']:.1f} | "
          f"{med['reference_convert_cpu']:.1f} | "
          f"{med['ipfsnap_convert_cpu'] / med['reference_convert_cpu']:.2f} |")
    print(f"| add all blobs to IPFS | {med['ipfsnap_add']:.1f} | - | - |")
    print(f"| whole ipfs-push | {med['ipfsnap_push']:.1f} | - | - |")
    print(f"| ipfs-push again (conversion cached) | {med['ipfsnap_push_cached']:.1f} | - | - |")
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
