"""The fixed overhead of ``ipfsnap run --rm``: this checkout against a baseline, with phases.

Usage::

    .venv/bin/python benchmarks/run_bench.py [--baseline REV] [--runs N]
        [--modes overlayfs,stargz,lazy] [--image OCI_TAR] [--json FILE]

The baseline's ``src/`` is exported with ``git archive REV`` into a temporary directory and
put first on ``PYTHONPATH`` (same interpreter and venv). Each tree gets its modules
compiled (kept, as installed), its own state dir (under /var/tmp), the image imported and
one warm-up run per snapshotter (layers unpacked, the stargz snapshotter service started),
so what is timed is the run of an image whose layers are all in place. Modes: ``overlayfs``
and ``stargz`` (the same local layers, through the snapshotter service) run the imported
image; ``lazy`` runs it pushed as eStargz to a local IPFS node (js-ipfs, managed) and
rpulled with the stargz snapshotter: FUSE layer mounts, checked at every prepare, whose
files the warm-up run has fetched into the chunk cache. Then N rounds; in each, every
(mode, tree) runs once, the order alternating, so both trees see the same load. Needs root
and runc (and the managed node's js-ipfs for ``lazy``).

One run: ``ipfsnap run --rm [--snapshotter S] IMAGE bench python3 -c 'print(...)'`` with a
workload that prints "Hello, World!" and ``time.time()``. Phases, from outside the CLI so
the baseline needs no instrumentation:

- start: from spawning the CLI to its ``runc run`` (a ``runc`` shim first on PATH records
  the time and execs the real runc): interpreter and imports, image and container records,
  layer snapshots checked, active snapshot prepared and mounted, bundle written;
- container: from ``runc run`` to the container's python printing (runc create/start,
  python's own start-up);
- exit: from that print to the CLI's exit: python and runc exiting, then the ``--rm``
  clean-up (unmount, snapshot removal, container record).

After every run the bench checks that nothing is left: no container directory, no mount
under the state dir's containers, no ``ipfsnap-container`` snapshot in the store's
metadata. It prints median (min-max) per phase and the ratio this/baseline of the medians.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY = "import sys; from ipfsnap.cli.main import main; sys.exit(main())"
DEFAULT_IMAGE = Path("/var/cache/ipfsnap-test/python-3/image.oci.tar")
WORKLOAD = ["python3", "-c", 'import time; print("Hello, World!", time.time())']
CONTAINER_ID = "bench"
PHASES = ("total", "start", "container", "exit", "cpu")

SHIM = """#!/bin/sh
case " $* " in *" run "*) date +%s.%N >> "$RUN_BENCH_LOG";; esac
exec {runc} "$@"
"""


@dataclass
class Sample:
    tree: str
    snapshotter: str
    total: float
    start: float
    container: float
    exit: float
    cpu: float


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


#: mode -> the snapshotter it runs with; ``lazy`` runs the image pushed as eStargz to a
#: local IPFS node and rpulled with the stargz snapshotter (its layers FUSE mounts)
MODES = {"overlayfs": "overlayfs", "stargz": "stargz", "lazy": "stargz"}


class Tree:
    """One source tree with its own state dir."""

    def __init__(self, name: str, src: Path, state: Path, shim_dir: Path) -> None:
        self.name, self.src, self.state = name, src, state
        #: ``--ipfs-api`` given to every command (lazy mode)
        self.api: list[str] = []
        self.log = state.parent / f"{name}.runc-times"
        # as on an installed node, compiled modules are kept (a development shell's
        # PYTHONDONTWRITEBYTECODE would make every run compile what changed since)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        self.env = dict(env, PYTHONPATH=str(src), RUN_BENCH_LOG=str(self.log),
                        PATH=f"{shim_dir}:{os.environ.get('PATH', '')}")
        compileall.compile_dir(str(src / "ipfsnap"), quiet=1)

    def cli(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", ENTRY, "--state-dir", str(self.state),
                               *self.api, *argv], env=self.env, check=check,
                              capture_output=True, text=True)

    def run_argv(self, snapshotter: str, image: str) -> list[str]:
        return [sys.executable, "-c", ENTRY, "--state-dir", str(self.state), *self.api, "run",
                "--rm", "--snapshotter", snapshotter, image, CONTAINER_ID, *WORKLOAD]

    def timed_run(self, mode: str, image: str) -> Sample:
        snapshotter = MODES[mode]
        self.log.unlink(missing_ok=True)
        cpu0, t0 = _cpu(), time.time()
        proc = subprocess.run(self.run_argv(snapshotter, image), env=self.env,
                              capture_output=True, text=True, check=False)
        t_end, cpu = time.time(), _cpu() - cpu0
        words = proc.stdout.split()
        if proc.returncode != 0 or words[:2] != ["Hello,", "World!"]:
            raise SystemExit(f"{self.name} {mode}: run failed ({proc.returncode}): "
                             f"{proc.stdout!r} {proc.stderr[-500:]!r}")
        t_hello = float(words[2])
        t_runc = float(self.log.read_text().split()[0])
        self.check_clean(snapshotter)
        return Sample(self.name, mode, t_end - t0, t_runc - t0, t_hello - t_runc,
                      t_end - t_hello, cpu)

    def check_clean(self, snapshotter: str) -> None:
        """What ``--rm`` must have removed by the time the command returned."""
        left = []
        if (self.state / "containers" / CONTAINER_ID).exists():
            left.append("container directory")
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            mounts = [ln.split()[4] for ln in f]
        left += [m for m in mounts if m.startswith(str(self.state / "containers"))]
        db = self.state / "snapshots" / snapshotter / "metadata.db"
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            left += [r[0] for r in conn.execute(
                "SELECT key FROM snapshots WHERE key LIKE 'ipfsnap-container %'")]
        if left:
            raise SystemExit(f"{self.name} {snapshotter}: left behind after run --rm: {left}")

    def teardown(self) -> None:
        self.cli("snapshotter", "stop", check=False)
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            mounts = [ln.split()[4] for ln in f]
        for m in reversed(mounts):
            if m.startswith(str(self.state) + "/"):
                subprocess.run(["umount", "-l", m], check=False)
        shutil.rmtree(self.state, ignore_errors=True)


@contextlib.contextmanager
def lazy_image(archive: Path, work: Path, trees: list[Tree]) -> Iterator[str]:
    """A local IPFS node holding ``archive`` pushed as eStargz; every tree's state has it
    rpulled with the stargz snapshotter (layers mounted lazily). Yields the CID."""
    from ipfsnap.ipfs.node import ManagedNode

    node = ManagedNode(work / "node").start()
    pusher = Tree("push", ROOT / "src", work / "state-push", work)
    pusher.api = ["--ipfs-api", node.api_multiaddr]
    try:
        name = pusher.cli("image", "import", str(archive)).stdout.split()[0]
        cid = pusher.cli("image", "ipfs-push", "--estargz=true", name).stdout.split()[-1]
        for tree in trees:
            tree.api = pusher.api
            tree.cli("image", "rpull", "--ipfs", "--snapshotter", "stargz", cid)
        yield cid
    finally:
        for tree in trees:
            tree.teardown()
        pusher.teardown()
        node.stop()


def export(rev: str, dest: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True,
                             capture_output=True).stdout
    dest.mkdir()
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def report(samples: list[Sample], modes: list[str]) -> None:
    print(f"{'mode':11} {'phase':9} {'baseline s':>22} {'this s':>22} {'ratio':>6}")
    for snap in modes:
        for phase in PHASES:
            cols = {tree: [getattr(s, phase) for s in samples
                           if s.snapshotter == snap and s.tree == tree]
                    for tree in ("baseline", "this")}
            if not cols["this"]:
                continue
            ratio = statistics.median(cols["this"]) / statistics.median(cols["baseline"])
            print(f"{snap:11} {phase:9} {fmt(cols['baseline']):>22} {fmt(cols['this']):>22}"
                  f" {ratio:6.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="d592638", metavar="REV")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--modes", default="overlayfs,stargz,lazy",
                    help="overlayfs, stargz (local layers through the snapshotter service), "
                    "lazy (eStargz layers from a local IPFS node, FUSE mounted)")
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE, metavar="OCI_TAR")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write every sample here")
    opts = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run_bench: needs root (mounts, runc)")
    runc = shutil.which("runc")
    if runc is None:
        raise SystemExit("run_bench: runc not found")
    if not opts.image.exists():
        raise SystemExit(f"run_bench: no image at {opts.image} (the tests build it: "
                         "tests/fixtures/images.py python_image)")
    modes = opts.modes.split(",")
    if set(modes) - set(MODES):
        raise SystemExit(f"run_bench: unknown modes {sorted(set(modes) - set(MODES))}")
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="run-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        shim_dir = work / "shim"
        shim_dir.mkdir()
        (shim_dir / "runc").write_text(SHIM.format(runc=runc))
        (shim_dir / "runc").chmod(0o755)
        trees = [Tree("baseline", export(opts.baseline, work / "baseline"),
                      work / "state-baseline", shim_dir),
                 Tree("this", ROOT / "src", work / "state-this", shim_dir)]
        with contextlib.ExitStack() as stack:
            images: dict[str, str] = {}
            if "lazy" in modes:
                images["lazy"] = stack.enter_context(lazy_image(opts.image, work, trees))
            for tree in trees:
                stack.callback(tree.teardown)
                name = tree.cli("image", "import", str(opts.image)).stdout.split()[0]
                images.update({m: name for m in modes if m != "lazy"})
                for mode in modes:  # warm-up: layers unpacked or mounted, service started
                    tree.timed_run(mode, images[mode])
            for i in range(opts.runs):
                order = trees if i % 2 == 0 else trees[::-1]
                for mode in modes:
                    for tree in order:
                        samples.append(tree.timed_run(mode, images[mode]))
                print(f"round {i + 1}/{opts.runs} done", file=sys.stderr)
    print(f"{opts.runs} runs each, image {opts.image}, load average "
          f"{os.getloadavg()[0]:.1f}; seconds: median (min-max); ratio this/baseline")
    report(samples, modes)
    if opts.json:
        opts.json.write_text(json.dumps([asdict(s) for s in samples], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
