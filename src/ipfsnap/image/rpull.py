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
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ipfsnap.content import ImageStore
from ipfsnap.image.resolve import (
    BlobFetcher,
    ClientSource,
    image_name,
    ipfs_cid,
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

#: compressed TOC bytes fetched ahead per layer at most: a 100k-entry layer's TOC is ~3 MB
#: gzipped (37 MB of JSON, docs/benchmarks.md "TOC open"), python's 2-9k-entry layers'
#: a few hundred KB; a bigger TOC is left to the layer worker alone
WARM_TOC_MAX = 16 << 20
#: which lazy layers' footers and TOCs :func:`warm_tocs` fetches as soon as the manifest is
#: known: "first" (default) = the first lazy layer only, whose mount the pull waits for
#: first; the others are warmed by the snapshotter while it mounts the first. Fetching all
#: of them here ("1"/"all") made the first layer's mount slower (3.64 vs 2.47 s, 2026-11-28,
#: docs/benchmarks.md "TOC in one request"): the blocks of all four TOCs then cross bitswap
#: at once, one after the other, and the first layer's wait behind the others'. The first
#: layer alone: its worker's footer and TOC read took 0.46-0.83 s instead of 1.04-1.44 s.
DEFAULT_TOC_AHEAD = "first"
#: environment switch (hello_bench's ``-ahead``/``-noahead`` modes): "first", "1"/"all",
#: or anything else (e.g. "0") for none
TOC_AHEAD_ENV = "IPFSNAP_TOC_AHEAD"


def toc_ahead_layers(layers: Sequence[Descriptor], mode: str) -> list[Descriptor]:
    """The lazy layers :data:`TOC_AHEAD_ENV`'s value ``mode`` asks to warm ahead."""
    from ipfsnap.image.unpack import ipfs_urls, is_estargz

    lazy = [layer for layer in layers if is_estargz(layer) and ipfs_urls(layer)]
    if mode in ("1", "all"):
        return lazy
    if mode == "first":
        return lazy[:1]
    return []


def warm_tocs(fetcher: BlobFetcher, layers: Sequence[Descriptor]) -> list[threading.Thread]:
    """Have the IPFS node fetch each lazy layer's footer and TOC now, in background threads,
    while the rest of the pull goes on (the config, the first layer's mount).

    A layer's worker (or its warm-up) reads the blob's end through the node (footer and
    TOC: fs.source.TailReader): DAG round trips to a peer that nothing could start before
    the manifest was known. Read here first, the blocks are local to the node (or already
    on their way) when the worker asks. The same range is read (estargz.footer.tail_start,
    aligned to IPFS's leaves), so the same blocks are fetched. The bytes read here are
    discarded: the worker reads and verifies the TOC itself (digest, limits) as before.
    """
    from ipfsnap.image.unpack import ipfs_urls, is_estargz

    threads = []
    for layer in layers:
        if not (is_estargz(layer) and ipfs_urls(layer)):
            continue
        t = threading.Thread(target=_warm_toc, args=(fetcher, layer),
                             name=f"warm TOC {layer.digest[7:19]}", daemon=True)
        t.start()
        threads.append(t)
    return threads


def _warm_toc(fetcher: BlobFetcher, layer: Descriptor) -> None:
    from ipfsnap.estargz.footer import (
        GZIP_FOOTER_SIZE,
        parse_gzip_footer,
        tail_read_size,
        tail_start,
    )
    from ipfsnap.ipfs.unixfs import CHUNK_SIZE

    t0 = time.monotonic()
    length = 0
    try:
        cid = ipfs_cid(layer, "layer")
        if layer.size < GZIP_FOOTER_SIZE:
            return
        # the range the layer worker reads first (its spec's toc_tail: the snapshotter's
        # IPFSNAP_TOC_TAIL, which a benchmark sets for this command too)
        start = tail_start(layer.size, tail_read_size(), CHUNK_SIZE)
        tail = fetcher.client.cat(cid, start, layer.size - start)
        # eStargz (gzip) only: others are left as they are
        toc_offset = parse_gzip_footer(tail[-GZIP_FOOTER_SIZE:])
        length = layer.size - GZIP_FOOTER_SIZE - toc_offset
        if toc_offset < start and 0 < length <= WARM_TOC_MAX:
            # a TOC bigger than the tail guess: the rest of it, as the worker will read it
            fetcher.client.cat_into(cid, toc_offset, start - toc_offset, lambda _piece: None)
    except Exception as exc:  # best effort: the worker meets (and reports) any real problem
        log.debug("layer %s: TOC not fetched ahead: %s", layer.digest, exc)
        return
    log.info("layer %s: footer and TOC (%d bytes) fetched ahead in %.3f s", layer.digest,
             length, time.monotonic() - t0)


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
        warm = None
        ahead = os.environ.get(TOC_AHEAD_ENV, "") or DEFAULT_TOC_AHEAD
        if snapshotter is not None and lazy:  # toc_ahead_layers: none for "0"
            def warm(manifest: Manifest) -> None:
                warm_tocs(fetcher, toc_ahead_layers(manifest.layers, ahead))
        remote = resolve_remote(fetcher, cid, platform, on_manifest=warm)
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
