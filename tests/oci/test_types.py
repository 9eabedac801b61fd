"""Parsers of ipfsnap.oci: digests, platforms, references, documents, canonical JSON."""

from __future__ import annotations

import json

import pytest

from ipfsnap.errors import FormatError, IntegrityError, LimitExceeded, UsageError
from ipfsnap.oci import (
    Descriptor,
    DigestMismatch,
    DocumentTooLarge,
    InvalidDigest,
    InvalidPlatform,
    InvalidReference,
    OCIFormatError,
    Platform,
    UnknownMediaType,
    best_match,
    canonical_json,
    convert_manifest_to_oci,
    host_platform,
    matches,
    mediatypes,
    parse_config,
    parse_document,
    parse_index,
    parse_manifest,
    parse_platform,
    parse_reference,
    sha256_digest,
    validate_digest,
    verify_bytes,
)

D1 = sha256_digest(b"one")
D2 = sha256_digest(b"two")


def test_digest_valid_and_invalid() -> None:
    assert validate_digest(D1) == D1
    bad = [
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "a" * 64,
        "",
        "sha256:",
    ]
    for value in bad:
        with pytest.raises(InvalidDigest, match="invalid digest"):
            validate_digest(value, "layer 1")
    with pytest.raises(InvalidDigest, match="unsupported digest algorithm 'sha512'"):
        validate_digest("sha512:" + "a" * 128)
    with pytest.raises(InvalidDigest, match="must be a string"):
        validate_digest(5)
    assert issubclass(InvalidDigest, FormatError)


def test_verify_bytes() -> None:
    verify_bytes(b"one", D1, 3)
    with pytest.raises(DigestMismatch, match="hashes to"):
        verify_bytes(b"two", D1)
    with pytest.raises(DigestMismatch, match="size 3 != expected 4"):
        verify_bytes(b"one", D1, 4)
    assert issubclass(DigestMismatch, IntegrityError)


def test_platform_parse_and_match() -> None:
    p = parse_platform("linux/arm64/v8")
    assert (p.os, p.architecture, p.variant) == ("linux", "arm64", "v8")
    assert str(parse_platform("linux/amd64")) == "linux/amd64"
    for bad in ("linux", "linux/", "a/b/c/d", "", "linux/am d64"):
        with pytest.raises(InvalidPlatform):
            parse_platform(bad)
    assert issubclass(InvalidPlatform, UsageError)
    assert matches(parse_platform("linux/arm64"), Platform("linux", "arm64", ""))
    assert matches(parse_platform("linux/arm64/v8"), Platform("linux", "arm64", ""))
    assert not matches(parse_platform("linux/arm/v7"), Platform("linux", "arm", "v6"))
    assert not matches(parse_platform("linux/amd64"), Platform("linux", "arm64"))
    assert not matches(parse_platform("linux/amd64"), Platform("windows", "amd64"))
    cands = [Platform("linux", "arm", "v6"), None, Platform("linux", "arm", "v7")]
    assert best_match(parse_platform("linux/arm/v7"), cands) == 2
    assert best_match(parse_platform("linux/arm"), cands) == 0
    assert best_match(parse_platform("linux/s390x"), cands) is None
    assert host_platform().os == "linux"
    assert host_platform().architecture in (
        "amd64",
        "arm64",
        "386",
        "arm",
        "ppc64le",
        "s390x",
        "riscv64",
    )


def test_platform_dict_round_trip() -> None:
    p = Platform("windows", "amd64", "", "10.0.1", ("win32k",))
    assert Platform.from_dict(p.to_dict()) == p
    with pytest.raises(OCIFormatError):
        Platform.from_dict({"os": "linux"})


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("python", "docker.io/library/python:latest"),
        ("python:3.9", "docker.io/library/python:3.9"),
        ("localhost:5000/x:tag", "localhost:5000/x:tag"),
        ("localhost/x", "localhost/x:latest"),
        ("127.0.0.1:5000/a/b/c", "127.0.0.1:5000/a/b/c:latest"),
        ("docker.io/library/busybox:latest", "docker.io/library/busybox:latest"),
        ("index.docker.io/user/app", "docker.io/user/app:latest"),
        ("user/app:v1.2_3", "docker.io/user/app:v1.2_3"),
        ("ghcr.io/o/r@" + D1, "ghcr.io/o/r@" + D1),
        ("ghcr.io/o/r:t@" + D1, "ghcr.io/o/r:t@" + D1),
        (
            "ipfs://bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy",
            "ipfs://bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy",
        ),
    ],
)
def test_reference_normalisation(text: str, name: str) -> None:
    ref = parse_reference(text)
    assert ref.name == name
    assert parse_reference(ref.name) == ref


