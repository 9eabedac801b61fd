"""``ipfsnap run``, ``ipfsnap ps``, ``ipfsnap rm``, ``ipfsnap logs``.

``run`` follows ``ctr run``: ``ipfsnap run [OPTIONS] REF ID [CMD ...]``. Options come before
REF (everything after REF belongs to the container), and a given CMD replaces the image's
Entrypoint *and* Cmd, as ctr does (docker would keep the Entrypoint). ``--rootfs DIR`` runs a
plain directory instead of an image (as ``ctr run --rootfs``): then the positionals are
``ID [CMD ...]`` and the directory is bind mounted read-write as the container's root.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ipfsnap.cli.common import Context, print_json
from ipfsnap.errors import MountError, UsageError
from ipfsnap.image.snapshotters import OVERLAYFS, STARGZ, snapshotter_root

# Commands import the runtime, stores and snapshotters when they run (start-up stays cheap).
if TYPE_CHECKING:
    from ipfsnap.content import ResolvedImage
    from ipfsnap.runtime import BindMount, ContainerConfig, ContainerRecord
    from ipfsnap.runtime.containers import MountRootfs, Release
    from ipfsnap.snapshot import Mount, Snapshotter

log = logging.getLogger(__name__)

SNAPSHOTTERS = (OVERLAYFS, STARGZ)

#: seconds between polls of a followed log (short enough to feel live, cheap on the CPU)
_FOLLOW_POLL = 0.2


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this area's sub-commands to the top-level parser."""
    p = sub.add_parser(
        "run",
        help="run a container from an image (or a rootfs directory)",
        description="Run a container: ipfsnap run [OPTIONS] REF ID [CMD ...]. A given CMD "
        "replaces the image's Entrypoint and Cmd (as ctr run).",
    )
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background")
    p.add_argument(
        "--snapshotter",
        choices=SNAPSHOTTERS,
        default="overlayfs",
        help="stargz: lazy layers from IPFS; overlayfs: layers fetched whole (default)",
    )
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    p.add_argument("--cwd", metavar="DIR", help="working directory (default: the image's)")
    p.add_argument("-u", "--user", metavar="U", help="uid[:gid] or name[:group]")
    p.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="SPEC",
        help="type=bind,src=HOST,dst=CONTAINER[,ro] (repeatable)",
    )
    p.add_argument(
        "--net",
        "--network",
        dest="net",
        choices=("none", "host"),
        default="none",
        help="none: own network namespace with only lo (default); host: the host's",
    )
    p.add_argument("--hostname", metavar="H", help="hostname (default: the container id)")
    p.add_argument(
        "--rootfs",
        metavar="DIR",
        help="run this directory as the root instead of an image; positionals are ID [CMD ...]",
    )
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="REF ID [CMD ...]")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ps", help="list containers (JSON lines when not a terminal)")
    p.add_argument("--json", action="store_true", help="JSON lines even on a terminal")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("rm", help="remove containers, their snapshots and mounts")
    p.add_argument("-f", "--force", action="store_true", help="kill a running container first")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("logs", help="print the output of a detached container")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until it stops")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_logs)


# ---------------------------------------------------------------------------------------------
# rootfs providers


def _bind_rootfs(source: Path) -> MountRootfs:
    from ipfsnap.snapshot import Mount, mount_all

    def mount(target: Path) -> None:
        if not source.is_dir():
            raise UsageError(f"--rootfs {source}: not a directory")
        mount_all([Mount(type="bind", source=str(source), options=["rbind", "rw"])], target)

    return mount


def release_for(ctx: Context, shared: SnapshotSession | None = None) -> Release:
    """The callback that frees what a container's record says it holds (its snapshot);
    through ``shared`` when it is the record's snapshotter (the run's own connection)."""

    def release(record: ContainerRecord) -> None:
        if not record.snapshot_key:
            return
        from ipfsnap.service.errors import ServiceUnavailable
        from ipfsnap.snapshot.errors import SnapshotNotFound

        name = record.snapshotter or OVERLAYFS
        if shared is not None and shared.name == name:
            try:
                with contextlib.suppress(SnapshotNotFound):
                    shared.get().remove(record.snapshot_key)
                return
            except ServiceUnavailable as exc:
                # the connection held since the mount was lost (the service restarted while
                # the container ran): once more on a new one; already removed is fine
                log.debug("run %s: snapshotter connection lost (%s); reconnecting",
                          record.id, exc)
                shared.close()
        with open_snapshots(ctx, name) as snaps, contextlib.suppress(SnapshotNotFound):
            snaps.remove(record.snapshot_key)

    return release


