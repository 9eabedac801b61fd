"""ImageStore: names, completeness, locking, tree walks with platforms, garbage collection."""

from __future__ import annotations

import json
import multiprocessing
import re
import threading
from pathlib import Path

import pytest

from ipfsnap.content import (
    ImageNotFound,
    ImageStore,
    IncompleteImage,
    StoreCorrupt,
    import_image,
)
from ipfsnap.content.sample import SampleImage
from ipfsnap.errors import NotFoundError
from ipfsnap.oci import Descriptor, InvalidReference, mediatypes, parse_platform


def _import(store: ImageStore, image: SampleImage) -> None:
    import_image(store, image.layout)


def test_put_get_list_tag_remove(image_store: ImageStore, busybox_image: SampleImage) -> None:
    _import(image_store, busybox_image)
    rec = image_store.get(busybox_image.name)
    assert rec.target == busybox_image.target
    # normalisation: short and long forms are the same name
    image_store.tag(busybox_image.name, "busybox")
    assert image_store.get("docker.io/library/busybox:latest").target == rec.target
    assert image_store.get("busybox").name == "docker.io/library/busybox:latest"
    image_store.put("localhost:5000/x:tag", rec.target)
    assert [r.name for r in image_store.list()] == [
        "docker.io/ipfsnap-test/busybox:1",
        "docker.io/library/busybox:latest",
        "localhost:5000/x:tag",
    ]
    image_store.put(
        "ipfs://bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy", rec.target
    )
    assert (
        image_store.get("ipfs://bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy").target
        == rec.target
    )
    assert image_store.remove("busybox").name == "docker.io/library/busybox:latest"
    with pytest.raises(ImageNotFound, match=re.escape("docker.io/library/busybox:latest")):
        image_store.get("busybox")
    with pytest.raises(ImageNotFound):
        image_store.remove("busybox")
    with pytest.raises(ImageNotFound):
        image_store.tag("nope", "other")
    with pytest.raises(InvalidReference):
        image_store.get("Bad Name")


def test_put_refuses_incomplete_tree(image_store: ImageStore, busybox_image: SampleImage) -> None:
    _import(image_store, busybox_image)
    before = image_store.list()
    layer = busybox_image.layer_digests[1]
    image_store.blobs.delete(layer)
    with pytest.raises(IncompleteImage, match=layer):
        image_store.put("other", busybox_image.target)
    missing = Descriptor(mediatypes.OCI_MANIFEST, "sha256:" + "1" * 64, 10)
    with pytest.raises(IncompleteImage, match="1" * 64):
        image_store.put("other", missing)
    assert image_store.list() == before
    # remote (lazily pulled) images may lack layers, never manifests or configs
    image_store.put("lazy", busybox_image.target, remote_layers=True)
    assert image_store.get("lazy").remote_layers


def test_corrupt_names_file(image_store: ImageStore) -> None:
    image_store.root.mkdir(parents=True)
    (image_store.root / "refs.json").write_text("{not json")
    with pytest.raises(StoreCorrupt, match=r"refs\.json"):
        image_store.list()
    (image_store.root / "refs.json").write_text(json.dumps({"version": 99, "images": {}}))
    with pytest.raises(StoreCorrupt, match="version"):
        image_store.get("x")


def _put_names(state: str, layout: str, worker: int) -> None:
    store = ImageStore(Path(state))
    target = store.get("seed").target
    for i in range(10):
        store.put(f"w{worker}/img:{i}", target)


def test_concurrent_name_updates_lose_nothing(
    image_store: ImageStore, busybox_image: SampleImage, state_dir: Path
) -> None:
    """Processes updating names at the same time: the lock serialises read-modify-write."""
    _import(image_store, busybox_image)
    image_store.tag(busybox_image.name, "seed")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_put_names, args=(str(state_dir), "", w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0] * 4
    names = {r.name for r in image_store.list()}
    assert len(names) == 2 + 40


def test_gc(
    image_store: ImageStore, busybox_image: SampleImage, busybox_multiarch: SampleImage
) -> None:
    _import(image_store, busybox_image)
    _import(image_store, busybox_multiarch)
    stray = image_store.blobs.write(b"unreferenced")
    all_blobs = set(image_store.blobs.list())
    result = image_store.gc()
    assert result.removed == (stray,)
    assert result.freed_bytes == len(b"unreferenced")
    assert set(image_store.blobs.list()) == all_blobs - {stray}
    # both images share layers: removing one keeps the shared ones
    image_store.remove(busybox_multiarch.name)
    image_store.gc()
    kept = set(image_store.blobs.list())
    assert set(busybox_image.layer_digests) <= kept
    assert busybox_multiarch.target.digest not in kept
    image_store.check_complete(image_store.get(busybox_image.name).target)
    image_store.remove(busybox_image.name)
    image_store.gc()
    assert list(image_store.blobs.list()) == []


def test_gc_waits_for_leases(image_store: ImageStore) -> None:
    """Blobs written under a lease are not swept while the lease is held."""
    done = threading.Event()
    with image_store.lease():
        digest = image_store.blobs.write(b"in flight")
        t = threading.Thread(target=lambda: (image_store.gc(), done.set()))
        t.start()
        t.join(0.5)
        assert t.is_alive() and not done.is_set()
        assert image_store.blobs.exists(digest)
    t.join()
    assert done.is_set()
    assert not image_store.blobs.exists(digest)


