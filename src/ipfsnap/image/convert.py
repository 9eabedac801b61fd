"""Convert a local image to eStargz: what ``ipfs-push`` does before it adds any blob.

:func:`convert_image` rewrites the tree under an image's target into a new tree in the content
store and returns the new top descriptor:

* every layer of the selected manifests becomes an eStargz blob (gzip, level 9 unless told
  otherwise, default chunk size, ``--prioritize`` passed through) whose descriptor carries the
  ``containerd.io/snapshot/stargz/toc.digest`` and ``io.containers.estargz.uncompressed-size``
  annotations and the OCI media type ``application/vnd.oci.image.layer.v1.tar+gzip``;
* a layer that already is valid eStargz (gzip footer, TOC whose digest equals its toc.digest
  annotation) is kept as it is, only its media type becomes OCI;
* each config gets ``rootfs.diff_ids`` of the new layers (sha256 of the decompressed blob);
* Docker media types become OCI ones; index entries of platforms not selected are dropped
  (the reference's ``IndexConvertFunc`` with a platform matcher does the same);
* a document whose children did not change keeps its original bytes and digest.

Layers convert in parallel, at most one per core, and each build gets its share of the cores
as compression threads, so the number of busy compression threads never exceeds the core
count. When one layer holds most of the bytes it is built alone with every core instead (it
would otherwise finish long after the others, on a fraction of the machine). Each conversion is
recorded in a cache under the state dir keyed by the source digest and every option that
affects the output bytes; a second conversion of the same layer only checks that the recorded
blob is still in the store.

Callers hold ``store.lease()`` around the conversion and everything that follows it up to
naming the result (new blobs are unnamed until then; GC waits for the lease). On failure the
digests of blobs this call created are in the exception's ``created`` attribute, so the caller
can discard them once the lease is released.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import secrets
import tempfile
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import ipfsnap
from ipfsnap.content import ImageStore
from ipfsnap.content.errors import BlobNotFound, IncompleteImage
from ipfsnap.errors import IpfsnapError, NotFoundError, StoreError
from ipfsnap.estargz import (
    DEFAULT_CHUNK_SIZE,
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    BuildOptions,
    FileRangeReader,
    build,
    open_layer,
)
from ipfsnap.estargz import builder as estargz_builder
from ipfsnap.image.errors import LayerConversionError, SourceBlobMismatch, UnsupportedMediaType
from ipfsnap.oci import (
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    canonical_json,
    host_platform,
    matches,
    mediatypes,
    sha256_digest,
)
from ipfsnap.oci.errors import UnknownMediaType
from ipfsnap.progress import Progress

log = logging.getLogger(__name__)

#: the reference's ipfs-push builds with the estargz library's default, gzip.BestCompression
DEFAULT_LEVEL = 9
#: bump when the conversion recipe changes so old cache records are ignored
CACHE_VERSION = 1
#: nesting depth of indexes we follow (same bound as the content store's)
MAX_DEPTH = 8
#: layers convert side by side only when the biggest is at most this much more than an even
#: share of the bytes; the builder is parallel itself, so a dominant layer is better built
#: alone with all cores (see _convert_layers)
BALANCE = 1.25
#: read size while hashing or copying local blobs
_READ = 1 << 20
#: annotations describing a previous encoding of the layer; they would lie about the new one
_STALE_ANNOTATIONS = frozenset(
    {
        TOC_DIGEST_ANNOTATION,
        UNCOMPRESSED_SIZE_ANNOTATION,
        "io.github.containers.zstd-chunked.manifest-checksum",
        "io.github.containers.zstd-chunked.manifest-position",
    }
)


@dataclass(frozen=True)
class ConvertOptions:
    """How to convert; the defaults are the reference ipfs-push's."""

    #: False: keep layers as they are (only Docker media types become OCI)
    estargz: bool = True
    level: int = DEFAULT_LEVEL
    chunk_size: int = DEFAULT_CHUNK_SIZE
    #: files to put first in each layer (missing ones are fine: they may be in another layer)
    prioritize: tuple[str, ...] = ()
    #: platforms to keep from indexes; empty = this machine's
    platforms: tuple[Platform, ...] = ()
    all_platforms: bool = False
    #: concurrent layer conversions; 0 = one per core
    jobs: int = 0
    #: per source layer digest, files to put first in that layer (``image optimize``); a
    #: layer listed here uses its own list instead of ``prioritize`` and is rebuilt even when
    #: it already is eStargz
    prioritize_per_layer: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: whether a layer of ``prioritize_per_layer`` that already is eStargz is rebuilt with
    #: its list (``image optimize``) or kept as it is (ipfs-push's start-up layout)
    rebuild_prioritized: bool = True

    def prioritized(self, source_digest: str) -> tuple[str, ...]:
        """The files to put first in the layer whose source digest is ``source_digest``."""
        for digest, files in self.prioritize_per_layer:
            if digest == source_digest:
                return files
        return self.prioritize

    def optimized(self, source_digest: str) -> bool:
        """Whether the layer is rebuilt with its own list even when it is eStargz already."""
        return self.rebuild_prioritized and any(
            d == source_digest for d, _ in self.prioritize_per_layer)

    def cache_key(self, source_digest: str) -> str:
        """Everything that determines the converted bytes, hashed."""
        deflate = getattr(estargz_builder, "_deflate", zlib).__name__
        material = {
            "v": CACHE_VERSION,
            "ipfsnap": ipfsnap.__version__,
            "deflate": deflate,
            "source": source_digest,
            "level": self.level,
            "chunk_size": self.chunk_size,
            "prioritize": list(self.prioritized(source_digest)),
        }
        return hashlib.sha256(canonical_json(material)).hexdigest()


