"""containerd's snapshots gRPC API (``containerd.services.snapshots.v1.Snapshots``) on a unix
socket, on top of the snapshotter daemon's store: what makes ipfsnap a containerd proxy
snapshotter (``[proxy_plugins.ipfsnap] type = "snapshot"``).

containerd's proxy client turns our gRPC status codes back into its ``errdefs`` errors, and
its metadata layer relies on them: ALREADY_EXISTS from Prepare with the
``containerd.io/snapshot.ref`` label means "the target layer is there (mounted lazily)", after
which containerd walks us with ``labels."containerd.io/snapshot.ref"==<chainID>,parent==...``
to find it. So every ipfsnap error is mapped by family (:func:`status_of`).

The ``snapshotter`` field of the requests is ignored: this socket serves one snapshotter.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from ipfsnap.errors import (
    AlreadyExistsError,
    IpfsnapError,
    NotFoundError,
    ServiceError,
    UsageError,
)
from ipfsnap.service.proto import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from ipfsnap.snapshot import Info, Kind, Mount, Snapshotter, Usage
from ipfsnap.snapshot.errors import (
    SnapshotInvalidArgument,
    SnapshotStateError,
    SnapshotUnavailable,
)

if TYPE_CHECKING:
    from ipfsnap.service.daemon import Daemon

log = logging.getLogger(__name__)

#: worker threads of the gRPC server. containerd unpacks an image's layers with up to 3
#: Prepare calls at once (its default max concurrent unpacks) per pull, and a lazy Prepare
#: may wait for a remote mount (TOC fetch) for seconds: leave room for several pulls plus
#: the quick calls (Stat, List, Mounts) containerd makes meanwhile.
MAX_WORKERS = 16
#: Infos per List reply message; containerd's own snapshots service batches 100 per
#: message to keep each under gRPC's default 4 MiB limit with labels.
LIST_BATCH = 100
#: seconds calls in flight may still run when the server stops
STOP_GRACE = 5.0


class GrpcStore(Snapshotter, Protocol):
    """What the gRPC service needs of a snapshot store: the :class:`Snapshotter` protocol plus
    containerd's Update/List/Usage/Cleanup (:class:`~ipfsnap.snapshot.SnapshotStore` satisfies
    it)."""

    def update(self, info: Info, fieldpaths: list[str] | None = None) -> Info: ...

    def walk(self, filters: list[str]) -> list[Info]: ...

    def usage(self, key: str) -> Usage: ...

    def cleanup(self) -> list[Path]: ...


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The gRPC code containerd expects for ``exc`` (errdefs.FromGRPC maps it back)."""
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, AlreadyExistsError):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(exc, SnapshotInvalidArgument | UsageError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, SnapshotUnavailable | ServiceError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, SnapshotStateError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.UNKNOWN if isinstance(exc, IpfsnapError) else grpc.StatusCode.INTERNAL


_KIND_TO_PB = {
    Kind.VIEW: snapshots_pb2.VIEW,
    Kind.ACTIVE: snapshots_pb2.ACTIVE,
    Kind.COMMITTED: snapshots_pb2.COMMITTED,
}


def _ts(value: datetime | None) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    if value is not None:
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        ts.FromDatetime(value)
    return ts


def info_to_pb(info: Info) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(
        name=info.name,
        parent=info.parent,
        kind=_KIND_TO_PB[info.kind],
        created_at=_ts(info.created),
        updated_at=_ts(info.updated),
        labels=dict(info.labels),
    )


def info_from_pb(pb: snapshots_pb2.Info) -> Info:
    kinds = {v: k for k, v in _KIND_TO_PB.items()}
    return Info(
        name=pb.name,
        # Update only changes labels; the kind sent does not matter, so tolerate UNKNOWN.
        kind=kinds.get(pb.kind, Kind.ACTIVE),
        parent=pb.parent,
        labels=dict(pb.labels),
        created=pb.created_at.ToDatetime(tzinfo=UTC) if pb.HasField("created_at") else None,
        updated=pb.updated_at.ToDatetime(tzinfo=UTC) if pb.HasField("updated_at") else None,
    )


def _mounts_pb(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
            for m in mounts]


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    """The servicer: each RPC calls the store and maps its errors to status codes."""

    def __init__(self, store: GrpcStore) -> None:
        self.store = store

    def _call(self, context: grpc.ServicerContext, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            code = status_of(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("gRPC %s: unexpected error", what)
            else:
                log.debug("gRPC %s: %s: %s", what, code.name, exc)
            context.abort(code, str(exc) or type(exc).__name__)
            raise  # pragma: no cover  (abort raises)

    def Prepare(
        self, request: snapshots_pb2.PrepareSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.PrepareSnapshotResponse:
        log.debug("Prepare key=%r parent=%r labels=%r", request.key, request.parent,
                  dict(request.labels))
        mounts = self._call(context, f"Prepare {request.key!r}", lambda: self.store.prepare(
            request.key, request.parent, dict(request.labels)))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts_pb(mounts))

    def View(
        self, request: snapshots_pb2.ViewSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.ViewSnapshotResponse:
        mounts = self._call(context, f"View {request.key!r}", lambda: self.store.view(
            request.key, request.parent, dict(request.labels)))
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts_pb(mounts))

    def Mounts(
        self, request: snapshots_pb2.MountsRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.MountsResponse:
        mounts = self._call(context, f"Mounts {request.key!r}",
                            lambda: self.store.mounts(request.key))
        return snapshots_pb2.MountsResponse(mounts=_mounts_pb(mounts))

    def Commit(
        self, request: snapshots_pb2.CommitSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self._call(context, f"Commit {request.key!r}", lambda: self.store.commit(
            request.name, request.key, dict(request.labels)))
        return empty_pb2.Empty()

    def Remove(
        self, request: snapshots_pb2.RemoveSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self._call(context, f"Remove {request.key!r}", lambda: self.store.remove(request.key))
        return empty_pb2.Empty()

    def Stat(
        self, request: snapshots_pb2.StatSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.StatSnapshotResponse:
        info = self._call(context, f"Stat {request.key!r}", lambda: self.store.stat(request.key))
        return snapshots_pb2.StatSnapshotResponse(info=info_to_pb(info))

    def Update(
        self, request: snapshots_pb2.UpdateSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.UpdateSnapshotResponse:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = self._call(context, f"Update {request.info.name!r}", lambda: self.store.update(
            info_from_pb(request.info), paths or None))
        return snapshots_pb2.UpdateSnapshotResponse(info=info_to_pb(info))

    def List(
        self, request: snapshots_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[snapshots_pb2.ListSnapshotsResponse]:
        infos: list[Info] = self._call(context, f"List {list(request.filters)!r}",
                                       lambda: self.store.walk(list(request.filters)))
        for i in range(0, len(infos), LIST_BATCH):
            yield snapshots_pb2.ListSnapshotsResponse(
                info=[info_to_pb(x) for x in infos[i : i + LIST_BATCH]])

    def Usage(
        self, request: snapshots_pb2.UsageRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.UsageResponse:
        usage = self._call(context, f"Usage {request.key!r}",
                           lambda: self.store.usage(request.key))
        return snapshots_pb2.UsageResponse(size=usage.size, inodes=usage.inodes)

    def Cleanup(
        self, request: snapshots_pb2.CleanupRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        removed = self._call(context, "Cleanup", self.store.cleanup)
        if removed:
            log.info("cleanup removed %d stray snapshot directories", len(removed))
        return empty_pb2.Empty()


class GrpcServer:
    """A running gRPC server on a unix socket; :meth:`stop` ends it and removes the socket."""

    def __init__(self, server: grpc.Server, path: Path) -> None:
        self.server = server
        self.path = path

    def stop(self, grace: float = STOP_GRACE) -> None:
        self.server.stop(grace).wait()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        log.info("containerd snapshots API on %s stopped", self.path)


def _remove_stale_socket(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"gRPC address {path} exists and is not a socket; not replacing it")
    # We run as the state dir's one snapshotter (its lock is held), so a socket here is a
    # dead predecessor's.
    path.unlink()


def serve_grpc(store: GrpcStore, address: str | os.PathLike[str]) -> GrpcServer:
    """Serve containerd's snapshots API for ``store`` on the unix socket ``address``."""
    path = Path(address).absolute()
    if len(os.fsencode(str(path))) > 107:  # sun_path holds 108 bytes with the NUL
        raise UsageError(f"gRPC address {path} is longer than a unix socket path may be")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _remove_stale_socket(path)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="grpc"),
        options=[("grpc.so_reuseport", 0)],
    )
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(  # type: ignore[no-untyped-call]
        SnapshotsService(store), server
    )
    old = os.umask(0o177)  # born 0600: only root (containerd) may talk to it
    try:
        port = server.add_insecure_port(f"unix:{path}")
    finally:
        os.umask(old)
    if port == 0:
        raise UsageError(f"gRPC address {path}: cannot listen on this unix socket")
    server.start()
    log.info("containerd snapshots API listening on %s", path)
    return GrpcServer(server, path)


def daemon_hook(address: str | os.PathLike[str]) -> Callable[[Daemon], Callable[[], None]]:
    """A :attr:`Daemon.on_serve` hook that serves the daemon's store on ``address``."""

    def hook(daemon: Daemon) -> Callable[[], None]:
        assert daemon.store is not None
        server = serve_grpc(daemon.store, address)
        return server.stop

    return hook
