"""rpull through containerd: an IPFS-enabled image pulled into a running containerd, its
layers unpacked with the ``ipfsnap`` proxy snapshotter (lazily where possible), so that
``ctr run --snapshotter ipfsnap <CID> ...`` runs it. What the reference's
``ctr-remote image rpull --ipfs`` does, over containerd's gRPC API:

1. a lease (containerd's garbage collector keeps what is created under it);
2. resolve the CID (:func:`ipfsnap.image.resolve.resolve_remote`: root descriptor -> index
   -> manifest -> config, each verified against its digest);
3. write index, manifest and config into containerd's content store, with the
   ``containerd.io/gc.ref.*`` labels that keep the children and the layer snapshots alive
   once the image exists;
4. unpack with :func:`ipfsnap.image.unpack.unpack` through containerd's snapshots service
   (:class:`ContainerdSnapshotter`, snapshotter ``ipfsnap``), so containerd's metadata
   records every snapshot: eStargz layers are prepared with the remote labels and come back
   AlreadyExists (mounted lazily); the others are fetched whole from IPFS into ipfsnap's
   content store, verified, and unpacked into the snapshot's mounts;
5. create (or update) the image record named by the CID, then drop the lease.

This module talks gRPC with the stubs generated into :mod:`ipfsnap.service.proto` (the one
place the containerd protos are compiled); it does not use the snapshotter service itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import field_mask_pb2

from ipfsnap.content import ImageStore
from ipfsnap.errors import AlreadyExistsError, NotFoundError, ServiceError, UsageError
from ipfsnap.image.resolve import (
    BlobFetcher,
    ClientSource,
    parse_ipfs_ref,
    resolve_remote,
)
from ipfsnap.image.unpack import UnpackResult, chain_ids, unpack
from ipfsnap.oci import Descriptor, ImageConfig, Platform, mediatypes
from ipfsnap.progress import Progress
from ipfsnap.service.proto import (
    content_pb2,
    content_pb2_grpc,
    descriptor_pb2,
    images_pb2,
    images_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    mount_pb2,
    snapshots_pb2,
    snapshots_pb2_grpc,
)
from ipfsnap.snapshot import Info, Kind, Mount

log = logging.getLogger(__name__)

#: the name ipfsnap is registered under in containerd's config (``[proxy_plugins.ipfsnap]``)
DEFAULT_SNAPSHOTTER = "ipfsnap"
DEFAULT_NAMESPACE = "default"
#: gRPC metadata keys containerd reads the namespace and the lease from
NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
#: containerd's gc labels: a lease expires by itself (a crashed pull leaves nothing
#: behind for ever); content refers to content and snapshots by these prefixes
GC_EXPIRE_LABEL = "containerd.io/gc.expire"
GC_REF_CONTENT = "containerd.io/gc.ref.content"
GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot"
#: how long a pull's lease lives if the pull dies without deleting it. A pull of a big
#: image whose layers are all fetched whole from a slow IPFS network can take many minutes;
#: an hour is far beyond that and still bounds leaked content.
LEASE_TTL = timedelta(hours=1)
#: seconds to wait for containerd's socket to accept a connection
CONNECT_TIMEOUT = 10.0
#: seconds a single containerd call may take. Prepare with remote labels waits for the lazy
#: mount (the TOC fetched from IPFS, bounded by the fs fetch timeouts, minutes at worst).
CALL_TIMEOUT = 600.0
#: containerd's gRPC server refuses messages above 16 MiB; documents are far below the
#: ipfsnap document limit anyway, but write in pieces of 1 MiB to stay clear of it
WRITE_PIECE = 1 << 20


class ContainerdError(ServiceError):
    """containerd refused or failed a request (the message names the call and the object)."""


class ContainerdUnavailable(ContainerdError):
    """containerd's socket does not answer."""


class ContainerdNotFound(NotFoundError):
    """containerd has no such object (snapshot, image, content, lease)."""


class ContainerdAlreadyExists(AlreadyExistsError):
    """containerd already has such an object (or, for Prepare with a target label, the
    snapshotter mounted the layer remotely)."""


