"""``ipfsnap --containerd SOCKET [--namespace NS] image rpull --ipfs CID``: pull an
IPFS-enabled image into a running containerd, unpacked with the ``ipfsnap`` proxy
snapshotter (see :mod:`ipfsnap.image.containerd` and docs/containerd.md), or with
``--snapshotter overlayfs`` into containerd's own overlayfs (every layer fetched whole).

``image rpull`` hands over here when the global ``--containerd`` option is given. Output as
the plain rpull: one ``fetching sha256:<8 hex>... <mediaType>`` line per blob fetched from
IPFS, then nothing else.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from ipfsnap.cli.common import Context, print_line
from ipfsnap.errors import UsageError

if TYPE_CHECKING:
    from ipfsnap.ipfs.client import IPFSClient

log = logging.getLogger(__name__)


#: rpull --snapshotter value -> containerd snapshotter name
CONTAINERD_SNAPSHOTTERS = {"stargz": "ipfsnap", "overlayfs": "overlayfs"}



def cmd_rpull_containerd(args: argparse.Namespace, ctx: Context) -> int:
    """rpull through the containerd at ``--containerd`` (image named by its CID)."""
    from ipfsnap.cli.rpull import ipfs_client
    from ipfsnap.image.containerd import DEFAULT_SNAPSHOTTER, rpull_containerd
    from ipfsnap.oci import parse_platform
    from ipfsnap.progress import progress_for

    if not args.ipfs:
        raise UsageError("image rpull: only IPFS images are supported: pass --ipfs")
    # rpull's --snapshotter names ipfsnap's snapshotters; in containerd, the lazy one is
    # the ipfsnap proxy plugin and overlayfs is containerd's own (layers fetched whole)
    snapshotter = CONTAINERD_SNAPSHOTTERS.get(args.snapshotter, DEFAULT_SNAPSHOTTER)
    clients: list[IPFSClient] = []

    def client() -> IPFSClient:
        clients.append(ipfs_client(ctx.config))
        return clients[-1]

    try:
        pulled = rpull_containerd(
            args.ref, ctx.args.containerd, client=client, state_dir=ctx.config.state_dir,
            namespace=ctx.args.namespace, snapshotter=snapshotter,
            platform=parse_platform(args.platform) if args.platform else None,
            prefetch_size=ctx.config.prefetch_size or None, report=print_line,
            progress=progress_for(),
        )
    finally:
        for c in clients:
            c.close()
    log.info("containerd image %s: %s", pulled.name,
             ", ".join(f"{r.chain_id[:19]} {r.how}" for r in pulled.unpacked.layers))
    return 0
