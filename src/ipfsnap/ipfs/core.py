"""The RPC logic shared by both faces: calls, error mapping, retries, byte counting.

Every public call is a *plan* (see :mod:`ipfsnap.ipfs.http`): a generator the sync face drives
with blocking sockets and the trio face with trio sockets. So there is one implementation of
retries with exponential backoff, resumption of interrupted range reads, the byte-count check,
trailer handling and JSON parsing.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, Self
from urllib.parse import quote, urlencode

from ipfsnap.config import BlobConfig, Config
from ipfsnap.docparse import MalformedDocument, parse_json
from ipfsnap.ipfs.cid import SHA2_256, parse_cid
from ipfsnap.ipfs.errors import (
    BadCID,
    BadMultiaddr,
    BadReply,
    DaemonUnreachable,
    IPFSCallError,
    IPFSHTTPError,
    IPFSNotFound,
    IPFSTimeout,
    ShortRead,
    StreamError,
)
from ipfsnap.ipfs.http import (
    BodySink,
    Buffer,
    BufferSink,
    CallbackSink,
    ConnectionBroken,
    ConnectionPool,
    Plan,
    Request,
    Response,
    Sleep,
    ViewSink,
    exchange,
    open_connection,
    reusable,
)
from ipfsnap.ipfs.multiaddr import Endpoint, discover_api, parse_api
from ipfsnap.progress import Progress

log = logging.getLogger(__name__)

API_PREFIX = "/api/v0/"
#: seconds a socket operation (connect, send, one receive) may wait before the call fails
DEFAULT_TIMEOUT = 60.0
#: slowest transfer rate we still call progress when sizing the daemon-side ``timeout=`` of a
#: range read: a 4 MiB chunk gets its base timeout plus 4 s
MIN_RATE = 1 << 20
#: share of the client's timeout given to the daemon as its own ``timeout=``
SERVER_TIMEOUT_SHARE = 0.8
#: piece size read from a file and sent as one HTTP chunk by ``add``
ADD_PIECE = 1 << 20
#: ``cat`` with a length allocates its result up front, up to this size (beyond, the result
#: grows as the body arrives): a range read's length is what the caller will hold anyway, this
#: only bounds what a mistaken length costs before the daemon says the content is shorter
PREALLOC_MAX = 256 << 20
#: chunking parameters that make ``add`` match :func:`ipfsnap.ipfs.unixfs.compute_cid`
ADD_PARAMS = (
    ("cid-version", "1"),
    ("raw-leaves", "true"),
    ("chunker", "size-262144"),
    ("cid-base", "base32"),
)

_NOT_FOUND = ("not found", "no link named", "could not find", "does not exist", "no such")
_TIMEOUT = ("context deadline exceeded", "timeout", "timed out", "aborted")


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff, for idempotent calls only."""

    max_retries: int = 5
    min_wait: float = 0.03
    max_wait: float = 0.3
    #: no new attempt starts once this many seconds have passed since the first one
    total: float = 300.0

    @classmethod
    def from_config(cls, blob: BlobConfig) -> RetryPolicy:
        return cls(
            max_retries=blob.max_retries,
            min_wait=blob.min_wait_msec / 1000,
            max_wait=blob.max_wait_msec / 1000,
            total=float(blob.fetching_timeout_sec),
        )

    def wait(self, attempt: int) -> float:
        """Backoff before retry number ``attempt + 1``: doubling, capped, with jitter."""
        base = min(self.max_wait, self.min_wait * float(1 << min(attempt, 30)))
        return base * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class AddResult:
    """What ``add`` gives: the CIDv1 base32 and the file's size in bytes (as sent)."""

    cid: str
    size: int
    #: the daemon's ``Size``: the DAG's cumulative size (file bytes plus node overhead)
    dag_size: int = 0
    name: str = ""


@dataclass(frozen=True)
class BlockStat:
    cid: str
    size: int


@dataclass(frozen=True)
class FileStat:
    cid: str
    size: int
    cumulative_size: int
    type: str
    blocks: int


@dataclass(frozen=True)
class Peer:
    peer_id: str
    addr: str


