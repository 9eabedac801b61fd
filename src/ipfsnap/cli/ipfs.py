"""``ipfsnap ipfs ...`` commands (client side; the managed node's are in ipfs_node.py)."""

from __future__ import annotations

import argparse
from typing import Any

from ipfsnap.cli import ipfs_node


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``ipfsnap ipfs`` and its sub-commands."""
    parser = sub.add_parser("ipfs", help="IPFS: CIDs, the managed node, private networks")
    group = parser.add_subparsers(dest="ipfs_command", metavar="SUBCOMMAND")
    group.required = True
    ipfs_node.register(group)
