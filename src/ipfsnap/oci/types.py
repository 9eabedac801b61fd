"""OCI image documents as dataclasses: Descriptor, Manifest, Index, ImageConfig.

Parsing is strict about what ipfsnap relies on (digests, sizes, media types, shapes) and
lenient about the rest: fields we do not model are kept in ``extra`` (descriptors, manifests,
indexes) or in ``raw`` (configs) and written back unchanged, so a round trip through these
types never drops information.

Encoding (:func:`canonical_json`): what we write must be byte-for-byte reproducible, because
pushing the same image twice must give the same digests and CIDs. We emit the fields of each
document in the order the Go structs of the reference declare them (so our output looks like
containerd's), map-valued fields (annotations, labels) with sorted keys as Go's encoder does,
unknown fields after the known ones in their original order, compact separators, non-ASCII
as UTF-8, and ``<``, ``>``, ``&`` escaped as ``\\u003c`` ... like Go's ``json.Marshal``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ipfsnap.docparse import MalformedDocument, parse_json
from ipfsnap.oci import mediatypes as mt
from ipfsnap.oci.digest import validate_digest
from ipfsnap.oci.errors import DocumentTooLarge, OCIFormatError, UnknownMediaType
from ipfsnap.oci.platform import Platform

#: largest index/manifest/config we parse. Real manifests are a few KiB and configs of big
#: images with long histories a few hundred KiB; containerd caps manifests at 4 MiB too.
MAX_DOCUMENT_SIZE = 4 << 20

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"


def canonical_json(obj: Any) -> bytes:
    """Deterministic compact JSON (see the module docstring)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    # these characters occur only inside JSON strings, so replacing them is safe
    text = (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )
    return text.encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard number {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400
        raise ValueError(f"number {text[:40]} out of range")
    return value


def load_json(data: bytes, what: str, max_size: int = MAX_DOCUMENT_SIZE) -> dict[str, Any]:
    """Parse a JSON object of at most ``max_size`` bytes; errors name ``what``."""
    if len(data) > max_size:
        raise DocumentTooLarge(f"{what}: document is {len(data)} bytes, limit {max_size}")
    try:
        # NaN/Infinity (also as 1e400) are not JSON (RFC 8259; Go refuses them, and
        # canonical_json cannot write them back)
        obj = parse_json(data, parse_constant=_reject_constant, parse_float=_finite_float)
    except MalformedDocument as exc:
        raise OCIFormatError(f"{what}: not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise OCIFormatError(f"{what}: JSON document must be an object")
    return obj


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise OCIFormatError(f"{what}: must be an object of strings")
    return dict(value)


def _sorted(m: Mapping[str, str]) -> dict[str, str]:
    return {k: m[k] for k in sorted(m)}


_DESCRIPTOR_KEYS = ("mediaType", "digest", "size", "urls", "annotations", "platform")


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a blob is, its digest and size, and where to find it."""

    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    #: fields we do not model (artifactType, data ...), kept for round trips
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = _sorted(self.annotations)
        for key, value in self.extra.items():
            out[key] = value
        if self.platform is not None:
            out["platform"] = self.platform.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any, what: str = "descriptor") -> Descriptor:
        if not isinstance(data, dict):
            raise OCIFormatError(f"{what}: descriptor must be an object")
        media_type = data.get("mediaType")
        if not isinstance(media_type, str) or not media_type:
            raise OCIFormatError(f"{what}: descriptor has no mediaType")
        digest = validate_digest(data.get("digest"), what)
        size = data.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OCIFormatError(f"{what}: descriptor {digest} has invalid size {size!r}")
        urls = data.get("urls") or []
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise OCIFormatError(f"{what}: descriptor {digest} urls must be strings")
        annotations = _str_map(data.get("annotations"), f"{what} {digest} annotations")
        plat = data.get("platform")
        platform = None if plat is None else Platform.from_dict(plat, f"{what} {digest}")
        extra = {k: v for k, v in data.items() if k not in _DESCRIPTOR_KEYS}
        return cls(media_type, digest, size, tuple(urls), annotations, platform, extra)

    def with_urls(self, urls: tuple[str, ...]) -> Descriptor:
        return replace(self, urls=tuple(urls))

    def with_annotations(self, annotations: Mapping[str, str]) -> Descriptor:
        return replace(self, annotations=dict(annotations))


def _schema_version(data: dict[str, Any], what: str) -> int:
    version = data.get("schemaVersion")
    if version != 2:
        raise OCIFormatError(f"{what}: unsupported schemaVersion {version!r} (want 2)")
    return 2


@dataclass(frozen=True)
class Manifest:
    """An image manifest (OCI or Docker schema 2)."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = 2

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schemaVersion": self.schema_version}
        if self.media_type:
            out["mediaType"] = self.media_type
        if "artifactType" in self.extra:
            out["artifactType"] = self.extra["artifactType"]
        out["config"] = self.config.to_dict()
        out["layers"] = [layer.to_dict() for layer in self.layers]
        for key, value in self.extra.items():
            if key != "artifactType":
                out[key] = value
        if self.annotations:
            out["annotations"] = _sorted(self.annotations)
        return out

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())


@dataclass(frozen=True)
class Index:
    """An image index (OCI) or manifest list (Docker)."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = 2

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schemaVersion": self.schema_version}
        if self.media_type:
            out["mediaType"] = self.media_type
        out["manifests"] = [m.to_dict() for m in self.manifests]
        for key, value in self.extra.items():
            out[key] = value
        if self.annotations:
            out["annotations"] = _sorted(self.annotations)
        return out

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())


def _check_media_type(
    data: dict[str, Any], expected: str | None, allowed: frozenset[str], what: str
) -> str:
    media_type = data.get("mediaType", "")
    if not isinstance(media_type, str):
        raise OCIFormatError(f"{what}: mediaType must be a string")
    if media_type and media_type not in allowed:
        raise UnknownMediaType(f"{what}: unexpected mediaType {media_type!r}")
    if expected and media_type and expected != media_type:
        raise OCIFormatError(
            f"{what}: descriptor says {expected!r} but document says {media_type!r}"
        )
    return media_type or (expected or "")


def parse_manifest(
    data: bytes,
    what: str = "manifest",
    media_type: str | None = None,
    max_size: int = MAX_DOCUMENT_SIZE,
) -> Manifest:
    """Parse a manifest; ``media_type`` is the one its descriptor claims, if known."""
    obj = load_json(data, what, max_size)
    _schema_version(obj, what)
    mtype = _check_media_type(obj, media_type, mt.MANIFEST_TYPES, what)
    if "manifests" in obj:
        raise OCIFormatError(f"{what}: is an index, not a manifest")
    config = Descriptor.from_dict(obj.get("config"), f"{what} config")
    layers_raw = obj.get("layers")
    if not isinstance(layers_raw, list):
        raise OCIFormatError(f"{what}: layers must be a list")
    layers = tuple(
        Descriptor.from_dict(item, f"{what} layer {i}") for i, item in enumerate(layers_raw)
    )
    annotations = _str_map(obj.get("annotations"), f"{what} annotations")
    known = ("schemaVersion", "mediaType", "config", "layers", "annotations")
    extra = {k: v for k, v in obj.items() if k not in known}
    return Manifest(mtype or mt.OCI_MANIFEST, config, layers, annotations, extra)


def parse_index(
    data: bytes,
    what: str = "index",
    media_type: str | None = None,
    max_size: int = MAX_DOCUMENT_SIZE,
) -> Index:
    """Parse an image index / manifest list (also an OCI layout's ``index.json``)."""
    obj = load_json(data, what, max_size)
    _schema_version(obj, what)
    mtype = _check_media_type(obj, media_type, mt.INDEX_TYPES, what)
    items = obj.get("manifests")
    if not isinstance(items, list):
        raise OCIFormatError(f"{what}: manifests must be a list")
    manifests = tuple(
        Descriptor.from_dict(item, f"{what} entry {i}") for i, item in enumerate(items)
    )
    annotations = _str_map(obj.get("annotations"), f"{what} annotations")
    known = ("schemaVersion", "mediaType", "manifests", "annotations")
    extra = {k: v for k, v in obj.items() if k not in known}
    return Index(mtype or mt.OCI_INDEX, manifests, annotations, extra)


def parse_document(
    data: bytes, what: str, media_type: str | None = None, max_size: int = MAX_DOCUMENT_SIZE
) -> Manifest | Index:
    """Parse a manifest or an index, deciding by media type (or shape when absent)."""
    if media_type in mt.INDEX_TYPES:
        return parse_index(data, what, media_type, max_size)
    if media_type in mt.MANIFEST_TYPES:
        return parse_manifest(data, what, media_type, max_size)
    if media_type:
        raise UnknownMediaType(f"{what}: unknown media type {media_type!r}")
    obj = load_json(data, what, max_size)
    declared = obj.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise OCIFormatError(f"{what}: mediaType must be a string")
    if declared in mt.INDEX_TYPES or (declared is None and "manifests" in obj):
        return parse_index(data, what, None, max_size)
    if declared in mt.MANIFEST_TYPES or (declared is None and "layers" in obj):
        return parse_manifest(data, what, None, max_size)
    raise UnknownMediaType(f"{what}: unknown document media type {declared!r}")


@dataclass(frozen=True)
class ImageConfig:
    """An image config. ``raw`` is the whole document; the properties are views on it."""

    raw: Mapping[str, Any]

    def _container(self) -> Mapping[str, Any]:
        cfg = self.raw.get("config")
        return cfg if isinstance(cfg, dict) else {}

    def _str_list(self, key: str) -> list[str] | None:
        value = self._container().get(key)
        return list(value) if isinstance(value, list) else None

    @property
    def entrypoint(self) -> list[str] | None:
        return self._str_list("Entrypoint")

    @property
    def cmd(self) -> list[str] | None:
        return self._str_list("Cmd")

    @property
    def env(self) -> list[str]:
        return self._str_list("Env") or []

    @property
    def working_dir(self) -> str:
        value = self._container().get("WorkingDir")
        return value if isinstance(value, str) else ""

    @property
    def user(self) -> str:
        value = self._container().get("User")
        return value if isinstance(value, str) else ""

    @property
    def exposed_ports(self) -> list[str]:
        value = self._container().get("ExposedPorts")
        return sorted(value) if isinstance(value, dict) else []

    @property
    def labels(self) -> dict[str, str]:
        value = self._container().get("Labels")
        return dict(value) if isinstance(value, dict) else {}

    @property
    def stop_signal(self) -> str:
        value = self._container().get("StopSignal")
        return value if isinstance(value, str) else ""

    @property
    def diff_ids(self) -> list[str]:
        rootfs = self.raw.get("rootfs")
        ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        return list(ids) if isinstance(ids, list) else []

    @property
    def history(self) -> list[Mapping[str, Any]]:
        value = self.raw.get("history")
        return [h for h in value if isinstance(h, dict)] if isinstance(value, list) else []

    @property
    def platform(self) -> Platform:
        return Platform(
            str(self.raw.get("os", "")),
            str(self.raw.get("architecture", "")),
            str(self.raw.get("variant", "") or ""),
        )

    def to_bytes(self) -> bytes:
        """Canonical encoding of ``raw`` (keys in their original order)."""
        return canonical_json(dict(self.raw))


def parse_config(
    data: bytes, what: str = "config", max_size: int = MAX_DOCUMENT_SIZE
) -> ImageConfig:
    obj = load_json(data, what, max_size)
    for key in ("architecture", "os"):
        if not isinstance(obj.get(key), str):
            raise OCIFormatError(f"{what}: missing or non-string {key!r}")
    rootfs = obj.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise OCIFormatError(f"{what}: rootfs must be an object with type 'layers'")
    ids = rootfs.get("diff_ids")
    if not isinstance(ids, list):
        raise OCIFormatError(f"{what}: rootfs.diff_ids must be a list")
    for i, d in enumerate(ids):
        validate_digest(d, f"{what} diff_ids[{i}]")
    container = obj.get("config")
    if container is not None and not isinstance(container, dict):
        raise OCIFormatError(f"{what}: config must be an object")
    if isinstance(container, dict):
        for key in ("Entrypoint", "Cmd", "Env"):
            v = container.get(key)
            if v is not None and (
                not isinstance(v, list) or not all(isinstance(s, str) for s in v)
            ):
                raise OCIFormatError(f"{what}: config.{key} must be a list of strings")
        for key in ("WorkingDir", "User", "StopSignal"):
            v = container.get(key)
            if v is not None and not isinstance(v, str):
                raise OCIFormatError(f"{what}: config.{key} must be a string")
        labels = container.get("Labels")
        if labels is not None:
            _str_map(labels, f"{what} config.Labels")
    return ImageConfig(obj)


def convert_manifest_to_oci(manifest: Manifest) -> Manifest:
    """Docker schema 2 manifest -> OCI manifest (media types only; digests of blobs stay)."""
    config = replace(manifest.config, media_type=mt.to_oci(manifest.config.media_type))
    layers = tuple(
        replace(layer, media_type=mt.to_oci(layer.media_type)) for layer in manifest.layers
    )
    return replace(manifest, media_type=mt.OCI_MANIFEST, config=config, layers=layers)


def convert_index_to_oci(index: Index, manifests: tuple[Descriptor, ...]) -> Index:
    """Docker manifest list -> OCI index whose entries are ``manifests`` (already converted)."""
    return replace(index, media_type=mt.OCI_INDEX, manifests=manifests)


def iter_children(doc: Manifest | Index) -> Iterator[Descriptor]:
    """Direct children of a document: index entries, or config then layers."""
    if isinstance(doc, Index):
        yield from doc.manifests
    else:
        yield doc.config
        yield from doc.layers