@dataclass
class Call:
    """One RPC request, rebuilt per attempt (a retried range read asks for less)."""

    name: str
    params: list[tuple[str, str]]
    cid: str | None = None
    idempotent: bool = True
    #: makes the request body's pieces; called per request, so a reconnect resends it whole
    body: Callable[[], Iterable[Buffer]] | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    #: socket timeout for this call (None: the client's)
    timeout: float | None = None


def _json_message(resp: Response) -> str:
    text = resp.body.decode("utf-8", "replace").strip()
    try:
        obj = parse_json(text)
    except MalformedDocument:
        return text.splitlines()[0][:500] if text else resp.reason or "no message"
    if isinstance(obj, dict) and isinstance(obj.get("Message"), str):
        return str(obj["Message"])[:500]
    return text[:500]


def _server_timeout(seconds: float) -> str:
    """The daemon's ``timeout=``: a bit shorter than ours, so the daemon's error (which says
    what it was waiting for) arrives before our socket timeout fires. Milliseconds: Kubo (Go
    durations) and js-ipfs (parse-duration) both read ``ms``."""
    return f"{max(100, math.floor(seconds * SERVER_TIMEOUT_SHARE * 1000))}ms"


def _decode_json(call: Call, api: str, body: bytes) -> Any:
    try:
        return parse_json(body)
    except MalformedDocument:
        raise BadReply(call.name, api, f"reply is not JSON: {body[:80]!r}", call.cid) from None


def _source_pieces(source: Path | IO[bytes] | bytes, counter: list[int]) -> Iterator[Buffer]:
    """``source`` in pieces of :data:`ADD_PIECE`; each piece is sent before the next is read,
    so one buffer serves them all (no fresh 1 MiB per piece)."""
    if isinstance(source, bytes):
        counter[0] += len(source)
        yield source
        return
    # a path is opened here and closed below, also when the plan is closed early
    f: IO[bytes] = open(source, "rb") if isinstance(source, Path) else source  # noqa: SIM115
    buf = bytearray(ADD_PIECE)
    view = memoryview(buf)
    readinto = getattr(f, "readinto", None)
    try:
        while True:
            if readinto is not None:
                n = readinto(view)
                piece: Buffer = view[:n] if n else b""
            else:
                piece = f.read(ADD_PIECE)
            if not piece:
                return
            counter[0] += len(piece)
            yield piece
    finally:
        if isinstance(source, Path):
            f.close()


class _RangeSink:
    """Counts the body bytes of a range read into ``inner`` and refuses more than ``limit``
    (across attempts: a resumed read carries on where the last one stopped)."""

    def __init__(self, inner: BodySink, limit: int | None, too_much: Callable[[], Exception]):
        self.inner = inner
        self.limit = limit
        self.too_much = too_much
        self.direct = inner.direct
        self.got = 0

    def write(self, piece: memoryview) -> None:
        if self.limit is not None and self.got + len(piece) > self.limit:
            raise self.too_much()
        self.inner.write(piece)
        self.got += len(piece)

    def reserve(self, n: int) -> memoryview | None:
        if self.limit is not None:
            n = min(n, self.limit - self.got)
        return self.inner.reserve(n) if n > 0 else None

    def commit(self, n: int) -> None:
        self.inner.commit(n)
        self.got += n


