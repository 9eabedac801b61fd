"""``ipfsnap image optimize REF NEWREF``: record a workload, prioritize the files it reads.

Also the recording options ``ipfs-push --optimize`` shares (:func:`add_workload_options`,
:func:`workload_from_args`). stdout gets the new image's name and nothing else; the workload's
own output goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ipfsnap.cli.common import Context, print_line

# The recorder and converter (runc, tarfile, zstandard) load only when a command runs.
if TYPE_CHECKING:
    from ipfsnap.image.record import Workload

#: seconds the workload is recorded: image.record's DEFAULT_PERIOD (a test checks they agree;
#: importing it here would load the recorder at start-up)
DEFAULT_PERIOD = 10.0


def _period(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"period must be positive, got {text!r}")
    return value


def add_workload_options(p: argparse.ArgumentParser) -> None:
    """The options describing the recorded workload (optimize and ipfs-push --optimize)."""
    p.add_argument(
        "--args",
        metavar="ARGS",
        help='arguments replacing the image\'s Cmd: a JSON array (["-c", "echo hi"]) or a '
        "shell-quoted string",
    )
    p.add_argument(
        "--entrypoint",
        metavar="ARGS",
        help="replaces the image's Entrypoint (JSON array or shell-quoted string)",
    )
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="environment variable for the workload (repeatable)")
    p.add_argument("--cwd", metavar="DIR", help="working directory (default: the image's)")
    p.add_argument("--user", metavar="U", help="uid[:gid] or name (default: the image's)")
    p.add_argument(
        "--period",
        type=_period,
        default=DEFAULT_PERIOD,
        metavar="SECONDS",
        help=f"stop recording (kill the workload) after this long (default {DEFAULT_PERIOD:g})",
    )


def workload_from_args(args: argparse.Namespace) -> Workload:
    from ipfsnap.image.record import Workload, parse_command
    from ipfsnap.runtime import parse_env

    return Workload(
        args=parse_command(args.args, "--args") if args.args is not None else None,
        entrypoint=(parse_command(args.entrypoint, "--entrypoint")
                    if args.entrypoint is not None else None),
        env=tuple(parse_env(args.env)),
        cwd=args.cwd,
        user=args.user,
        period=args.period,
    )


def cmd_optimize(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.content.store import ImageStore
    from ipfsnap.image.convert import ConvertOptions
    from ipfsnap.image.optimize import optimize_image
    from ipfsnap.oci import parse_platform
    from ipfsnap.progress import progress_for

    cfg = ctx.config
    store = ImageStore(cfg.state_dir)
    store.get(args.ref)  # a missing image fails before anything runs
    platform = parse_platform(args.platform) if args.platform else None
    sys.stdout.flush()
    result = optimize_image(
        store,
        args.ref,
        args.new_ref,
        workload_from_args(args),
        ConvertOptions(),
        state_dir=cfg.state_dir,
        platform=platform,
        output=sys.stderr.fileno(),
        progress=progress_for(),
    )
    print_line(result.name)
    return 0


def register(group: argparse._SubParsersAction[Any]) -> None:
    p = group.add_parser(
        "optimize",
        help="record the files a workload reads and put them first in each eStargz layer",
        description=(
            "Run the image's command (or --args/--entrypoint) once in a container, record the "
            "files it opens in order, and store as NEWREF the image with every layer rebuilt "
            "as eStargz with those files before .prefetch.landmark (prefetched before the "
            "container starts when run lazily)."
        ),
    )
    p.add_argument("ref", metavar="REF", help="local image name")
    p.add_argument("new_ref", metavar="NEWREF", help="name for the optimized image")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="platform of an index to optimize (default: this machine's)")
    add_workload_options(p)
    p.set_defaults(func=cmd_optimize)