# ---------------------------------------------------------------------------------------------
# images -> layer snapshots -> the container's active snapshot
#
# The seam for the lazy path: a LayerSnapshots provider turns an image's layers into committed
# snapshots (bottom first) and returns the key of the top one; run then prepares the
# container's active snapshot on it. Both providers are ipfsnap.image.unpack (through
# cli/rpull.py): "overlayfs" unpacks each layer fully (fetching it from IPFS when it is not
# local), "stargz" mounts eStargz layers lazily; committed snapshots are keyed by chain ID, so
# a second run unpacks nothing. Each snapshotter has its own store (image/snapshotters.py).

#: the overlayfs snapshotter's store, relative to the state dir (kept for callers that
#: open it directly); every store root comes from ipfsnap.image.snapshotters
SNAPSHOT_ROOT = str(snapshotter_root(Path(), OVERLAYFS))


class LayerSnapshots(Protocol):
    def __call__(self, ctx: Context, snaps: Snapshotter, image: ResolvedImage) -> str:
        """Make sure every layer of ``image`` is a committed snapshot; return the top key."""
        ...


@contextlib.contextmanager
def open_snapshots(ctx: Context, snapshotter: str = OVERLAYFS) -> Iterator[Snapshotter]:
    """The snapshots of ``snapshotter`` (stargz: through the snapshotter service)."""
    from ipfsnap.cli.rpull import open_snapshotter

    with open_snapshotter(ctx.config, snapshotter) as store:
        yield store


class SnapshotSession:
    """One open snapshotter for the whole of a run, opened on first use: the rootfs mount and
    the ``--rm`` release share it (one connection to the snapshotter service, or one open
    store, instead of one each)."""

    def __init__(self, ctx: Context, name: str) -> None:
        self.ctx = ctx
        self.name = name
        self._stack = contextlib.ExitStack()
        self._snaps: Snapshotter | None = None

    def get(self) -> Snapshotter:
        if self._snaps is None:
            self._snaps = self._stack.enter_context(open_snapshots(self.ctx, self.name))
        return self._snaps

    def close(self) -> None:
        self._snaps = None
        self._stack.close()


def top_chain_id(diff_ids: Sequence[str]) -> str:
    """The chain ID of an image's top layer, the name its committed layer snapshot has
    (ipfsnap.image.unpack names them so; a test checks both agree): ChainID(L0) = DiffID(L0),
    ChainID(Ln) = sha256 of ChainID(Ln-1) + " " + DiffID(Ln), as the OCI image spec says."""
    if not diff_ids:
        return ""
    return functools.reduce(
        lambda below, diff: "sha256:" + hashlib.sha256(f"{below} {diff}".encode()).hexdigest(),
        diff_ids[1:],
        diff_ids[0],
    )


def _overlayfs_layers(ctx: Context, snaps: Snapshotter, image: ResolvedImage) -> str:
    """Full unpack of every layer (blobs missing locally are fetched whole from IPFS)."""
    from ipfsnap.cli.rpull import layer_snapshots

    return layer_snapshots(ctx, snaps, image, OVERLAYFS)


def _stargz_layers(ctx: Context, snaps: Snapshotter, image: ResolvedImage) -> str:
    """eStargz layers with an ipfs:// url mounted lazily, the others unpacked fully."""
    from ipfsnap.cli.rpull import layer_snapshots

    return layer_snapshots(ctx, snaps, image, STARGZ)


def _rpull(ctx: Context, ref: str) -> None:
    from ipfsnap.cli.rpull import pull

    pull(ctx, ref, None)


LAYER_PROVIDERS: dict[str, LayerSnapshots] = {
    OVERLAYFS: _overlayfs_layers,
    STARGZ: _stargz_layers,
}

#: the rpull side sets this: ``rpull(ctx, "ipfs://CID")`` stores the image locally (layers
#: may stay remote); run calls it for an IPFS ref that is not in the store yet
RPULL: Callable[[Context, str], None] | None = _rpull


def resolve_image(ctx: Context, ref: str) -> ResolvedImage:
    """A local image by name, ``ipfs://CID``, ``/ipfs/CID`` or bare CID."""
    from ipfsnap.content import ImageNotFound, ImageStore

    store = ImageStore(ctx.config.state_dir)
    candidates = [ref]
    if ref.startswith("/ipfs/"):
        candidates = ["ipfs://" + ref[len("/ipfs/") :]]
    elif "://" not in ref and "/" not in ref and ":" not in ref and "@" not in ref:
        candidates.append("ipfs://" + ref)
    first: Exception | None = None
    for name in candidates:
        try:
            return store.resolve(name)
        except (ImageNotFound, UsageError) as exc:
            first = first or exc
    ipfs_refs = [c for c in candidates if c.startswith("ipfs://")]
    if RPULL is not None and ipfs_refs:
        for name in ipfs_refs:
            try:
                RPULL(ctx, name)
            except UsageError:  # not a valid CID after all
                continue
            return store.resolve(name)
    assert first is not None
    raise first


