"""The seed workflow end to end, through the CLI, with two IPFS nodes.

Node A (state dir A) imports a sample image and pushes it; node B (state dir B, its own API,
connected to A in a private network) rpulls the CID and runs it, so every blob B needs crosses
bitswap. Checked: the container's output and exit code, that ``--rm`` leaves no container
record, no active snapshot and no container mount, and that the lazy path fetched only part
of the image. Also ``scripts/quickstart.sh`` itself (the README's first command).

Needs root, FUSE, runc and the managed IPFS node: FAILS (never skips) without them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipfsnap.content.sample import SampleImage
from ipfsnap.ipfs.cid import normalize_cid
from tests.fixtures.ipfs import NodePair
from tests.support import ROOT, require_fuse, require_tool

#: generous bound for one CLI command: the python image's push converts ~60 MB at gzip -9
CLI_TIMEOUT = 900
GREETING = "Hello, World!"


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment minus anything that would point ipfsnap at another state or daemon."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("IPFSNAP_") and k != "IPFS_PATH"}
    env.update(extra)
    return env


def _mounts_under(path: Path) -> list[tuple[str, str]]:
    """(target, fstype) of every mount below ``path``."""
    out = subprocess.run(["findmnt", "-rn", "-o", "TARGET,FSTYPE"], capture_output=True,
                         text=True, check=True).stdout
    prefix = str(path) + "/"
    rows = [line.rsplit(" ", 1) for line in out.splitlines() if line.strip()]
    return [(t, f) for t, f in rows if t.startswith(prefix)]


@dataclass
class Ipfsnap:
    """``ipfsnap`` with one state dir, one IPFS API and one config file."""

    state: Path
    api: str
    config: Path

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "ipfsnap.cli.main", "--state-dir", str(self.state),
               "--config", str(self.config), "--ipfs-api", self.api, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT,
                              env=_clean_env(), stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            pytest.fail(f"ipfsnap {' '.join(args)} exited {proc.returncode}:\n"
                        f"stdout: {proc.stdout}\nstderr: {proc.stderr}", pytrace=False)
        return proc

    def json_lines(self, *args: str) -> list[dict[str, object]]:
        return [json.loads(line) for line in self(*args).stdout.splitlines() if line.strip()]

    def teardown(self) -> None:
        """Stop this state dir's snapshotter (unmounting its lazy layers) and any leftovers.

        The lazy layers' FUSE workers outlive the CLI; a snapshotter started here adopts and
        unmounts them."""
        if any(f == "fuse.ipfsnap" for _, f in _mounts_under(self.state)):
            self("snapshotter", check=False)
        self("snapshotter", "stop", check=False)
        for target, _ in sorted(_mounts_under(self.state), reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True)


@dataclass
class Nodes:
    a: Ipfsnap
    b: Ipfsnap


@pytest.fixture
def nodes(ipfs_pair: NodePair, tmp_path: Path) -> Iterator[Nodes]:
    """State dirs A (push) and B (rpull + run) on the two nodes of ``ipfs_pair``.

    B's config turns background fetch off, so what B fetched is what the workload read."""
    require_fuse()
    require_tool("runc")
    ipfs_pair.connect()
    cfg_a = tmp_path / "a.toml"
    cfg_a.write_text("")
    cfg_b = tmp_path / "b.toml"
    cfg_b.write_text("no_background_fetch = true\n")
    pair = Nodes(
        Ipfsnap(tmp_path / "state-a", ipfs_pair.a.api_multiaddr, cfg_a),
        Ipfsnap(tmp_path / "state-b", ipfs_pair.b.api_multiaddr, cfg_b),
    )
    for side in (pair.a, pair.b):
        side.state.mkdir()
    try:
        yield pair
    finally:
        pair.b.teardown()
        pair.a.teardown()
        left = _mounts_under(tmp_path)
        assert not left, f"mounts left behind: {left}"