def test_platform_selection(image_store: ImageStore, busybox_multiarch: SampleImage) -> None:
    _import(image_store, busybox_multiarch)
    rec = image_store.get(busybox_multiarch.name)
    assert rec.target.media_type == mediatypes.OCI_INDEX
    arm = image_store.manifest_for(rec.target, parse_platform("linux/arm64"))
    amd = image_store.manifest_for(rec.target, parse_platform("linux/amd64"))
    assert arm == busybox_multiarch.manifests["linux/arm64"]
    assert amd == busybox_multiarch.manifests["linux/amd64"]
    assert (
        image_store.resolve(
            busybox_multiarch.name, parse_platform("linux/arm64")
        ).config.platform.architecture
        == "arm64"
    )
    with pytest.raises(NotFoundError, match="linux/s390x"):
        image_store.manifest_for(rec.target, parse_platform("linux/s390x"))
    walked = [d.digest for d in image_store.walk(rec.target, parse_platform("linux/arm64"))]
    assert walked[0] == rec.target.digest and walked[1] == arm.digest
    assert amd.digest not in walked
    everything = {d.digest for d in image_store.walk(rec.target)}
    assert {arm.digest, amd.digest} <= everything
    # a platform whose manifest was not fetched: clear error
    image_store.blobs.delete(arm.digest)
    with pytest.raises(IncompleteImage, match="not pulled"):
        image_store.manifest_for(rec.target, parse_platform("linux/arm64"))


def test_resolve_single(image_store: ImageStore, busybox_image: SampleImage) -> None:
    _import(image_store, busybox_image)
    res = image_store.resolve(busybox_image.name.split("/", 1)[1])
    assert res.config.cmd == ["/bin/sh"]
    assert [d.digest for d in res.layers] == busybox_image.layer_digests
    assert res.config.diff_ids == busybox_image.diff_ids


def test_discard_unreferenced_keeps_named(
    image_store: ImageStore, busybox_image: SampleImage
) -> None:
    _import(image_store, busybox_image)
    stray = image_store.blobs.write(b"stray")
    image_store.discard_unreferenced({stray, busybox_image.layer_digests[0]})
    assert not image_store.blobs.exists(stray)
    assert image_store.blobs.exists(busybox_image.layer_digests[0])


def test_typed_readers(image_store: ImageStore, busybox_multiarch: SampleImage) -> None:
    from ipfsnap.oci import OCIFormatError

    _import(image_store, busybox_multiarch)
    index = image_store.read_index(busybox_multiarch.target)
    manifest = image_store.read_manifest(index.manifests[0])
    assert [d.digest for d in manifest.layers] == busybox_multiarch.layer_digests
    with pytest.raises(OCIFormatError, match="not a manifest"):
        image_store.read_manifest(busybox_multiarch.target)
    with pytest.raises(OCIFormatError, match="not an index"):
        image_store.read_index(index.manifests[0])


def test_gc_stops_on_unreadable_document(
    image_store: ImageStore, busybox_image: SampleImage
) -> None:
    """A corrupt manifest on disk: gc must not sweep (it cannot know the children)."""
    from ipfsnap.errors import StoreError

    _import(image_store, busybox_image)
    stray = image_store.blobs.write(b"stray")
    path = image_store.blobs.path(busybox_image.target.digest)
    path.write_bytes(path.read_bytes()[:-1] + b" ")
    before = set(image_store.blobs.list())
    with pytest.raises(StoreError, match="nothing was removed"):
        image_store.gc()
    assert set(image_store.blobs.list()) == before and stray in before


KILL_MID_IMPORT = """
import os, signal, sys
from pathlib import Path
from ipfsnap.content import ImageStore, import_image
from ipfsnap.content.blobs import BlobStore

real = BlobStore.ingest
count = 0

def ingest(self, *args, **kwargs):
    global count
    count += 1
    if count == 3:  # manifest and config stored, now die while a layer streams in
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args, **kwargs)

BlobStore.ingest = ingest
import_image(ImageStore(Path(sys.argv[1])), Path(sys.argv[2]), "crashed:1")
"""


def test_crash_mid_import_names_nothing(state_dir: Path, busybox_image: SampleImage) -> None:
    """An import killed half-way (SIGKILL while a layer streams in) leaves no name, so none
    points at missing content; its stray blobs go with the next gc."""
    import subprocess
    import sys

    from tests.support import ROOT

    store = ImageStore(state_dir)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_MID_IMPORT, str(state_dir), str(busybox_image.layout)],
        cwd=ROOT,
        capture_output=True,
    )
    assert proc.returncode == -9, proc.stderr
    assert store.list() == []
    assert set(store.blobs.list()) == {busybox_image.target.digest, busybox_image.config_digest}
    store.gc()
    assert list(store.blobs.list()) == []
    # and the import works afterwards
    _import(store, busybox_image)
    store.check_complete(store.get(busybox_image.name).target)