def container_config(
    image: ResolvedImage,
    args: argparse.Namespace,
    cmd: list[str],
    env: list[str],
    mounts: list[BindMount],
) -> ContainerConfig:
    """The image's Entrypoint/Cmd/Env/WorkingDir/User under the command line's overrides
    (the image's values are untrusted: errors name the image and the field)."""
    from ipfsnap.runtime.spec import image_container_config

    return image_container_config(
        image.record.name,
        image.config,
        command=cmd,
        env=env,
        cwd=args.cwd,
        user=args.user,
        hostname=args.hostname or "",
        tty=args.tty,
        mounts=mounts,
        net=args.net,
    )


def _prepare(snaps: Snapshotter, key: str, parent: str, volatile: bool) -> list[Mount]:
    """The container's active snapshot (``volatile``: thrown away after the run, so its
    creation and removal are not synced to disk; see VOLATILE_LABEL)."""
    from ipfsnap.errors import AlreadyExistsError
    from ipfsnap.snapshot import VOLATILE_LABEL

    labels = {VOLATILE_LABEL: "true"} if volatile else None
    try:
        return snaps.prepare(key, parent, labels)
    except AlreadyExistsError:
        # The id is ours (ContainerStore.create just made its directory), so a snapshot
        # under its key was left by an earlier container of that id that a crash cut short
        # (e.g. a volatile removal lost by a power failure): replace it.
        log.warning("run: snapshot %r left by an earlier container; replacing it", key)
        snaps.remove(key)
        return snaps.prepare(key, parent, labels)


def image_rootfs(
    ctx: Context,
    image: ResolvedImage,
    snapshotter: str,
    key: str,
    *,
    session: SnapshotSession | None = None,
    volatile: bool = False,
) -> MountRootfs:
    """The mount_rootfs callback: layer snapshots, the container's active snapshot on top,
    mounted at the target.

    When the image's top layer snapshot already exists (every run after the first), the
    active snapshot is prepared on it at once: one request, none of the unpack machinery
    (and its imports); only a missing parent goes through the layer provider. ``session``:
    the snapshotter to use (kept open for the caller; default: opened for the mount only).
    ``volatile``: the container's snapshot is thrown away after the run (``--rm``), so its
    overlay is mounted without syncing at unmount (snapshot/mount.py)."""

    def mount(target: Path) -> None:
        from ipfsnap.errors import NotFoundError
        from ipfsnap.snapshot import mount_all

        provider = LAYER_PROVIDERS.get(snapshotter)
        if provider is None:
            raise UsageError(f"unknown snapshotter {snapshotter!r}")
        own = session is None
        snaps_of = session if session is not None else SnapshotSession(ctx, snapshotter)
        try:
            snaps = snaps_of.get()
            mounts = None
            diff_ids = image.config.diff_ids
            top = top_chain_id(diff_ids)
            if top and len(diff_ids) == len(image.manifest.layers):
                try:
                    mounts = _prepare(snaps, key, top, volatile)
                except NotFoundError:  # a layer snapshot is missing: unpack
                    log.debug("run: layer snapshot %s missing; unpacking", top)
            if mounts is None:
                mounts = _prepare(snaps, key, provider(ctx, snaps, image), volatile)
        finally:
            if own:
                snaps_of.close()
        mount_all(mounts, target, volatile=volatile)

    return mount


# ---------------------------------------------------------------------------------------------
# commands


