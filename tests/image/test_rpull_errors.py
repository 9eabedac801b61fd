"""rpull refuses what it cannot verify: wrong digests are rejected with one clear line and
leave no name and no half-made snapshot; a layer whose TOC digest annotation does not match
is never mounted lazily (logged, fetched whole instead)."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ipfsnap import fs
from ipfsnap.content import ImageNotFound, ImageStore
from ipfsnap.estargz import TOC_DIGEST_ANNOTATION
from ipfsnap.image import unpack as unpack_mod
from ipfsnap.image.errors import BadImageRef, BlobVerificationError, RemoteImageFormatError
from ipfsnap.image.resolve import fetching_line, parse_ipfs_ref
from ipfsnap.image.rpull import rpull
from ipfsnap.image.unpack import chain_ids
from ipfsnap.ipfs import IPFSClient
from ipfsnap.oci import Descriptor, sha256_digest
from ipfsnap.snapshot import REMOTE_LABEL, mount_all, unmount
from tests.fs.layers import Item, make_tar
from tests.image.rpull_helpers import closing_lazy, lazy_config, lazy_store, push
from tests.support import require_fuse

CID = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"


def small_tars() -> list[bytes]:
    return [
        make_tar([Item("a", "dir", mode=0o755), Item("a/one", "file", b"one\n")]),
        make_tar([Item("a", "dir", mode=0o755), Item("a/two", "file", b"two\n"),
                  Item("a/.wh.one", "file", b"")]),
    ]


def wrong(desc: Descriptor) -> Descriptor:
    """The same descriptor (same url, same size) claiming another digest."""
    return replace(desc, digest=sha256_digest(b"not the content of " + desc.digest.encode()))


# -- no daemon needed --------------------------------------------------------------------------

def test_refs() -> None:
    want = parse_ipfs_ref(CID)
    assert parse_ipfs_ref(f"ipfs://{CID}") == want
    assert parse_ipfs_ref(f"/ipfs/{CID}") == want
    assert parse_ipfs_ref(f"/ipfs/{CID}/") == want
    for bad in ("", "ipfs://", "/ipfs/", f"/ipfs/{CID}/etc", "not-a-cid", "docker.io/x:1"):
        with pytest.raises(BadImageRef) as info:
            parse_ipfs_ref(bad)
        assert "\n" not in str(info.value) and repr(bad) in str(info.value)


def test_chain_ids_as_containerd() -> None:
    d = [sha256_digest(x) for x in (b"1", b"2", b"3")]
    c1 = "sha256:" + hashlib.sha256(f"{d[0]} {d[1]}".encode()).hexdigest()
    c2 = "sha256:" + hashlib.sha256(f"{c1} {d[2]}".encode()).hexdigest()
    assert chain_ids(d) == [d[0], c1, c2]
    assert chain_ids([]) == []


def test_label_names_match_the_layer_filesystem() -> None:
    assert unpack_mod.LAYER_DIGEST_LABEL == fs.LAYER_DIGEST_LABEL
    assert unpack_mod.TOC_DIGEST_LABEL == fs.TOC_DIGEST_LABEL
    assert unpack_mod.URLS_LABEL == fs.URLS_LABEL
    assert unpack_mod.SIZE_LABEL == fs.SIZE_LABEL
    assert unpack_mod.PREFETCH_SIZE_LABEL == fs.PREFETCH_SIZE_LABEL


def test_fetching_line_format() -> None:
    d = Descriptor("application/vnd.oci.image.index.v1+json", "sha256:" + "ab12cd34" + "0" * 56, 1)
    assert fetching_line(d) == "fetching sha256:ab12cd34... application/vnd.oci.image.index.v1+json"


# -- with IPFS ---------------------------------------------------------------------------------

def _no_name(state: Path, cid: str) -> None:
    with pytest.raises(ImageNotFound):
        ImageStore(state).get(f"ipfs://{cid}")


@pytest.mark.integration
def test_wrong_config_digest_is_rejected(ipfs_pair: Any, tmp_path: Path) -> None:
    require_fuse()
    with IPFSClient(ipfs_pair.a.api_url) as a:
        image = push(a, small_tars(), [True, True], config_hook=wrong)
    ipfs_pair.connect()
    state = tmp_path / "state"
    cfg = lazy_config(state, ipfs_pair.b.api_url)
    with closing_lazy(lazy_store(cfg)) as store, IPFSClient(ipfs_pair.b.api_url) as b:
        with pytest.raises(BlobVerificationError) as info:
            rpull(image.cid, store, client=b, images=ImageStore(state))
        msg = str(info.value)
        assert image.config.digest in msg and "rejected" in msg and "\n" not in msg
        _no_name(state, image.cid)
        assert store.walk() == []
        assert not ImageStore(state).blobs.exists(image.config.digest)


@pytest.mark.integration
def test_wrong_layer_digest_is_rejected_cli(ipfs_pair: Any, tmp_path: Path) -> None:
    """A non-eStargz layer whose blob does not match: exit code, one line, no name, no
    active snapshot, nothing stored under the digest."""
    require_fuse()

    def hook(i: int, d: Descriptor) -> Descriptor:
        return wrong(d) if i == 1 else d

    with IPFSClient(ipfs_pair.a.api_url) as a:
        image = push(a, small_tars(), [False, False], layer_hook=hook)
    ipfs_pair.connect()
    state = tmp_path / "state"
    base = [sys.executable, "-m", "ipfsnap.cli.main", "--state-dir", str(state), "--ipfs-api",
            ipfs_pair.b.api_url]
    try:
        p = subprocess.run(
            [*base, "image", "rpull", "--ipfs", image.cid],
            capture_output=True, text=True, timeout=300,
        )
    finally:
        # rpull started this state dir's snapshotter on demand: do not leave it running
        subprocess.run([*base, "snapshotter", "stop"], capture_output=True, timeout=120)
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and image.layers[1].digest in err[0], p.stderr
    _no_name(state, image.cid)
    assert not ImageStore(state).blobs.exists(image.layers[1].digest)
    cfg = lazy_config(state, ipfs_pair.b.api_url)
    with closing_lazy(lazy_store(cfg)) as store:
        infos = store.walk()
        # the good bottom layer stays committed (shared by chain ID); no active leftovers
        assert [i.name for i in infos] == chain_ids(image.diff_ids)[:1]


@pytest.mark.integration
def test_toc_digest_mismatch_falls_back_to_full_fetch(
    ipfs_pair: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_fuse()

    def hook(i: int, d: Descriptor) -> Descriptor:
        if i != 0:
            return d
        bad = dict(d.annotations)
        bad[TOC_DIGEST_ANNOTATION] = sha256_digest(b"some other TOC")
        return replace(d, annotations=bad)

    with IPFSClient(ipfs_pair.a.api_url) as a:
        image = push(a, small_tars(), [True, True], layer_hook=hook)
    ipfs_pair.connect()
    state = tmp_path / "state"
    cfg = lazy_config(state, ipfs_pair.b.api_url)
    lines: list[str] = []
    caplog.set_level(logging.WARNING)
    with closing_lazy(lazy_store(cfg)) as store, IPFSClient(ipfs_pair.b.api_url) as b:
        img = rpull(image.cid, store, client=b, images=ImageStore(state), report=lines.append)
        assert img.unpacked is not None
        assert [r.how for r in img.unpacked.layers] == ["full", "lazy"]
        assert fetching_line(image.layers[0]) in lines
        assert fetching_line(image.layers[1]) not in lines
        warned = [r.getMessage() for r in caplog.records
                  if image.layers[0].digest in r.getMessage()
                  and "lazily" in r.getMessage()]
        assert warned, [r.getMessage() for r in caplog.records]
        chains = chain_ids(image.diff_ids)
        assert REMOTE_LABEL not in store.stat(chains[0]).labels
        assert REMOTE_LABEL in store.stat(chains[1]).labels
        mp = tmp_path / "mnt"
        mp.mkdir()
        mount_all(store.view("v", chains[1]), mp)
        try:
            assert sorted(p.name for p in (mp / "a").iterdir()) == ["two"]
            assert (mp / "a" / "two").read_bytes() == b"two\n"
        finally:
            unmount(mp)
            store.remove("v")


@pytest.mark.integration
def test_descriptor_without_ipfs_url(ipfs_pair: Any, tmp_path: Path) -> None:
    def hook(i: int, d: Descriptor) -> Descriptor:
        return replace(d, urls=("https://example.invalid/blob",))

    with IPFSClient(ipfs_pair.a.api_url) as a:
        image = push(a, small_tars()[:1], [False], layer_hook=hook)
    state = tmp_path / "state"
    from tests.image.rpull_helpers import full_store

    with full_store(lazy_config(state, ipfs_pair.a.api_url)) as store, \
            IPFSClient(ipfs_pair.a.api_url) as a:
        with pytest.raises(RemoteImageFormatError) as info:
            rpull(image.cid, store, client=a, images=ImageStore(state), lazy=False)
        assert "no ipfs:// url" in str(info.value) and image.layers[0].digest in str(info.value)
        _no_name(state, image.cid)
        assert store.walk() == []



@pytest.mark.integration
def test_platform_selection(ipfs_pair: Any, tmp_path: Path) -> None:
    """An index with two platforms: only the selected manifest and config are fetched."""
    from ipfsnap.image.errors import PlatformNotFound
    from ipfsnap.oci import Index, Manifest, Platform, canonical_json, mediatypes, parse_platform

    with IPFSClient(ipfs_pair.a.api_url) as a:
        image = push(a, small_tars()[:1], [False])

        def add(media_type: str, data: bytes, platform: Platform | None = None) -> Descriptor:
            cid = a.add(data).cid
            return Descriptor(media_type, sha256_digest(data), len(data), urls=(f"ipfs://{cid}",),
                              platform=platform)

        arm_config = add(mediatypes.OCI_CONFIG, canonical_json({
            "architecture": "arm64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": image.diff_ids}}))
        arm = add(mediatypes.OCI_MANIFEST,
                  Manifest(mediatypes.OCI_MANIFEST, arm_config, tuple(image.layers)).to_bytes(),
                  Platform("linux", "arm64"))
        index = add(mediatypes.OCI_INDEX,
                    Index(mediatypes.OCI_INDEX, (image.manifest, arm)).to_bytes())
        root = Descriptor(index.media_type, index.digest, index.size, urls=index.urls)
        cid = a.add(canonical_json(root.to_dict())).cid
    ipfs_pair.connect()
    state = tmp_path / "state"
    with IPFSClient(ipfs_pair.b.api_url) as b:
        lines: list[str] = []
        img = rpull(cid, None, client=b, images=ImageStore(state),
                    platform=parse_platform("linux/arm64"), report=lines.append)
        assert img.config.raw["architecture"] == "arm64"
        assert lines == [fetching_line(d) for d in (index, arm, arm_config)]
        assert ImageStore(state).get(f"ipfs://{cid}").target.digest == index.digest
        with pytest.raises(PlatformNotFound) as info:
            rpull(cid, None, client=b, images=ImageStore(tmp_path / "other"),
                  platform=parse_platform("linux/s390x"))
        assert "linux/s390x" in str(info.value)
        _no_name(tmp_path / "other", cid)
