"""Import of OCI layouts, oci-archives and docker-archives; export; bad input leaves the
store and the names unchanged."""

from __future__ import annotations

import gzip
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ipfsnap.content import (
    AmbiguousImport,
    ArchiveError,
    ImageStore,
    IncompleteImage,
    export_image,
    import_image,
)
from ipfsnap.content.sample import SampleImage, tar_directory
from ipfsnap.errors import FormatError, IntegrityError, IpfsnapError
from ipfsnap.oci import (
    DigestMismatch,
    UnknownMediaType,
    digest_hex,
    mediatypes,
    sha256_digest,
)


def _snapshot(store: ImageStore) -> tuple[list[Any], set[str]]:
    return store.list(), set(store.blobs.list())


def _verify_all(store: ImageStore, name: str) -> None:
    rec = store.get(name)
    for desc in store.walk(rec.target):
        with store.blobs.open(desc.digest) as f:
            data = f.read()
        assert sha256_digest(data) == desc.digest and len(data) == desc.size


def test_import_oci_layout_and_archive(tmp_path: Path, busybox_image: SampleImage) -> None:
    for source in (busybox_image.layout, busybox_image.oci_archive):
        assert source is not None
        store = ImageStore(tmp_path / source.name)
        records = import_image(store, source)
        assert [r.name for r in records] == [busybox_image.name]
        assert records[0].target == busybox_image.target
        _verify_all(store, busybox_image.name)
        res = store.resolve(busybox_image.name)
        for digest, tar in zip(res.manifest.layers, busybox_image.layer_tars, strict=True):
            with store.blobs.open(digest.digest) as f:
                assert gzip.decompress(f.read()) == tar


def test_import_docker_archive(tmp_path: Path, busybox_image: SampleImage) -> None:
    assert busybox_image.docker_archive is not None
    store = ImageStore(tmp_path / "s")
    (record,) = import_image(store, busybox_image.docker_archive)
    assert record.name == busybox_image.name  # from RepoTags
    res = store.resolve(record.name)
    # converted to OCI: manifest/config media types, plain tar layers equal to the diff_ids
    assert res.manifest_descriptor.media_type == mediatypes.OCI_MANIFEST
    assert res.manifest.config.media_type == mediatypes.OCI_CONFIG
    assert res.manifest.config.digest == busybox_image.config_digest  # config bytes kept
    assert [d.media_type for d in res.layers] == [mediatypes.OCI_LAYER] * 2
    assert [d.digest for d in res.layers] == busybox_image.diff_ids
    _verify_all(store, record.name)
    # a gzipped `docker save` stream imports too, and --name renames
    gz = tmp_path / "image.docker.tar.gz"
    gz.write_bytes(gzip.compress(busybox_image.docker_archive.read_bytes(), mtime=0))
    (renamed,) = import_image(store, gz, "localhost:5000/renamed:2")
    assert renamed.name == "localhost:5000/renamed:2"
    assert renamed.target == record.target


def test_export_import_round_trip(
    tmp_path: Path, busybox_image: SampleImage, busybox_multiarch: SampleImage
) -> None:
    for image in (busybox_image, busybox_multiarch):
        store = ImageStore(tmp_path / "a")
        import_image(store, image.layout)
        out1, out2 = tmp_path / "one.tar", tmp_path / "two.tar"
        export_image(store, image.name, out1)
        export_image(store, image.name, out2)
        assert out1.read_bytes() == out2.read_bytes()  # reproducible
        other = ImageStore(tmp_path / f"b-{image.target.digest[7:15]}")
        (rec,) = import_image(other, out1)
        assert rec.name == image.name and rec.target == image.target
        assert set(other.blobs.list()) == {d.digest for d in store.walk(rec.target)}
        assert not list(tmp_path.glob(".*.tmp"))


def test_export_refuses_incomplete(tmp_path: Path, busybox_image: SampleImage) -> None:
    store = ImageStore(tmp_path / "s")
    import_image(store, busybox_image.layout)
    store.put("lazy", busybox_image.target, remote_layers=True)
    store.remove(busybox_image.name)
    store.blobs.delete(busybox_image.layer_digests[0])
    out = tmp_path / "out.tar"
    with pytest.raises(IncompleteImage, match=busybox_image.layer_digests[0]):
        export_image(store, "lazy", out)
    assert not out.exists() and not list(tmp_path.glob(".out.tar*"))