def test_reference_parts() -> None:
    ref = parse_reference("localhost:5000/a/b:t")
    assert (ref.domain, ref.path, ref.tag, ref.digest) == ("localhost:5000", "a/b", "t", "")
    assert ref.repository == "localhost:5000/a/b"
    assert ref.with_tag("u").name == "localhost:5000/a/b:u"
    ipfs = parse_reference("ipfs://bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi")
    assert ipfs.is_ipfs and ipfs.cid.startswith("bafy")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Python",
        "python:",
        "a//b",
        "x@sha256:12",
        "ipfs://",
        "ipfs://bad cid",
        "http://x/y",
        " python",
        "a/b:t/c",
        "python:-bad",
        "x" * 300,
    ],
)
def test_reference_invalid(text: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(text)


def _manifest_doc() -> dict[str, object]:
    return {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_MANIFEST,
        "config": {"mediaType": mediatypes.OCI_CONFIG, "digest": D1, "size": 3},
        "layers": [
            {
                "mediaType": mediatypes.OCI_LAYER_GZIP,
                "digest": D2,
                "size": 3,
                "annotations": {"b": "2", "a": "1"},
                "urls": ["ipfs://bafy"],
                "artifactType": "x/y",
            },
        ],
        "subject": {"mediaType": mediatypes.OCI_MANIFEST, "digest": D1, "size": 3},
        "annotations": {"z": "1"},
    }


def test_manifest_parse_and_round_trip() -> None:
    data = json.dumps(_manifest_doc()).encode()
    m = parse_manifest(data, "manifest x")
    assert m.config.digest == D1
    assert m.layers[0].urls == ("ipfs://bafy",)
    assert m.layers[0].extra == {"artifactType": "x/y"}
    assert "subject" in m.extra
    out = json.loads(m.to_bytes())
    assert out == _manifest_doc()
    # deterministic, compact, Go field order, sorted annotations
    text = m.to_bytes().decode()
    assert text.startswith('{"schemaVersion":2,"mediaType":')
    assert '"annotations":{"a":"1","b":"2"}' in text
    assert m.to_bytes() == parse_manifest(m.to_bytes()).to_bytes()
    assert isinstance(parse_document(data, "x"), type(m))


def test_canonical_json_escapes_like_go() -> None:
    assert canonical_json({"a": "<&>", "é": 1}) == '{"a":"\\u003c\\u0026\\u003e","é":1}'.encode()


@pytest.mark.parametrize(
    ("mutate", "err", "msg"),
    [
        (lambda d: d.update(schemaVersion=1), OCIFormatError, "schemaVersion"),
        (lambda d: d.update(mediaType="text/plain"), UnknownMediaType, "text/plain"),
        (lambda d: d.update(layers="x"), OCIFormatError, "layers must be a list"),
        (lambda d: d["config"].update(digest="sha256:xyz"), InvalidDigest, "config"),
        (lambda d: d["config"].update(size=-1), OCIFormatError, "invalid size"),
        (lambda d: d["config"].update(size=True), OCIFormatError, "invalid size"),
        (lambda d: d["config"].pop("mediaType"), OCIFormatError, "no mediaType"),
        (lambda d: d["layers"][0].update(urls=[1]), OCIFormatError, "urls"),
        (lambda d: d["layers"][0].update(annotations={"a": 1}), OCIFormatError, "annotations"),
        (lambda d: d.update(manifests=[]), OCIFormatError, "index"),
    ],
)
def test_manifest_bad(mutate, err, msg) -> None:  # type: ignore[no-untyped-def]
    doc = _manifest_doc()
    mutate(doc)
    with pytest.raises(err, match=msg) as info:
        parse_manifest(json.dumps(doc).encode(), "manifest " + D1)
    assert "\n" not in str(info.value)
    assert D1 in str(info.value)


def test_document_limits_and_garbage() -> None:
    with pytest.raises(DocumentTooLarge, match="limit 10"):
        parse_manifest(b"{" + b" " * 20 + b"}", "m", max_size=10)
    assert issubclass(DocumentTooLarge, LimitExceeded)
    for bad in (b"", b"{", b"[]", b"\xff\xfe", b"null", b"[" * 100000):
        with pytest.raises(OCIFormatError):
            parse_manifest(bad, "m")
    with pytest.raises(OCIFormatError, match="descriptor says"):
        parse_manifest(json.dumps(_manifest_doc()).encode(), "m", mediatypes.DOCKER_MANIFEST)
    with pytest.raises(UnknownMediaType):
        parse_document(b'{"schemaVersion":2,"mediaType":"x/y"}', "d")


def test_index_parse() -> None:
    doc = {
        "schemaVersion": 2,
        "mediaType": mediatypes.DOCKER_MANIFEST_LIST,
        "manifests": [
            {
                "mediaType": mediatypes.DOCKER_MANIFEST,
                "digest": D1,
                "size": 3,
                "platform": {"architecture": "arm", "os": "linux", "variant": "v7"},
            },
        ],
    }
    idx = parse_index(json.dumps(doc).encode())
    assert idx.manifests[0].platform == Platform("linux", "arm", "v7")
    assert json.loads(idx.to_bytes()) == doc
    # an OCI layout index.json has no mediaType
    del doc["mediaType"]
    assert parse_index(json.dumps(doc).encode()).media_type == mediatypes.OCI_INDEX
    with pytest.raises(OCIFormatError, match="manifests must be a list"):
        parse_index(b'{"schemaVersion":2}')


def test_config_parse() -> None:
    doc = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/sh"],
            "Cmd": ["-c", "x"],
            "Env": ["A=1"],
            "WorkingDir": "/w",
            "User": "1:2",
            "ExposedPorts": {"80/tcp": {}},
            "Labels": {"l": "v"},
            "StopSignal": "SIGINT",
            "Unknown": 5,
        },
        "rootfs": {"type": "layers", "diff_ids": [D1]},
        "history": [{"created_by": "x"}],
        "custom": {"keep": True},
    }
    cfg = parse_config(json.dumps(doc).encode())
    assert cfg.entrypoint == ["/bin/sh"] and cfg.cmd == ["-c", "x"] and cfg.env == ["A=1"]
    assert (cfg.working_dir, cfg.user, cfg.stop_signal) == ("/w", "1:2", "SIGINT")
    assert cfg.exposed_ports == ["80/tcp"] and cfg.labels == {"l": "v"}
    assert cfg.diff_ids == [D1] and cfg.history == [{"created_by": "x"}]
    assert cfg.platform == Platform("linux", "amd64")
    assert json.loads(cfg.to_bytes()) == doc
    for mutate in (
        lambda d: d.pop("os"),
        lambda d: d.update(rootfs={"type": "x"}),
        lambda d: d["rootfs"].update(diff_ids=["nope"]),
        lambda d: d["config"].update(Cmd="sh"),
        lambda d: d["config"].update(User=0),
        lambda d: d.update(config=[]),
    ):
        bad = json.loads(json.dumps(doc))
        mutate(bad)
        with pytest.raises(FormatError):
            parse_config(json.dumps(bad).encode(), "config " + D2)