def _map_error(exc: grpc.RpcError, what: str) -> Exception:
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else "") or str(code)
    msg = f"containerd {what}: {details}"
    if code is grpc.StatusCode.NOT_FOUND:
        return ContainerdNotFound(msg)
    if code is grpc.StatusCode.ALREADY_EXISTS:
        return ContainerdAlreadyExists(msg)
    if code is grpc.StatusCode.UNAVAILABLE:
        return ContainerdUnavailable(msg)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return UsageError(msg)
    return ContainerdError(msg)


T = TypeVar("T")


class Containerd:
    """A connection to containerd's socket in one namespace (and, inside :meth:`lease`,
    under one lease)."""

    def __init__(self, address: str | os.PathLike[str], namespace: str = DEFAULT_NAMESPACE
                 ) -> None:
        self.address = os.path.abspath(address)
        self.namespace = namespace
        self.lease_id: str | None = None
        if not os.path.exists(self.address):  # fail now rather than after CONNECT_TIMEOUT
            raise ContainerdUnavailable(f"containerd socket {self.address} does not exist")
        self.channel = grpc.insecure_channel(
            f"unix:{self.address}",
            # documents and Info lists can exceed gRPC's 4 MiB default in big namespaces
            options=[("grpc.max_receive_message_length", 16 << 20)],
        )
        try:
            grpc.channel_ready_future(self.channel).result(timeout=CONNECT_TIMEOUT)
        except grpc.FutureTimeoutError:
            self.channel.close()
            raise ContainerdUnavailable(
                f"containerd at {self.address} does not answer (is it running?)"
            ) from None
        self.snapshots_stub: Any = snapshots_pb2_grpc.SnapshotsStub(  # type: ignore[no-untyped-call]
            self.channel)
        self.content_stub: Any = content_pb2_grpc.ContentStub(  # type: ignore[no-untyped-call]
            self.channel)
        self.images_stub: Any = images_pb2_grpc.ImagesStub(  # type: ignore[no-untyped-call]
            self.channel)
        self.leases_stub: Any = leases_pb2_grpc.LeasesStub(  # type: ignore[no-untyped-call]
            self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Containerd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def metadata(self) -> list[tuple[str, str]]:
        md = [(NAMESPACE_HEADER, self.namespace)]
        if self.lease_id:
            md.append((LEASE_HEADER, self.lease_id))
        return md

    def call(self, what: str, fn: Callable[..., T], request: Any) -> T:
        try:
            return fn(request, metadata=self.metadata(), timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            raise _map_error(exc, what) from None

    # ---- leases ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, ttl: timedelta = LEASE_TTL) -> Iterator[str]:
        """Everything created inside is kept from containerd's gc until the lease ends."""
        lease_id = f"ipfsnap-{os.getpid()}-{secrets.token_hex(6)}"
        expire = (datetime.now(UTC) + ttl).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.call(f"create lease {lease_id}", self.leases_stub.Create,
                  leases_pb2.CreateRequest(id=lease_id, labels={GC_EXPIRE_LABEL: expire}))
        self.lease_id = lease_id
        try:
            yield lease_id
        finally:
            self.lease_id = None
            try:
                self.call(f"delete lease {lease_id}", self.leases_stub.Delete,
                          leases_pb2.DeleteRequest(id=lease_id))
            except (ContainerdError, NotFoundError) as exc:
                log.warning("%s (it expires by itself)", exc)

    # ---- content ---------------------------------------------------------------------------

    def write_blob(self, data: bytes, digest: str, labels: Mapping[str, str]) -> None:
        """Store ``data`` (which hashes to ``digest``: containerd checks) with ``labels``;
        content already there only gets the labels set."""
        ref = f"ipfsnap-{digest}"

        def requests() -> Iterator[content_pb2.WriteContentRequest]:
            for off in range(0, len(data), WRITE_PIECE):
                yield content_pb2.WriteContentRequest(
                    action=content_pb2.WRITE, ref=ref, total=len(data), expected=digest,
                    offset=off, data=data[off : off + WRITE_PIECE])
            yield content_pb2.WriteContentRequest(
                action=content_pb2.COMMIT, ref=ref, total=len(data), expected=digest,
                offset=len(data), labels=dict(labels))

        try:
            for _ in self.content_stub.Write(requests(), metadata=self.metadata(),
                                             timeout=CALL_TIMEOUT):
                pass
        except grpc.RpcError as exc:
            err = _map_error(exc, f"write content {digest}")
            if not isinstance(err, AlreadyExistsError):
                raise err from None
            self.set_content_labels(digest, labels)

    def set_content_labels(self, digest: str, labels: Mapping[str, str]) -> None:
        if not labels:
            return
        self.call(
            f"label content {digest}", self.content_stub.Update,
            content_pb2.UpdateRequest(
                info=content_pb2.Info(digest=digest, labels=dict(labels)),
                update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]),
            ),
        )

    # ---- images ----------------------------------------------------------------------------

    def put_image(self, name: str, target: Descriptor, labels: Mapping[str, str] | None = None
                  ) -> None:
        """Create image ``name`` pointing at ``target``, or repoint an existing one."""
        image = images_pb2.Image(
            name=name,
            labels=dict(labels or {}),
            target=descriptor_pb2.Descriptor(
                media_type=target.media_type, digest=target.digest, size=target.size,
                annotations=dict(target.annotations)),
        )
        try:
            self.call(f"create image {name}", self.images_stub.Create,
                      images_pb2.CreateImageRequest(image=image))
        except AlreadyExistsError:
            self.call(f"update image {name}", self.images_stub.Update,
                      images_pb2.UpdateImageRequest(image=image))

    def image_target(self, name: str) -> Descriptor:
        resp = self.call(f"get image {name}", self.images_stub.Get,
                         images_pb2.GetImageRequest(name=name))
        t = resp.image.target
        return Descriptor(t.media_type, t.digest, t.size, annotations=dict(t.annotations))


