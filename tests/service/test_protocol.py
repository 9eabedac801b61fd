"""The socket protocol's pure parts: value codecs, error class round trips, framing limits."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest

from ipfsnap.errors import AlreadyExistsError, IpfsnapError, NotFoundError
from ipfsnap.fs.errors import LayerMountError
from ipfsnap.service.errors import ProtocolError, RemoteInternalError
from ipfsnap.service.protocol import (
    MAX_MESSAGE,
    LayerState,
    encode,
    error_from_json,
    error_to_json,
    info_from_json,
    info_to_json,
    mount_from_json,
    mount_to_json,
    read_message,
)
from ipfsnap.snapshot import Info, Kind, Mount
from ipfsnap.snapshot.errors import (
    SnapshotExists,
    SnapshotHasChildren,
    SnapshotNotFound,
    SnapshotUnavailable,
)


@pytest.mark.parametrize(
    "exc",
    [
        SnapshotExists("target snapshot 'x' already exists (remote layer)"),
        SnapshotNotFound("snapshot 'k' not found"),
        SnapshotHasChildren("snapshot 'p' has children ('c'): remove them first"),
        SnapshotUnavailable("layer 'l' of snapshot 'k' is unavailable: gone"),
        LayerMountError("layer sha256:ab: lazy mount at /x failed: boom"),
        AlreadyExistsError("plain branch class"),
    ],
)
def test_error_round_trip_gives_the_same_class_and_message(exc: IpfsnapError) -> None:
    wire = error_to_json(exc)
    back = error_from_json(wire)
    assert type(back) is type(exc)
    assert str(back) == str(exc)


def test_unknown_error_class_falls_back_to_the_nearest_known_ancestor() -> None:
    wire = error_to_json(SnapshotNotFound("snapshot 'k' not found"))
    wire["type"] = "ipfsnap.snapshot.errors.SnapshotGoneInAFutureVersion"
    wire["mro"] = [wire["type"], *wire["mro"][1:]]
    back = error_from_json(wire)
    assert type(back) is NotFoundError
    assert str(back) == "snapshot 'k' not found"


def test_error_names_outside_ipfsnap_are_never_imported_or_built() -> None:
    back = error_from_json({"type": "subprocess.CalledProcessError",
                            "mro": ["subprocess.CalledProcessError", "builtins.Exception"],
                            "message": "m"})
    assert type(back) is RemoteInternalError
    back = error_from_json({"type": "ipfsnap.config.Config", "message": "not an error class"})
    assert type(back) is RemoteInternalError


def test_non_ipfsnap_exceptions_travel_as_internal_errors() -> None:
    back = error_from_json(error_to_json(KeyError("oops")))
    assert type(back) is RemoteInternalError
    assert "KeyError" in str(back)


def test_values_round_trip() -> None:
    m = Mount("overlay", "overlay", ["index=off", "lowerdir=/a:/b"])
    assert mount_from_json(mount_to_json(m)) == m
    t = datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=UTC)
    i = Info("n", Kind.COMMITTED, "p", {"a": "b"}, t, t)
    assert info_from_json(info_to_json(i)) == i
    st = LayerState("s", "sha256:0", "/m", 1, 2, 3, 4.5, "ready", "", 7, 8)
    assert LayerState.from_json(st.to_json()) == st


@pytest.mark.parametrize("bad", [{"type": "bind"}, [], {"name": "n", "kind": "nope"}])
def test_malformed_values_are_protocol_errors(bad: object) -> None:
    with pytest.raises(ProtocolError):
        mount_from_json(bad)
    with pytest.raises(ProtocolError):
        info_from_json(bad)


def test_framing() -> None:
    stream = io.BytesIO(encode({"id": 1, "op": "ping"}) + encode({"id": 2, "op": "walk"}))
    assert read_message(stream, peer="t") == {"id": 1, "op": "ping"}
    assert read_message(stream, peer="t") == {"id": 2, "op": "walk"}
    assert read_message(stream, peer="t") is None
    with pytest.raises(ProtocolError, match="middle of a message"):
        read_message(io.BytesIO(b'{"id": 1'), peer="t")
    with pytest.raises(ProtocolError, match="not JSON"):
        read_message(io.BytesIO(b"{nope\n"), peer="t")
    with pytest.raises(ProtocolError, match="not a JSON object"):
        read_message(io.BytesIO(b"[1]\n"), peer="t")


def test_deeply_nested_message_is_refused() -> None:
    # json.loads raised RecursionError out of read_message (found reading the code, issue 8)
    with pytest.raises(ProtocolError, match="not JSON"):
        read_message(io.BytesIO(b"[" * 100_000 + b"]" * 100_000 + b"\n"), peer="t")


def test_oversized_message_is_refused() -> None:
    stream = io.BytesIO(b"x" * (MAX_MESSAGE + 10) + b"\n")
    with pytest.raises(ProtocolError, match="larger than"):
        read_message(stream, peer="t")
