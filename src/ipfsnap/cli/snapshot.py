"""``ipfsnap snapshotter`` (the daemon) and ``ipfsnap snapshot status|ls``.

``ipfsnap snapshotter --foreground`` runs the daemon in this process (systemd, and what an
on-demand start runs); plain ``ipfsnap snapshotter`` starts it in the background unless one
already runs; ``ipfsnap snapshotter stop`` unmounts every lazy layer it serves and stops it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Any

from ipfsnap.cli.common import Context, print_json
from ipfsnap.errors import UsageError
from ipfsnap.log import setup_logging

if TYPE_CHECKING:
    from ipfsnap.snapshot import Info

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this area's sub-commands to the top-level parser."""
    p = sub.add_parser(
        "snapshotter",
        help="the snapshotter daemon that owns the snapshots and lazy mounts",
        description="Run the snapshotter of the state dir (one per state dir). Without "
        "--foreground it is started in the background unless one is running. 'stop' "
        "unmounts every lazy layer it serves and stops it; a plain SIGTERM stops it but "
        "leaves the mounts to the next start.",
    )
    p.add_argument("action", nargs="?", choices=("start", "stop"), default="start",
                   help="start (default) or stop")
    p.add_argument("--foreground", action="store_true",
                   help="run in this process, logging to stderr (systemd)")
    p.add_argument("--grpc-address", metavar="PATH",
                   help="also serve containerd's snapshots gRPC API on this unix socket")
    p.set_defaults(func=cmd_snapshotter)

    p = sub.add_parser("snapshot", help="inspect the snapshots of the snapshotter")
    ssub = p.add_subparsers(dest="snapshot_command", metavar="COMMAND")
    ssub.required = True
    s = ssub.add_parser(
        "status",
        help="per lazy layer: size, fetched bytes and percent, state, last error",
    )
    s.add_argument("--json", action="store_true", help="JSON lines even on a terminal")
    s.set_defaults(func=cmd_status)
    s = ssub.add_parser("ls", help="list snapshots (JSON lines when not a terminal)")
    s.add_argument("--json", action="store_true", help="JSON lines even on a terminal")
    s.set_defaults(func=cmd_ls)


def cmd_snapshotter(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.service import SnapshotterClient, lock_holder, serve, start_daemon
    from ipfsnap.service.errors import ServiceUnavailable

    config = ctx.config
    if args.action == "stop":
        holder = lock_holder(config.state_dir)
        if holder is None:
            sys.stderr.write(f"no snapshotter runs for {config.state_dir}\n")
            return 0
        with SnapshotterClient(config.state_dir) as client:
            pid = client.stop()
        sys.stderr.write(f"snapshotter (pid {pid}) unmounted its layers and stopped\n")
        return 0
    if args.grpc_address and not args.foreground:
        # an on-demand start cannot pass the address on; a service manager runs this
        raise UsageError("--grpc-address needs --foreground (run it under systemd or similar)")
    if args.foreground:
        setup_logging(args.verbose, daemon=True)
        if args.grpc_address:
            from ipfsnap.service import Daemon
            from ipfsnap.service.grpc_server import daemon_hook

            daemon = Daemon(config)
            daemon.on_serve.append(daemon_hook(args.grpc_address))
            return daemon.run()
        return serve(config)
    holder = lock_holder(config.state_dir)
    if holder is not None:
        try:
            with SnapshotterClient(config.state_dir) as client:
                client.ping()
            sys.stderr.write(f"snapshotter already running (pid {holder})\n")
            return 0
        except ServiceUnavailable:
            pass
    pid = start_daemon(config)
    sys.stderr.write(f"started snapshotter (pid {pid}), log "
                     f"{config.state_dir / 'snapshotter.log'}\n")
    return 0


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                         + "\n")


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _not_running(ctx: Context) -> str:
    return (
        f"snapshotter not running for {ctx.config.state_dir}: no lazy layers are served "
        "(it starts with the next rpull, image mount or run --snapshotter stargz)"
    )


def cmd_status(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.service.client import connect_if_running

    # a query: ask a running snapshotter, never start one just to answer
    client = connect_if_running(ctx.config)
    if client is None:
        sys.stderr.write(_not_running(ctx) + "\n")
        return 0
    with client:
        states = client.status()
    if args.json or not sys.stdout.isatty():
        for s in states:
            print_json(s.to_json())
        return 0
    if not states:
        sys.stdout.write("no lazy layers\n")
        return 0
    rows = [["SNAPSHOT", "LAYER", "SIZE", "FETCHED", "%", "STATE", "LAST ERROR"]]
    for s in states:
        rows.append([
            _short(s.snapshot or "(none)", 24),
            _short(s.layer, 19),
            _human(s.size),
            _human(s.fetched),
            f"{s.percent:.1f}",
            s.state,
            _short(s.last_error, 60),
        ])
    _table(rows)
    return 0


def _walk_store(ctx: Context) -> list[Info]:
    """The snapshots of the lazy snapshotter's store, read in-process (it is not running)."""
    from ipfsnap.image.snapshotters import STARGZ, snapshotter_root
    from ipfsnap.snapshot.store import SnapshotStore

    root = snapshotter_root(ctx.config.state_dir, STARGZ)
    if not (root / "metadata.db").is_file():  # the store's database (snapshot/store.py)
        return []  # never used: nothing to list (and nothing to create for a query)
    # no RemoteFileSystem and no restore: opening the store mounts and unmounts nothing
    with SnapshotStore(root, restore=False) as store:
        return store.walk()


def cmd_ls(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.service.client import connect_if_running
    from ipfsnap.service.protocol import info_to_json
    from ipfsnap.snapshot import REMOTE_LABEL

    client = connect_if_running(ctx.config)
    if client is None:
        log.info("%s; listing the snapshots from its store", _not_running(ctx))
        infos = _walk_store(ctx)
    else:
        with client:
            infos = client.walk()
    if args.json or not sys.stdout.isatty():
        for i in infos:
            print_json(info_to_json(i))
        return 0
    if client is None:
        sys.stderr.write(_not_running(ctx) + "\n")
    rows = [["NAME", "KIND", "PARENT", "REMOTE"]]
    for i in infos:
        rows.append([_short(i.name, 40), str(i.kind), _short(i.parent, 40),
                     "yes" if REMOTE_LABEL in i.labels else ""])
    _table(rows)
    return 0
