"""``ipfsnap ipfs daemon|swarm-key-gen|bootstrap``: the managed node and private networks.

Also :func:`ensure_api`, which commands that need IPFS call: it returns a reachable API
address, starting the managed node in the background when none is found.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from ipfsnap.cli.common import Context
from ipfsnap.errors import IPFSError, UsageError
from ipfsnap.ipfs.multiaddr import Endpoint, parse_api, read_api_file

# The HTTP client (h11) and the node manager (urllib, subprocess) load when a command needs
# them, not when the command line is parsed.
if TYPE_CHECKING:
    from ipfsnap.config import Config
    from ipfsnap.ipfs.client import IPFSClient

log = logging.getLogger(__name__)

#: a discovered API must answer `id` this fast to count as reachable (it answers in ms)
_PROBE_TIMEOUT = 2.0
#: bootstrap edits are config writes on the daemon; they return at once
_RPC_TIMEOUT = 30.0


class NoIPFSAPI(IPFSError):
    """No IPFS API is reachable and the managed node is disabled."""


def register(group: argparse._SubParsersAction[Any]) -> None:
    """Add the managed-node sub-commands to the ``ipfs`` group."""
    p = group.add_parser(
        "daemon",
        help="run the managed IPFS node in the foreground (Kubo if on PATH, else js-ipfs)",
        description="Run a real IPFS node (loopback only, no public bootstrap) until "
        "SIGTERM/SIGINT. Honours REPO/swarm.key and LIBP2P_FORCE_PNET=1.",
    )
    p.add_argument("--repo", metavar="DIR", help="IPFS repo (default STATE_DIR/ipfs)")
    p.add_argument(
        "--api", metavar="ADDR", help="API listen multiaddr (default loopback, free port)"
    )
    p.add_argument(
        "--swarm",
        metavar="ADDR",
        action="append",
        help="swarm listen multiaddr (repeatable; default loopback, free port)",
    )
    p.add_argument("--offline", action="store_true", help="no swarm: serve local content only")
    p.set_defaults(func=cmd_daemon)

    p = group.add_parser(
        "swarm-key-gen",
        help="print a new private-network key (save it as REPO/swarm.key)",
    )
    p.set_defaults(func=cmd_swarm_key_gen)

    p = group.add_parser("bootstrap", help="edit a daemon's bootstrap list through its RPC API")
    sub = p.add_subparsers(dest="bootstrap_command", metavar="ACTION")
    sub.required = True
    q = sub.add_parser("list", help="print the bootstrap peers")
    q.set_defaults(func=cmd_bootstrap_list)
    q = sub.add_parser("add", help="add a bootstrap peer")
    q.add_argument("multiaddr", metavar="MULTIADDR", help="/ip4/.../tcp/.../p2p/PEERID")
    q.set_defaults(func=cmd_bootstrap_add)
    q = sub.add_parser("rm", help="remove bootstrap peers (--all: the whole list)")
    q.add_argument("--all", action="store_true", help="remove every bootstrap peer (required)")
    q.set_defaults(func=cmd_bootstrap_rm)


# --------------------------------------------------------------------------------------------
# finding or starting an API


def _candidate_repos(config: Config) -> list[Path]:
    """Where a running daemon's ``api`` file may be, in discovery order."""
    out = []
    if os.environ.get("IPFS_PATH"):
        out.append(Path(os.environ["IPFS_PATH"]))
    out.append(config.ipfs_repo)
    out.append(Path.home() / ".ipfs")
    return out


def _answers(endpoint: Endpoint) -> bool:
    from ipfsnap.ipfs.client import IPFSClient
    from ipfsnap.ipfs.core import RetryPolicy

    # a probe answers or not; retrying a dead daemon's port only delays the fallback
    no_retry = RetryPolicy(max_retries=0)
    try:
        with IPFSClient(endpoint, timeout=_PROBE_TIMEOUT, retry=no_retry) as client:
            client.id()
    except IPFSError as exc:
        log.info("IPFS API %s (from %s) does not answer: %s", endpoint, endpoint.source, exc)
        return False
    return True