def test_import_multiarch_keeps_index(tmp_path: Path, busybox_multiarch: SampleImage) -> None:
    store = ImageStore(tmp_path / "s")
    (rec,) = import_image(store, busybox_multiarch.oci_archive or busybox_multiarch.layout)
    assert rec.target == busybox_multiarch.target
    for desc in busybox_multiarch.manifests.values():
        assert store.blobs.exists(desc.digest)


def test_import_unnamed_entries_with_name(tmp_path: Path, busybox_multiarch: SampleImage) -> None:
    """An OCI layout with several unnamed manifests + --name: wrapped in a new index."""
    layout = tmp_path / "layout"
    shutil.copytree(busybox_multiarch.layout, layout)
    entries = list(busybox_multiarch.manifests.values())
    (layout / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "manifests": [e.to_dict() for e in entries]})
    )
    store = ImageStore(tmp_path / "s")
    with pytest.raises(AmbiguousImport, match="no name"):
        import_image(store, layout)
    (rec,) = import_image(store, layout, "multi:1")
    assert rec.target.media_type == mediatypes.OCI_INDEX
    index = store.read_document(rec.target)
    assert [m.digest for m in index.manifests] == [e.digest for e in entries]  # type: ignore[union-attr]


# -- bad input ---------------------------------------------------------------------------


def _copy_layout(image: SampleImage, dest: Path) -> Path:
    shutil.copytree(image.layout, dest)
    return dest


def _rewrite_manifest(
    layout: Path, image: SampleImage, edit: Callable[[dict[str, Any]], None]
) -> None:
    blobs = layout / "blobs" / "sha256"
    doc = json.loads((blobs / digest_hex(image.target.digest)).read_bytes())
    edit(doc)
    data = json.dumps(doc).encode()
    digest = sha256_digest(data)
    (blobs / digest_hex(digest)).write_bytes(data)
    index = json.loads((layout / "index.json").read_bytes())
    index["manifests"][0].update(digest=digest, size=len(data))
    (layout / "index.json").write_text(json.dumps(index))