def _mounts(pbs: Sequence[mount_pb2.Mount]) -> list[Mount]:
    return [Mount(m.type, m.source, list(m.options)) for m in pbs]


_KINDS = {snapshots_pb2.VIEW: Kind.VIEW, snapshots_pb2.ACTIVE: Kind.ACTIVE,
          snapshots_pb2.COMMITTED: Kind.COMMITTED}


class ContainerdSnapshotter:
    """:class:`ipfsnap.snapshot.Snapshotter` over containerd's snapshots service for one
    snapshotter name: containerd's metadata records every snapshot (so ``ctr`` sees them)
    and forwards to the snapshotter (the ``ipfsnap`` proxy)."""

    def __init__(self, ctd: Containerd, snapshotter: str = DEFAULT_SNAPSHOTTER) -> None:
        self.ctd = ctd
        self.name = snapshotter

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
                ) -> list[Mount]:
        resp = self.ctd.call(
            f"prepare snapshot {key!r} ({self.name})", self.ctd.snapshots_stub.Prepare,
            snapshots_pb2.PrepareSnapshotRequest(snapshotter=self.name, key=key, parent=parent,
                                                 labels=dict(labels or {})))
        return _mounts(resp.mounts)

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
             ) -> list[Mount]:
        resp = self.ctd.call(
            f"view snapshot {key!r} ({self.name})", self.ctd.snapshots_stub.View,
            snapshots_pb2.ViewSnapshotRequest(snapshotter=self.name, key=key, parent=parent,
                                              labels=dict(labels or {})))
        return _mounts(resp.mounts)

    def mounts(self, key: str) -> list[Mount]:
        resp = self.ctd.call(f"mounts of snapshot {key!r} ({self.name})",
                             self.ctd.snapshots_stub.Mounts,
                             snapshots_pb2.MountsRequest(snapshotter=self.name, key=key))
        return _mounts(resp.mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        self.ctd.call(
            f"commit snapshot {key!r} as {name!r} ({self.name})", self.ctd.snapshots_stub.Commit,
            snapshots_pb2.CommitSnapshotRequest(snapshotter=self.name, name=name, key=key,
                                                labels=dict(labels or {})))

    def remove(self, key: str) -> None:
        self.ctd.call(f"remove snapshot {key!r} ({self.name})", self.ctd.snapshots_stub.Remove,
                      snapshots_pb2.RemoveSnapshotRequest(snapshotter=self.name, key=key))

    def stat(self, key: str) -> Info:
        resp = self.ctd.call(f"stat snapshot {key!r} ({self.name})", self.ctd.snapshots_stub.Stat,
                             snapshots_pb2.StatSnapshotRequest(snapshotter=self.name, key=key))
        i = resp.info
        return Info(
            name=i.name, kind=_KINDS.get(i.kind, Kind.ACTIVE), parent=i.parent,
            labels=dict(i.labels),
            created=i.created_at.ToDatetime(tzinfo=UTC),
            updated=i.updated_at.ToDatetime(tzinfo=UTC),
        )


@dataclass(frozen=True)
class ContainerdPull:
    """An image rpulled into containerd."""

    name: str
    namespace: str
    snapshotter: str
    target: Descriptor
    unpacked: UnpackResult
    #: descriptors of the blobs fetched from IPFS, in order
    fetched: tuple[Descriptor, ...]
    #: the image's config (its command, environment and working directory)
    config: ImageConfig


def _gc_refs(prefix: str, children: Sequence[Descriptor]) -> dict[str, str]:
    return {f"{prefix}.{i}": d.digest for i, d in enumerate(children)}


def rpull_containerd(
    ref: str,
    address: str | os.PathLike[str],
    *,
    client: ClientSource,
    state_dir: Path,
    namespace: str = DEFAULT_NAMESPACE,
    snapshotter: str = DEFAULT_SNAPSHOTTER,
    platform: Platform | None = None,
    prefetch_size: int | None = None,
    report: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> ContainerdPull:
    """Pull the IPFS-enabled image ``ref`` (CID, ipfs://CID, /ipfs/CID) into containerd at
    ``address`` as image ``<CID>`` (see the module doc). Blobs fetched from IPFS are cached
    in ipfsnap's content store under ``state_dir``."""
    cid = parse_ipfs_ref(ref)
    name = cid  # as the reference: `ctr run ... <CID>`
    images = ImageStore(state_dir)
    fetcher = BlobFetcher(client, images.blobs, report=report, progress=progress)
    with Containerd(address, namespace) as ctd, ctd.lease(), images.lease():
        remote = resolve_remote(fetcher, cid, platform)
        manifest, mdesc = remote.manifest, remote.manifest_descriptor
        chains = chain_ids(remote.config.diff_ids)
        # children first, so that each parent's gc.ref labels point at stored content
        config_labels = {f"{GC_REF_SNAPSHOT}.{snapshotter}": chains[-1]} if chains else {}
        ctd.write_blob(fetcher.document_bytes(manifest.config, "config"),
                       manifest.config.digest, config_labels)
        ctd.write_blob(
            fetcher.document_bytes(mdesc, "manifest"), mdesc.digest,
            {f"{GC_REF_CONTENT}.config": manifest.config.digest,
             **_gc_refs(f"{GC_REF_CONTENT}.l", manifest.layers)})
        if remote.target.digest != mdesc.digest:
            if not mediatypes.is_index(remote.target.media_type):
                raise UsageError(f"image ipfs://{cid}: root {remote.target.digest} is "
                                 "neither the manifest nor an index")
            ctd.write_blob(fetcher.document_bytes(remote.target, "index"), remote.target.digest,
                           _gc_refs(f"{GC_REF_CONTENT}.m", [mdesc]))
        result = unpack(name, manifest, remote.config, ContainerdSnapshotter(ctd, snapshotter),
                        blobs=images.blobs, fetcher=fetcher, lazy=True,
                        prefetch_size=prefetch_size)
        ctd.put_image(name, remote.target)
    log.info("image %s pulled into containerd %s (namespace %s, snapshotter %s): %s",
             name, ctd.address, namespace, snapshotter,
             ", ".join(f"{r.digest[:19]} {r.how}" for r in result.layers))
    return ContainerdPull(name, namespace, snapshotter, remote.target, result,
                          tuple(fetcher.fetched), remote.config)