def push(side: Ipfsnap, archive: Path, name: str, *, estargz: bool) -> str:
    side("image", "import", str(archive), "--name", name)
    out = side("image", "ipfs-push", f"--estargz={'true' if estargz else 'false'}", name).stdout
    lines = out.splitlines()
    assert len(lines) == 1, f"ipfs-push must print only the CID, got {out!r}"
    cid = lines[0].strip()
    assert normalize_cid(cid) == cid, f"not a CIDv1 base32: {cid!r}"
    return cid


def assert_removed(side: Ipfsnap, container: str) -> None:
    """``--rm`` left no container record, no active snapshot and no container mount."""
    ids = [row["id"] for row in side.json_lines("ps", "--json")]
    assert container not in ids
    active = [s for s in side.json_lines("snapshot", "ls", "--json") if s["kind"] == "active"]
    assert not active, f"active snapshots left by --rm: {active}"
    overlays = [t for t, f in _mounts_under(side.state) if f == "overlay"]
    assert not overlays, f"container rootfs still mounted: {overlays}"


def lazy_status(side: Ipfsnap) -> tuple[int, int]:
    """(fetched, size) summed over the lazy layers of ``side``."""
    rows = side.json_lines("snapshot", "status", "--json")
    assert rows, "no lazy layers: the image was not mounted lazily"
    fetched = sum(int(str(r["fetched"])) for r in rows)
    size = sum(int(str(r["size"])) for r in rows)
    return fetched, size


def test_busybox_lazy(nodes: Nodes, busybox_image: SampleImage) -> None:
    assert busybox_image.oci_archive is not None
    cid = push(nodes.a, busybox_image.oci_archive, "busybox", estargz=True)

    pulled = nodes.b("image", "rpull", "--ipfs", cid).stdout
    # B has nothing yet: the index/manifest/config come over IPFS and are reported
    assert "fetching sha256:" in pulled

    run = nodes.b("run", "--snapshotter=stargz", "--rm", "-t", cid, "hello",
                  "sh", "-c", "echo 'Hello, World!'; cat /hello.txt; exit 7", check=False)
    assert run.returncode == 7, run.stderr
    assert run.stdout.splitlines() == [GREETING, "Hello from layer 2"]
    assert_removed(nodes.b, "hello")

    # the layers are FUSE mounts (lazy) and only part of the image was fetched (the files
    # read, plus neighbour chunks inside the same IPFS blocks: [blob] neighbour_span)
    assert any(f == "fuse.ipfsnap" for _, f in _mounts_under(nodes.b.state))
    fetched, size = lazy_status(nodes.b)
    assert 0 < fetched < size

    # the same image again reuses the pulled layers and works the same
    again = nodes.b("run", "--snapshotter=stargz", "--rm", cid, "hello", "cat", "/hello.txt")
    assert again.stdout == "Hello from layer 2\n"
    assert_removed(nodes.b, "hello")


def test_busybox_full(nodes: Nodes, busybox_image: SampleImage) -> None:
    assert busybox_image.oci_archive is not None
    cid = push(nodes.a, busybox_image.oci_archive, "busybox", estargz=False)
    lazy_cid = push(nodes.a, busybox_image.oci_archive, "busybox", estargz=True)
    assert cid != lazy_cid

    nodes.b("image", "rpull", "--ipfs", cid)
    run = nodes.b("run", "--snapshotter=overlayfs", "--rm", "-t", cid, "hello",
                  "sh", "-c", "echo 'Hello, World!'; cat /data/numbers.txt | wc -l; "
                  "test ! -e /etc/removed.txt")
    assert run.returncode == 0
    assert run.stdout.split() == ["Hello,", "World!", "1000"]
    assert_removed(nodes.b, "hello")
    # the full path never mounts a lazy layer
    assert not any(f == "fuse.ipfsnap" for _, f in _mounts_under(nodes.b.state))


def prefetched(side: Ipfsnap, ref: str) -> list[set[str]]:
    """Per layer of ``ref`` in ``side``'s store: the paths before its prefetch landmark."""
    from ipfsnap.content import ImageStore
    from ipfsnap.estargz import open_layer
    from ipfsnap.estargz.types import BytesRangeReader

    store = ImageStore(side.state)
    out = []
    for desc in store.resolve(ref).layers:
        blob = store.blobs.read(desc.digest)
        index = open_layer(BytesRangeReader(blob), len(blob))
        out.append({p for p, e in index.walk()
                     if e.type == "reg" and e.size and e.offset < index.prefetch_end})
    return out


