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
from ipfsnap.errors import IpfsnapError, UsageError

if TYPE_CHECKING:
    from ipfsnap.image.containerd import ContainerdPull
    from ipfsnap.ipfs.client import IPFSClient

log = logging.getLogger(__name__)


#: rpull --snapshotter value -> containerd snapshotter name
CONTAINERD_SNAPSHOTTERS = {"stargz": "ipfsnap", "overlayfs": "overlayfs"}
#: seconds the warm request may take: the snapshotter answers at once (the warm-up runs in
#: its background); a snapshotter that does not answer in this time is left alone
WARM_TIMEOUT = 10.0



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
    if snapshotter == DEFAULT_SNAPSHOTTER:
        warm_containerd_command(ctx, pulled)
    return 0


def backend_key(name: str, namespace: str, chain_id: str) -> bool:
    """Whether ``name`` is how containerd's metadata store names, in the proxy snapshotter,
    its snapshot ``chain_id`` of ``namespace``: ``<namespace>/<id>/<chain_id>``."""
    ns, sep, rest = name.partition("/")
    sid, sep2, tail = rest.partition("/")
    return bool(sep and sep2) and ns == namespace and sid.isdigit() and tail == chain_id


def warm_containerd_command(ctx: Context, pulled: ContainerdPull) -> bool:
    """As ``image rpull`` does for its own pulls (``[run] warm_on_pull``): have the
    snapshotter read the image's command ahead in the image's top snapshot, found under the
    name containerd gave it; never fails the pull."""
    from ipfsnap.cli.rpull import warm_command
    from ipfsnap.service.client import SnapshotterClient
    from ipfsnap.snapshot import Kind

    top = pulled.unpacked.top
    if not (top and ctx.config.run.warm_on_pull and ctx.config.run.warm_bytes > 0):
        return False
    try:
        with SnapshotterClient(ctx.config.state_dir, timeout=WARM_TIMEOUT) as snaps:
            keys = [i.name for i in snaps.walk() if i.kind == Kind.COMMITTED
                    and backend_key(i.name, pulled.namespace, top)]
            if not keys:
                log.info("containerd image %s: its command is not read ahead: no snapshot "
                         "%s of namespace %s in the snapshotter", pulled.name, top,
                         pulled.namespace)
                return False
            # the newest, should containerd hold the chain twice
            key = max(keys, key=lambda k: int(k.split("/")[1]))
            return warm_command(ctx.config, snaps, key, pulled.config, pulled.name)
    except IpfsnapError as exc:  # the snapshotter's own API is not reachable from here
        log.info("containerd image %s: its command is not read ahead: %s", pulled.name, exc)
        return False
