"""``ipfsnap image rpull --ipfs REF``, ``ipfsnap image mount REF TARGET``,
``ipfsnap image unmount TARGET``; and the snapshotter stores ``run`` uses.

Snapshot stores: one per snapshotter, at :func:`ipfsnap.image.snapshotters.snapshotter_root`
(``<state_dir>/snapshots/stargz`` with the lazy layer filesystem, ``.../overlayfs`` without).
The stargz one is served by the snapshotter service (``ipfsnap.service``, started on demand),
the overlayfs one is opened in-process: see :func:`open_snapshotter`.

Output: rpull prints one ``fetching sha256:<8 hex>... <mediaType>`` line per blob fetched on
stdout, as the reference's ``ctr-remote image rpull`` does, and nothing else.

rpull's critical path is CLI start -> documents resolved through IPFS (3-4 sequential round
trips, each through the local node to a peer) -> one prepare per layer. Connecting to the
snapshotter service (or starting it, ~1 s) does not depend on the documents, so :func:`pull`
does it in a background thread while the main thread resolves.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ipfsnap.cli.common import Context, print_line
from ipfsnap.errors import IpfsnapError, NotFoundError, UsageError
from ipfsnap.image.snapshotters import SNAPSHOTTERS, STARGZ, is_lazy, snapshotter_root

# What a command runs is imported when it runs: parsing the command line must not load the
# IPFS client, the unpacker or the snapshot store (see tests/cli/test_startup.py).
if TYPE_CHECKING:
    from ipfsnap.config import Config
    from ipfsnap.content import ResolvedImage
    from ipfsnap.image.rpull import PulledImage
    from ipfsnap.ipfs.client import IPFSClient
    from ipfsnap.oci import ImageConfig, Platform
    from ipfsnap.snapshot import Snapshotter

log = logging.getLogger(__name__)

T = TypeVar("T")

#: key prefix of the view snapshots ``image mount`` creates (the target path follows)
MOUNT_KEY_PREFIX = "ipfsnap-mount "


# ---------------------------------------------------------------------------------------------
# stores and clients


@contextlib.contextmanager
def open_snapshotter(config: Config, name: str) -> Iterator[Snapshotter]:
    """The snapshots of snapshotter ``name``.

    stargz: the snapshotter service of the state dir (started on demand), which owns the
    store at ``snapshotter_root(state_dir, "stargz")`` and its lazy layer mounts; the
    service outlives this command, so the mounts stay served. overlayfs: the store at
    ``snapshotter_root(state_dir, "overlayfs")``, in-process (plain directories, nothing to
    serve).
    """
    if is_lazy(name):
        from ipfsnap.service.client import connect_or_start

        client = connect_or_start(config, ipfs_api=lambda: request_api(config))
        try:
            yield client
        finally:
            client.close()
        return
    from ipfsnap.snapshot.store import SnapshotStore

    store = SnapshotStore(snapshotter_root(config.state_dir, name), restore=False)
    try:
        yield store
    finally:
        store.close()


def request_api(config: Config) -> str | None:
    """The IPFS API this command's lazy layers are fetched from (sent with each request, so
    a snapshotter started earlier with another API serves them from this one): the API the
    command was given or resolved, else a discovered one that answers; None leaves it to the
    snapshotter's own configuration."""
    from ipfsnap.cli.ipfs_node import find_api

    found = find_api(config)
    return found.url if found is not None else None


def resolve_api(config: Config) -> str:
    """The configured IPFS API (URL), or a discovered one, or a managed node's started now;
    recorded in ``config`` so the snapshotter and the lazy layer workers use the same one."""
    from ipfsnap.cli.ipfs_node import ensure_api, find_api

    # an explicit address is used unchecked (as ensure_api does); asking find_api directly
    # skips ensure_api's import of the managed-node code (~0.1 s of rpull's critical path)
    found = find_api(config) if config.ipfs_api else None
    api = found.url if found is not None else ensure_api(config)
    config.ipfs_api = api
    return api


def ipfs_client(config: Config) -> IPFSClient:
    """A client of the configured IPFS API, or of a managed node started now (and the API
    recorded in ``config`` so the lazy layer workers use the same one)."""
    from ipfsnap.ipfs.client import IPFSClient
    from ipfsnap.ipfs.core import RetryPolicy

    api = resolve_api(config)
    return IPFSClient(api, auth=config.ipfs_auth, retry=RetryPolicy.from_config(config.blob))