def cmd_run(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.runtime import (
        ContainerConfig,
        ContainerStore,
        merge_env,
        parse_env,
        parse_mount,
        validate_id,
    )
    from ipfsnap.runtime.errors import Interrupted
    from ipfsnap.runtime.runc import have_terminal

    argv: list[str] = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if args.rootfs:
        if not argv:
            raise UsageError("run --rootfs DIR: missing container ID")
        ref, cid, cmd = "", argv[0], argv[1:]
    else:
        if len(argv) < 2:
            raise UsageError("run: need REF and ID (ipfsnap run [OPTIONS] REF ID [CMD ...])")
        ref, cid, cmd = argv[0], argv[1], argv[2:]
    validate_id(cid)
    if args.detach and args.tty:
        raise UsageError("run: -d and -t cannot be combined (no console to attach later)")
    if args.detach and args.rm:
        raise UsageError("run: -d and --rm cannot be combined; remove it with ipfsnap rm")
    if args.tty and not have_terminal():
        # runc fails outright without a console to attach; scripts and CI often pass -t
        # (as the seed workflow does), so run without a terminal and say so
        log.warning("run %s: -t ignored: no terminal on stdin/stdout/stderr", cid)
        args.tty = False
    mounts = [parse_mount(m) for m in args.mount]
    env = parse_env(args.env)
    store = ContainerStore(ctx.config.state_dir)
    # one snapshotter connection for the mount and the --rm release
    session = SnapshotSession(ctx, args.snapshotter)

    if args.rootfs:
        cfg = ContainerConfig(
            args=cmd,
            env=merge_env(env),
            cwd=args.cwd or "/",
            user=args.user or "",
            hostname=args.hostname or "",
            tty=args.tty,
            mounts=mounts,
            net=args.net,
        )
        if not cfg.args:
            raise UsageError("run --rootfs: no command given")
        record = store.create(
            cid, image="", snapshotter="", detached=args.detach, rm=args.rm, args=cmd
        )
        mount_rootfs = _bind_rootfs(Path(args.rootfs).absolute())
    else:
        image = resolve_image(ctx, ref)
        cfg = container_config(image, args, cmd, env, mounts)
        if not cfg.args:
            raise UsageError(f"image {image.record.name}: no Entrypoint/Cmd; give a command")
        key = f"ipfsnap-container {cid}"
        record = store.create(
            cid,
            image=image.record.name,
            snapshot_key=key,
            snapshotter=args.snapshotter,
            detached=args.detach,
            rm=args.rm,
            args=cfg.args,
        )
        mount_rootfs = image_rootfs(ctx, image, args.snapshotter, key, session=session,
                                    volatile=args.rm)
    try:
        # the exec's files are read ahead only where a first read waits for IPFS
        warm = ctx.config.run.warm_bytes if args.snapshotter == STARGZ and not args.rootfs else 0
        code = store.run(record, cfg, mount_rootfs=mount_rootfs,
                         release=release_for(ctx, session), warm_bytes=warm,
                         warm_start_files=ctx.config.run.warm_start_files)
    except Interrupted as exc:
        sys.stderr.write(f"ipfsnap: run {cid}: {exc}\n")
        return 128 + exc.signum
    finally:
        session.close()
    if args.detach:
        sys.stdout.write(cid + "\n")
    return code


def cmd_ps(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.runtime import ContainerStore

    store = ContainerStore(ctx.config.state_dir)
    rows = store.list()
    if args.json or not sys.stdout.isatty():
        for st in rows:
            print_json(
                {
                    "id": st.record.id,
                    "image": st.record.image,
                    "status": st.status,
                    "created": st.record.created,
                    "pid": st.pid,
                    "exitCode": st.record.exit_code,
                    "command": st.record.args,
                }
            )
        return 0
    fmt = "{:<24} {:<40} {:<12} {}\n"
    sys.stdout.write(fmt.format("ID", "IMAGE", "STATUS", "CREATED"))
    for st in rows:
        status = st.status
        if st.status == "exited" and st.record.exit_code is not None:
            status = f"exited({st.record.exit_code})"
        image = st.record.image or "(rootfs)"
        sys.stdout.write(fmt.format(st.record.id, image[:40], status, st.record.created))
    return 0


def cmd_rm(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.runtime import ContainerStore, validate_id
    from ipfsnap.runtime.errors import ContainerNotFound

    store = ContainerStore(ctx.config.state_dir)
    release = release_for(ctx)
    failed = 0
    for cid in args.ids:
        try:
            store.destroy(validate_id(cid), release, force=args.force)
        except (ContainerNotFound, MountError) as exc:
            sys.stderr.write(f"ipfsnap: {exc}\n")
            failed += 1
            continue
        sys.stdout.write(cid + "\n")
    return 1 if failed else 0


def cmd_logs(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.runtime import ContainerStore, validate_id

    store = ContainerStore(ctx.config.state_dir)
    store.load(validate_id(args.id))  # a clear error for an unknown id
    path = store.log_path(args.id)
    if not path.exists():
        return 0
    out = sys.stdout.buffer
    with path.open("rb") as f:
        while True:
            chunk = f.read(1 << 16)
            if chunk:
                out.write(chunk)
                continue
            out.flush()
            if not args.follow:
                return 0
            st = store.runc.state(args.id)
            if st is None or st.status not in ("running", "paused", "created"):
                # one last read: output written just before the container stopped
                while chunk := f.read(1 << 16):
                    out.write(chunk)
                out.flush()
                return 0
            time.sleep(_FOLLOW_POLL)
