"""eStargz conversion of local images (ipfsnap.image.convert), without IPFS.

Also holds the small image builders the push tests import (``make_image`` ...): images are
written straight into a test's content store, with any media types and annotations.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipfsnap.content import ImageStore, IncompleteImage, import_image
from ipfsnap.content.sample import SampleImage, TarEntry, build_tar, gzip_bytes
from ipfsnap.errors import IpfsnapError, NotFoundError
from ipfsnap.estargz import (
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    BytesRangeReader,
    LayerReader,
    open_layer,
    verify_blob,
)
from ipfsnap.image.convert import ConvertOptions, ConvertResult, convert_image
from ipfsnap.image.errors import (
    LayerConversionError,
    SourceBlobMismatch,
    UnsupportedMediaType,
)
from ipfsnap.oci import (
    Descriptor,
    Index,
    Manifest,
    canonical_json,
    host_platform,
    mediatypes,
    parse_platform,
    sha256_digest,
)

#: small chunks: files of a few hundred KiB span several chunks
CHUNK = 64 * 1024
OPTS = ConvertOptions(chunk_size=CHUNK, level=6)


# -- builders (also used by test_push*.py) ------------------------------------------------------


def sample_tars() -> list[bytes]:
    """Two layer tars: a base with a multi-chunk file, and an upper layer with a whiteout."""
    big = hashlib.sha256(b"seed").digest() * (300 * 1024 // 32)  # 300 KiB: 5 chunks of 64 KiB
    lower = [
        TarEntry("etc", "dir", mode=0o755),
        TarEntry("etc/hostname", data=b"ipfsnap\n"),
        TarEntry("usr", "dir", mode=0o755),
        TarEntry("usr/lib", "dir", mode=0o755),
        TarEntry("usr/lib/big.bin", data=big),
        TarEntry("usr/lib/link", "symlink", link="big.bin"),
        TarEntry("gone.txt", data=b"removed above\n"),
    ]
    upper = [
        TarEntry("etc", "dir", mode=0o755),
        TarEntry("etc/motd", data=b"hello from the upper layer\n" * 100),
        TarEntry("etc/hard", "hardlink", link="etc/motd"),
        TarEntry("gone.txt", "whiteout"),
    ]
    return [build_tar(lower), build_tar(upper)]


@dataclass
class Layer:
    """A layer blob as it goes into the store, and the tar it decompresses to."""

    blob: bytes
    media_type: str
    tar: bytes
    annotations: dict[str, str] | None = None


def gzip_layer(tar: bytes, media_type: str = mediatypes.OCI_LAYER_GZIP) -> Layer:
    return Layer(gzip_bytes(tar), media_type, tar)


def plain_layer(tar: bytes, media_type: str = mediatypes.OCI_LAYER) -> Layer:
    return Layer(tar, media_type, tar)


def make_image(
    store: ImageStore,
    name: str,
    layers: Sequence[Layer],
    *,
    docker: bool = False,
    diff_ids: Sequence[str] | None = None,
    process: dict[str, object] | None = None,
) -> Descriptor:
    """Write config, layers and manifest into ``store`` and name the manifest ``name``;
    ``process`` is the config's ``config`` object (Cmd, Env...)."""
    plat = host_platform()
    config = {
        "architecture": plat.architecture,
        "os": plat.os,
        "config": process if process is not None else {"Cmd": ["/bin/sh"],
                                                       "Labels": {"a&b": "<x>"}},
        "rootfs": {
            "type": "layers",
            "diff_ids": list(diff_ids or [sha256_digest(layer.tar) for layer in layers]),
        },
    }
    cbytes = canonical_json(config)
    ctype = mediatypes.DOCKER_CONFIG if docker else mediatypes.OCI_CONFIG
    cdesc = Descriptor(ctype, store.blobs.write(cbytes), len(cbytes))
    ldescs = []
    for layer in layers:
        digest = store.blobs.write(layer.blob)
        ldescs.append(
            Descriptor(layer.media_type, digest, len(layer.blob),
                       annotations=layer.annotations or {})
        )
    mtype = mediatypes.DOCKER_MANIFEST if docker else mediatypes.OCI_MANIFEST
    mbytes = Manifest(mtype, cdesc, tuple(ldescs)).to_bytes()
    target = Descriptor(mtype, store.blobs.write(mbytes), len(mbytes))
    store.put(name, target)
    return target


def sample_image(store: ImageStore, name: str = "test/sample:1") -> Descriptor:
    tars = sample_tars()
    return make_image(store, name, [gzip_layer(tars[0]), gzip_layer(tars[1])])


def convert(
    store: ImageStore, target: Descriptor, state: Path, opts: ConvertOptions = OPTS
) -> ConvertResult:
    with store.lease():
        return convert_image(store, target, opts, state_dir=state, what="image test")