@dataclass(frozen=True)
class LayerResult:
    """What became of one source layer."""

    source: Descriptor
    descriptor: Descriptor
    #: diffID of the new blob; None when the layer was kept (the config's entry stays)
    diff_id: str | None
    #: an eStargz blob was built (now or in an earlier run, see ``cached``)
    converted: bool
    #: the result came from the conversion cache (nothing was built now)
    cached: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class ConvertResult:
    """The converted tree's top descriptor and what happened on the way."""

    target: Descriptor
    layers: tuple[LayerResult, ...]
    #: blobs this call wrote to the content store (unnamed until the caller names them)
    created: frozenset[str]
    seconds: float
    #: CPU seconds of this process (all threads) during the conversion
    cpu_seconds: float = 0.0

    @property
    def built(self) -> int:
        """Layers converted now (not kept, not from the cache)."""
        return sum(1 for r in self.layers if r.converted and not r.cached)


@dataclass
class _Run:
    store: ImageStore
    opts: ConvertOptions
    what: str
    progress: Progress | None
    cache_dir: Path
    tmp_dir: Path
    created: set[str] = field(default_factory=set)
    layers: dict[str, LayerResult] = field(default_factory=dict)


class _KeyedProgress:
    """Forwards the builder's progress under this layer's key (builds run side by side)."""

    def __init__(self, inner: Progress, key: str, total: int) -> None:
        self._inner = inner
        self._key = key
        self._total = total

    def update(self, key: str, status: str, done: int = 0, total: int = 0) -> None:
        self._inner.update(self._key, "converting", done, 0)

    def finish(self, key: str, status: str) -> None:
        return None


