"""The reference's optimized images (``ctr-remote image optimize``, Debian's stargz-snapshotter)
through ipfsnap: the same workload prioritizes the same files as ``ipfsnap image optimize``,
and ipfsnap's lazy mount prefetches exactly their range before the layer is ready.

Needs root, a private containerd (tests/containerd/env.py), ctr-remote, runc and FUSE; FAILS
without them.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipfsnap.content import ImageStore, ResolvedImage
from ipfsnap.content.archive import import_image
from ipfsnap.content.sample import PASSWD, SampleImage
from ipfsnap.estargz import PREFETCH_LANDMARK, TOC_DIGEST_ANNOTATION, FileRangeReader, open_layer
from tests.containerd.env import start_env
from tests.fs.layers import Blob
from tests.fs.mounts import labels_for, make_mounter, mounted
from tests.image.test_optimize import EXPECTED, SCRIPT
from tests.support import require_fuse, require_root, require_tool

pytestmark = pytest.mark.integration

TIMEOUT = 300


@pytest.fixture(scope="module")
def reference_optimized(
    tmp_path_factory: pytest.TempPathFactory, busybox_image: SampleImage
) -> Iterator[tuple[ImageStore, ResolvedImage]]:
    require_root()
    for tool in ("containerd", "ctr", "ctr-remote", "runc", "containerd-shim-runc-v2"):
        require_tool(tool)
    assert busybox_image.oci_archive is not None
    out = tmp_path_factory.mktemp("refopt")
    env = start_env()
    try:
        env.ctr("images", "import", "--base-name", "refsrc", str(busybox_image.oci_archive))
        src = env.ctr("images", "ls", "-q").stdout.split()[0]
        res = subprocess.run(
            ["ctr-remote", "-a", str(env.address), "-n", env.namespace, "images", "optimize",
             "--oci", "--period", "30", "--args", json.dumps(["/bin/sh", "-c", SCRIPT]),
             src, "refopt:1"],
            capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )
        assert res.returncode == 0, res.stderr
        assert "Hello from layer 2" in res.stdout  # the workload ran
        env.ctr("images", "export", str(out / "refopt.tar"), "refopt:1")
    finally:
        env.teardown()
    store = ImageStore(out / "state")
    name = import_image(store, out / "refopt.tar")[0].name
    yield store, store.resolve(name)


def _head(store: ImageStore, digest: str, size: int, toc: str) -> tuple[list[str], int]:
    """Regular files before the landmark, and the compressed bytes of their chunks."""
    with store.blobs.open(digest) as f:
        index = open_layer(FileRangeReader(f, digest), size, toc_digest=toc)
        names = [e.name for e in index.toc_entries if e.type != "chunk"]
        head = [n for n in names[: names.index(PREFETCH_LANDMARK)] if not n.endswith("/")]
        extents = {c.chunk_digest: c.end - c.offset for p in head for c in index.chunks(p)}
    return head, sum(extents.values())


def test_reference_prioritizes_the_files_ipfsnap_records(
    reference_optimized: tuple[ImageStore, ResolvedImage]
) -> None:
    store, image = reference_optimized
    assert len(image.layers) == len(EXPECTED)
    for layer, ours in zip(image.layers, EXPECTED, strict=True):
        head, _ = _head(store, layer.digest, layer.size, layer.annotations[TOC_DIGEST_ANNOTATION])
        # the reference (fanotify) sees the files opened, after symlinks are resolved; ipfsnap
        # also lists the symlinks it went through (bin/sh): the same files in the same order
        with store.blobs.open(layer.digest) as f:
            index = open_layer(FileRangeReader(f, layer.digest), layer.size)
            regular = [p for p in ours if (e := index.entry(p)) is not None and e.type == "reg"]
        assert head == regular


def test_lazy_mount_prefetches_the_references_prioritized_range(
    reference_optimized: tuple[ImageStore, ResolvedImage], tmp_path: Path
) -> None:
    require_fuse()
    store, image = reference_optimized
    m = make_mounter(tmp_path / "fsstate", background=False)
    contents = {"etc/passwd": PASSWD, "hello.txt": b"Hello from layer 2\n"}
    for i, layer in enumerate(image.layers):
        toc = layer.annotations[TOC_DIGEST_ANNOTATION]
        head, want = _head(store, layer.digest, layer.size, toc)
        assert want > 0
        blob = Blob(store.blobs.path(layer.digest), toc, layer.digest, layer.size, [])
        mp = tmp_path / f"mp{i}"
        with mounted(m, mp, labels_for(blob)):
            st = m.status(mp)
            assert st is not None
            # ready means prefetched: the prioritized chunks, before any read, nothing more
            assert st["cached_bytes"] == want
            assert st["fetched_bytes"] == want
            assert not (mp / PREFETCH_LANDMARK).exists()
            for name in head:
                if name in contents:
                    assert (mp / name).read_bytes() == contents[name]