def tar_files(tar: bytes) -> dict[str, tuple[str, bytes]]:
    """name -> (type, content) of a tar's entries, eStargz landmarks and TOC left out."""
    out: dict[str, tuple[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        for m in tf.getmembers():
            name = m.name.removeprefix("./")
            if name in (".prefetch.landmark", ".no.prefetch.landmark", "stargz.index.json"):
                continue
            data = tf.extractfile(m).read() if m.isfile() else m.linkname.encode()  # type: ignore[union-attr]
            out[name] = (str(m.type), data)
    return out


def check_estargz_layer(desc: Descriptor, blob: bytes, diff_id: str) -> bytes:
    """Assert ``blob`` is the eStargz ``desc`` describes; returns its decompressed tar."""
    assert desc.media_type == mediatypes.OCI_LAYER_GZIP
    assert sha256_digest(blob) == desc.digest and len(blob) == desc.size
    plain = gzip.decompress(blob)
    assert desc.annotations[UNCOMPRESSED_SIZE_ANNOTATION] == str(len(plain))
    assert sha256_digest(plain) == diff_id
    toc = desc.annotations[TOC_DIGEST_ANNOTATION]
    index = open_layer(BytesRangeReader(blob), len(blob), toc_digest=toc)
    assert index.toc_digest == toc and index.compression == "gzip"
    assert verify_blob(BytesRangeReader(blob), len(blob), toc_digest=toc).chunks > 0
    return plain


def blob_set(store: ImageStore) -> set[str]:
    return set(store.blobs.list())


# -- tests --------------------------------------------------------------------------------------


def test_layers_become_estargz_with_annotations_and_diff_ids(
    image_store: ImageStore, state_dir: Path
) -> None:
    target = sample_image(image_store)
    tars = sample_tars()
    result = convert(image_store, target, state_dir)
    assert result.built == 2
    assert result.target.digest != target.digest
    man = image_store.read_manifest(result.target)
    assert man.media_type == mediatypes.OCI_MANIFEST
    config = image_store.read_config(man.config)
    assert len(config.diff_ids) == 2
    for layer, diff_id, tar in zip(man.layers, config.diff_ids, tars, strict=True):
        blob = image_store.blobs.read(layer.digest)
        plain = check_estargz_layer(layer, blob, diff_id)
        # same files, same bytes
        assert tar_files(plain) == tar_files(tar)
    # the multi-chunk file reads back through the TOC
    lower = image_store.blobs.read(man.layers[0].digest)
    index = open_layer(BytesRangeReader(lower), len(lower))
    assert len(index.chunks("usr/lib/big.bin")) == 5
    reader = LayerReader(index, BytesRangeReader(lower))
    assert reader.read("usr/lib/big.bin") == tar_files(tars[0])["usr/lib/big.bin"][1]
    # everything else of the config is kept
    old = image_store.read_config(image_store.read_manifest(target).config)
    assert {k: v for k, v in config.raw.items() if k != "rootfs"} == {
        k: v for k, v in old.raw.items() if k != "rootfs"
    }
    assert config.labels == {"a&b": "<x>"}
    # all new blobs were created by this call and are in the store
    assert {man.config.digest, *(x.digest for x in man.layers), result.target.digest} <= set(
        result.created
    )
    image_store.put("converted", result.target)  # the tree is complete


def test_docker_media_types_become_oci(image_store: ImageStore, state_dir: Path) -> None:
    tars = sample_tars()
    target = make_image(
        image_store,
        "test/docker:1",
        [plain_layer(tars[0], mediatypes.DOCKER_LAYER),
         gzip_layer(tars[1], mediatypes.DOCKER_LAYER_GZIP)],
        docker=True,
    )
    for estargz in (True, False):
        opts = ConvertOptions(chunk_size=CHUNK, level=1, estargz=estargz)
        result = convert(image_store, target, state_dir, opts)
        assert result.target.media_type == mediatypes.OCI_MANIFEST
        man = image_store.read_manifest(result.target)
        assert man.media_type == mediatypes.OCI_MANIFEST
        assert man.config.media_type == mediatypes.OCI_CONFIG
        if estargz:
            assert [x.media_type for x in man.layers] == [mediatypes.OCI_LAYER_GZIP] * 2
            config = image_store.read_config(man.config)
            for layer, diff_id in zip(man.layers, config.diff_ids, strict=True):
                check_estargz_layer(layer, image_store.blobs.read(layer.digest), diff_id)
        else:
            # only the media types change: same blobs, same config bytes
            src = image_store.read_manifest(target)
            assert [x.media_type for x in man.layers] == [
                mediatypes.OCI_LAYER, mediatypes.OCI_LAYER_GZIP
            ]
            assert [x.digest for x in man.layers] == [x.digest for x in src.layers]
            assert man.config.digest == src.config.digest


def test_estargz_false_leaves_an_oci_image_unchanged(
    image_store: ImageStore, state_dir: Path
) -> None:
    target = sample_image(image_store)
    result = convert(image_store, target, state_dir, ConvertOptions(estargz=False))
    assert result.target == target
    assert result.created == frozenset()
    assert all(not r.converted for r in result.layers)


def test_already_estargz_layers_are_kept(image_store: ImageStore, state_dir: Path) -> None:
    target = sample_image(image_store)
    first = convert(image_store, target, state_dir)
    # converting the converted image (different options: no cache applies) changes nothing
    again = convert(image_store, first.target, state_dir, ConvertOptions(level=1))
    assert again.built == 0
    assert all(not r.converted and not r.cached for r in again.layers)
    assert again.target == first.target
    assert again.created == frozenset()


def test_estargz_without_size_annotation_is_kept_and_annotated(
    image_store: ImageStore, state_dir: Path
) -> None:
    first = convert(image_store, sample_image(image_store), state_dir)
    man = image_store.read_manifest(first.target)
    cfg = image_store.read_config(man.config)
    layers = []
    for layer in man.layers:
        blob = image_store.blobs.read(layer.digest)
        ann = {TOC_DIGEST_ANNOTATION: layer.annotations[TOC_DIGEST_ANNOTATION]}
        layers.append(Layer(blob, mediatypes.DOCKER_LAYER_GZIP, gzip.decompress(blob), ann))
    target = make_image(image_store, "test/bare:1", layers, docker=True, diff_ids=cfg.diff_ids)
    result = convert(image_store, target, state_dir, ConvertOptions(level=1))
    assert result.built == 0
    new = image_store.read_manifest(result.target)
    assert [x.digest for x in new.layers] == [x.digest for x in man.layers]
    assert [dict(x.annotations) for x in new.layers] == [dict(x.annotations) for x in man.layers]
    assert [x.media_type for x in new.layers] == [mediatypes.OCI_LAYER_GZIP] * 2


def test_wrong_toc_annotation_is_converted_not_kept(
    image_store: ImageStore, state_dir: Path
) -> None:
    first = convert(image_store, sample_image(image_store), state_dir)
    man = image_store.read_manifest(first.target)
    cfg = image_store.read_config(man.config)
    blob = image_store.blobs.read(man.layers[1].digest)
    lie = {TOC_DIGEST_ANNOTATION: sha256_digest(b"not the toc")}
    target = make_image(
        image_store, "test/lie:1",
        [Layer(blob, mediatypes.OCI_LAYER_GZIP, gzip.decompress(blob), lie)],
        diff_ids=[cfg.diff_ids[1]],
    )
    result = convert(image_store, target, state_dir, ConvertOptions(chunk_size=CHUNK, level=1))
    assert result.built == 1
    layer = image_store.read_manifest(result.target).layers[0]
    assert layer.annotations[TOC_DIGEST_ANNOTATION] != lie[TOC_DIGEST_ANNOTATION]
    new_cfg = image_store.read_config(image_store.read_manifest(result.target).config)
    check_estargz_layer(layer, image_store.blobs.read(layer.digest), new_cfg.diff_ids[0])


def test_second_run_is_served_from_the_cache(image_store: ImageStore, state_dir: Path) -> None:
    target = sample_image(image_store)
    first = convert(image_store, target, state_dir)
    assert first.built == 2 and not any(r.cached for r in first.layers)
    second = convert(image_store, target, state_dir)
    assert second.built == 0 and all(r.cached for r in second.layers)
    assert second.target == first.target
    assert second.created == frozenset()
    # other options are another cache entry
    third = convert(image_store, target, state_dir, ConvertOptions(chunk_size=CHUNK, level=1))
    assert third.built == 2
    # a cached blob that was collected since is converted again, to the same bytes
    man = image_store.read_manifest(first.target)
    image_store.blobs.delete(man.layers[0].digest)
    fourth = convert(image_store, target, state_dir)
    assert fourth.built == 1
    assert fourth.target == first.target
    assert image_store.blobs.exists(man.layers[0].digest)


def test_parallel_and_serial_conversions_give_the_same_bytes(
    image_store: ImageStore, tmp_path: Path
) -> None:
    target = sample_image(image_store)
    serial = convert(image_store, target, tmp_path / "a", ConvertOptions(chunk_size=CHUNK, jobs=1))
    parallel = convert(
        image_store, target, tmp_path / "b", ConvertOptions(chunk_size=CHUNK, jobs=2)
    )
    assert serial.built == parallel.built == 2
    assert serial.target == parallel.target


def test_prioritized_files_come_first(image_store: ImageStore, state_dir: Path) -> None:
    target = sample_image(image_store)
    opts = ConvertOptions(chunk_size=CHUNK, level=1, prioritize=("etc/motd",))
    result = convert(image_store, target, state_dir, opts)
    man = image_store.read_manifest(result.target)
    lower, upper = (image_store.blobs.read(x.digest) for x in man.layers)
    up = open_layer(BytesRangeReader(upper), len(upper))
    assert up.prefetch_end > 0
    entry = up.entry("etc/motd")
    assert entry is not None and entry.offset < up.prefetch_end
    # the lower layer has no such file: converted all the same
    low = open_layer(BytesRangeReader(lower), len(lower))
    assert low.entry("etc/motd") is None


def test_index_platform_selection(
    image_store: ImageStore, state_dir: Path, busybox_multiarch: SampleImage
) -> None:
    import_image(image_store, busybox_multiarch.layout)
    target = image_store.get(busybox_multiarch.name).target
    host = str(host_platform())
    other = "linux/arm64" if host != "linux/arm64" else "linux/amd64"

    def platforms(result: ConvertResult) -> list[str]:
        idx = image_store.read_index(result.target)
        assert isinstance(idx, Index) and idx.media_type == mediatypes.OCI_INDEX
        return [str(m.platform) for m in idx.manifests]

    assert platforms(convert(image_store, target, state_dir)) == [host]
    every = convert(image_store, target, state_dir, ConvertOptions(chunk_size=CHUNK, level=6,
                                                                   all_platforms=True))
    assert sorted(platforms(every)) == sorted([host, other])
    # the layers are shared: converted once
    assert len(every.layers) == 2
    only = ConvertOptions(chunk_size=CHUNK, level=6, platforms=(parse_platform(other),))
    assert platforms(convert(image_store, target, state_dir, only)) == [other]
    none = ConvertOptions(platforms=(parse_platform("linux/s390x"),))
    with pytest.raises(NotFoundError, match="linux/s390x"):
        convert(image_store, target, state_dir, none)


# -- bad input ----------------------------------------------------------------------------------


def _fails(
    store: ImageStore, target: Descriptor, state: Path, exc: type[IpfsnapError], *needles: str
) -> IpfsnapError:
    before = blob_set(store)
    with pytest.raises(exc) as info:
        convert(store, target, state)
    message = str(info.value)
    assert "\n" not in message
    assert "image test" in message
    for needle in needles:
        assert needle in message
    created = info.value.created  # type: ignore[attr-defined]
    assert blob_set(store) - before == created
    return info.value


def test_corrupt_layer_tar(image_store: ImageStore, state_dir: Path) -> None:
    tars = sample_tars()
    garbage = gzip_bytes(os.urandom(3000))
    bad = make_image(image_store, "test/bad:1",
                     [gzip_layer(tars[0]), Layer(garbage, mediatypes.OCI_LAYER_GZIP, b"")],
                     diff_ids=[sha256_digest(tars[0]), sha256_digest(b"x")])
    _fails(image_store, bad, state_dir, LayerConversionError, sha256_digest(garbage))


def test_truncated_layer(image_store: ImageStore, state_dir: Path) -> None:
    tars = sample_tars()
    cut = gzip_bytes(tars[0])[:-500]
    bad = make_image(image_store, "test/cut:1", [Layer(cut, mediatypes.OCI_LAYER_GZIP, b"")],
                     diff_ids=[sha256_digest(tars[0])])
    _fails(image_store, bad, state_dir, LayerConversionError, sha256_digest(cut))


def test_layer_digest_mismatch(image_store: ImageStore, state_dir: Path) -> None:
    target = sample_image(image_store)
    layer = image_store.read_manifest(target).layers[1]
    path = image_store.blobs.path(layer.digest)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    _fails(image_store, target, state_dir, SourceBlobMismatch, layer.digest)


def test_missing_layer(image_store: ImageStore, state_dir: Path) -> None:
    target = sample_image(image_store)
    layer = image_store.read_manifest(target).layers[0]
    image_store.blobs.delete(layer.digest)
    err = _fails(image_store, target, state_dir, IncompleteImage, layer.digest)
    # nothing was converted: the check comes before any slow work
    assert err.created == set()  # type: ignore[attr-defined]


def test_unknown_layer_media_type(image_store: ImageStore, state_dir: Path) -> None:
    tars = sample_tars()
    bad = make_image(image_store, "test/odd:1",
                     [gzip_layer(tars[0], "application/vnd.example.weird")])
    _fails(image_store, bad, state_dir, UnsupportedMediaType, "application/vnd.example.weird")


def test_bad_gzip_level_is_refused(image_store: ImageStore, state_dir: Path) -> None:
    target = sample_image(image_store)
    with pytest.raises(ValueError, match="level"):
        convert(image_store, target, state_dir, ConvertOptions(level=12))
