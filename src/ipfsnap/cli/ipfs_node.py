"""``ipfsnap ipfs daemon|swarm-key-gen|bootstrap``: the managed node and private networks."""

from __future__ import annotations

import argparse
from typing import Any


def register(group: argparse._SubParsersAction[Any]) -> None:
    """Add the managed-node sub-commands to the ``ipfs`` group."""
    return None