def find_api(config: Config) -> Endpoint | None:
    """The explicit API (unchecked), else the first discovered one that answers ``id``."""
    if config.ipfs_api:
        return parse_api(config.ipfs_api, auth=config.ipfs_auth, source="explicit address")
    for repo in _candidate_repos(config):
        endpoint = read_api_file(repo / "api", auth=config.ipfs_auth)
        if endpoint is not None and _answers(endpoint):
            return endpoint
    return None


def ensure_api(config: Config) -> str:
    """A reachable IPFS API (URL): explicit, discovered, or a managed node started now.

    The managed node runs detached in the background (repo ``config.ipfs_repo``, log
    ``<repo>/daemon.log``) and outlives this process; stop it with ``kill`` on the pid in
    ``<repo>/ipfsnap-node.pid`` or run ``ipfsnap ipfs daemon`` in the foreground instead.
    """
    from ipfsnap.ipfs.node import LOG_FILE, ManagedNode

    found = find_api(config)
    if found is not None:
        return found.url
    if not config.managed_ipfs:
        raise NoIPFSAPI(
            "no IPFS API found (--ipfs-api, $IPFS_PATH/api, "
            f"{config.ipfs_repo / 'api'}, ~/.ipfs/api) and managed_ipfs is off"
        )
    node = ManagedNode(
        config.ipfs_repo, log_path=config.ipfs_repo / LOG_FILE, stop_with_parent=False
    )
    log.warning(
        "no IPFS API found: starting a managed IPFS node (%s) in the background, repo %s",
        node.implementation,
        config.ipfs_repo,
    )
    node.start()
    node.detach()
    log.warning("managed IPFS node ready: API %s, log %s", node.api_multiaddr, node.log_path)
    return node.api_url


def _client(ctx: Context) -> IPFSClient:
    from ipfsnap.ipfs.client import IPFSClient

    endpoint = find_api(ctx.config)
    if endpoint is None:
        raise NoIPFSAPI(
            "no IPFS API found: pass --ipfs-api, set IPFS_PATH, or run ipfsnap ipfs daemon"
        )
    return IPFSClient(endpoint, timeout=_RPC_TIMEOUT)


# --------------------------------------------------------------------------------------------
# commands


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signum)


def cmd_daemon(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.ipfs.node import ManagedNode, NodeError

    repo = Path(args.repo) if args.repo else ctx.config.ipfs_repo
    node = ManagedNode(repo, api=args.api, swarm=args.swarm, offline=args.offline)
    old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            node.start()
            sys.stdout.write(
                f"IPFS node ready: API {node.api_multiaddr} peer {node.peer_id} "
                f"({node.implementation}, repo {repo})\n"
            )
            sys.stdout.flush()
            code = node.wait()
        except _Stop as stop:
            log.info("signal %d: stopping the IPFS node", stop.signum)
            # a second signal while stopping must not abandon the daemon half-way
            for s in old:
                signal.signal(s, signal.SIG_IGN)
            node.stop()
            return 0
        raise NodeError(f"IPFS node {repo}: daemon exited with status {code}; see {node.log_path}")
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def cmd_swarm_key_gen(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.ipfs.pnet import generate_swarm_key

    sys.stdout.write(generate_swarm_key().to_text())
    sys.stdout.flush()
    return 0


def cmd_bootstrap_list(args: argparse.Namespace, ctx: Context) -> int:
    with _client(ctx) as client:
        for peer in client.bootstrap_list():
            sys.stdout.write(peer + "\n")
    return 0


def cmd_bootstrap_add(args: argparse.Namespace, ctx: Context) -> int:
    with _client(ctx) as client:
        for peer in client.bootstrap_add(args.multiaddr):
            sys.stdout.write(f"added {peer}\n")
    return 0


def cmd_bootstrap_rm(args: argparse.Namespace, ctx: Context) -> int:
    if not args.all:
        raise UsageError("bootstrap rm: only --all is supported (then add the peers you want)")
    with _client(ctx) as client:
        for peer in client.bootstrap_rm_all():
            sys.stdout.write(f"removed {peer}\n")
    return 0
