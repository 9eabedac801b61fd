"""``ipfsnap ipfs ...`` commands (client side; the managed node's are in ipfs_node.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ipfsnap.cli import ipfs_node
from ipfsnap.cli.common import Context, parse_size, print_json
from ipfsnap.errors import UsageError


def _cid(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.ipfs.unixfs import compute_dag

    path = Path(args.file)
    try:
        info = compute_dag(sys.stdin.buffer if args.file == "-" else path)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if args.json:
        print_json({"cid": info.cid, "size": info.size, "dagSize": info.dag_size,
                    "blocks": info.blocks})
    else:
        sys.stdout.write(info.cid + "\n")
    return 0


def _client(ctx: Context) -> Any:
    from ipfsnap.ipfs.client import IPFSClient

    return IPFSClient.from_config(ctx.config)


def _id(args: argparse.Namespace, ctx: Context) -> int:
    with _client(ctx) as client:
        info = client.id()
        info["Api"] = client.endpoint.url
        print_json(info)
    return 0


def _cat(args: argparse.Namespace, ctx: Context) -> int:
    out = sys.stdout.buffer
    with _client(ctx) as client:
        client.cat_into(args.cid, args.offset, args.length, out.write)
    out.flush()
    return 0


def _add(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.progress import progress_for

    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"{path}: not a regular file")
    with _client(ctx) as client:
        result = client.add(path, pin=not args.no_pin, progress=progress_for())
    print_json({"cid": result.cid, "size": result.size, "dagSize": result.dag_size})
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``ipfsnap ipfs`` and its sub-commands."""
    parser = sub.add_parser("ipfs", help="IPFS: CIDs, the managed node, private networks")
    group = parser.add_subparsers(dest="ipfs_command", metavar="SUBCOMMAND")
    group.required = True

    p = group.add_parser(
        "cid", help="offline: the CID `ipfs add --cid-version=1` gives FILE (- = stdin)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="also print size, DAG size, blocks")
    p.set_defaults(func=_cid)

    p = group.add_parser("id", help="identity of the IPFS daemon the API points at (JSON)")
    p.set_defaults(func=_id)

    p = group.add_parser("cat", help="write a CID's bytes (or a range of them) to stdout")
    p.add_argument("cid", metavar="CID")
    p.add_argument("--offset", type=parse_size, default=0, help="first byte (default 0)")
    p.add_argument("--length", type=parse_size, default=None, help="bytes (default: to the end)")
    p.set_defaults(func=_cat)

    p = group.add_parser("add", help="add FILE (CIDv1, raw leaves, pinned); prints JSON")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--no-pin", action="store_true", help="do not pin")
    p.set_defaults(func=_add)

    ipfs_node.register(group)
