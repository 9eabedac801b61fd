"""Image names over the blob store: ``ImageStore`` (get/put/list/remove/tag, walk, gc).

Layout under ``<state_dir>/content``: ``blobs/sha256/<hex>``, ``refs.json`` (names ->
target descriptors), ``refs.lock`` (fcntl lock serialising name updates) and ``gc.lock``.

Consistency rules:

* A name is written only after every blob of its tree is in the store (``put`` checks it under
  the names lock), so a name never points at missing content. The one exception is layers of
  *remote* images (``put(..., remote_layers=True)``, used by rpull), which stay in IPFS.
* Manifests of an index for platforms that were not pulled may be absent; an index is
  accepted when at least one of its manifests is present. Commands that select an absent
  platform fail with a clear error.
* Writers that ingest blobs before naming them hold a *lease* (shared ``gc.lock``); garbage
  collection takes it exclusively, so it never sweeps blobs of an import in progress.
* ``refs.json`` is replaced atomically (temp file, fsync, rename, fsync dir).
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ipfsnap.content.blobs import BlobStore
from ipfsnap.content.errors import (
    BlobNotFound,
    ImageNotFound,
    IncompleteImage,
    StoreCorrupt,
)
from ipfsnap.errors import IpfsnapError, NotFoundError, StoreError
from ipfsnap.oci import (
    MAX_DOCUMENT_SIZE,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    OCIFormatError,
    Platform,
    best_match,
    host_platform,
    mediatypes,
    normalize_name,
    parse_config,
    parse_document,
    verify_bytes,
)

log = logging.getLogger(__name__)

REFS_VERSION = 1
#: nesting depth of indexes we follow (an index of indexes of manifests is already unusual)
MAX_DEPTH = 8


@dataclass(frozen=True)
class ImageRecord:
    """A named image: its normalised name and the descriptor of its top blob."""

    name: str
    target: Descriptor
    #: seconds since the epoch when the name was (last) set
    updated: float = 0.0
    #: layers may be absent locally (lazily pulled images)
    remote_layers: bool = False


@dataclass(frozen=True)
class ResolvedImage:
    """One platform's image: the manifest, its config, and the record it came from."""

    record: ImageRecord
    manifest_descriptor: Descriptor
    manifest: Manifest
    config: ImageConfig

    @property
    def layers(self) -> tuple[Descriptor, ...]:
        return self.manifest.layers


@dataclass(frozen=True)
class GCResult:
    removed: tuple[str, ...]
    freed_bytes: int


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)