class _HashingReader:
    """Reads a local blob while hashing it, so the source digest is checked for free."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.hash = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self._f.read(n)
        self.hash.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while data := self.read(_READ):
            del data

    def check(self, desc: Descriptor, what: str) -> None:
        self.drain()
        digest = "sha256:" + self.hash.hexdigest()
        if self.count != desc.size:
            raise SourceBlobMismatch(
                f"{what}: layer {desc.digest} is {self.count} bytes in the store, its "
                f"descriptor says {desc.size}"
            )
        if digest != desc.digest:
            raise SourceBlobMismatch(
                f"{what}: layer {desc.digest} in the store hashes to {digest} (corrupt blob)"
            )


def _cores() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def state_paths(state_dir: Path) -> tuple[Path, Path]:
    """(conversion cache dir, temp dir) of a state dir."""
    base = Path(state_dir) / "image"
    return base / "convert-cache", base / "tmp"


# -- cache ------------------------------------------------------------------------------------


def _cache_get(run: _Run, desc: Descriptor) -> LayerResult | None:
    path = run.cache_dir / f"{run.opts.cache_key(desc.digest)}.json"
    try:
        obj = json.loads(path.read_bytes())
        new = Descriptor.from_dict(obj["descriptor"], f"conversion cache {path.name}")
        diff_id = obj["diff_id"]
        if obj["source"] != desc.digest or not isinstance(diff_id, str):
            return None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, IpfsnapError) as exc:
        log.warning("conversion cache %s: ignoring unreadable record: %s", path, exc)
        return None
    try:
        if run.store.blobs.size(new.digest) != new.size:
            return None
    except BlobNotFound:
        return None  # collected since; convert again
    return LayerResult(desc, _as_converted(desc, new), diff_id, converted=True, cached=True)


def _cache_put(run: _Run, result: LayerResult) -> None:
    assert result.diff_id is not None
    path = run.cache_dir / f"{run.opts.cache_key(result.source.digest)}.json"
    record = {
        "source": result.source.digest,
        "descriptor": result.descriptor.to_dict(),
        "diff_id": result.diff_id,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
    try:
        run.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(canonical_json(record))
        os.replace(tmp, path)
    except OSError as exc:
        # the cache only saves time: a push without it is still right
        log.warning("conversion cache %s: cannot write: %s", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()


# -- layers -----------------------------------------------------------------------------------


def _as_converted(layer: Descriptor, blob: Descriptor) -> Descriptor:
    """``layer`` (as one manifest lists it) pointing at the converted ``blob``.

    Its own annotations stay (as in the reference) except those describing the old encoding;
    the blob's eStargz annotations are added. Old urls go: they name the old bytes.
    """
    ann = {k: v for k, v in layer.annotations.items() if k not in _STALE_ANNOTATIONS}
    ann.update({k: v for k, v in blob.annotations.items() if k in _STALE_ANNOTATIONS})
    return replace(layer, media_type=blob.media_type, digest=blob.digest, size=blob.size,
                   urls=(), annotations=ann)


def _as_kept(layer: Descriptor, result: LayerResult) -> Descriptor:
    """``layer`` (as one manifest lists it) kept, with an OCI media type and the annotations
    computed for it (the uncompressed size of an eStargz layer that lacked it)."""
    ann = dict(layer.annotations)
    for k, v in result.descriptor.annotations.items():
        if k in _STALE_ANNOTATIONS:
            ann.setdefault(k, v)
    return replace(layer, media_type=result.descriptor.media_type, annotations=ann)


def _check_layer_type(desc: Descriptor, what: str) -> None:
    if not mediatypes.is_layer(desc.media_type):
        raise UnsupportedMediaType(
            f"{what}: layer {desc.digest} has unknown media type {desc.media_type!r}"
        )


def _open_blob(run: _Run, desc: Descriptor, kind: str) -> BinaryIO:
    try:
        return run.store.blobs.open(desc.digest)
    except BlobNotFound:
        raise IncompleteImage(f"{run.what}: {kind} {desc.digest} is not in the store") from None


def _already_estargz(run: _Run, desc: Descriptor) -> bool:
    """Valid eStargz whose TOC digest is the one annotated: keep it."""
    toc = desc.annotations.get(TOC_DIGEST_ANNOTATION)
    if not toc or mediatypes.layer_compression(desc.media_type) != "gzip":
        return False
    with _open_blob(run, desc, "layer") as f:
        try:
            index = open_layer(FileRangeReader(f, desc.digest), desc.size, toc_digest=toc,
                               name=f"layer {desc.digest}")
        except IpfsnapError as exc:
            log.info("%s: layer %s has a toc.digest annotation but is not usable eStargz "
                     "(%s): converting it", run.what, desc.digest, exc)
            return False
    return index.compression == "gzip"


def _uncompressed_size(run: _Run, desc: Descriptor) -> int:
    n = 0
    with _open_blob(run, desc, "layer") as f, gzip.GzipFile(fileobj=f, mode="rb") as gz:
        try:
            while data := gz.read(_READ):
                n += len(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise LayerConversionError(
                f"{run.what}: layer {desc.digest}: corrupt gzip stream: {exc}"
            ) from None
    return n


def _keep(run: _Run, desc: Descriptor) -> LayerResult:
    ann = dict(desc.annotations)
    if UNCOMPRESSED_SIZE_ANNOTATION not in ann:
        ann[UNCOMPRESSED_SIZE_ANNOTATION] = str(_uncompressed_size(run, desc))
    new = replace(desc, media_type=mediatypes.OCI_LAYER_GZIP, annotations=ann)
    return LayerResult(desc, new, None, converted=False)


def _build(run: _Run, desc: Descriptor, workers: int) -> LayerResult:
    start = time.monotonic()
    key = desc.digest[7:19]
    progress = _KeyedProgress(run.progress, key, desc.size) if run.progress else None
    if run.progress is not None:
        run.progress.update(key, "converting", 0, 0)
    opts = BuildOptions(
        chunk_size=run.opts.chunk_size,
        level=run.opts.level,
        prioritize=run.opts.prioritized(desc.digest),
        allow_missing_prioritized=True,
        workers=workers,
        spool_dir=str(run.tmp_dir),
    )
    try:
        run.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=run.tmp_dir, prefix="estargz-")
    except OSError as exc:
        raise StoreError(f"{run.what}: cannot create a temp file in {run.tmp_dir}: {exc}") from exc
    tmp = Path(name)
    try:
        out = os.fdopen(fd, "wb")
        with _open_blob(run, desc, "layer") as src:
            reader = _HashingReader(src)
            try:
                with out:
                    result = build(reader, out, opts, progress=progress)  # type: ignore[arg-type]
            except OSError as exc:
                raise StoreError(
                    f"{run.what}: converting layer {desc.digest} failed: {exc}"
                ) from exc
            except (IpfsnapError, EOFError, ValueError, zlib.error) as exc:
                # a corrupt blob shows up as a bad tar: name the real cause when it is that
                reader.check(desc, run.what)
                raise LayerConversionError(
                    f"{run.what}: layer {desc.digest} cannot be converted to eStargz: {exc}"
                ) from None
            reader.check(desc, run.what)
        for missing in result.missing_prioritized:
            log.debug("layer %s: prioritized %r is not in this layer", desc.digest, missing)
        with open(tmp, "rb") as f:
            if run.store.blobs.ingest(f, result.blob_digest, result.blob_size,
                                      what=f"eStargz of layer {desc.digest}"):
                run.created.add(result.blob_digest)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    blob = Descriptor(mediatypes.OCI_LAYER_GZIP, result.blob_digest, result.blob_size,
                      annotations=result.annotations())
    new = _as_converted(desc, blob)
    seconds = time.monotonic() - start
    if run.progress is not None:
        run.progress.finish(key, f"converted to eStargz {result.blob_digest[7:19]} "
                                 f"({result.blob_size} bytes, {seconds:.1f} s)")
    log.info("%s: layer %s -> eStargz %s (%d -> %d bytes, %.1f s)", run.what, desc.digest,
             result.blob_digest, desc.size, result.blob_size, seconds)
    return LayerResult(desc, new, result.diff_id, converted=True, seconds=seconds)


def _convert_layer(run: _Run, desc: Descriptor, workers: int) -> LayerResult:
    _check_layer_type(desc, run.what)
    if not run.store.blobs.exists(desc.digest):
        raise IncompleteImage(f"{run.what}: layer {desc.digest} is not in the store")
    if not run.opts.estargz:
        new = replace(desc, media_type=mediatypes.to_oci(desc.media_type))
        return LayerResult(desc, new, None, converted=False)
    if not run.opts.optimized(desc.digest) and _already_estargz(run, desc):
        log.info("%s: layer %s is already eStargz: kept", run.what, desc.digest)
        return _keep(run, desc)
    cached = _cache_get(run, desc)
    if cached is not None:
        log.info("%s: layer %s: conversion cached (%s)", run.what, desc.digest,
                 cached.descriptor.digest)
        if run.progress is not None:
            run.progress.finish(desc.digest[7:19], "eStargz (cached)")
        return cached
    result = _build(run, desc, workers)
    _cache_put(run, result)
    return result


def _convert_layers(run: _Run, layers: Sequence[Descriptor]) -> None:
    """Convert every distinct layer, in parallel, filling ``run.layers``."""
    todo: dict[str, Descriptor] = {}
    for d in layers:
        todo.setdefault(d.digest, d)
    if not todo:
        return
    # biggest first: the long builds start early and the small ones fill the gaps
    ordered = sorted(todo.values(), key=lambda d: -d.size)
    cores = _cores()
    jobs = min(run.opts.jobs or cores, len(ordered))
    total = sum(d.size for d in ordered)
    if not run.opts.jobs and jobs > 1 and ordered[0].size * jobs > total * BALANCE:
        # one layer dominates: side by side, it would run on its share of the cores long
        # after the others are done; alone with every core (the builder compresses in
        # parallel) it finishes sooner. Measured on the python sample (48 + 16 MB) on 2
        # cores: 52 s one after the other with 2 threads each, 68 s side by side.
        jobs = 1
    # the builder compresses on `workers` threads: split the cores between concurrent builds
    workers = max(1, cores // jobs)
    if jobs == 1:
        for d in ordered:
            run.layers[d.digest] = _convert_layer(run, d, workers)
        return
    with ThreadPoolExecutor(jobs, "convert") as pool:
        futures: list[tuple[Descriptor, Future[LayerResult]]] = [
            (d, pool.submit(_convert_layer, run, d, workers)) for d in ordered
        ]
        error: BaseException | None = None
        for d, fut in futures:
            try:
                run.layers[d.digest] = fut.result()
            except BaseException as exc:
                if error is None:
                    error = exc
                    for _, other in futures:
                        other.cancel()
        if error is not None:
            raise error


# -- documents --------------------------------------------------------------------------------


def _wanted(opts: ConvertOptions) -> tuple[Platform, ...]:
    return opts.platforms or (host_platform(),)


def _selected(run: _Run, entry: Descriptor) -> bool:
    if run.opts.all_platforms or entry.platform is None:
        return True
    return any(matches(w, entry.platform) for w in _wanted(run.opts))


def _read_doc(run: _Run, desc: Descriptor) -> Manifest | Index:
    if not run.store.blobs.exists(desc.digest):
        kind = "index" if mediatypes.is_index(desc.media_type) else "manifest"
        raise IncompleteImage(f"{run.what}: {kind} {desc.digest} is not in the store")
    try:
        return run.store.read_document(desc)
    except IpfsnapError as exc:
        raise type(exc)(f"{run.what}: {exc}") from None


def _collect(run: _Run, desc: Descriptor, depth: int, out: list[Descriptor]) -> None:
    """Check the selected tree and gather its layers (before any slow work starts)."""
    if depth > MAX_DEPTH:
        raise UnsupportedMediaType(f"{run.what}: indexes nested deeper than {MAX_DEPTH}")
    if mediatypes.is_index(desc.media_type):
        doc = _read_doc(run, desc)
        assert isinstance(doc, Index)
        chosen = [m for m in doc.manifests if _selected(run, m)]
        if not chosen:
            have = ", ".join(str(m.platform) for m in doc.manifests if m.platform) or "none"
            want = ", ".join(str(p) for p in _wanted(run.opts))
            raise NotFoundError(
                f"{run.what}: index {desc.digest} has no manifest for {want} (has {have})"
            )
        for m in chosen:
            _collect(run, m, depth + 1, out)
    elif mediatypes.is_manifest(desc.media_type):
        doc = _read_doc(run, desc)
        assert isinstance(doc, Manifest)
        if not mediatypes.is_config(doc.config.media_type):
            raise UnsupportedMediaType(
                f"{run.what}: config {doc.config.digest} has unknown media type "
                f"{doc.config.media_type!r}"
            )
        if not run.store.blobs.exists(doc.config.digest):
            raise IncompleteImage(f"{run.what}: config {doc.config.digest} is not in the store")
        for layer in doc.layers:
            _check_layer_type(layer, run.what)
            if not run.store.blobs.exists(layer.digest):
                raise IncompleteImage(f"{run.what}: layer {layer.digest} is not in the store")
            out.append(layer)
    else:
        raise UnsupportedMediaType(
            f"{run.what}: blob {desc.digest} has unknown media type {desc.media_type!r} "
            "(want an image index or manifest)"
        )


def _write(run: _Run, data: bytes) -> str:
    digest = sha256_digest(data)
    if not run.store.blobs.exists(digest):
        run.store.blobs.write(data, digest)
        run.created.add(digest)
    return digest


def _rebuilt(old: Descriptor, media_type: str, data: bytes, digest: str) -> Descriptor:
    # a new blob: the old urls point at the old bytes
    return replace(old, media_type=media_type, digest=digest, size=len(data), urls=())


def _convert_config(run: _Run, desc: Descriptor, layers: Sequence[LayerResult]) -> Descriptor:
    try:
        config: ImageConfig = run.store.read_config(desc)
    except IpfsnapError as exc:
        raise type(exc)(f"{run.what}: {exc}") from None
    old_ids = config.diff_ids
    if len(old_ids) != len(layers):
        raise UnsupportedMediaType(
            f"{run.what}: config {desc.digest} lists {len(old_ids)} diff_ids for "
            f"{len(layers)} layers"
        )
    new_ids = [r.diff_id or old for r, old in zip(layers, old_ids, strict=True)]
    media_type = mediatypes.to_oci(desc.media_type)
    if new_ids == old_ids:
        return replace(desc, media_type=media_type)
    raw: dict[str, Any] = dict(config.raw)
    rootfs = dict(raw["rootfs"])
    rootfs["diff_ids"] = new_ids
    raw["rootfs"] = rootfs
    data = canonical_json(raw)
    return _rebuilt(desc, media_type, data, _write(run, data))


def _convert_doc(run: _Run, desc: Descriptor, depth: int) -> Descriptor:
    doc = _read_doc(run, desc)
    if isinstance(doc, Index):
        entries = tuple(
            _convert_doc(run, m, depth + 1) for m in doc.manifests if _selected(run, m)
        )
        if entries == doc.manifests and doc.media_type == mediatypes.OCI_INDEX:
            return desc
        idx = replace(doc, media_type=mediatypes.OCI_INDEX, manifests=entries)
        data = idx.to_bytes()
        return _rebuilt(desc, mediatypes.OCI_INDEX, data, _write(run, data))
    results = [run.layers[layer.digest] for layer in doc.layers]
    layers = tuple(
        _as_converted(layer, r.descriptor) if r.descriptor.digest != layer.digest
        else _as_kept(layer, r)
        for layer, r in zip(doc.layers, results, strict=True)
    )
    config = _convert_config(run, doc.config, results)
    if (
        layers == doc.layers
        and config == doc.config
        and doc.media_type == mediatypes.OCI_MANIFEST
    ):
        return desc
    man = replace(doc, media_type=mediatypes.OCI_MANIFEST, config=config, layers=layers)
    data = man.to_bytes()
    return _rebuilt(desc, mediatypes.OCI_MANIFEST, data, _write(run, data))


def convert_image(
    store: ImageStore,
    target: Descriptor,
    options: ConvertOptions | None = None,
    *,
    state_dir: Path,
    what: str = "image",
    progress: Progress | None = None,
) -> ConvertResult:
    """Convert the tree under ``target`` (see the module docstring); hold ``store.lease()``.

    ``what`` names the image in error messages (``"image docker.io/library/x:1"``). On
    failure the raised :class:`~ipfsnap.errors.IpfsnapError` has a ``created`` attribute
    (a set of digests) listing blobs already written, for the caller to discard.
    """
    opts = options or ConvertOptions()
    if not 0 <= opts.level <= 9:
        raise ValueError(f"gzip level {opts.level} is not in 0..9")
    cache_dir, tmp_dir = state_paths(state_dir)
    run = _Run(store, opts, what, progress, cache_dir, tmp_dir)
    start = time.monotonic()
    cpu_start = time.process_time()
    try:
        layers: list[Descriptor] = []
        _collect(run, target, 0, layers)
        _convert_layers(run, layers)
        new_target = _convert_doc(run, target, 0)
    except UnknownMediaType as exc:
        err: BaseException = UnsupportedMediaType(f"{what}: {exc}")
        err.created = set(run.created)  # type: ignore[attr-defined]
        raise err from None
    except BaseException as exc:
        exc.created = set(run.created)  # type: ignore[attr-defined]
        raise
    seconds = time.monotonic() - start
    cpu = time.process_time() - cpu_start
    return ConvertResult(
        new_target, tuple(run.layers.values()), frozenset(run.created), seconds, cpu
    )

