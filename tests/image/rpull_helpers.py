"""Helpers of the rpull tests: IPFS-enabled images built and added in the test itself.

:func:`push` converts layer tars (eStargz with the real builder, or plain gzip), adds every
blob bottom-up to an IPFS node, sets the ``ipfs://`` urls, and adds the compact root
descriptor, as ipfs-push does. Hooks corrupt single descriptors for the negative tests.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ipfsnap.config import Config
from ipfsnap.content.sample import gzip_bytes
from ipfsnap.estargz import BuildOptions, build
from ipfsnap.fs import LayerMounter
from ipfsnap.image.snapshotters import snapshotter_root
from ipfsnap.ipfs import IPFSClient
from ipfsnap.oci import (
    Descriptor,
    Index,
    Manifest,
    canonical_json,
    host_platform,
    mediatypes,
    sha256_digest,
)
from ipfsnap.snapshot import SnapshotStore

#: small chunks so that files span several chunks without big fixtures
CHUNK = 64 * 1024

DescHook = Callable[[Descriptor], Descriptor]


@dataclass
class PushedImage:
    cid: str
    root: Descriptor
    index: Descriptor
    manifest: Descriptor
    config: Descriptor
    layers: list[Descriptor]
    diff_ids: list[str]
    #: compressed blob bytes by layer digest (what the node holds)
    blobs: dict[str, bytes] = field(default_factory=dict)


def _add(client: IPFSClient, data: bytes) -> str:
    return client.add(io.BytesIO(data)).cid


def push(
    client: IPFSClient,
    tars: Sequence[bytes],
    estargz: Sequence[bool],
    *,
    layer_hook: Callable[[int, Descriptor], Descriptor] | None = None,
    config_hook: DescHook | None = None,
    chunk_size: int = CHUNK,
) -> PushedImage:
    """Add an IPFS-enabled image of ``tars`` (bottom first) to the node behind ``client``."""
    layers: list[Descriptor] = []
    diff_ids: list[str] = []
    blobs: dict[str, bytes] = {}
    for i, (tar, lazy) in enumerate(zip(tars, estargz, strict=True)):
        if lazy:
            out = io.BytesIO()
            opts = BuildOptions(chunk_size=chunk_size, level=1, workers=1)
            res = build(io.BytesIO(tar), out, opts)
            blob = out.getvalue()
            annotations = res.annotations()
            diff_id = res.diff_id
        else:
            blob = gzip_bytes(tar)
            annotations = {}
            diff_id = sha256_digest(tar)
        cid = _add(client, blob)
        desc = Descriptor(mediatypes.OCI_LAYER_GZIP, sha256_digest(blob), len(blob),
                          urls=(f"ipfs://{cid}",), annotations=annotations)
        if layer_hook is not None:
            desc = layer_hook(i, desc)
        blobs[desc.digest] = blob
        layers.append(desc)
        diff_ids.append(diff_id)
    plat = host_platform()
    config = canonical_json({
        "architecture": plat.architecture,
        "os": plat.os,
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    cdesc = Descriptor(mediatypes.OCI_CONFIG, sha256_digest(config), len(config),
                       urls=(f"ipfs://{_add(client, config)}",))
    if config_hook is not None:
        cdesc = config_hook(cdesc)
    manifest = Manifest(mediatypes.OCI_MANIFEST, cdesc, tuple(layers)).to_bytes()
    mdesc = Descriptor(mediatypes.OCI_MANIFEST, sha256_digest(manifest), len(manifest),
                       urls=(f"ipfs://{_add(client, manifest)}",), platform=plat)
    index = Index(mediatypes.OCI_INDEX, (mdesc,)).to_bytes()
    idesc = Descriptor(mediatypes.OCI_INDEX, sha256_digest(index), len(index),
                       urls=(f"ipfs://{_add(client, index)}",))
    root = replace(idesc)
    cid = _add(client, json.dumps(root.to_dict(), separators=(",", ":")).encode())
    return PushedImage(cid, root, idesc, mdesc, cdesc, layers, diff_ids, blobs)


def lazy_config(state: Path, api: str, *, timeout: int = 30) -> Config:
    """A config for deterministic lazy reads: no prefetch, no background fetch."""
    cfg = Config(state_dir=state, ipfs_api=api)
    cfg.no_background_fetch = True
    cfg.noprefetch = True
    cfg.blob.fetching_timeout_sec = timeout
    cfg.blob.max_retries = 2
    cfg.blob.neighbour_span = 0  # only the chunks read are fetched
    return cfg


def lazy_store(cfg: Config) -> SnapshotStore:
    mounter = LayerMounter(cfg, ready_timeout=120,
                           extra={"status_interval": 0.1, "log_level": "DEBUG"})
    return SnapshotStore(snapshotter_root(cfg.state_dir, "stargz"), remote=mounter)


def full_store(cfg: Config) -> SnapshotStore:
    return SnapshotStore(snapshotter_root(cfg.state_dir, "overlayfs"), restore=False)


@contextlib.contextmanager
def closing_lazy(store: SnapshotStore) -> Iterator[SnapshotStore]:
    """Unmount every lazy layer of ``store`` when done (no worker outlives the test)."""
    try:
        yield store
    finally:
        store.close(unmount_remote=True)


def unmount_state(state: Path) -> None:
    """Stop what CLI runs left behind under ``state``: the snapshotter service (it unmounts
    its lazy layers), then any lazy layer still mounted."""
    from ipfsnap.service import paths
    from ipfsnap.service.client import SnapshotterClient

    if paths.lock_holder(state) is not None:
        with SnapshotterClient(state) as client:
            client.stop()
    root = snapshotter_root(state, "stargz")
    if root.is_dir():
        cfg = Config(state_dir=state)
        SnapshotStore(root, remote=LayerMounter(cfg), restore=False).close(unmount_remote=True)
