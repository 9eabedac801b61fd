"""``ipfsnap image ipfs-push``: convert a local image to eStargz and add it to IPFS.

stdout gets the image's CID and nothing else (scripts do ``CID=$(ipfsnap image ipfs-push X)``);
progress goes to stderr when it is a terminal. The IPFS API is the explicit/discovered one, or
a managed node started in the background when there is none (as other IPFS commands do).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

from ipfsnap.cli.common import Context, parse_bool, print_line
from ipfsnap.errors import IPFSError

#: seconds one socket operation of an add may wait; the daemon answers an add only after it
#: has chunked and stored the whole blob, which for a few hundred MB can take a while
ADD_TIMEOUT = 300.0


def _level(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a gzip level: {text!r}") from None
    if not 0 <= value <= 9:
        raise argparse.ArgumentTypeError(f"gzip level must be 0..9, got {value}")
    return value


#: gzip level of converted layers: the reference's (and image.convert's DEFAULT_LEVEL, which
#: a test checks; importing it here would load the converter at start-up)
DEFAULT_LEVEL = 9


def cmd_ipfs_push(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.cli.ipfs_node import ensure_api
    from ipfsnap.content.store import ImageStore
    from ipfsnap.estargz.types import DEFAULT_CHUNK_SIZE
    from ipfsnap.image.convert import ConvertOptions
    from ipfsnap.image.errors import PushError
    from ipfsnap.image.push import PushOptions, push_image
    from ipfsnap.ipfs.client import IPFSClient
    from ipfsnap.ipfs.core import RetryPolicy
    from ipfsnap.oci import parse_platform
    from ipfsnap.progress import progress_for

    cfg = ctx.config
    platforms = tuple(parse_platform(p) for p in (args.platform or []))
    options = PushOptions(
        convert=ConvertOptions(
            estargz=args.estargz,
            level=args.level,
            chunk_size=DEFAULT_CHUNK_SIZE,
            prioritize=tuple(args.prioritize or ()),
            platforms=platforms,
            all_platforms=args.all_platforms,
        )
    )
    store = ImageStore(cfg.state_dir)
    record = store.get(args.ref)  # a missing image fails before any IPFS node is started
    api = ensure_api(cfg)
    with IPFSClient(
        api, auth=cfg.ipfs_auth, timeout=ADD_TIMEOUT, retry=RetryPolicy.from_config(cfg.blob)
    ) as client:
        # fail before a long conversion when the daemon is not there
        try:
            client.id()
        except IPFSError as exc:
            raise PushError(f"image {record.name}: cannot push: {exc}") from None
        if args.optimize:
            # image optimize's recording: each layer gets the files the workload read first
            from ipfsnap.cli.image_optimize import workload_from_args
            from ipfsnap.image.optimize import optimized_convert_options

            plan = optimized_convert_options(
                store, args.ref, workload_from_args(args), options.convert,
                state_dir=cfg.state_dir, platform=platforms[0] if platforms else None,
                output=sys.stderr.fileno(),
            )
            options = replace(options, convert=plan.options)
        elif args.estargz and args.layout == "startup" and not args.prioritize:
            # the files the image's own command reads at its start first (image/startup.py)
            from ipfsnap.image.convert import state_paths
            from ipfsnap.image.startup import push_layout

            per_layer = push_layout(store, args.ref, platforms=platforms,
                                    all_platforms=args.all_platforms,
                                    tmp_dir=state_paths(cfg.state_dir)[1])
            options = replace(options, convert=replace(options.convert,
                                                       prioritize_per_layer=per_layer,
                                                       rebuild_prioritized=False))
        result = push_image(
            store, args.ref, client, options, state_dir=cfg.state_dir, progress=progress_for()
        )
    print_line(result.cid)
    return 0


def register(group: argparse._SubParsersAction[Any]) -> None:
    p = group.add_parser(
        "ipfs-push",
        help="convert an image to eStargz and add it to IPFS; prints its CID",
        description=(
            "Convert the layers of a local image to eStargz, add every blob to IPFS "
            "(CIDv1, pinned) with ipfs:// urls, and print the CID of the image. "
            "The pushed image is also stored locally as ipfs://<CID>."
        ),
    )
    p.add_argument("ref", metavar="REF", help="local image name")
    p.add_argument(
        "--estargz",
        type=parse_bool,
        nargs="?",
        const=True,
        default=True,
        metavar="true|false",
        help="convert layers to eStargz (default true; false only adds ipfs urls)",
    )
    sel = p.add_mutually_exclusive_group()
    sel.add_argument(
        "--platform",
        action="append",
        metavar="OS/ARCH[/VARIANT]",
        help="platform to keep from an index (repeatable; default: this machine's)",
    )
    sel.add_argument("--all-platforms", action="store_true", help="keep every platform")
    p.add_argument(
        "--prioritize",
        action="append",
        metavar="PATH",
        help="file to put first in its layer, for prefetch (repeatable)",
    )
    p.add_argument(
        "--layout",
        choices=("startup", "plain"),
        default="startup",
        help="startup (default): the files the image's own command (Entrypoint + Cmd) reads "
        "at its start go first in each layer, so a lazy mount prefetches them; plain: the "
        "layers' own order (as the reference's ipfs-push). --prioritize and --optimize "
        "replace it",
    )
    p.add_argument(
        "--level",
        type=_level,
        default=DEFAULT_LEVEL,
        metavar="N",
        help=f"gzip level 0..9 (default {DEFAULT_LEVEL}, as the reference)",
    )
    p.add_argument(
        "--optimize",
        action="store_true",
        help="first run the image's command (or --args) once and put the files it reads "
        "first in each layer, for prefetch (as 'image optimize')",
    )
    from ipfsnap.cli.image_optimize import add_workload_options

    add_workload_options(p)
    p.set_defaults(func=cmd_ipfs_push)