def test_docker_to_oci() -> None:
    assert mediatypes.to_oci(mediatypes.DOCKER_LAYER_GZIP) == mediatypes.OCI_LAYER_GZIP
    assert mediatypes.to_oci(mediatypes.OCI_LAYER_ZSTD) == mediatypes.OCI_LAYER_ZSTD
    with pytest.raises(UnknownMediaType):
        mediatypes.to_oci("application/octet-stream")
    assert mediatypes.layer_compression(mediatypes.DOCKER_LAYER_GZIP) == "gzip"
    assert mediatypes.layer_compression(mediatypes.OCI_LAYER) == ""
    doc = _manifest_doc()
    doc["mediaType"] = mediatypes.DOCKER_MANIFEST
    doc["config"]["mediaType"] = mediatypes.DOCKER_CONFIG  # type: ignore[index]
    doc["layers"][0]["mediaType"] = mediatypes.DOCKER_LAYER_GZIP  # type: ignore[index]
    m = convert_manifest_to_oci(parse_manifest(json.dumps(doc).encode()))
    assert m.media_type == mediatypes.OCI_MANIFEST
    assert m.config.media_type == mediatypes.OCI_CONFIG
    assert m.layers[0].media_type == mediatypes.OCI_LAYER_GZIP
    assert m.layers[0].digest == D2


def test_descriptor_round_trip() -> None:
    d = Descriptor(
        mediatypes.OCI_LAYER, D1, 3, ("ipfs://x",), {"k": "v"}, Platform("linux", "amd64")
    )
    assert Descriptor.from_dict(d.to_dict()) == d
    assert list(d.to_dict()) == ["mediaType", "digest", "size", "urls", "annotations", "platform"]
