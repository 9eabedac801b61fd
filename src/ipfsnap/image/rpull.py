"""``rpull``: make an IPFS-enabled image usable before its layers are local.

Resolve the CID (root descriptor -> index -> manifest for the platform -> config, each blob
verified and stored), prepare one snapshot per layer (lazily mounted eStargz layers, or
fetched whole), and only then name the image ``ipfs://<CID>``: a failure leaves no name.

The snapshotter may be given as a factory (a :data:`SnapshotterSource`) that is called only
once the documents are resolved: the CLI connects to (or starts) the snapshotter service in
the background while the documents cross IPFS, so neither waits for the other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ipfsnap.content import ImageStore
from ipfsnap.image.resolve import (
    BlobFetcher,
    ClientSource,
    image_name,
    parse_ipfs_ref,
    resolve_remote,
)
from ipfsnap.oci import Descriptor, ImageConfig, Manifest, Platform
from ipfsnap.progress import Progress
from ipfsnap.snapshot import Snapshotter

# image.unpack is needed only once the documents are resolved: imported then (the CLI loads
# it in its background thread meanwhile, off the critical path; cli/rpull.py)
if TYPE_CHECKING:
    from ipfsnap.image.unpack import UnpackResult

log = logging.getLogger(__name__)

#: a snapshotter, or a factory giving one when it is first needed (after resolution)
SnapshotterSource = Snapshotter | Callable[[], Snapshotter]


@dataclass(frozen=True)
class PulledImage:
    """An rpulled image: its local name, documents and layer chain IDs (bottom first)."""

    name: str
    target: Descriptor
    manifest_descriptor: Descriptor
    manifest: Manifest
    config: ImageConfig
    chain_ids: tuple[str, ...]
    #: what unpacking did (None when no snapshotter was given)
    unpacked: UnpackResult | None = None
    #: descriptors of the blobs actually fetched from IPFS, in order
    fetched: tuple[Descriptor, ...] = ()


def rpull(
    ref: str,
    snapshotter: SnapshotterSource | None,
    *,
    client: ClientSource,
    images: ImageStore,
    platform: Platform | None = None,
    lazy: bool = True,
    prefetch_size: int | None = None,
    report: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> PulledImage:
    """Pull the IPFS-enabled image ``ref`` (``CID``, ``ipfs://CID``, ``/ipfs/CID``).

    With a ``snapshotter``, its layers become committed snapshots named by chain ID (lazily
    mounted when ``lazy`` and the snapshotter supports it); without one only the documents
    are stored (``run`` unpacks later with the snapshotter it uses). A factory is called
    once, after the documents are resolved and verified. ``report`` gets one
    ``fetching sha256:<8 hex>... <mediaType>`` line per blob fetched.
    """
    cid = parse_ipfs_ref(ref)
    name = image_name(cid)
    fetcher = BlobFetcher(client, images.blobs, report=report, progress=progress)
    # the lease keeps gc from sweeping blobs stored before the name exists
    with images.lease():
        t0 = time.monotonic()
        remote = resolve_remote(fetcher, cid, platform)
        log.info("image %s resolved in %.3f s (root descriptor and %d documents fetched)",
                 name, time.monotonic() - t0, len(fetcher.fetched))
        from ipfsnap.image.unpack import chain_ids, unpack

        result: UnpackResult | None = None
        if snapshotter is not None:
            snaps = snapshotter() if callable(snapshotter) else snapshotter
            result = unpack(name, remote.manifest, remote.config, snaps,
                            blobs=images.blobs, fetcher=fetcher, lazy=lazy,
                            prefetch_size=prefetch_size)
            chains = result.chain_ids
        else:
            chains = tuple(chain_ids(remote.config.diff_ids))
        images.put(name, remote.target, remote_layers=True)
    log.info("image %s pulled (%d layers, %d blobs fetched)", name, len(remote.manifest.layers),
             len(fetcher.fetched))
    return PulledImage(
        name=name,
        target=remote.target,
        manifest_descriptor=remote.manifest_descriptor,
        manifest=remote.manifest,
        config=remote.config,
        chain_ids=tuple(chains),
        unpacked=result,
        fetched=tuple(fetcher.fetched),
    )
