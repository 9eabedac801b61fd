"""The snapshots gRPC service in-process (a real gRPC server on a unix socket and the
generated client stub), without containerd: every RPC, the status codes containerd's
errdefs expect, and the List filter containerd uses to find a remote snapshot."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from ipfsnap.service.grpc_server import GrpcServer, serve_grpc
from ipfsnap.service.proto import snapshots_pb2, snapshots_pb2_grpc
from ipfsnap.snapshot import SnapshotStore
from tests.support import require_root


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Any, SnapshotStore]]:
    store = SnapshotStore(tmp_path / "store", restore=False)
    server: GrpcServer = serve_grpc(store, tmp_path / "grpc.sock")
    channel = grpc.insecure_channel(f"unix:{tmp_path / 'grpc.sock'}")
    try:
        yield snapshots_pb2_grpc.SnapshotsStub(channel), store  # type: ignore[no-untyped-call]
    finally:
        channel.close()
        server.stop(0)
        store.close()
    assert not (tmp_path / "grpc.sock").exists()


def code_of(fn: Any, request: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        reply = fn(request)
        if isinstance(reply, grpc.Future) and hasattr(reply, "__iter__"):
            list(reply)  # a streaming call fails when read
    return info.value.code()


def test_round_trip_and_codes(served: tuple[Any, SnapshotStore]) -> None:
    stub, store = served
    pb = snapshots_pb2
    r = stub.Prepare(pb.PrepareSnapshotRequest(key="k1", labels={"a": "1"}))
    assert [(m.type, list(m.options)) for m in r.mounts] == [("bind", ["rw", "rbind"])]
    assert r.mounts[0].source == str(store.path("k1"))
    (Path(r.mounts[0].source) / "f").write_text("x")
    assert stub.Mounts(pb.MountsRequest(key="k1")).mounts[0].source == r.mounts[0].source
    info = stub.Stat(pb.StatSnapshotRequest(key="k1")).info
    assert (info.name, info.kind, dict(info.labels)) == ("k1", pb.ACTIVE, {"a": "1"})
    assert info.created_at.seconds > 0
    assert stub.Usage(pb.UsageRequest(key="k1")).inodes >= 2

    stub.Commit(pb.CommitSnapshotRequest(name="c1", key="k1", labels={"b": "2"}))
    r2 = stub.Prepare(pb.PrepareSnapshotRequest(key="k2", parent="c1"))
    assert r2.mounts[0].type == "overlay"
    assert f"lowerdir={store.path('c1')}" in r2.mounts[0].options
    v = stub.View(pb.ViewSnapshotRequest(key="v1", parent="c1"))
    assert [(m.type, list(m.options)) for m in v.mounts] == [("bind", ["ro", "rbind"])]

    # errors as containerd's errdefs expect them
    assert code_of(stub.Prepare, pb.PrepareSnapshotRequest(key="k2")) \
        == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(stub.Stat, pb.StatSnapshotRequest(key="nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(stub.Prepare, pb.PrepareSnapshotRequest(key="k3", parent="nope")) \
        == grpc.StatusCode.NOT_FOUND
    assert code_of(stub.Prepare, pb.PrepareSnapshotRequest(key="k3", parent="k2")) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(stub.Remove, pb.RemoveSnapshotRequest(key="c1")) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(stub.Commit, pb.CommitSnapshotRequest(name="c2", key="v1")) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(stub.Prepare, pb.PrepareSnapshotRequest(key="")) \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stub.List, pb.ListSnapshotsRequest(filters=['name=="unterminated'])) \
        == grpc.StatusCode.INVALID_ARGUMENT

    # Update: one label set, one deleted, through the field mask
    upd = stub.Update(pb.UpdateSnapshotRequest(
        info=pb.Info(name="c1", labels={"c": "3"}),
        update_mask=field_mask_pb2.FieldMask(paths=["labels.c", "labels.b"])))
    assert dict(upd.info.labels) == {"c": "3"}
    assert store.stat("c1").labels == {"c": "3"}

    stub.Remove(pb.RemoveSnapshotRequest(key="v1"))
    stub.Remove(pb.RemoveSnapshotRequest(key="k2"))
    stub.Remove(pb.RemoveSnapshotRequest(key="c1"))
    assert [i for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info] == []
    stub.Cleanup(pb.CleanupRequest())


def test_list_filter_containerd_uses_for_remote_snapshots(
    served: tuple[Any, SnapshotStore],
) -> None:
    """containerd finds the snapshot a remote Prepare committed with
    ``labels."containerd.io/snapshot.ref"==<target>,parent=="<parent>"``; List streams in
    batches."""
    stub, _ = served
    pb = snapshots_pb2
    for i in range(150):
        stub.Prepare(pb.PrepareSnapshotRequest(key=f"k{i}"))
    stub.Commit(pb.CommitSnapshotRequest(
        name="sha256:aa", key="k0", labels={"containerd.io/snapshot.ref": "sha256:aa"}))
    replies = list(stub.List(pb.ListSnapshotsRequest()))
    assert len(replies) == 2  # 150 infos, 100 per message
    assert sum(len(r.info) for r in replies) == 150
    flt = 'labels."containerd.io/snapshot.ref"==sha256:aa,parent==""'
    found = [i for r in stub.List(pb.ListSnapshotsRequest(filters=[flt])) for i in r.info]
    assert [(i.name, i.kind) for i in found] == [("sha256:aa", pb.COMMITTED)]
    flt_other = 'labels."containerd.io/snapshot.ref"==sha256:aa,parent=="sha256:bb"'
    assert [i for r in stub.List(pb.ListSnapshotsRequest(filters=[flt_other]))
            for i in r.info] == []


def test_stale_socket_replaced_and_non_socket_refused(tmp_path: Path) -> None:
    require_root()
    import socket

    from ipfsnap.errors import UsageError

    path = tmp_path / "g.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # a dead predecessor's socket file
    store = SnapshotStore(tmp_path / "store", restore=False)
    try:
        server = serve_grpc(store, path)
        server.stop(0)
        (tmp_path / "file").write_text("not a socket")
        with pytest.raises(UsageError, match="not a socket"):
            serve_grpc(store, tmp_path / "file")
        assert (tmp_path / "file").read_text() == "not a socket"
    finally:
        store.close()
