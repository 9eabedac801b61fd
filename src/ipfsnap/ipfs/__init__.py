"""ipfsnap.ipfs: Kubo RPC client (sync and trio), API discovery, CIDs.

The managed node (``ipfsnap.ipfs.node``, ``ipfsnap.ipfs.pnet``) is imported on its own; this
package namespace only carries the client side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipfsnap._lazy import lazy_exports

if TYPE_CHECKING:
    from ipfsnap.ipfs.aclient import AsyncIPFSClient
    from ipfsnap.ipfs.cid import CID, normalize_cid, parse_cid, raw_cid
    from ipfsnap.ipfs.client import CIDReader, IPFSClient, endpoint_from_config
    from ipfsnap.ipfs.core import AddResult, BlockStat, FileStat, Peer, RetryPolicy
    from ipfsnap.ipfs.errors import (
        APINotFound,
        BadCID,
        BadMultiaddr,
        BadReply,
        DaemonUnreachable,
        IPFSCallError,
        IPFSHTTPError,
        IPFSNotFound,
        IPFSTimeout,
        ShortRead,
        StreamError,
    )
    from ipfsnap.ipfs.multiaddr import Endpoint, discover_api, parse_api
    from ipfsnap.ipfs.unixfs import DagInfo, compute_cid, compute_dag

__all__ = [
    "CID",
    "APINotFound",
    "AddResult",
    "AsyncIPFSClient",
    "BadCID",
    "BadMultiaddr",
    "BadReply",
    "BlockStat",
    "CIDReader",
    "DaemonUnreachable",
    "DagInfo",
    "Endpoint",
    "FileStat",
    "IPFSCallError",
    "IPFSClient",
    "IPFSHTTPError",
    "IPFSNotFound",
    "IPFSTimeout",
    "Peer",
    "RetryPolicy",
    "ShortRead",
    "StreamError",
    "compute_cid",
    "compute_dag",
    "discover_api",
    "endpoint_from_config",
    "normalize_cid",
    "parse_api",
    "parse_cid",
    "raw_cid",
]

# Submodules load on first use of one of their names (see ipfsnap._lazy).
if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_exports(__name__, __file__)
