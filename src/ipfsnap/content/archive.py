"""Import (OCI layout dir, oci-archive, docker-archive) and export (oci-archive).

Imports copy every blob into the store through :meth:`BlobStore.ingest` (sha256 and size
verified while streaming), then set all names in one atomic update. If anything fails, blobs
this import added that no name reaches are removed again, so the store and the names are as
they were.

docker-archive (``docker save``) images are converted on import: an OCI manifest is built with
OCI media types (``...layer.v1.tar`` for the plain tars ``docker save`` writes, ``+gzip`` /
``+zstd`` when a layer file is compressed) and an OCI config media type; the config bytes are
kept unchanged, so the image ID (config digest) stays what Docker shows. Each layer is checked
against the config's ``rootfs.diff_ids``.

Names, in order: ``--name`` (one image, or several unnamed index entries wrapped into a new
index); else each entry's ``io.containerd.image.name`` annotation, or its
``org.opencontainers.image.ref.name`` when that is a full reference (a bare tag needs
``--name``); for docker-archive, ``RepoTags``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import logging
import lzma
import os
import posixpath
import tarfile
import zlib
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal, Protocol, cast

import zstandard

from ipfsnap.content.errors import AmbiguousImport, ArchiveError, IncompleteImage
from ipfsnap.content.store import MAX_DEPTH, ImageRecord, ImageStore
from ipfsnap.docparse import MalformedDocument, parse_json
from ipfsnap.errors import IpfsnapError
from ipfsnap.oci import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    Descriptor,
    DigestMismatch,
    Index,
    InvalidReference,
    Manifest,
    UnknownMediaType,
    canonical_json,
    digest_hex,
    is_digest,
    load_json,
    mediatypes,
    parse_config,
    parse_index,
    parse_reference,
    sha256_digest,
)
from ipfsnap.oci.tarheaders import BoundedTarInfo
from ipfsnap.progress import Progress

log = logging.getLogger(__name__)

#: annotation buildkit puts on attestation manifests inside an index; their blobs are copied
#: as they are, without media-type checks
ATTESTATION_ANNOTATION = "vnd.docker.reference.type"
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError,
                   lzma.LZMAError, MemoryError)
#: an archive's compression by its magic bytes (as docker load detects it); anything else is
#: read as a plain tar. tarfile's "r:*" also took LZMA-alone data, whose 13-byte header may
#: claim a 4 GiB dictionary (MemoryError under an address-space limit: found by fuzzing)
_ARCHIVE_MAGIC: tuple[tuple[bytes, Literal["r:gz", "r:bz2", "r:xz"]], ...] = (
    (b"\x1f\x8b", "r:gz"), (b"BZh", "r:bz2"), (b"\xfd7zXZ\x00", "r:xz"))
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class _Source(Protocol):
    label: str

    def has(self, path: str) -> bool: ...

    def open(self, path: str) -> BinaryIO: ...

    def close(self) -> None: ...


def _clean(path: str, label: str) -> str:
    norm = posixpath.normpath(path.lstrip("/")) if path else ""
    if not norm or norm.startswith("..") or norm == ".":
        raise ArchiveError(f"{label}: unsafe or empty path {path!r}")
    return norm


class _DirSource:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.label = f"OCI layout {root}"

    def has(self, path: str) -> bool:
        return (self.root / _clean(path, self.label)).is_file()

    def open(self, path: str) -> BinaryIO:
        try:
            return open(self.root / _clean(path, self.label), "rb")
        except OSError as exc:
            raise ArchiveError(f"{self.label}: cannot read {path}: {exc.strerror}") from None

    def close(self) -> None:
        return None


class _TarSource:
    def __init__(self, path: Path) -> None:
        self.label = f"archive {path}"
        try:
            with open(path, "rb") as f:
                head = f.read(6)
            mode: Literal["r:", "r:gz", "r:bz2", "r:xz"] = next(
                (m for magic, m in _ARCHIVE_MAGIC if head.startswith(magic)), "r:")
            # bounded headers: an archive is as hostile as a layer (BoundedTarInfo)
            self.tar = tarfile.open(  # noqa: SIM115 - closed by close()
                path, mode, tarinfo=BoundedTarInfo
            )
            members = self.tar.getmembers()
        except _ARCHIVE_ERRORS as exc:
            reason = str(exc).strip().splitlines()
            if len(reason) != 1:  # tarfile lists every compression it tried
                reason = ["not plain, gzip, bzip2 or xz tar data"]
            raise ArchiveError(f"{self.label}: not a readable tar archive: {reason[0]}") from None
        self.members: dict[str, tarfile.TarInfo] = {}
        for m in members:
            if m.isfile() or m.issym() or m.islnk():
                name = posixpath.normpath(m.name.lstrip("/"))
                if not name.startswith(".."):
                    self.members[name] = m

    def has(self, path: str) -> bool:
        return _clean(path, self.label) in self.members

    def open(self, path: str) -> BinaryIO:
        member = self.members.get(_clean(path, self.label))
        if member is None:
            raise ArchiveError(f"{self.label}: {path} is missing")
        try:
            f = self.tar.extractfile(member)
        except _ARCHIVE_ERRORS as exc:
            raise ArchiveError(f"{self.label}: cannot read {path}: {_line(exc)}") from None
        if f is None:
            raise ArchiveError(f"{self.label}: {path} is not a regular file")
        return cast(BinaryIO, io.BufferedReader(_GuardedReader(f, self.label, path)))

    def close(self) -> None:
        self.tar.close()


class _GuardedReader(io.RawIOBase):
    """Turns tar/zlib read errors of a member into one-line :class:`ArchiveError`."""

    def __init__(self, f: IO[bytes], label: str, path: str) -> None:
        self._f, self._label, self._path = f, label, path

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        try:
            return self._f.read(n)
        except _ARCHIVE_ERRORS as exc:
            raise ArchiveError(
                f"{self._label}: {self._path} is truncated or corrupt: {_line(exc)}"
            ) from None

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _open_source(path: Path) -> _Source:
    if path.is_dir():
        return _DirSource(path)
    if not path.exists():
        raise ArchiveError(f"archive {path}: no such file or directory")
    return _TarSource(path)


def _read_small(src: _Source, path: str, limit: int = 4 << 20) -> bytes:
    with src.open(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ArchiveError(f"{src.label}: {path} is larger than {limit} bytes")
    return data


def _blob_path(digest: str) -> str:
    return f"blobs/sha256/{digest_hex(digest)}"


class _Importer:
    def __init__(self, store: ImageStore, src: _Source, progress: Progress | None) -> None:
        self.store = store
        self.src = src
        self.progress = progress
        self.created: set[str] = set()

    def ingest(self, desc: Descriptor, what: str) -> None:
        path = _blob_path(desc.digest)
        if not self.src.has(path):
            raise ArchiveError(f"{self.src.label}: {what} blob {desc.digest} is missing")
        if self.store.blobs.exists(desc.digest):
            # already stored (and verified then); still check the archive's copy, so a broken
            # archive fails the same way whatever the store holds
            h = hashlib.sha256()
            n = 0
            with self.src.open(path) as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                    n += len(block)
            verify_digest = "sha256:" + h.hexdigest()
            if n != desc.size:
                raise DigestMismatch(
                    f"{what} {desc.digest}: got {n} bytes, expected {desc.size} (truncated?)"
                )
            if verify_digest != desc.digest:
                raise DigestMismatch(f"{what} {desc.digest}: content hashes to {verify_digest}")
            return
        with self.src.open(path) as f:
            if self.store.blobs.ingest(
                f, desc.digest, desc.size, what=what, progress=self.progress
            ):
                self.created.add(desc.digest)
        if self.progress is not None:
            self.progress.finish(desc.digest[7:19], f"{what} stored")

    def tree(self, desc: Descriptor, what: str, depth: int = 0, opaque: bool = False) -> None:
        if depth > MAX_DEPTH:
            raise ArchiveError(f"{self.src.label}: indexes nested deeper than {MAX_DEPTH}")
        mtype = desc.media_type
        if mediatypes.is_index(mtype):
            self.ingest(desc, "index")
            doc = self.store.read_document(desc)
            assert isinstance(doc, Index)
            present = [
                m
                for m in doc.manifests
                if self.store.blobs.exists(m.digest) or self.src.has(_blob_path(m.digest))
            ]
            if not present:
                raise ArchiveError(
                    f"{self.src.label}: no manifest of index {desc.digest} is in the archive"
                )
            for m in present:
                self.tree(
                    m, "manifest", depth + 1, opaque or ATTESTATION_ANNOTATION in m.annotations
                )
        elif mediatypes.is_manifest(mtype):
            self.ingest(desc, "manifest")
            doc = self.store.read_document(desc)
            assert isinstance(doc, Manifest)
            if not opaque:
                if not mediatypes.is_config(doc.config.media_type):
                    raise UnknownMediaType(
                        f"manifest {desc.digest}: unknown config media type"
                        f" {doc.config.media_type!r}"
                    )
                for layer in doc.layers:
                    if not mediatypes.is_layer(layer.media_type):
                        raise UnknownMediaType(
                            f"manifest {desc.digest}: layer {layer.digest}"
                            f" has unknown media type {layer.media_type!r}"
                        )
            self.ingest(doc.config, "config")
            if not opaque:
                self.store.read_config(doc.config)
            for layer in doc.layers:
                self.ingest(layer, "layer")
        elif opaque:
            self.ingest(desc, what)
        else:
            raise UnknownMediaType(f"{what} {desc.digest}: unknown media type {mtype!r}")


def _strip_names(desc: Descriptor) -> Descriptor:
    ann = {
        k: v
        for k, v in desc.annotations.items()
        if k not in (ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME)
    }
    return desc.with_annotations(ann)


def _entry_name(desc: Descriptor) -> str | None:
    full = desc.annotations.get(ANNOTATION_CONTAINERD_NAME)
    if full:
        return parse_reference(full).name
    ref = desc.annotations.get(ANNOTATION_REF_NAME, "")
    if ref and ("/" in ref or ":" in ref):
        try:
            return parse_reference(ref).name
        except InvalidReference:
            return None
    return None


def _plan_oci(src: _Source, name: str | None) -> tuple[list[tuple[str, Descriptor | None]], Index]:
    """(name, target) pairs; target None = wrap all (unnamed) entries in a new index."""
    if not src.has("oci-layout"):
        raise ArchiveError(f"{src.label}: no oci-layout file (not an OCI image layout)")
    layout = load_json(_read_small(src, "oci-layout"), f"{src.label} oci-layout")
    version = layout.get("imageLayoutVersion")
    if not isinstance(version, str) or not version.startswith("1."):
        raise ArchiveError(f"{src.label}: unsupported imageLayoutVersion {version!r}")
    if not src.has("index.json"):
        raise ArchiveError(f"{src.label}: index.json is missing")
    index = parse_index(_read_small(src, "index.json"), f"{src.label} index.json")
    entries = list(index.manifests)
    if not entries:
        raise ArchiveError(f"{src.label}: index.json lists no images")
    if name is not None:
        if len(entries) == 1:
            return [(name, _strip_names(entries[0]))], index
        if all(_entry_name(e) is None for e in entries):
            return [(name, None)], index
        raise AmbiguousImport(
            f"{src.label}: contains {len(entries)} named images; import without --name"
        )
    plan: list[tuple[str, Descriptor | None]] = []
    for e in entries:
        n = _entry_name(e)
        if n is None:
            raise AmbiguousImport(f"{src.label}: image {e.digest} has no name; use --name REF")
        plan.append((n, _strip_names(e)))
    return plan, index


def _compression(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return ""


def _docker_layer(imp: _Importer, path: str, diff_id: str, what: str) -> Descriptor:
    src = imp.src
    with src.open(path) as f:
        head = f.read(4)
    comp = _compression(head)

    # plain tars are named by their diff_id; only a blob new to the store may be undone
    existed = comp == "" and imp.store.blobs.exists(diff_id)
    with src.open(path) as f:
        digest, size = imp.store.blobs.ingest_unknown(f, what=what)
    if not existed:
        imp.created.add(digest)
    # a path like blobs/sha256/<hex> names the blob's digest: it must match
    base = posixpath.basename(path)
    if path.startswith("blobs/sha256/") and "sha256:" + base != digest:
        raise DigestMismatch(f"{src.label}: {path} hashes to {digest}")
    if comp == "":
        got_diff = digest
    else:
        h = hashlib.sha256()
        try:
            with imp.store.blobs.open(digest) as raw:
                stream: Any = (
                    gzip.GzipFile(fileobj=raw)
                    if comp == "gzip"
                    else zstandard.ZstdDecompressor().stream_reader(raw)
                )
                with stream:
                    for block in iter(lambda: stream.read(1 << 20), b""):
                        h.update(block)
        except (*_ARCHIVE_ERRORS, zstandard.ZstdError) as exc:
            raise ArchiveError(f"{src.label}: {path} is corrupt {comp}: {_line(exc)}") from None
        got_diff = "sha256:" + h.hexdigest()
    if got_diff != diff_id:
        raise DigestMismatch(
            f"{src.label}: {what} {path} has diff_id {got_diff}, config says {diff_id}"
        )
    media_type = {
        "": mediatypes.OCI_LAYER,
        "gzip": mediatypes.OCI_LAYER_GZIP,
        "zstd": mediatypes.OCI_LAYER_ZSTD,
    }[comp]
    return Descriptor(media_type, digest, size)


def _import_docker(imp: _Importer, name: str | None) -> list[tuple[str, Descriptor]]:
    src = imp.src
    raw = _read_small(src, "manifest.json")
    try:
        entries = parse_json(raw)
    except MalformedDocument as exc:
        raise ArchiveError(f"{src.label}: manifest.json is not valid JSON: {exc}") from None
    if not isinstance(entries, list) or not entries:
        raise ArchiveError(f"{src.label}: manifest.json must be a non-empty list")
    if name is not None and len(entries) != 1:
        raise AmbiguousImport(f"{src.label}: contains {len(entries)} images; import without --name")
    plan = []
    for i, entry in enumerate(entries):
        what = f"{src.label} image {i}"
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("Config"), str)
            or not isinstance(entry.get("Layers"), list)
            or not all(isinstance(p, str) for p in entry["Layers"])
        ):
            raise ArchiveError(f"{what}: manifest.json entry needs Config and Layers")
        config_path = entry["Config"]
        config_bytes = _read_small(src, config_path)
        config_digest = sha256_digest(config_bytes)
        stem = posixpath.basename(config_path).removesuffix(".json")
        if is_digest("sha256:" + stem) and "sha256:" + stem != config_digest:
            raise DigestMismatch(f"{src.label}: config {config_path} hashes to {config_digest}")
        config = parse_config(config_bytes, f"{src.label} config {config_path}")
        if len(config.diff_ids) != len(entry["Layers"]):
            raise ArchiveError(
                f"{what}: {len(entry['Layers'])} layers but config lists"
                f" {len(config.diff_ids)} diff_ids"
            )
        layers = tuple(
            _docker_layer(imp, p, d, f"layer {j}")
            for j, (p, d) in enumerate(zip(entry["Layers"], config.diff_ids, strict=True))
        )
        if imp.store.blobs.ingest([config_bytes], config_digest, len(config_bytes), what="config"):
            imp.created.add(config_digest)
        cdesc = Descriptor(mediatypes.OCI_CONFIG, config_digest, len(config_bytes))
        mbytes = Manifest(mediatypes.OCI_MANIFEST, cdesc, layers).to_bytes()
        mdigest = imp.store.blobs.write(mbytes)
        imp.created.add(mdigest)
        mdesc = Descriptor(mediatypes.OCI_MANIFEST, mdigest, len(mbytes))
        if name is not None:
            plan.append((name, mdesc))
            continue
        tags = entry.get("RepoTags") or []
        if not isinstance(tags, list) or not tags:
            raise AmbiguousImport(f"{what}: has no RepoTags; use --name REF")
        for tag in tags:
            plan.append((parse_reference(str(tag)).name, mdesc))
    return plan


def import_image(
    store: ImageStore, path: Path, name: str | None = None, progress: Progress | None = None
) -> list[ImageRecord]:
    """Import an OCI layout directory, oci-archive or docker-archive; returns the new names."""
    path = Path(path)
    if name is not None:
        name = parse_reference(name).name
    src = _open_source(path)
    imp = _Importer(store, src, progress)
    try:
        with store.lease():
            if src.has("index.json") and src.has("oci-layout"):
                plan, index = _plan_oci(src, name)
                final = []
                for n, maybe in plan:
                    if maybe is None:
                        # several unnamed entries + --name: wrap them in a new index
                        for e in index.manifests:
                            imp.tree(e, "manifest")
                        ibytes = Index(
                            mediatypes.OCI_INDEX, tuple(_strip_names(e) for e in index.manifests)
                        ).to_bytes()
                        digest = store.blobs.write(ibytes)
                        imp.created.add(digest)
                        desc = Descriptor(mediatypes.OCI_INDEX, digest, len(ibytes))
                    else:
                        desc = maybe
                        imp.tree(desc, "image")
                    final.append((n, desc))
            elif src.has("manifest.json"):
                final = _import_docker(imp, name)
            else:
                raise ArchiveError(
                    f"{src.label}: neither an OCI layout (oci-layout, index.json) nor a"
                    " docker-archive (manifest.json)"
                )
            records = store.put_many(final)
    except (IpfsnapError, OSError, ValueError) as exc:
        src.close()
        store.discard_unreferenced(imp.created)
        if isinstance(exc, IpfsnapError):
            raise
        raise ArchiveError(f"{src.label}: {exc}") from exc
    except BaseException:
        src.close()
        store.discard_unreferenced(imp.created)
        raise
    src.close()
    return records


# -- export ------------------------------------------------------------------------------


def _tarinfo(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = 0  # reproducible archives: same image -> same bytes
    info.uid = info.gid = 0
    if directory:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        info.size, info.mode = size, 0o644
    return info


def export_image(store: ImageStore, ref: str, out: Path) -> Descriptor:
    """Write the image named ``ref`` (whole tree, all present platforms) as an oci-archive.

    The file appears atomically (temp file in the same directory, then rename). Returns the
    target descriptor as written into ``index.json``.
    """
    record = store.get(ref)
    digests: list[Descriptor] = []
    seen: set[str] = set()
    for desc in store.walk(record.target):
        if desc.digest in seen:
            continue
        seen.add(desc.digest)
        if not store.blobs.exists(desc.digest):
            raise IncompleteImage(
                f"image {record.name}: blob {desc.digest} is not in the local store"
                " (lazily pulled layer?)"
            )
        digests.append(desc)
    ref_obj = parse_reference(record.name)
    ann = {ANNOTATION_CONTAINERD_NAME: record.name}
    if ref_obj.tag:
        ann[ANNOTATION_REF_NAME] = ref_obj.tag
    target = record.target.with_annotations({**record.target.annotations, **ann})
    index_bytes = Index(mediatypes.OCI_INDEX, (target,)).to_bytes()
    layout_bytes = canonical_json({"imageLayoutVersion": mediatypes.OCI_LAYOUT_VERSION})
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.addfile(_tarinfo("blobs", directory=True))
                tar.addfile(_tarinfo("blobs/sha256", directory=True))
                for desc in sorted(digests, key=lambda d: d.digest):
                    size = store.blobs.size(desc.digest)
                    with store.blobs.open(desc.digest) as blob:
                        tar.addfile(_tarinfo(_blob_path(desc.digest), size), blob)
                tar.addfile(_tarinfo("index.json", len(index_bytes)), io.BytesIO(index_bytes))
                tar.addfile(_tarinfo("oci-layout", len(layout_bytes)), io.BytesIO(layout_bytes))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ArchiveError(f"export {out}: cannot write: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return target
