"""Unpack an image's layers into committed snapshots named by chain ID, lazily where possible.

Per layer, bottom first (as containerd's unpacker):

* a committed snapshot named by the layer's chain ID already exists: nothing to do;
* lazy (the snapshotter mounts remote layers) and the layer is eStargz (TOC digest
  annotation) with an ``ipfs://`` url: ``prepare`` with the target label and the remote
  labels; ``AlreadyExists`` means the layer is mounted lazily and committed;
* otherwise, or when the remote mount failed and the store fell back to a normal active
  snapshot: the whole blob (local, or fetched from IPFS into the content store, verified),
  unpacked into the snapshot with its diffID checked against the config, then committed.

The label names are the reference's (containerd's stargz snapshotter); ``ipfsnap.fs``
reads the same strings (a test checks they agree; this package does not import ``fs``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ipfsnap.content import BlobStore
from ipfsnap.errors import AlreadyExistsError, NotFoundError
from ipfsnap.estargz import TOC_DIGEST_ANNOTATION
from ipfsnap.image.errors import RemoteImageFormatError, UnpackError
from ipfsnap.image.resolve import IPFS_URL_PREFIX, BlobFetcher
from ipfsnap.oci import Descriptor, ImageConfig, Manifest, is_digest, mediatypes
from ipfsnap.snapshot import (
    ESTARGZ_METADATA,
    TARGET_SNAPSHOT_LABEL,
    Mount,
    Snapshotter,
    apply_layer,
    mount_all,
    unmount,
)

log = logging.getLogger(__name__)

#: remote-layer labels (the reference's names), read by ipfsnap.fs.LayerMounter
LAYER_DIGEST_LABEL = "containerd.io/snapshot/remote/stargz.digest"
TOC_DIGEST_LABEL = "containerd.io/snapshot/stargz/toc.digest"
URLS_LABEL = "containerd.io/snapshot/remote/urls"
PREFETCH_SIZE_LABEL = "containerd.io/snapshot/remote/stargz.prefetch"
SIZE_LABEL = "ipfsnap.io/layer.size"
#: the remote labels of the image's next lazy layers (JSON list of objects), so the lazy
#: filesystem can open and prefetch them while the earlier ones are mounted (layers are
#: prepared one after the other, each waiting for its mount)
NEXT_LAYERS_LABEL = "ipfsnap.io/layers.next"
#: next layers listed at most (each ~300 bytes: containerd bounds a label at 4096 bytes)
NEXT_LAYERS_MAX = 8


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """OCI chain IDs: ChainID(L0) = DiffID(L0), ChainID(Ln) = sha256(ChainID(Ln-1) + " " +
    DiffID(Ln)); committed layer snapshots are named by them (as containerd's)."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


def is_estargz(layer: Descriptor) -> bool:
    """Whether the layer descriptor claims eStargz (a TOC digest annotation); the claim is
    checked when the layer is mounted (the TOC must hash to it) or fully unpacked."""
    return is_digest(layer.annotations.get(TOC_DIGEST_ANNOTATION, ""))


def ipfs_urls(layer: Descriptor) -> list[str]:
    return [u for u in layer.urls if u.startswith(IPFS_URL_PREFIX)]


def remote_labels(layer: Descriptor, prefetch_size: int | None = None) -> dict[str, str]:
    """The labels that tell the lazy filesystem which layer to mount and how to verify it."""
    labels = {
        LAYER_DIGEST_LABEL: layer.digest,
        TOC_DIGEST_LABEL: layer.annotations[TOC_DIGEST_ANNOTATION],
        URLS_LABEL: ",".join(layer.urls),
        SIZE_LABEL: str(layer.size),
    }
    if prefetch_size is not None:
        labels[PREFETCH_SIZE_LABEL] = str(prefetch_size)
    return labels


@dataclass(frozen=True)
class LayerResult:
    """What happened to one layer."""

    digest: str
    chain_id: str
    #: "existing" (already committed), "lazy" (mounted remotely), "full" (unpacked)
    how: str


@dataclass(frozen=True)
class UnpackResult:
    chain_ids: tuple[str, ...]
    layers: tuple[LayerResult, ...]

    @property
    def top(self) -> str:
        return self.chain_ids[-1] if self.chain_ids else ""


def _option(options: Sequence[str], name: str) -> str | None:
    prefix = name + "="
    for opt in options:
        if opt.startswith(prefix):
            return opt[len(prefix):]
    return None


def _apply_into(
    mounts: Sequence[Mount], stream_path: Path, *, diff_id: str, layer: str, estargz: bool
) -> None:
    """Unpack the blob at ``stream_path`` into the active snapshot described by ``mounts``.

    An overlay's upper directory gets the layer directly, with the lower directories as
    parents (as containerd does for overlay mounts): the unpacker writes overlay whiteouts
    (0/0 devices, the opaque xattr), which cannot be created through a mounted overlay. Any
    other mount is mounted on a temporary directory and unpacked into.
    """
    skip = ESTARGZ_METADATA if estargz else frozenset()
    if len(mounts) == 1 and mounts[0].type == "overlay":
        upper = _option(mounts[0].options, "upperdir")
        lower = _option(mounts[0].options, "lowerdir")
        if upper is None:
            raise UnpackError(f"layer {layer}: snapshot mount has no upperdir: {mounts[0]}")
        parents = [Path(p) for p in lower.split(":")] if lower else []
        with open(stream_path, "rb") as f:
            apply_layer(upper, f, expected_diff_id=diff_id, layer=layer, parents=parents,
                        skip=skip)
        return
    if len(mounts) == 1 and mounts[0].type == "bind" and "ro" not in mounts[0].options:
        with open(stream_path, "rb") as f:
            apply_layer(mounts[0].source, f, expected_diff_id=diff_id, layer=layer, skip=skip)
        return
    with tempfile.TemporaryDirectory(prefix="ipfsnap-unpack-") as tmp:
        mount_all(mounts, tmp)
        try:
            with open(stream_path, "rb") as f:
                apply_layer(tmp, f, expected_diff_id=diff_id, layer=layer, skip=skip)
        finally:
            unmount(tmp)


def _exists(snapshotter: Snapshotter, key: str) -> bool:
    try:
        snapshotter.stat(key)
    except NotFoundError:
        return False
    return True


def unpack_layers(
    name: str,
    layers: Sequence[Descriptor],
    diff_ids: Sequence[str],
    snapshotter: Snapshotter,
    *,
    blobs: BlobStore,
    fetcher: BlobFetcher | None,
    lazy: bool,
    prefetch_size: int | None = None,
) -> UnpackResult:
    """Make every layer a committed snapshot named by its chain ID (see the module doc).

    ``fetcher`` fetches layers that are not in ``blobs`` from IPFS (None: they must be
    local). On error the layer's active snapshot is removed; layers committed before stay
    (they are complete and shared by chain ID, as containerd's).
    """
    if len(diff_ids) != len(layers):
        raise RemoteImageFormatError(
            f"image {name}: config has {len(diff_ids)} diff_ids for {len(layers)} layers"
        )
    for layer in layers:
        if not mediatypes.is_layer(layer.media_type):
            raise RemoteImageFormatError(
                f"image {name}: layer {layer.digest} has unsupported media type "
                f"{layer.media_type!r}"
            )
    chains = chain_ids(diff_ids)
    results: list[LayerResult] = []
    parent = ""
    lazy_labels = [remote_labels(layer, prefetch_size)
                   if lazy and is_estargz(layer) and ipfs_urls(layer) else None
                   for layer in layers]
    for i, (layer, diff_id, chain) in enumerate(zip(layers, diff_ids, chains, strict=True)):
        if _exists(snapshotter, chain):
            results.append(LayerResult(layer.digest, chain, "existing"))
            parent = chain
            continue
        upcoming = [lb for lb in lazy_labels[i + 1:] if lb is not None][:NEXT_LAYERS_MAX]
        how = _unpack_one(name, layer, diff_id, chain, parent, snapshotter, blobs=blobs,
                          fetcher=fetcher, lazy=lazy, prefetch_size=prefetch_size,
                          upcoming=upcoming)
        results.append(LayerResult(layer.digest, chain, how))
        parent = chain
    return UnpackResult(tuple(chains), tuple(results))


def _unpack_one(
    name: str,
    layer: Descriptor,
    diff_id: str,
    chain: str,
    parent: str,
    snapshotter: Snapshotter,
    *,
    blobs: BlobStore,
    fetcher: BlobFetcher | None,
    lazy: bool,
    prefetch_size: int | None,
    upcoming: Sequence[Mapping[str, str]] = (),
) -> str:
    what = f"image {name} layer {layer.digest}"
    labels: dict[str, str] = {}
    try_lazy = False
    if lazy:
        if not is_estargz(layer):
            log.info("%s: not eStargz (no valid %s annotation): fetching it whole", what,
                     TOC_DIGEST_ANNOTATION)
        elif not ipfs_urls(layer):
            log.info("%s: no ipfs:// url: cannot mount it lazily", what)
        else:
            # the target label is what asks the snapshotter to try a remote mount
            labels = {TARGET_SNAPSHOT_LABEL: chain, **remote_labels(layer, prefetch_size)}
            if upcoming:
                labels[NEXT_LAYERS_LABEL] = json.dumps(list(upcoming), separators=(",", ":"))
            try_lazy = True
    # a private key, committed under the chain ID: concurrent unpacks of the same layer each
    # work on their own snapshot and the first commit wins (as containerd's unpacker)
    key = f"extract-{os.getpid()}-{secrets.token_hex(4)} {chain}"
    try:
        mounts = snapshotter.prepare(key, parent, labels)
    except AlreadyExistsError:
        if not _exists(snapshotter, chain):
            raise
        log.info("%s: mounted lazily as snapshot %s", what, chain)
        return "lazy"
    try:
        if try_lazy:
            log.warning("%s: cannot be mounted lazily (see the snapshotter's log): fetching "
                        "it whole", what)
        if not blobs.exists(layer.digest):
            if fetcher is None:
                raise UnpackError(f"{what}: not in the local store and no IPFS fetcher")
            fetcher.blob(layer, "layer")
        _apply_into(mounts, blobs.path(layer.digest), diff_id=diff_id, layer=what,
                    estargz=is_estargz(layer))
        try:
            snapshotter.commit(chain, key, _committed_labels(labels))
        except AlreadyExistsError:
            log.info("%s: snapshot %s committed meanwhile by another unpack", what, chain)
            snapshotter.remove(key)
    except BaseException:
        with contextlib.suppress(Exception):
            snapshotter.remove(key)
        raise
    log.info("%s: unpacked as snapshot %s", what, chain)
    return "full"


def _committed_labels(labels: Mapping[str, str]) -> dict[str, str]:
    # a fully unpacked layer must not carry remote labels: restore_remote() would try to
    # mount it lazily on top of its unpacked files
    return {k: v for k, v in labels.items()
            if k not in (LAYER_DIGEST_LABEL, TOC_DIGEST_LABEL, URLS_LABEL, PREFETCH_SIZE_LABEL,
                         SIZE_LABEL, TARGET_SNAPSHOT_LABEL, NEXT_LAYERS_LABEL)}


def unpack(
    name: str,
    manifest: Manifest,
    config: ImageConfig,
    snapshotter: Snapshotter,
    *,
    blobs: BlobStore,
    fetcher: BlobFetcher | None,
    lazy: bool,
    prefetch_size: int | None = None,
) -> UnpackResult:
    """:func:`unpack_layers` for an image's manifest and config."""
    return unpack_layers(name, manifest.layers, config.diff_ids, snapshotter, blobs=blobs,
                         fetcher=fetcher, lazy=lazy, prefetch_size=prefetch_size)