class ImageStore:
    """Names and blobs of the local store of one state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "content"
        self.blobs = BlobStore(self.root)
        self._refs = self.root / "refs.json"
        self._refs_lock = self.root / "refs.lock"
        self._gc_lock = self.root / "gc.lock"

    # -- locking -------------------------------------------------------------------------
    @contextlib.contextmanager
    def lease(self) -> Iterator[None]:
        """Hold while ingesting blobs that are not yet named: GC waits for it."""
        with _flock(self._gc_lock, fcntl.LOCK_SH):
            yield

    # -- names ---------------------------------------------------------------------------
    def _load(self) -> dict[str, ImageRecord]:
        try:
            data = self._refs.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StoreCorrupt(f"image names {self._refs}: cannot read: {exc}") from exc
        try:
            obj = json.loads(data)
            if obj.get("version") != REFS_VERSION:
                raise ValueError(f"unsupported version {obj.get('version')!r}")
            out = {}
            for name, entry in obj["images"].items():
                out[name] = ImageRecord(
                    name,
                    Descriptor.from_dict(entry["target"], f"image {name}"),
                    float(entry.get("updated", 0.0)),
                    bool(entry.get("remote_layers", False)),
                )
            return out
        except (ValueError, KeyError, TypeError, AttributeError, OCIFormatError) as exc:
            raise StoreCorrupt(f"image names {self._refs}: corrupt: {exc}") from None

    def _save(self, records: dict[str, ImageRecord]) -> None:
        obj = {
            "version": REFS_VERSION,
            "images": {
                name: {
                    "target": r.target.to_dict(),
                    "updated": r.updated,
                    "remote_layers": r.remote_layers,
                }
                for name, r in sorted(records.items())
            },
        }
        tmp = self._refs.with_name(f".refs.json.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._refs)
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"image names {self._refs}: cannot write: {exc}") from exc

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return _flock(self._refs_lock, fcntl.LOCK_EX)

    def list(self) -> list[ImageRecord]:
        return sorted(self._load().values(), key=lambda r: r.name)

    def get(self, ref: str) -> ImageRecord:
        name = normalize_name(ref)
        record = self._load().get(name)
        if record is None:
            raise ImageNotFound(f"image {name}: not in the local store")
        return record

    def put(self, ref: str, target: Descriptor, *, remote_layers: bool = False) -> ImageRecord:
        """Point ``ref`` at ``target`` (replacing an earlier target); the tree must be here."""
        return self.put_many([(ref, target)], remote_layers=remote_layers)[0]

    def put_many(
        self, items: Sequence[tuple[str, Descriptor]], *, remote_layers: bool = False
    ) -> builtins.list[ImageRecord]:
        """Set several names in one atomic update (all or none)."""
        named = [(normalize_name(ref), target) for ref, target in items]
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked():
            for name, target in named:
                self.check_complete(target, remote_layers=remote_layers, what=f"image {name}")
            records = self._load()
            now = time.time()
            out = []
            for name, target in named:
                record = ImageRecord(name, target, now, remote_layers)
                records[name] = record
                out.append(record)
                log.info("image %s -> %s", name, target.digest)
            self._save(records)
        return out

    def remove(self, ref: str) -> ImageRecord:
        """Drop a name (blobs stay until :meth:`gc`)."""
        name = normalize_name(ref)
        with self._locked():
            records = self._load()
            record = records.pop(name, None)
            if record is None:
                raise ImageNotFound(f"image {name}: not in the local store")
            self._save(records)
        return record

    def tag(self, src: str, dst: str) -> ImageRecord:
        """Give the image named ``src`` the additional name ``dst``."""
        dst_name = normalize_name(dst)
        with self._locked():
            records = self._load()
            source = records.get(normalize_name(src))
            if source is None:
                raise ImageNotFound(f"image {normalize_name(src)}: not in the local store")
            record = ImageRecord(dst_name, source.target, time.time(), source.remote_layers)
            records[dst_name] = record
            self._save(records)
        return record

    # -- documents -----------------------------------------------------------------------
    def read_blob_verified(self, desc: Descriptor, max_size: int = MAX_DOCUMENT_SIZE) -> bytes:
        if desc.size > max_size:
            raise OCIFormatError(
                f"blob {desc.digest}: document of {desc.size} bytes exceeds limit {max_size}"
            )
        data = self.blobs.read(desc.digest, max_size)
        verify_bytes(data, desc.digest, desc.size, what="blob")
        return data

    def read_document(self, desc: Descriptor) -> Manifest | Index:
        data = self.read_blob_verified(desc)
        return parse_document(data, f"blob {desc.digest}", desc.media_type)

    def read_manifest(self, desc: Descriptor) -> Manifest:
        doc = self.read_document(desc)
        if not isinstance(doc, Manifest):
            raise OCIFormatError(f"blob {desc.digest}: is an index, not a manifest")
        return doc

    def read_index(self, desc: Descriptor) -> Index:
        doc = self.read_document(desc)
        if not isinstance(doc, Index):
            raise OCIFormatError(f"blob {desc.digest}: is a manifest, not an index")
        return doc

    def read_config(self, desc: Descriptor) -> ImageConfig:
        return parse_config(self.read_blob_verified(desc), f"config {desc.digest}")

    # -- trees ---------------------------------------------------------------------------
    def check_complete(
        self, target: Descriptor, *, remote_layers: bool = False, what: str = "image"
    ) -> None:
        """Raise :class:`IncompleteImage` unless the tree under ``target`` is present."""
        self._check(target, remote_layers, what, 0)

    def _check(self, desc: Descriptor, remote: bool, what: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise OCIFormatError(f"{what}: indexes nested deeper than {MAX_DEPTH}")
        if not self.blobs.exists(desc.digest):
            raise IncompleteImage(f"{what}: blob {desc.digest} is not in the store")
        if mediatypes.is_index(desc.media_type):
            doc = self.read_document(desc)
            assert isinstance(doc, Index)
            present = [m for m in doc.manifests if self.blobs.exists(m.digest)]
            if not present:
                raise IncompleteImage(
                    f"{what}: none of the manifests of index {desc.digest} is in the store"
                )
            for m in present:
                self._check(m, remote, what, depth + 1)
        elif mediatypes.is_manifest(desc.media_type):
            doc = self.read_document(desc)
            assert isinstance(doc, Manifest)
            if not self.blobs.exists(doc.config.digest):
                raise IncompleteImage(f"{what}: config {doc.config.digest} is not in the store")
            if not remote:
                for layer in doc.layers:
                    if not self.blobs.exists(layer.digest):
                        raise IncompleteImage(f"{what}: layer {layer.digest} is not in the store")

    def walk(self, target: Descriptor, platform: Platform | None = None) -> Iterator[Descriptor]:
        """Every descriptor of the tree, parents before children.

        Index entries whose manifest is absent are skipped; with ``platform``, only the best
        matching manifest of each index is followed. Configs and layers are yielded whether
        present or not (callers check ``blobs.exists`` where that matters).
        """
        yield from self._walk(target, platform, 0)

    def _walk(
        self, desc: Descriptor, platform: Platform | None, depth: int
    ) -> Iterator[Descriptor]:
        if depth > MAX_DEPTH:
            raise OCIFormatError(f"blob {desc.digest}: indexes nested deeper than {MAX_DEPTH}")
        yield desc
        if mediatypes.is_index(desc.media_type):
            doc = self.read_document(desc)
            assert isinstance(doc, Index)
            entries = [m for m in doc.manifests if self.blobs.exists(m.digest)]
            if platform is not None:
                chosen = self._select(doc, platform)
                entries = [chosen] if chosen is not None else []
            for m in entries:
                yield from self._walk(m, platform, depth + 1)
        elif mediatypes.is_manifest(desc.media_type):
            doc = self.read_document(desc)
            assert isinstance(doc, Manifest)
            yield doc.config
            yield from doc.layers

    def _select(self, index: Index, platform: Platform) -> Descriptor | None:
        present = [m for m in index.manifests if self.blobs.exists(m.digest)]
        i = best_match(platform, [m.platform for m in present])
        return present[i] if i is not None else None

    def manifest_for(
        self, target: Descriptor, platform: Platform | None = None, what: str = "image"
    ) -> Descriptor:
        """The manifest descriptor for ``platform`` (default: this machine's)."""
        want = platform or host_platform()
        desc = target
        for _ in range(MAX_DEPTH):
            if mediatypes.is_manifest(desc.media_type):
                return desc
            if not mediatypes.is_index(desc.media_type):
                raise OCIFormatError(
                    f"{what}: blob {desc.digest} has unknown media type {desc.media_type!r}"
                )
            doc = self.read_document(desc)
            assert isinstance(doc, Index)
            i = best_match(want, [m.platform for m in doc.manifests])
            if i is None:
                have = ", ".join(str(m.platform) for m in doc.manifests if m.platform)
                raise NotFoundError(f"{what}: no manifest for platform {want} (has {have})")
            desc = doc.manifests[i]
            if not self.blobs.exists(desc.digest):
                raise IncompleteImage(
                    f"{what}: platform {want} was not pulled (manifest {desc.digest} missing)"
                )
        raise OCIFormatError(f"{what}: indexes nested deeper than {MAX_DEPTH}")

    def resolve(self, ref: str, platform: Platform | None = None) -> ResolvedImage:
        """Name -> manifest and config for one platform (what ``run`` and push need)."""
        record = self.get(ref)
        mdesc = self.manifest_for(record.target, platform, f"image {record.name}")
        manifest = self.read_document(mdesc)
        assert isinstance(manifest, Manifest)
        config = self.read_config(manifest.config)
        return ResolvedImage(record, mdesc, manifest, config)

    # -- garbage collection --------------------------------------------------------------
    def gc(self, temp_grace: float = 3600.0) -> GCResult:
        """Delete blobs unreachable from every name (mark and sweep, under both locks)."""
        with _flock(self._gc_lock, fcntl.LOCK_EX), self._locked():
            marked: set[str] = set()
            for record in self._load().values():
                marked.update(self._mark(record.target))
            removed = []
            freed = 0
            for digest in list(self.blobs.list()):
                if digest in marked:
                    continue
                with contextlib.suppress(BlobNotFound):
                    freed += self.blobs.size(digest)
                if self.blobs.delete(digest):
                    removed.append(digest)
            self.blobs.clean_temp(temp_grace)
        log.info("gc removed %d blobs, %d bytes", len(removed), freed)
        return GCResult(tuple(sorted(removed)), freed)

    def _mark(self, target: Descriptor) -> set[str]:
        out: set[str] = set()
        stack = [(target, 0)]
        while stack:
            desc, depth = stack.pop()
            if desc.digest in out:
                continue
            out.add(desc.digest)
            if depth > MAX_DEPTH or not self.blobs.exists(desc.digest):
                continue
            if mediatypes.is_index(desc.media_type) or mediatypes.is_manifest(desc.media_type):
                try:
                    doc = self.read_document(desc)
                except IpfsnapError as exc:
                    # sweeping now could delete the children of an unreadable document:
                    # stop instead, having removed nothing
                    raise StoreError(
                        f"gc: cannot read {desc.digest} ({exc}); nothing was removed"
                    ) from exc
                children = doc.manifests if isinstance(doc, Index) else (doc.config, *doc.layers)
                stack.extend((c, depth + 1) for c in children)
        return out

    def discard_unreferenced(self, digests: set[str]) -> None:
        """Remove these blobs unless some name reaches them (undo of a failed import).

        Takes the GC lock exclusively, so call it outside any :meth:`lease`.
        """
        if not digests:
            return
        with _flock(self._gc_lock, fcntl.LOCK_EX), self._locked():
            marked: set[str] = set()
            for record in self._load().values():
                marked.update(self._mark(record.target))
            for digest in digests - marked:
                self.blobs.delete(digest)
