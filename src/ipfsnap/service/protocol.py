"""The snapshotter's socket protocol: JSON lines over a unix stream socket.

One request, one response, in order, on a connection that may carry many of them::

    -> {"id": 7, "op": "prepare", "args": {"key": "k", "parent": "", "labels": {}}}
    <- {"id": 7, "ok": true, "result": [{"type": "bind", "source": "...", "options": [...]}]}
    <- {"id": 7, "ok": false, "error": {"type": "ipfsnap.snapshot.errors.SnapshotExists",
                                        "mro": ["ipfsnap.snapshot.errors.SnapshotExists",
                                                "ipfsnap.errors.AlreadyExistsError", ...],
                                        "message": "target snapshot 'x' already exists ..."}}

Each message is one line of UTF-8 JSON (``json.dumps`` never emits a raw newline). Errors
carry the exception's class (module and name) plus its ipfsnap ancestors, so the client
re-raises the same class, or the nearest ancestor it can build, with the same message.
Only classes under ``ipfsnap.`` that derive from :class:`IpfsnapError` are ever built.

Operations and their ``args`` / ``result``:

=========  ==================================================  ===========================
op         args                                                result
=========  ==================================================  ===========================
ping       {}                                                  {"pid", "state_dir", "root"}
prepare    {"key", "parent", "labels"}                         [Mount]
view       {"key", "parent", "labels"}                         [Mount]
mounts     {"key"}                                             [Mount]
commit     {"name", "key", "labels"}                           null
remove     {"key"}                                             null
stat       {"key"}                                             Info
update     {"info": Info, "fieldpaths": [str] | null}          Info
walk       {"filters": [str]}                                  [Info]
usage      {"key"}                                             {"size", "inodes"}
status     {}                                                  [LayerState]
stop       {}                                                  {"pid"}; then it unmounts
                                                               every remote layer and exits
=========  ==================================================  ===========================
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import IO, Any

from ipfsnap.docparse import MalformedDocument, parse_json
from ipfsnap.errors import IpfsnapError
from ipfsnap.service.errors import ProtocolError, RemoteInternalError
from ipfsnap.snapshot.types import Info, Kind, Mount, Usage

#: protocol version, answered by ``ping``; bump on incompatible changes
VERSION = 1

#: upper bound of one message. The biggest answers are ``walk`` and ``status``: a few hundred
#: bytes per snapshot or layer, so 64 MiB allows >100k snapshots while a runaway or hostile
#: peer cannot make either side buffer without limit.
MAX_MESSAGE = 64 << 20

OPS = (
    "ping",
    "prepare",
    "view",
    "mounts",
    "commit",
    "remove",
    "stat",
    "update",
    "walk",
    "usage",
    "status",
    "stop",
    # ipfsnap's own: read a pulled image's command ahead (service/warmups.py)
    "warm",
)


@dataclass
class LayerState:
    """One lazy layer as ``ipfsnap snapshot status`` shows it."""

    #: the committed snapshot's name (the layer's chain ID), "" if no snapshot owns the mount
    snapshot: str
    layer: str
    mountpoint: str
    #: blob size in bytes
    size: int
    #: compressed bytes of the layer's chunks that are verified in the cache, of ``total``
    fetched: int
    total: int
    percent: float
    #: prefetching | ready | background | complete | error | starting | unmounted
    state: str
    last_error: str
    pid: int
    #: bytes the current worker read from its source (IPFS or file) since it started
    read_bytes: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LayerState:
        try:
            return cls(**dict(data))
        except TypeError as exc:
            raise ProtocolError(f"snapshotter status: malformed layer entry: {exc}") from None


# ---- framing --------------------------------------------------------------------------------


def encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def read_message(stream: IO[bytes], *, peer: str) -> dict[str, Any] | None:
    """The next message from ``stream``; None at a clean end of stream."""
    line = stream.readline(MAX_MESSAGE + 1)
    if not line:
        return None
    if not line.endswith(b"\n"):
        if len(line) > MAX_MESSAGE:
            raise ProtocolError(f"{peer}: message larger than {MAX_MESSAGE} bytes")
        raise ProtocolError(f"{peer}: connection closed in the middle of a message")
    try:
        data = parse_json(line)
    except MalformedDocument as exc:
        raise ProtocolError(f"{peer}: message is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{peer}: message is not a JSON object")
    return data


# ---- values -------------------------------------------------------------------------------


def mount_to_json(m: Mount) -> dict[str, Any]:
    return {"type": m.type, "source": m.source, "options": list(m.options)}


def mount_from_json(d: Any) -> Mount:
    if not isinstance(d, dict):
        raise ProtocolError(f"snapshotter: a mount is not an object: {d!r}")
    try:
        return Mount(type=str(d["type"]), source=str(d["source"]),
                     options=[str(o) for o in d["options"]])
    except (KeyError, TypeError) as exc:
        raise ProtocolError(f"snapshotter: malformed mount {d!r}: {exc}") from None


def mounts_from_json(d: Any) -> list[Mount]:
    if not isinstance(d, list):
        raise ProtocolError(f"snapshotter: mounts are not a list: {d!r}")
    return [mount_from_json(m) for m in d]


def _time(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def _parse_time(s: Any) -> datetime | None:
    if s is None:
        return None
    try:
        return datetime.fromisoformat(str(s))
    except ValueError:
        raise ProtocolError(f"snapshotter: bad timestamp {s!r}") from None


def info_to_json(i: Info) -> dict[str, Any]:
    return {
        "name": i.name,
        "kind": str(i.kind),
        "parent": i.parent,
        "labels": dict(i.labels),
        "created": _time(i.created),
        "updated": _time(i.updated),
    }


def info_from_json(d: Any) -> Info:
    if not isinstance(d, dict):
        raise ProtocolError(f"snapshotter: snapshot info is not an object: {d!r}")
    try:
        labels = d.get("labels") or {}
        if not isinstance(labels, dict):
            raise TypeError("labels is not an object")
        return Info(
            name=str(d["name"]),
            kind=Kind(str(d["kind"])),
            parent=str(d.get("parent") or ""),
            labels={str(k): str(v) for k, v in labels.items()},
            created=_parse_time(d.get("created")),
            updated=_parse_time(d.get("updated")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"snapshotter: malformed snapshot info {d!r}: {exc}") from None


def usage_to_json(u: Usage) -> dict[str, Any]:
    return {"size": u.size, "inodes": u.inodes}


def usage_from_json(d: Any) -> Usage:
    try:
        return Usage(size=int(d["size"]), inodes=int(d["inodes"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"snapshotter: malformed usage {d!r}: {exc}") from None


# ---- errors -------------------------------------------------------------------------------


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def error_to_json(exc: BaseException) -> dict[str, Any]:
    """The wire form of ``exc``; non-ipfsnap exceptions become RemoteInternalError."""
    if not isinstance(exc, IpfsnapError):
        exc = RemoteInternalError(f"snapshotter internal error: {type(exc).__name__}: {exc}")
    mro = [_qualname(c) for c in type(exc).__mro__ if issubclass(c, IpfsnapError)]
    return {"type": mro[0], "mro": mro, "message": str(exc)}


def _resolve(name: str) -> type[IpfsnapError] | None:
    module, _, attr = name.rpartition(".")
    if not module.startswith("ipfsnap.") and module != "ipfsnap":
        return None
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    if isinstance(obj, type) and issubclass(obj, IpfsnapError):
        return obj
    return None


def error_from_json(d: Any) -> IpfsnapError:
    """The exception to raise for an error answer: the same class when it can be built."""
    if not isinstance(d, dict):
        return ProtocolError(f"snapshotter: malformed error answer {d!r}")
    message = str(d.get("message", "snapshotter: unknown error"))
    names = d.get("mro")
    if not isinstance(names, list):
        names = [d.get("type")]
    for name in names:
        cls = _resolve(str(name))
        if cls is None:
            continue
        try:
            return cls(message)
        except TypeError:  # a class with a different constructor: try its parent
            continue
    return RemoteInternalError(message)