class EnteredInBackground(Generic[T]):
    """A context manager entered in a thread started now: :meth:`get` waits for its value
    (raising what entering raised), :meth:`close` waits and exits it. For work a command
    needs later that does not depend on what it does first."""

    def __init__(self, cm: AbstractContextManager[T], name: str) -> None:
        self._cm = cm
        self._value: T | None = None
        self._error: BaseException | None = None
        self._entered = False
        self._thread = threading.Thread(target=self._enter, name=name, daemon=True)
        self._thread.start()

    def _enter(self) -> None:
        try:
            self._value = self._cm.__enter__()
            self._entered = True
        except BaseException as exc:  # handed to the caller by get()
            self._error = exc

    def get(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._entered
        return self._value  # type: ignore[return-value]  # set when entered

    def close(self) -> None:
        self._thread.join()
        if self._entered:
            self._entered = False
            self._cm.__exit__(None, None, None)


@contextlib.contextmanager
def _snapshotter_for_pull(config: Config, name: str,
                          main_imported: threading.Event) -> Iterator[Snapshotter]:
    """:func:`open_snapshotter`, then the unpacker's import: what rpull needs once the
    documents are resolved (~0.05-0.1 s), done while the main thread waits for IPFS. Only
    after ``main_imported``: two threads importing overlapping module sets at once could
    each wait for a module the other is importing."""
    t0 = time.monotonic()
    with open_snapshotter(config, name) as snaps:
        main_imported.wait()
        import ipfsnap.image.unpack  # noqa: F401

        log.info("snapshotter %s ready for the pull after %.3f s", name,
                 time.monotonic() - t0)
        yield snaps



def _prefetch(config: Config) -> int | None:
    return config.prefetch_size or None


def pull(ctx: Context, ref: str, snapshotter: str | None,
         platform: Platform | None = None) -> PulledImage:
    """rpull ``ref`` into the local store, unpacking into ``snapshotter`` (None: documents
    only). The snapshotter is opened in the background while the documents are resolved."""
    # the API first: a snapshotter started now must be given the same one
    resolve_api(ctx.config)
    log.info("rpull %s: resolving through IPFS", ref)
    with contextlib.ExitStack() as stack:
        snaps: Callable[[], Snapshotter] | None = None
        main_imported = threading.Event()
        if snapshotter:
            opening = EnteredInBackground(
                _snapshotter_for_pull(ctx.config, snapshotter, main_imported),
                f"open snapshotter {snapshotter}")
            stack.callback(opening.close)
            snaps = opening.get
        # (runs before opening.close, which waits for the thread) when an import below fails
        stack.callback(main_imported.set)
        from ipfsnap.content.store import ImageStore
        from ipfsnap.image.rpull import rpull
        from ipfsnap.progress import progress_for

        main_imported.set()

        images = ImageStore(ctx.config.state_dir)
        client = stack.enter_context(ipfs_client(ctx.config))
        lazy = snapshotter is not None and is_lazy(snapshotter)
        pulled = rpull(ref, snaps, client=client, images=images, platform=platform,
                       lazy=lazy, prefetch_size=_prefetch(ctx.config), report=print_line,
                       progress=progress_for())
        if lazy and snaps is not None:
            top = pulled.unpacked.top if pulled.unpacked is not None else ""
            warm_command(ctx.config, snaps(), top, pulled.config, pulled.name)
        return pulled


def warm_command(config: Config, snaps: Snapshotter, top: str, image_config: ImageConfig,
                 name: str) -> bool:
    """Ask the snapshotter to read ahead the files the image's own command will exec, in
    its committed snapshot ``top`` (service/warmups.py; ``[run] warm_on_pull``); never fails
    the pull."""
    from ipfsnap.service.client import SnapshotterClient

    cfg = image_config
    args = [*(cfg.entrypoint or []), *(cfg.cmd or [])]  # what `run` runs without a command
    if not (config.run.warm_on_pull and config.run.warm_bytes > 0 and top and args
            and isinstance(snaps, SnapshotterClient)):
        return False
    try:
        started = snaps.warm(top, args, cfg.env, cfg.working_dir or "/")
    except IpfsnapError as exc:  # e.g. a snapshotter of an older version still running
        log.info("image %s: its command is not read ahead: %s", name, exc)
        return False
    if started:
        log.info("image %s: the snapshotter reads the files of %r ahead", name, args[0])
    return started


def layer_snapshots(
    ctx: Context, snaps: Snapshotter, image: ResolvedImage, snapshotter: str
) -> str:
    """Every layer of ``image`` a committed snapshot in ``snaps`` (lazily for a lazy
    snapshotter; layers missing locally are fetched from IPFS); returns the top chain ID."""
    from ipfsnap.content.store import ImageStore
    from ipfsnap.image.resolve import BlobFetcher
    from ipfsnap.image.unpack import unpack
    from ipfsnap.progress import progress_for

    images = ImageStore(ctx.config.state_dir)
    clients: list[IPFSClient] = []

    def client() -> IPFSClient:
        clients.append(ipfs_client(ctx.config))
        return clients[-1]

    fetcher = BlobFetcher(client, images.blobs, progress=progress_for())
    try:
        with images.lease():
            result = unpack(image.record.name, image.manifest, image.config, snaps,
                            blobs=images.blobs, fetcher=fetcher, lazy=is_lazy(snapshotter),
                            prefetch_size=_prefetch(ctx.config))
    finally:
        for c in clients:
            c.close()
    if not result.top:
        raise UsageError(f"image {image.record.name}: has no layers")
    return result.top


def resolve_or_pull(ctx: Context, ref: str, platform: Platform | None) -> ResolvedImage:
    """A local image by name; an IPFS ref (CID, ipfs://CID, /ipfs/CID) not yet stored is
    rpulled first (documents only)."""
    from ipfsnap.content.errors import ImageNotFound
    from ipfsnap.content.store import ImageStore
    from ipfsnap.image.errors import BadImageRef
    from ipfsnap.image.resolve import image_name, parse_ipfs_ref

    store = ImageStore(ctx.config.state_dir)
    cid: str | None = None
    with contextlib.suppress(BadImageRef):
        cid = parse_ipfs_ref(ref)
    candidates = [ref] if cid is None else [ref, image_name(cid)]
    first: Exception | None = None
    for name in candidates:
        try:
            return store.resolve(name, platform)
        except (ImageNotFound, UsageError) as exc:
            first = first or exc
    if cid is None:
        assert first is not None
        raise first
    pull(ctx, image_name(cid), None, platform)
    return store.resolve(image_name(cid), platform)


# ---------------------------------------------------------------------------------------------
# commands


def _platform(args: argparse.Namespace) -> Platform | None:
    from ipfsnap.oci import parse_platform

    return parse_platform(args.platform) if args.platform else None


def cmd_rpull(args: argparse.Namespace, ctx: Context) -> int:
    if ctx.args.containerd:  # pull into a running containerd (issue 7)
        from ipfsnap.cli.containerd import cmd_rpull_containerd

        return cmd_rpull_containerd(args, ctx)
    if not args.ipfs:
        raise UsageError("image rpull: only IPFS images are supported: pass --ipfs")
    pull(ctx, args.ref, args.snapshotter, _platform(args))
    return 0


def _mount_key(target: Path) -> str:
    return MOUNT_KEY_PREFIX + os.path.abspath(target)


def cmd_mount(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.snapshot.mount import mount_all

    target = Path(args.target)
    if not target.is_dir():
        raise UsageError(f"image mount: target {target} is not a directory")
    image = resolve_or_pull(ctx, args.ref, _platform(args))
    key = _mount_key(target)
    with open_snapshotter(ctx.config, args.snapshotter) as snaps:
        top = layer_snapshots(ctx, snaps, image, args.snapshotter)
        mounts = snaps.view(key, top, {"ipfsnap.io/image": image.record.name})
        # the image's files on the host, where no container spec applies: its setuid
        # binaries must not give a local user root, its device nodes must not open
        for m in mounts:
            m.options = [*m.options, "nosuid", "nodev"]
        try:
            mount_all(mounts, target)
        except BaseException:
            with contextlib.suppress(Exception):
                snaps.remove(key)
            raise
    log.info("image %s mounted read-only at %s", image.record.name, target)
    return 0


def cmd_unmount(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.snapshot.mount import unmount as unmount_path

    target = Path(args.target)
    key = _mount_key(target)
    found = False
    unmount_path(target)
    for name in SNAPSHOTTERS:
        if not snapshotter_root(ctx.config.state_dir, name).is_dir():
            continue  # never used: nothing mounted from it (and no service to start)
        with open_snapshotter(ctx.config, name) as snaps:
            try:
                snaps.remove(key)
                found = True
            except NotFoundError:
                continue
    if not found:
        raise NotFoundError(f"image unmount: no image is mounted at {os.path.abspath(target)}")
    return 0


def register(group: argparse._SubParsersAction[Any]) -> None:
    """Add rpull, mount and unmount to the ``image`` group."""
    p = group.add_parser("rpull", help="pull an IPFS-enabled image lazily (eStargz layers "
                         "mounted on demand)")
    p.add_argument("--ipfs", action="store_true", help="REF is an IPFS CID (required)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="platform to pull from an index (default: this machine's)")
    p.add_argument("--snapshotter", choices=SNAPSHOTTERS, default=STARGZ,
                   help="stargz: lazy layers (default); overlayfs: layers fetched whole")
    p.add_argument("ref", metavar="REF", help="CID, ipfs://CID or /ipfs/CID")
    p.set_defaults(func=cmd_rpull)

    p = group.add_parser("mount", help="mount an image's read-only rootfs (pulls if needed)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]")
    p.add_argument("--snapshotter", choices=SNAPSHOTTERS, default=STARGZ)
    p.add_argument("ref", metavar="REF", help="image name, CID, ipfs://CID or /ipfs/CID")
    p.add_argument("target", metavar="TARGET", help="existing directory to mount on")
    p.set_defaults(func=cmd_mount)

    p = group.add_parser("unmount", help="unmount an image mounted with 'image mount'")
    p.add_argument("target", metavar="TARGET")
    p.set_defaults(func=cmd_unmount)