def test_python_lazy_hello_world(nodes: Nodes, python_image: SampleImage) -> None:
    assert python_image.oci_archive is not None
    cid = push(nodes.a, python_image.oci_archive, "python", estargz=True)
    # ipfs-push's start-up layout (image/startup.py): the image's command (Cmd
    # /usr/bin/python3) found in Debian's real files: python's executable, ld.so, the libraries
    # and python's encodings, first in their layers; nothing else of the stdlib
    first = prefetched(nodes.a, f"ipfs://{cid}")
    every = set().union(*first)
    assert any(re.fullmatch(r"usr/bin/python3\.\d+", p) for p in every), first
    assert any(re.fullmatch(r"usr/lib/x86_64-linux-gnu/ld-linux-x86-64\.so\.2", p)
               for p in every), first
    assert "usr/lib/x86_64-linux-gnu/libc.so.6" in every, first
    assert any(re.search(r"/encodings/__pycache__/__init__\.cpython-\d+\.pyc$", p)
               for p in every), first
    assert not any(re.search(r"/(json|email|http)/", p) for p in every), first
    assert len(every) < 40, first

    nodes.b("image", "rpull", "--ipfs", cid)
    # the mounts prefetched those (before the landmarks) during the pull
    fetched_after_pull, size = lazy_status(nodes.b)
    assert fetched_after_pull > 1 << 20, fetched_after_pull
    run = nodes.b("-v", "run", "--snapshotter=stargz", "--rm", "-t", cid, "foo",
                  "python3", "-c", 'print("Hello, World!")')
    assert run.stdout == GREETING + "\n"
    assert_removed(nodes.b, "foo")
    # run read python's executable, ld.so, ld.so.cache and libraries ahead (runtime/warm.py)
    warmed = re.search(r"container foo: warmed (\d+) files of the command \((\d+) bytes",
                       run.stderr)
    assert warmed and int(warmed.group(1)) >= 4 and int(warmed.group(2)) > 1 << 20, run.stderr
    fetched, size_after = lazy_status(nodes.b)
    assert size_after == size
    # python3 -c reads 8-10 MB of a ~65 MB image (FACTS.md 5): far from all of it
    assert fetched_after_pull <= fetched < size // 2, (fetched_after_pull, fetched, size)


def test_quickstart_script(tmp_path: Path) -> None:
    """The README's first command (minus the install step, which scripts/test.sh runs)."""
    require_fuse()
    require_tool("runc")
    state = tmp_path / "state"
    home = tmp_path / "home"  # no ~/.ipfs/api of the machine's user gets picked up
    home.mkdir()
    script = ROOT / "scripts" / "quickstart.sh"
    try:
        for attempt in (1, 2):  # idempotent: a second run on the same state works too
            proc = subprocess.run(
                ["bash", str(script), "--no-setup", "--state-dir", str(state)],
                capture_output=True, text=True, timeout=CLI_TIMEOUT,
                env=_clean_env(HOME=str(home)), stdin=subprocess.DEVNULL,
            )
            assert proc.returncode == 0, f"run {attempt}: {proc.stderr}"
            lines = proc.stdout.splitlines()
            assert lines[0].startswith("CID: ")
            cid = lines[0].removeprefix("CID: ")
            assert normalize_cid(cid) == cid
            assert lines[1:] == [GREETING, "Hello from layer 2"]
            # it stopped what it started: no mounts, no IPFS daemon answering on its repo
            assert not _mounts_under(state), _mounts_under(state)
            pid_file = state / "ipfs" / "ipfsnap-node.pid"
            if pid_file.exists():
                pid = int(pid_file.read_text().split()[0])
                assert not Path(f"/proc/{pid}").exists(), f"IPFS node {pid} still running"
    finally:
        for target, _ in sorted(_mounts_under(state), reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True)
