"""The CLI: ``image rpull --ipfs``, ``image mount``/``unmount``, and the seed workflow end to
end over two IPFS nodes (import + ipfs-push on A; rpull + run on B, lazy and full)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipfsnap.content import ImageStore
from ipfsnap.content.sample import SampleImage
from ipfsnap.estargz import open_layer
from ipfsnap.estargz.types import BytesRangeReader
from ipfsnap.image.resolve import fetching_line
from ipfsnap.image.snapshotters import snapshotter_root
from ipfsnap.image.unpack import chain_ids
from ipfsnap.ipfs import IPFSClient
from ipfsnap.service.client import SnapshotterClient
from ipfsnap.snapshot import REMOTE_LABEL, Kind, SnapshotStore
from ipfsnap.snapshot.mount import is_mountpoint, mount_points
from tests.fs.layers import Item, make_tar, pseudo_random
from tests.image.rpull_helpers import CHUNK, push, unmount_state
from tests.runtime.elfs import ElfSpec, build_elf
from tests.support import require_fuse, require_tool

pytestmark = pytest.mark.integration

TIMEOUT = 300


def ipfsnap(state: Path, api: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipfsnap.cli.main", "--state-dir", str(state), "--ipfs-api", api,
         *args],
        capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    require_fuse()
    s = tmp_path / "state"
    s.mkdir()
    try:
        yield s
    finally:
        unmount_state(s)
        left = [m for m in mount_points() if m.startswith(str(tmp_path) + "/")]
        assert not left, f"mounts left behind: {left}"


def test_rpull_mount_unmount(ipfs_pair: Any, state: Path, tmp_path: Path) -> None:
    tars = [
        make_tar([Item("a", "dir", mode=0o755), Item("a/one", "file", b"one\n"),
                  Item("a/lazy", "file", b"from the lazy layer\n")]),
        make_tar([Item("a", "dir", mode=0o755), Item("a/two", "file", b"two\n"),
                  Item("a/.wh.one", "file", b"")]),
    ]
    with IPFSClient(ipfs_pair.a.api_url) as a:
        image = push(a, tars, [True, False])
    ipfs_pair.connect()
    api = ipfs_pair.b.api_url

    p = ipfsnap(state, api, "image", "rpull", "--ipfs", image.cid)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        fetching_line(d) for d in (image.index, image.manifest, image.config, image.layers[1])
    ]
    # fetched once: a second rpull prints nothing
    p = ipfsnap(state, api, "image", "rpull", "--ipfs", f"ipfs://{image.cid}")
    assert p.returncode == 0 and p.stdout == "", p.stderr
    # the full path in its own store: only the layer not yet in the content store is fetched
    p = ipfsnap(state, api, "image", "rpull", "--ipfs", "--snapshotter", "overlayfs",
                f"/ipfs/{image.cid}")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [fetching_line(image.layers[0])]

    chains = chain_ids(image.diff_ids)
    with SnapshotterClient(state) as snaps:
        assert [REMOTE_LABEL in snaps.stat(c).labels for c in chains] == [True, False]
    with SnapshotStore(snapshotter_root(state, "overlayfs"), restore=False) as full:
        assert {i.name: i.kind for i in full.walk()} == {c: Kind.COMMITTED for c in chains}
        assert not any(REMOTE_LABEL in i.labels for i in full.walk())

    for snapshotter in ("stargz", "overlayfs"):
        target = tmp_path / f"mnt-{snapshotter}"
        target.mkdir()
        p = ipfsnap(state, api, "image", "mount", "--snapshotter", snapshotter, image.cid,
                    str(target))
        assert p.returncode == 0, p.stderr
        assert is_mountpoint(target)
        assert sorted(x.name for x in (target / "a").iterdir()) == ["lazy", "two"]
        assert (target / "a" / "lazy").read_bytes() == b"from the lazy layer\n"
        p = ipfsnap(state, api, "image", "unmount", str(target))
        assert p.returncode == 0, p.stderr
        assert not is_mountpoint(target)
    p = ipfsnap(state, api, "image", "unmount", str(tmp_path / "mnt-stargz"))
    assert p.returncode != 0 and "no image is mounted" in p.stderr
    p = ipfsnap(state, api, "image", "rpull", image.cid)
    assert p.returncode == 2 and "--ipfs" in p.stderr


def test_rpull_has_the_snapshotter_read_the_images_command_ahead(
    ipfs_pair: Any, state: Path, tmp_path: Path
) -> None:
    """After a lazy rpull, the image's command (Cmd /bin/sh: a script whose interpreter, a
    python3.11 ELF, is in the lower layer), the user database and the interpreter's start
    files (runtime/startfiles.py, found across the layers: a ``.pth`` in a directory of the
    upper one, the zone file) are fetched by the snapshotter with no container
    (service/warmups.py); ``[run] warm_on_pull = false`` sends no such request."""
    interp = build_elf(ElfSpec(interpreter="/lib64/ld-linux-x86-64.so.2",
                               body=pseudo_random(3 * CHUNK + 5, 7)))
    lib = "usr/lib/python3.11"
    site = "usr/lib/python3/dist-packages"
    tars = [
        make_tar([Item("etc", "dir", mode=0o755), Item("etc/passwd", "file", b"root:x:0:0::/:\n"),
                  Item("usr/bin/python3.11", "file", interp, mode=0o755),
                  Item("usr/bin/unrelated", "file", pseudo_random(2 * CHUNK, 8)),
                  Item(f"{lib}/os.py", "file", pseudo_random(CHUNK, 9)),
                  Item(f"{lib}/encodings/__init__.py", "file", pseudo_random(CHUNK, 10)),
                  Item(f"{lib}/encodings/cp1252.py", "file", pseudo_random(CHUNK, 11)),
                  Item(f"{site}/a.pth", "file", b"import a\n")]),
        make_tar([Item("bin/sh", "file", b"#!/usr/bin/python3.11 -e\n", mode=0o755),
                  Item(f"{site}/b.pth", "file", b"import b\n"),
                  Item("etc/localtime", "file", b"TZif2" + bytes(100))]),
    ]
    with IPFSClient(ipfs_pair.a.api_url) as a:
        image = push(a, tars, [True, True])
    ipfs_pair.connect()
    api = ipfs_pair.b.api_url
    exact = tmp_path / "exact.toml"
    exact.write_text("noprefetch = true\nno_background_fetch = true\n[blob]\n"
                     "neighbour_span = 0\n")
    def extents(layer: int, *paths: str) -> int:
        blob = image.blobs[image.layers[layer].digest]
        index = open_layer(BytesRangeReader(blob), len(blob))
        return sum(c.end - c.offset for p in paths for c in index.chunks(p))

    # the command's files, /etc/passwd and the start files, nothing else (/etc/group is not
    # in the image, the loader is missing: skipped)
    want = {image.layers[0].digest: extents(0, "usr/bin/python3.11", "etc/passwd",
                                            f"{lib}/encodings/__init__.py", f"{site}/a.pth"),
            image.layers[1].digest: extents(1, "bin/sh", f"{site}/b.pth", "etc/localtime")}

    p = ipfsnap(state, api, "--config", str(exact), "-v", "image", "rpull", "--ipfs", image.cid)
    assert p.returncode == 0, p.stderr
    assert "the snapshotter reads the files of '/bin/sh' ahead" in p.stderr
    with SnapshotterClient(state) as snaps:
        deadline = time.monotonic() + 60
        while True:
            # (each worker rewrites its status about once a second)
            fetched = {s.layer: s.fetched for s in snaps.status()}
            if all(fetched.get(k, 0) >= v for k, v in want.items()):
                break
            assert time.monotonic() < deadline, fetched
            time.sleep(0.1)
    assert fetched == want
    unmount_state(state)

    off = tmp_path / "off.toml"
    off.write_text(exact.read_text().replace("[blob]", "[run]\nwarm_on_pull = false\n[blob]"))
    state2 = tmp_path / "state2"
    state2.mkdir()
    try:
        p = ipfsnap(state2, api, "--config", str(off), "-v", "image", "rpull", "--ipfs",
                    image.cid)
        assert p.returncode == 0, p.stderr
        assert "the snapshotter reads" not in p.stderr
    finally:
        unmount_state(state2)


def test_seed_workflow_busybox_two_nodes(
    ipfs_pair: Any, busybox_image: SampleImage, tmp_path: Path, state: Path
) -> None:
    """import + ipfs-push on node A; rpull + run (stargz lazily, then overlayfs fully) on B."""
    require_tool("runc")
    state_a = tmp_path / "state-a"
    p = ipfsnap(state_a, ipfs_pair.a.api_url, "image", "import", str(busybox_image.layout))
    assert p.returncode == 0, p.stderr
    p = ipfsnap(state_a, ipfs_pair.a.api_url, "image", "ipfs-push", busybox_image.name)
    assert p.returncode == 0, p.stderr
    cid = p.stdout.strip()
    ipfs_pair.connect()
    api = ipfs_pair.b.api_url

    p = ipfsnap(state, api, "image", "rpull", "--ipfs", cid)
    assert p.returncode == 0, p.stderr
    kinds = [line.rsplit(" ", 1)[1] for line in p.stdout.splitlines()]
    # documents only (the root is the manifest of this single-platform image): no layer
    assert kinds == ["application/vnd.oci.image.manifest.v1+json",
                     "application/vnd.oci.image.config.v1+json"], p.stdout
    script = "cat /hello.txt; test -e /etc/removed.txt || echo removed"
    p = ipfsnap(state, api, "run", "--snapshotter=stargz", "--rm", "-t", cid, "foo",
                "sh", "-c", script)
    assert p.returncode == 0, p.stderr
    assert p.stdout == busybox_image.files["hello.txt"].decode() + "removed\n"
    image = ImageStore(state).resolve(f"ipfs://{cid}")
    chains = chain_ids(image.config.diff_ids)
    with SnapshotterClient(state) as snaps:
        infos = {i.name: i for i in snaps.walk()}
        assert set(infos) == set(chains), "the container's snapshot went with --rm"
        assert all(REMOTE_LABEL in infos[c].labels for c in chains)
    blobs = ImageStore(state).blobs
    assert not any(blobs.exists(d.digest) for d in image.layers), "lazy: no layer fetched"

    # the same image through the overlayfs snapshotter: layers fetched whole from IPFS
    p = ipfsnap(state, api, "run", "--snapshotter=overlayfs", "--rm", f"ipfs://{cid}", "foo2",
                "cat", "/hello.txt")
    assert p.returncode == 0, p.stderr
    assert p.stdout == busybox_image.files["hello.txt"].decode()
    assert all(blobs.exists(d.digest) for d in image.layers)
    with SnapshotStore(snapshotter_root(state, "overlayfs"), restore=False) as full:
        assert {i.name for i in full.walk()} == set(chains)
        assert not any(REMOTE_LABEL in i.labels for i in full.walk())