class RPC:
    """Plans for every call; faces wrap each in one line (``self._run(self._rpc.cat(...))``)."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        pool: ConnectionPool | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.api = endpoint.url
        self.timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()
        self.pool = pool if pool is not None else ConnectionPool()

    # -- one attempt ----------------------------------------------------------------------

    def _request(self, call: Call) -> Request:
        query = urlencode(call.params)
        target = API_PREFIX + call.name + (f"?{query}" if query else "")
        headers = [("Host", self.endpoint.host_header), ("User-Agent", "ipfsnap"),
                   ("Accept", "*/*"), *call.headers]
        if self.endpoint.auth:
            headers.append(("Authorization", self.endpoint.auth))
        return Request("POST", target, headers, call.body() if call.body is not None else None)

    def _attempt(self, call: Call, sink: BodySink | None) -> Plan[Response]:
        """Plan -> :class:`Response` with a 2xx status and no stream error, or raise."""
        timeout = call.timeout if call.timeout is not None else self.timeout
        while True:
            # a request with a body that cannot be replayed gets a fresh connection: a pooled
            # one might have been closed by the daemon in the meantime
            conn = self.pool.take() if call.idempotent else None
            reused = conn is not None
            if conn is None:
                try:
                    conn = yield from open_connection(self.endpoint, timeout)
                except TimeoutError:
                    raise IPFSTimeout(call.name, self.api,
                                      f"no connection within {timeout:g} s", call.cid) from None
                except OSError as exc:
                    detail = exc.strerror or str(exc) or type(exc).__name__
                    raise DaemonUnreachable(call.name, self.api, f"cannot connect: {detail}",
                                            call.cid) from None
            request = self._request(call)
            try:
                resp: Response = yield from exchange(conn, request, timeout, sink)
            except TimeoutError:
                conn.transport.close()
                raise IPFSTimeout(call.name, self.api, f"no reply within {timeout:g} s",
                                  call.cid) from None
            except ConnectionBroken as exc:
                conn.transport.close()
                if reused and exc.before_reply:
                    log.debug("pooled connection to %s was closed; reconnecting", self.api)
                    continue
                err = DaemonUnreachable(call.name, self.api, str(exc), call.cid)
                err.connected = True
                raise err from None
            except BaseException:
                conn.transport.close()
                raise
            if reusable(conn):
                self.pool.put(conn)
            else:
                conn.transport.close()
            self._check(call, resp)
            return resp

    def _check(self, call: Call, resp: Response) -> None:
        if resp.status >= 300:
            message = _json_message(resp)
            low = message.lower()
            if resp.status == 404 and "page not found" in low:
                raise IPFSHTTPError(call.name, self.api, resp.status,
                                    f"the daemon does not know /api/v0/{call.name}", call.cid)
            if any(s in low for s in _TIMEOUT):
                raise IPFSTimeout(call.name, self.api, f"daemon: {message}", call.cid)
            if any(s in low for s in _NOT_FOUND):
                raise IPFSNotFound(call.name, self.api, f"daemon: {message}", call.cid)
            raise IPFSHTTPError(call.name, self.api, resp.status, message, call.cid)
        stream_error = resp.trailers.get("x-stream-error", "")
        if stream_error:
            raise StreamError(call.name, self.api,
                              f"error after {resp.received} bytes: {stream_error}", call.cid)

    # -- retries ----------------------------------------------------------------------------

    def run(
        self,
        make_call: Callable[[int], Call],
        sink: BodySink | None = None,
        check: Callable[[Call, Response], None] | None = None,
    ) -> Plan[Response]:
        """Plan -> :class:`Response`: attempts ``make_call(attempt)`` until it works, retrying
        retryable failures of idempotent calls with backoff within :class:`RetryPolicy`."""
        start = time.monotonic()
        attempt = 0
        while True:
            call = make_call(attempt)
            try:
                resp = yield from self._attempt(call, sink)
                if check is not None:
                    check(call, resp)
                return resp
            except IPFSCallError as exc:
                if not (call.idempotent and exc.retryable) or attempt >= self.retry.max_retries:
                    raise
                wait = self.retry.wait(attempt)
                if time.monotonic() - start + wait > self.retry.total:
                    raise
                attempt += 1
                log.info("%s; retry %d/%d in %.0f ms", exc, attempt, self.retry.max_retries,
                         wait * 1000)
                yield Sleep(wait)

    def json_call(
        self,
        name: str,
        params: list[tuple[str, str]] | None = None,
        *,
        cid: str | None = None,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Plan[Any]:
        """Plan -> the decoded JSON reply (None for an empty body)."""
        resp = yield from self.run(
            lambda _a: Call(name, list(params or []), cid, idempotent, timeout=timeout)
        )
        if not resp.body.strip():
            return None
        return _decode_json(Call(name, [], cid), self.api, resp.body)

    def _cid(self, name: str, cid: str) -> str:
        try:
            return parse_cid(cid).v1_base32()
        except BadCID as exc:
            raise BadCID(f"ipfs {name}: {exc}") from None

    def _norm(self, name: str, cid: Any) -> str:
        """A CID the daemon sent, normalised; a broken one is a bad reply."""
        if isinstance(cid, dict) and isinstance(cid.get("/"), str):
            cid = cid["/"]
        if not isinstance(cid, str):
            raise BadReply(name, self.api, f"expected a CID, got {cid!r}")
        try:
            return parse_cid(cid).v1_base32()
        except BadCID as exc:
            raise BadReply(name, self.api, str(exc)) from None

    # -- reads --------------------------------------------------------------------------------

    def cat_into(
        self,
        cid: str,
        offset: int,
        length: int | None,
        sink: Callable[[bytes], object] | bytearray | memoryview,
        *,
        timeout: float | None = None,
    ) -> Plan[int]:
        """Plan -> bytes delivered: ``length`` bytes at ``offset`` (None: to the end), either
        to a callback ``sink`` (each piece a new ``bytes`` it may keep) or straight into a
        writable buffer ``sink`` (a ``bytearray``, or a ``memoryview`` of one, of an ``mmap``
        or of any writable memory), filled from its start with no copy and no allocation.
        With a buffer, ``length`` None means ``len(sink)``.

        Exactly ``length`` bytes or an error: a short body is retried from where it stopped
        (the bytes already delivered stay valid: content is addressed by its hash).
        """
        if callable(sink):
            got: int = yield from self.read(cid, offset, length, CallbackSink(sink),
                                            timeout=timeout)
            return got
        with memoryview(sink) as outer:
            if outer.readonly:
                raise TypeError(f"ipfs cat {cid}: the buffer to read into is read-only "
                                f"({type(sink).__name__})")
            view = outer.cast("B")  # bytes, whatever the buffer's item format
            if length is None:
                length = len(view)
            elif length > len(view):
                size = len(view)
                view.release()
                raise ShortRead("cat", self.api, f"range offset={offset} length={length} "
                                f"does not fit the {size}-byte buffer", self._cid("cat", cid),
                                final=True)
            body = ViewSink(view)
            try:
                got = yield from self.read(cid, offset, length, body, timeout=timeout)
            finally:
                # no view of the caller's buffer outlives the call (it may be resized)
                body.release()
            return got

    def cat(
        self, cid: str, offset: int = 0, length: int | None = None, *,
        timeout: float | None = None,
    ) -> Plan[bytes]:
        """Plan -> bytes: built in place, received straight into the result when the length
        is known (see :class:`~ipfsnap.ipfs.http.BufferSink`)."""
        buf = BufferSink(length if length is not None and length <= PREALLOC_MAX else None)
        yield from self.read(cid, offset, length, buf, timeout=timeout)
        return buf.getvalue()

    def read(
        self,
        cid: str,
        offset: int,
        length: int | None,
        body: BodySink,
        *,
        timeout: float | None = None,
    ) -> Plan[int]:
        """Plan -> bytes given to ``body``: what :meth:`cat_into` does, for any sink."""
        cid = self._cid("cat", cid)
        if offset < 0 or (length is not None and length < 0):
            raise ShortRead("cat", self.api, f"bad range offset={offset} length={length}", cid,
                            final=True)
        if length == 0:
            return 0  # the daemons reject or misread length=0; nothing to fetch anyway
        got = 0
        base = timeout if timeout is not None else self.timeout

        def make(_attempt: int) -> Call:
            params = [("arg", f"/ipfs/{cid}")]
            if offset + got:
                params.append(("offset", str(offset + got)))
            if length is not None:
                params.append(("length", str(length - got)))
                server = base + (length - got) / MIN_RATE
            else:
                server = max(base, self.retry.total)
            # without a timeout js-ipfs waits forever for a block nobody has
            params.append(("timeout", _server_timeout(server)))
            return Call("cat", params, cid, True, timeout=timeout)

        start_of_attempt = [0]
        counted = _RangeSink(body, length, lambda: BadReply(
            "cat", self.api, f"daemon sent more than the {length} bytes asked for", cid))

        def check(call: Call, resp: Response) -> None:
            got = counted.got
            before = start_of_attempt[0]
            this = got - before
            want = None if length is None else length - before
            declared = resp.headers.get("x-content-length", "")
            # a count int() takes: ASCII digits (str.isdigit() also passes the header byte
            # "\xb2", a superscript two, which int() refuses) and no longer than a 64-bit
            # size (int() refuses 4300 digits); anything else counts as not announced
            if declared.isascii() and declared.isdigit() and len(declared) <= 20:
                # Kubo announces how many bytes this reply carries
                if this != int(declared):
                    raise ShortRead("cat", self.api, f"got {this} of the {declared} bytes the "
                                    f"daemon announced at offset {offset + before}", cid)
                if want is not None and this < want:
                    raise ShortRead("cat", self.api, f"range offset={offset} length={length} "
                                    f"ends beyond the content ({got} bytes available)", cid,
                                    final=True)
            elif want is not None and this < want:
                # a resumed read that ends cleanly with nothing new is at the end of the
                # content (js-ipfs does not announce lengths): repeating will not help
                raise ShortRead("cat", self.api, f"got {got} of {length} bytes at offset "
                                f"{offset}", cid, final=this == 0 and before > 0)

        def make_tracked(attempt: int) -> Call:
            nonlocal got
            got = start_of_attempt[0] = counted.got
            return make(attempt)

        try:
            yield from self.run(make_tracked, counted, check)
        except IPFSHTTPError as exc:
            # js-ipfs answers 500 to an offset at or past the end (Kubo: an empty 200)
            if "offset must be less than" in exc.message.lower():
                raise ShortRead("cat", self.api, f"range offset={offset} length={length} "
                                f"starts beyond the content ({exc.message})", cid,
                                final=True) from None
            raise
        return counted.got

    def files_stat(self, cid: str, *, timeout: float | None = None) -> Plan[FileStat]:
        """Plan -> :class:`FileStat` (``files/stat`` of ``/ipfs/<cid>``)."""
        cid = self._cid("files/stat", cid)
        t = timeout if timeout is not None else self.timeout
        obj = yield from self.json_call(
            "files/stat", [("arg", f"/ipfs/{cid}"), ("timeout", _server_timeout(t))],
            cid=cid, timeout=timeout)
        try:
            return FileStat(
                cid=self._norm("files/stat", obj["Hash"]),
                size=int(obj["Size"]),
                cumulative_size=int(obj.get("CumulativeSize", 0)),
                type=str(obj.get("Type", "")),
                blocks=int(obj.get("Blocks", 0)),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # int(1e999): inf
            raise BadReply("files/stat", self.api, f"unexpected reply {obj!r:.200} ({exc})",
                           cid) from None

    def file_size(self, cid: str, *, timeout: float | None = None) -> Plan[int]:
        stat: FileStat = yield from self.files_stat(cid, timeout=timeout)
        return stat.size

    def block_get(self, cid: str, *, timeout: float | None = None) -> Plan[bytes]:
        """Plan -> the block's bytes, checked against the CID's sha2-256 digest."""
        cid = self._cid("block/get", cid)
        parsed = parse_cid(cid)
        t = timeout if timeout is not None else self.timeout

        def check(call: Call, resp: Response) -> None:
            if parsed.hash_code == SHA2_256 and hashlib.sha256(resp.body).digest() != parsed.digest:
                err = BadReply("block/get", self.api, "block does not match its CID", cid)
                err.retryable = True
                raise err

        resp = yield from self.run(
            lambda _a: Call("block/get", [("arg", cid), ("timeout", _server_timeout(t))], cid,
                            timeout=timeout),
            None, check)
        return resp.body

    def block_stat(self, cid: str, *, timeout: float | None = None) -> Plan[BlockStat]:
        cid = self._cid("block/stat", cid)
        t = timeout if timeout is not None else self.timeout
        obj = yield from self.json_call(
            "block/stat", [("arg", cid), ("timeout", _server_timeout(t))], cid=cid,
            timeout=timeout)
        try:
            return BlockStat(self._norm("block/stat", obj["Key"]), int(obj["Size"]))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # int(1e999): inf
            raise BadReply("block/stat", self.api, f"unexpected reply {obj!r:.200} ({exc})",
                           cid) from None

    def pin_add(self, cid: str, *, timeout: float | None = None) -> Plan[list[str]]:
        """Plan -> the pinned CIDs (normalised). Recursive, like ``ipfs pin add``."""
        cid = self._cid("pin/add", cid)
        t = timeout if timeout is not None else max(self.timeout, self.retry.total)
        obj = yield from self.json_call(
            "pin/add", [("arg", f"/ipfs/{cid}"), ("timeout", _server_timeout(t))], cid=cid,
            timeout=timeout)
        pins = obj.get("Pins") if isinstance(obj, dict) else None
        if not isinstance(pins, list):
            raise BadReply("pin/add", self.api, f"unexpected reply {obj!r:.200}", cid)
        return [self._norm("pin/add", p) for p in pins]

    # -- node -----------------------------------------------------------------------------

    def id(self) -> Plan[dict[str, Any]]:
        """Plan -> the ``id`` reply (``ID``, ``Addresses``, ``AgentVersion``...)."""
        obj = yield from self.json_call("id")
        if not isinstance(obj, dict) or not isinstance(obj.get("ID"), str):
            raise BadReply("id", self.api, f"unexpected reply {obj!r:.200}")
        return obj

    def version(self) -> Plan[dict[str, Any]]:
        obj = yield from self.json_call("version")
        if not isinstance(obj, dict) or not isinstance(obj.get("Version"), str):
            raise BadReply("version", self.api, f"unexpected reply {obj!r:.200}")
        return obj

    def swarm_connect(self, addr: str, *, timeout: float | None = None) -> Plan[list[str]]:
        obj = yield from self.json_call("swarm/connect", [("arg", addr)], cid=None,
                                        timeout=timeout)
        strings = obj.get("Strings") if isinstance(obj, dict) else None
        return [str(s) for s in strings] if isinstance(strings, list) else []

    def swarm_peers(self) -> Plan[list[Peer]]:
        obj = yield from self.json_call("swarm/peers")
        peers = obj.get("Peers") if isinstance(obj, dict) else None
        out = []
        for p in peers or []:
            if isinstance(p, dict):
                out.append(Peer(str(p.get("Peer", "")), str(p.get("Addr", ""))))
        return out

    def _peers(self, name: str, obj: Any) -> list[str]:
        peers = obj.get("Peers") if isinstance(obj, dict) else None
        if peers is None:
            return []
        if not isinstance(peers, list):
            raise BadReply(name, self.api, f"unexpected reply {obj!r:.200}")
        return [str(p) for p in peers]

    def bootstrap_list(self) -> Plan[list[str]]:
        obj = yield from self.json_call("bootstrap/list")
        return self._peers("bootstrap/list", obj)

    def bootstrap_rm_all(self) -> Plan[list[str]]:
        obj = yield from self.json_call("bootstrap/rm", [("all", "true")])
        return self._peers("bootstrap/rm", obj)

    def bootstrap_add(self, addr: str) -> Plan[list[str]]:
        obj = yield from self.json_call("bootstrap/add", [("arg", addr)])
        return self._peers("bootstrap/add", obj)

    def shutdown(self) -> Plan[None]:
        """Plan -> None. A daemon that hangs up while stopping counts as stopped."""
        try:
            yield from self.run(lambda _a: Call("shutdown", [], idempotent=False))
        except DaemonUnreachable as exc:
            if not exc.connected:
                raise

    # -- add --------------------------------------------------------------------------------

    def add(
        self,
        source: str | os.PathLike[str] | IO[bytes] | bytes,
        name: str | None = None,
        *,
        pin: bool = True,
        timeout: float | None = None,
        progress: Progress | None = None,
    ) -> Plan[AddResult]:
        """Plan -> :class:`AddResult`: stream ``source`` as one multipart file part.

        A path (or bytes) can be sent again, so a failed add of a path is retried; a file
        object is read once and not retried.
        """
        src: Path | IO[bytes] | bytes
        if isinstance(source, (str, os.PathLike)):
            src = Path(source)
            label = name or src.name
            replayable = True
        elif isinstance(source, bytes):
            src, label, replayable = source, name or "blob", True
        else:
            src, label, replayable = source, name or "blob", False
        boundary = uuid.uuid4().hex
        counter = [0]
        disposition = f'form-data; name="file"; filename="{quote(label, safe="")}"'
        head = (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        def body() -> Iterator[Buffer]:
            counter[0] = 0
            yield head
            for piece in _source_pieces(src, counter):
                if progress is not None:
                    progress.update(label, "adding", counter[0])
                yield piece
            yield tail

        params = [*ADD_PARAMS, ("pin", "true" if pin else "false")]
        headers = [("Content-Type", f"multipart/form-data; boundary={boundary}")]
        resp = yield from self.run(
            lambda _a: Call("add", list(params), None, replayable, body, headers,
                            timeout=timeout))
        last: dict[str, Any] | None = None
        for line in resp.body.splitlines():
            if not line.strip():
                continue
            obj = _decode_json(Call("add", []), self.api, line)
            if not isinstance(obj, dict):
                raise BadReply("add", self.api, f"unexpected reply line {line[:200]!r}")
            if obj.get("Type") == "error" or ("Message" in obj and "Hash" not in obj):
                raise IPFSHTTPError("add", self.api, resp.status, str(obj.get("Message")))
            if "Hash" in obj:
                last = obj
        if last is None:
            raise BadReply("add", self.api, f"no Hash in reply {resp.body[:200]!r}")
        cid = self._norm("add", last["Hash"])
        try:
            dag_size = int(last.get("Size", 0))
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(1e999), inf
            raise BadReply("add", self.api, f"bad Size in reply {last!r:.200}", cid) from None
        if progress is not None:
            progress.finish(label, f"added {cid}")
        return AddResult(cid=cid, size=counter[0], dag_size=dag_size, name=label)


# -- what both faces share ----------------------------------------------------------------------


def endpoint_from_config(cfg: Config, repo_candidates: Iterable[Path] | None = None) -> Endpoint:
    """The API of ``cfg`` (``ipfs_api``/env/CLI), else the managed repo, else the usual files."""
    candidates = [cfg.ipfs_repo] if repo_candidates is None else list(repo_candidates)
    return discover_api(cfg.ipfs_api, cfg.ipfs_auth, repo_candidates=candidates)


def resolve_endpoint(endpoint: Endpoint | str | None, auth: str | None) -> Endpoint:
    """An explicit endpoint (multiaddr or URL string), else the discovered one."""
    if endpoint is None:
        return discover_api(None, auth)
    if isinstance(endpoint, str):
        return parse_api(endpoint, auth=auth)
    return endpoint.with_auth(auth) if auth is not None else endpoint


class HasRPC(Protocol):
    """A face: something holding the plans it runs."""

    _rpc: RPC


class ClientBase:
    """Construction shared by the faces; each face adds its calls as ``RPC`` plans run with its
    own I/O (``cat = blocking(RPC.cat)``), so signatures and types come from :class:`RPC`."""

    #: the API URL schemes the face can speak
    schemes: tuple[str, ...] = ("http", "https")

    def __init__(
        self,
        endpoint: Endpoint | str | None = None,
        *,
        auth: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.endpoint = resolve_endpoint(endpoint, auth)
        if self.endpoint.scheme not in self.schemes:
            raise BadMultiaddr(f"IPFS API {self.endpoint.url}: {type(self).__name__} speaks "
                               f"{' and '.join(self.schemes)} only")
        self._rpc = RPC(self.endpoint, timeout=timeout, retry=retry, pool=ConnectionPool())

    @classmethod
    def from_config(
        cls, cfg: Config, repo_candidates: Iterable[Path] | None = None, **kw: Any
    ) -> Self:
        kw.setdefault("retry", RetryPolicy.from_config(cfg.blob))
        return cls(endpoint_from_config(cfg, repo_candidates), **kw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.endpoint.url})"