def _bad_cases(image: SampleImage, tmp: Path) -> list[tuple[str, Path, type[Exception], str]]:
    cases: list[tuple[str, Path, type[Exception], str]] = []
    layer2 = image.layer_digests[1]

    d = _copy_layout(image, tmp / "missing")
    (d / "blobs/sha256" / digest_hex(layer2)).unlink()
    cases.append(("missing layer", d, ArchiveError, f"layer blob {layer2} is missing"))

    d = _copy_layout(image, tmp / "corrupt")
    p = d / "blobs/sha256" / digest_hex(layer2)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    cases.append(("corrupt layer", d, DigestMismatch, f"layer {layer2}: content hashes to"))

    d = _copy_layout(image, tmp / "short")
    p = d / "blobs/sha256" / digest_hex(layer2)
    p.write_bytes(p.read_bytes()[:-10])
    cases.append(("short layer", d, DigestMismatch, "truncated"))

    d = _copy_layout(image, tmp / "mediatype")
    _rewrite_manifest(d, image, lambda m: m["layers"][1].update(mediaType="application/x-foo"))
    cases.append(("unknown media type", d, UnknownMediaType, "application/x-foo"))

    d = _copy_layout(image, tmp / "badjson")
    (d / "index.json").write_text("{")
    cases.append(("bad index.json", d, FormatError, "index.json: not valid JSON"))

    d = _copy_layout(image, tmp / "nolayout")
    (d / "oci-layout").unlink()
    cases.append(("no oci-layout", d, ArchiveError, "neither an OCI layout"))

    d = _copy_layout(image, tmp / "badconfig")
    _rewrite_manifest(d, image, lambda m: m["config"].update(size=m["config"]["size"] + 1))
    cases.append(("config size", d, DigestMismatch, image.config_digest))

    d = tmp / "empty"
    d.mkdir()
    cases.append(("empty dir", d, ArchiveError, "neither"))

    garbage = tmp / "garbage.tar"
    garbage.write_bytes(b"this is not a tar archive at all" * 100)
    cases.append(("garbage", garbage, ArchiveError, "not a readable tar"))

    assert image.oci_archive is not None
    whole = image.oci_archive.read_bytes()
    # cut inside the big layer blob: the member list may be readable, the data is short
    with tarfile.open(image.oci_archive) as tar:
        big = max(tar.getmembers(), key=lambda m: m.size)
        cut_at = big.offset_data + big.size // 2
    cut = tmp / "cut.tar"
    cut.write_bytes(whole[:cut_at])
    cases.append(("truncated archive", cut, IpfsnapError, "cut.tar"))

    assert image.docker_archive is not None
    dd = tmp / "docker"
    dd.mkdir()
    with tarfile.open(image.docker_archive) as tar:
        tar.extractall(dd, filter="data")
    manifest = json.loads((dd / "manifest.json").read_bytes())
    layer_path = dd / manifest[0]["Layers"][1]
    raw = bytearray(layer_path.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    layer_path.write_bytes(bytes(raw))
    bad_docker = tmp / "bad-docker.tar"
    tar_directory(dd, bad_docker)
    cases.append(("docker diff_id", bad_docker, DigestMismatch, "diff_id"))

    nd = tmp / "notags"
    shutil.copytree(dd, nd)
    manifest[0]["RepoTags"] = None
    (nd / "manifest.json").write_text(json.dumps(manifest))
    layer = nd / manifest[0]["Layers"][1]
    layer.write_bytes(image.layer_tars[1])
    notags = tmp / "notags.tar"
    tar_directory(nd, notags)
    cases.append(("docker no tags", notags, AmbiguousImport, "--name"))
    return cases


def test_bad_input_leaves_store_unchanged(tmp_path: Path, busybox_image: SampleImage) -> None:
    store = ImageStore(tmp_path / "state")
    # an existing image sharing blobs with the bad ones: those must survive a failed import
    import_image(store, busybox_image.layout)
    store.put("other:1", busybox_image.target)
    before = _snapshot(store)
    for label, source, err, message in _bad_cases(busybox_image, tmp_path / "cases"):
        with pytest.raises(err) as info:
            import_image(store, source, "victim:1" if label != "docker no tags" else None)
        text = str(info.value)
        assert message in text, (label, text)
        assert "\n" not in text, label
        assert _snapshot(store) == before, label
    # and on an empty store nothing is left behind either
    empty = ImageStore(tmp_path / "empty-state")
    for label, source, err, _ in _bad_cases(busybox_image, tmp_path / "cases2"):
        with pytest.raises(err):
            import_image(empty, source, "victim:1" if label != "docker no tags" else None)
        assert empty.list() == [] and list(empty.blobs.list()) == [], label
    assert issubclass(DigestMismatch, IntegrityError)


def test_docker_archive_compressed_layers(tmp_path: Path, busybox_image: SampleImage) -> None:
    """Layer files may be gzip or zstd compressed; their diff_ids are still checked."""
    import zstandard

    from ipfsnap.content.sample import write_docker_archive

    config = (busybox_image.blobs / digest_hex(busybox_image.config_digest)).read_bytes()
    tars = busybox_image.layer_tars
    good = tmp_path / "good.tar"
    write_docker_archive(good, "z:1", config, [gzip.compress(tars[0]), zstandard.compress(tars[1])])
    store = ImageStore(tmp_path / "s")
    (rec,) = import_image(store, good)
    assert [d.media_type for d in store.resolve(rec.name).layers] == [
        mediatypes.OCI_LAYER_GZIP,
        mediatypes.OCI_LAYER_ZSTD,
    ]
    before = _snapshot(store)
    for bad_layers in (
        [gzip.compress(tars[0] + b"x"), zstandard.compress(tars[1])],
        [gzip.compress(tars[0]), zstandard.compress(tars[1] + b"x")],
    ):
        bad = tmp_path / "bad.tar"
        write_docker_archive(bad, "z:2", config, bad_layers)
        with pytest.raises(DigestMismatch, match="config says"):
            import_image(store, bad)
        assert _snapshot(store) == before
