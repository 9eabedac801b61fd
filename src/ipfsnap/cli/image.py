"""``ipfsnap image ...``: the local image store (import, pull, ls, rm, tag, export, gc).

Other areas add their sub-commands (ipfs-push, rpull, mount ...) to the same ``image`` group:
write a module with ``register(group)`` taking the group's sub-parsers action and call it at
the end of :func:`register` below.

Output: ``import``/``pull``/``tag`` print the affected names, one per line, on stdout.
``ls`` prints a table when stdout is a terminal and JSON lines (one object per image: name,
digest, media_type, size, updated) when it is not, so scripts never parse the table; ``--json``
forces JSON lines, ``-q`` prints names only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipfsnap.cli.common import Context, print_json

# Each command imports what it runs, so start-up and `image ls` stay cheap (the archive and
# registry code pulls in zstandard, tarfile and http.client).
if TYPE_CHECKING:
    from ipfsnap.content import ImageStore
    from ipfsnap.oci import Platform


def _store(ctx: Context) -> ImageStore:
    from ipfsnap.content.store import ImageStore

    return ImageStore(ctx.config.state_dir)


def _platform(args: argparse.Namespace) -> Platform | None:
    from ipfsnap.oci import parse_platform

    text = getattr(args, "platform", None)
    return parse_platform(text) if text else None


def cmd_import(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.content.archive import import_image
    from ipfsnap.progress import progress_for

    records = import_image(_store(ctx), Path(args.path), args.name, progress_for())
    for r in records:
        sys.stdout.write(f"{r.name} {r.target.digest}\n")
    return 0


def cmd_pull(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.content.registry import pull_image
    from ipfsnap.progress import progress_for

    record = pull_image(
        _store(ctx),
        args.ref,
        plain_http=args.plain_http,
        platform=_platform(args),
        all_platforms=args.all_platforms,
        progress=progress_for(),
    )
    sys.stdout.write(f"{record.name} {record.target.digest}\n")
    return 0


def _size(store: ImageStore, record: Any) -> int:
    """Bytes of the blobs of this image present locally (all platforms)."""
    total = 0
    seen: set[str] = set()
    for desc in store.walk(record.target):
        if desc.digest not in seen and store.blobs.exists(desc.digest):
            seen.add(desc.digest)
            total += desc.size
    return total


def cmd_ls(args: argparse.Namespace, ctx: Context) -> int:
    store = _store(ctx)
    records = store.list()
    if args.quiet:
        for r in records:
            sys.stdout.write(r.name + "\n")
        return 0
    if args.json or not sys.stdout.isatty():
        for r in records:
            print_json(
                {
                    "name": r.name,
                    "digest": r.target.digest,
                    "media_type": r.target.media_type,
                    "size": _size(store, r),
                    "updated": r.updated,
                    "remote_layers": r.remote_layers,
                }
            )
        return 0
    rows = [("NAME", "DIGEST", "TYPE", "SIZE", "UPDATED")]
    for r in records:
        kind = (
            "index"
            if "index" in r.target.media_type or "list" in r.target.media_type
            else "manifest"
        )
        rows.append(
            (
                r.name,
                r.target.digest[:19],
                kind,
                f"{_size(store, r) / 1e6:.1f} MB",
                time.strftime("%Y-%m-%d %H:%M", time.localtime(r.updated)),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        sys.stdout.write(
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n"
        )
    return 0


def cmd_rm(args: argparse.Namespace, ctx: Context) -> int:
    store = _store(ctx)
    for ref in args.refs:
        record = store.remove(ref)
        sys.stdout.write(record.name + "\n")
    return 0


def cmd_tag(args: argparse.Namespace, ctx: Context) -> int:
    record = _store(ctx).tag(args.src, args.dst)
    sys.stdout.write(record.name + "\n")
    return 0


def cmd_export(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.content.archive import export_image

    export_image(_store(ctx), args.ref, Path(args.file))
    return 0


def cmd_gc(args: argparse.Namespace, ctx: Context) -> int:
    result = _store(ctx).gc()
    sys.stdout.write(f"removed {len(result.removed)} blobs, {result.freed_bytes} bytes\n")
    return 0


def add_store_commands(group: argparse._SubParsersAction[Any]) -> None:
    p = group.add_parser("import", help="import an OCI layout, oci-archive or docker-archive")
    p.add_argument("path", help="OCI layout directory or archive (tar, optionally gzipped)")
    p.add_argument("--name", metavar="REF", help="name to give the image")
    p.set_defaults(func=cmd_import)

    p = group.add_parser("pull", help="pull an image from an OCI registry")
    p.add_argument("ref", help="image reference, e.g. localhost:5000/app:1")
    p.add_argument(
        "--plain-http",
        action="store_true",
        help="use HTTP instead of HTTPS (always for loopback registries)",
    )
    sel = p.add_mutually_exclusive_group()
    sel.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="platform to fetch from an index (default: this machine's)",
    )
    sel.add_argument("--all-platforms", action="store_true", help="fetch every platform")
    p.set_defaults(func=cmd_pull)

    p = group.add_parser("ls", help="list local images")
    p.add_argument("--json", action="store_true", help="JSON lines even on a terminal")
    p.add_argument("-q", "--quiet", action="store_true", help="names only")
    p.set_defaults(func=cmd_ls)

    p = group.add_parser("rm", help="remove image names (blobs go with 'image gc')")
    p.add_argument("refs", nargs="+", metavar="REF")
    p.set_defaults(func=cmd_rm)

    p = group.add_parser("tag", help="give an image another name")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.set_defaults(func=cmd_tag)

    p = group.add_parser("export", help="write an image as an oci-archive")
    p.add_argument("ref", metavar="REF")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=cmd_export)

    p = group.add_parser("gc", help="delete blobs no image name refers to")
    p.set_defaults(func=cmd_gc)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``ipfsnap image`` and its sub-commands to the top-level parser."""
    parser = sub.add_parser("image", help="images: local store, registry pulls, IPFS")
    group = parser.add_subparsers(dest="image_command", metavar="SUBCOMMAND")
    group.required = True
    add_store_commands(group)
    # other areas: add `<module>.register(group)` here
    from ipfsnap.cli import rpull

    rpull.register(group)
    from ipfsnap.cli import image_push

    image_push.register(group)
    from ipfsnap.cli import image_optimize

    image_optimize.register(group)
