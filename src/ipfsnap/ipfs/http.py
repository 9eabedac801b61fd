"""Sans-IO HTTP/1.1 for the RPC API: requests, responses with trailers, a connection pool.

Nothing here touches a socket. An exchange is a generator that *yields* I/O operations
(:class:`Connect`, :class:`Send`, :class:`Recv`, :class:`Sleep`) and receives their results;
the sync face (:mod:`ipfsnap.ipfs.client`, stdlib sockets) and the trio face
(:mod:`ipfsnap.ipfs.aclient`) each drive the same generators, so framing, keep-alive, retries
and byte counting exist once. A face reports failures by throwing into the generator:
``TimeoutError`` when an operation exceeds its ``timeout``, ``OSError`` for socket errors.

h11 parses chunked bodies *and their trailers*: Kubo reports errors that happen after it has
sent ``200 OK`` in an ``X-Stream-Error`` trailer, which many HTTP clients silently drop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import h11

from ipfsnap.ipfs.multiaddr import Endpoint

log = logging.getLogger(__name__)

#: bytes asked of the socket per receive: large enough that a 1 MiB range read takes a few
#: system calls, small enough not to matter per connection
RECV_SIZE = 256 * 1024
#: an error body longer than this is cut (the daemon's messages are one line of JSON)
MAX_ERROR_BODY = 64 * 1024
#: idle pooled connections older than this are dropped rather than reused: Node's http server
#: (js-ipfs) closes idle keep-alive connections after 5 s, so reuse must stay below that
POOL_IDLE_SECONDS = 4.0
#: idle connections kept per client
POOL_MAX_IDLE = 8


class Transport(Protocol):
    """What a face's :class:`Connect` returns: an open byte stream, closed synchronously."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Connect:
    endpoint: Endpoint
    timeout: float


@dataclass(frozen=True)
class Send:
    transport: Any
    data: bytes
    timeout: float


@dataclass(frozen=True)
class Recv:
    """Answer: up to ``RECV_SIZE`` bytes, ``b""`` at end of stream."""

    transport: Any
    timeout: float


@dataclass(frozen=True)
class Sleep:
    seconds: float


Op = Connect | Send | Recv | Sleep
#: a plan: yields operations, gets their results sent back, returns T
Plan = Generator[Op, Any, Any]


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    #: None: no body; otherwise the body's pieces, sent with chunked transfer encoding
    body: Iterable[bytes] | None = None


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]
    trailers: dict[str, str] = field(default_factory=dict)
    #: the body when it was collected (errors, JSON replies); empty when streamed to a sink
    body: bytes = b""
    #: body bytes received (also when streamed)
    received: int = 0


class ConnectionBroken(Exception):
    """The connection failed after it was opened; ``before_reply``: no response byte yet."""

    def __init__(self, detail: str, before_reply: bool) -> None:
        super().__init__(detail)
        self.before_reply = before_reply


@dataclass
class Connection:
    transport: Any
    h11: h11.Connection
    idle_since: float = 0.0
    uses: int = 0
    #: set when the body was decoded by :class:`ChunkedDecoder` instead of h11: whether the
    #: connection may carry another request (h11's own state no longer says so)
    fast_keep_alive: bool | None = None


#: a chunk-size line or trailer line longer than this is not HTTP we accept
MAX_LINE = 4096
#: trailer lines accepted (Kubo sends one)
MAX_TRAILERS = 64


class ChunkedDecoder:
    """Incremental decoder of a chunked body and its trailers, for the hot path.

    h11 decodes bodies correctly but copies every byte twice through its receive buffer and
    costs ~3 us of Python per event; a range read or full ``cat`` of a large blob is almost
    all body, so 2xx streamed bodies are decoded here: one slice per chunk piece, no
    buffering beyond a partial chunk-size line. h11 still parses the status line, headers and
    every error reply.
    """

    _DATA, _CRLF, _SIZE, _TRAILER = range(4)

    def __init__(self) -> None:
        self._state = self._SIZE
        self._remaining = 0
        self._partial = b""
        self.done = False
        self.trailers: dict[str, str] = {}
        #: bytes received after the end of the body (a pipelining server; never reuse)
        self.extra = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Body pieces found in ``data``; raises ValueError on malformed framing."""
        if self._partial:
            data = self._partial + data
            self._partial = b""
        out: list[bytes] = []
        pos, n = 0, len(data)
        while pos < n:
            if self._state == self._DATA:
                take = min(self._remaining, n - pos)
                out.append(data if take == n else data[pos:pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = self._CRLF
            elif self._state == self._CRLF:
                if n - pos < 2:
                    break
                if data[pos:pos + 2] != b"\r\n":
                    raise ValueError("missing CRLF after a chunk")
                pos += 2
                self._state = self._SIZE
            else:
                end = data.find(b"\r\n", pos, pos + MAX_LINE)
                if end < 0:
                    if n - pos >= MAX_LINE:
                        raise ValueError("chunk-size or trailer line too long")
                    break
                line = data[pos:end]
                pos = end + 2
                if self._state == self._SIZE:
                    text = line.split(b";", 1)[0].strip()
                    if not text or len(text) > 16 or text.strip(b"0123456789abcdefABCDEF"):
                        raise ValueError(f"bad chunk size {line[:40]!r}")
                    size = int(text, 16)
                    if size:
                        self._remaining = size
                        self._state = self._DATA
                    else:
                        self._state = self._TRAILER
                elif not line:
                    self.done = True
                    self.extra = data[pos:]
                    return out
                else:
                    if len(self.trailers) >= MAX_TRAILERS:
                        raise ValueError("too many trailers")
                    key, sep, value = line.partition(b":")
                    if not sep:
                        raise ValueError(f"bad trailer line {line[:40]!r}")
                    self.trailers[key.strip().lower().decode("latin-1")] = (
                        value.strip().decode("latin-1"))
        self._partial = data[pos:]
        return out


class ConnectionPool:
    """Idle keep-alive connections of one client. Thread-safe (the sync face is shared)."""

    def __init__(
        self, max_idle: int = POOL_MAX_IDLE, idle_seconds: float = POOL_IDLE_SECONDS
    ) -> None:
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds

    def take(self) -> Connection | None:
        now = time.monotonic()
        stale: list[Connection] = []
        found = None
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if now - conn.idle_since < self.idle_seconds:
                    found = conn
                    break
                stale.append(conn)
        for conn in stale:
            _close(conn.transport)
        return found

    def put(self, conn: Connection) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        _close(conn.transport)

    def close_all(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            _close(conn.transport)


def _close(transport: Any) -> None:
    try:
        transport.close()
    except Exception:  # closing a dead socket must never hide the real error
        log.debug("closing transport failed", exc_info=True)


def open_connection(endpoint: Endpoint, timeout: float) -> Plan:
    """Plan -> a fresh :class:`Connection` (``OSError``/``TimeoutError`` propagate)."""
    transport = yield Connect(endpoint, timeout)
    return Connection(transport, h11.Connection(h11.CLIENT))


def exchange(
    conn: Connection,
    request: Request,
    timeout: float,
    on_data: Callable[[bytes], None] | None = None,
) -> Plan:
    """Plan -> :class:`Response`: send ``request`` on ``conn`` and read the whole reply.

    A 2xx body goes to ``on_data`` when given (streaming; each piece is a new bytes-like
    object the callee may keep), else into ``Response.body``; error
    bodies are always collected (cut at :data:`MAX_ERROR_BODY`). Leaves ``conn`` ready for the
    next request when the server keeps it alive; the caller decides (see :func:`reusable`).
    Raises :class:`ConnectionBroken` when the peer goes away or speaks broken HTTP.
    """
    h = conn.h11
    conn.uses += 1
    replied = False
    try:
        headers = list(request.headers)
        if request.body is None:
            headers.append(("Content-Length", "0"))
        else:
            headers.append(("Transfer-Encoding", "chunked"))
        data = h.send(h11.Request(method=request.method, target=request.target, headers=headers))
        if request.body is not None:
            # one send for the head and each piece keeps the syscall count low
            for piece in request.body:
                if piece:
                    framed = h.send(h11.Data(data=piece)) or b""
                    yield Send(conn.transport, (data or b"") + framed, timeout)
                    data = b""
        end = h.send(h11.EndOfMessage()) or b""
        yield Send(conn.transport, (data or b"") + end, timeout)

        response: Response | None = None
        body = bytearray()
        collect = True
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                chunk = yield Recv(conn.transport, timeout)
                if chunk:
                    replied = True
                h.receive_data(chunk)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                response = Response(
                    status=event.status_code,
                    reason=event.reason.decode("latin-1"),
                    headers={k.decode("latin-1").lower(): v.decode("latin-1")
                             for k, v in event.headers},
                )
                collect = on_data is None or response.status >= 300
                if (not collect and response.status != 204
                        and response.headers.get("transfer-encoding", "").lower() == "chunked"):
                    assert on_data is not None
                    yield from _fast_body(conn, event, response, timeout, on_data)
                    return response
                continue
            if isinstance(event, h11.Data):
                assert response is not None
                response.received += len(event.data)
                if collect:
                    if len(body) < MAX_ERROR_BODY or response.status < 300:
                        body += event.data
                else:
                    assert on_data is not None
                    # h11 hands out a fresh slice per event: no need to copy it again
                    on_data(event.data)
                continue
            if isinstance(event, h11.EndOfMessage):
                assert response is not None
                response.trailers = {k.decode("latin-1").lower(): v.decode("latin-1")
                                     for k, v in event.headers}
                response.body = bytes(body)
                return response
            if isinstance(event, h11.ConnectionClosed):
                raise ConnectionBroken("connection closed by the daemon", not replied)
            raise ConnectionBroken(f"unexpected HTTP event {type(event).__name__}", not replied)
    except TimeoutError:
        raise
    except h11.ProtocolError as exc:
        if not replied:
            raise ConnectionBroken(f"connection closed before the reply ({exc})", True) from exc
        raise ConnectionBroken(f"reply cut short or malformed ({exc})", False) from exc
    except OSError as exc:
        detail = exc.strerror or str(exc) or type(exc).__name__
        raise ConnectionBroken(f"connection failed: {detail}", not replied) from exc


def _fast_body(
    conn: Connection,
    head: h11.Response,
    response: Response,
    timeout: float,
    on_data: Callable[[bytes], None],
) -> Plan:
    """Read a chunked 2xx body with :class:`ChunkedDecoder`, then renew ``conn``'s h11 state."""
    buffered, closed = conn.h11.trailing_data
    decoder = ChunkedDecoder()
    chunk = bytes(buffered)
    try:
        while True:
            for piece in decoder.feed(chunk):
                response.received += len(piece)
                on_data(piece)
            if decoder.done:
                break
            if closed:
                raise ConnectionBroken("reply cut short: connection closed mid-body", False)
            chunk = yield Recv(conn.transport, timeout)
            closed = not chunk
    except ValueError as exc:
        raise ConnectionBroken(f"malformed chunked reply ({exc})", False) from exc
    response.trailers = decoder.trailers
    connection = response.headers.get("connection", "").lower()
    conn.fast_keep_alive = (head.http_version == b"1.1" and "close" not in connection
                            and not decoder.extra)
    # the request is complete and the reply consumed: a new h11 state machine carries on
    conn.h11 = h11.Connection(h11.CLIENT)


def reusable(conn: Connection) -> bool:
    """True (and ``conn`` reset for a new request) when the exchange left it keep-alive."""
    if conn.fast_keep_alive is not None:
        keep, conn.fast_keep_alive = conn.fast_keep_alive, None
        return keep
    h = conn.h11
    if h.our_state is h11.DONE and h.their_state is h11.DONE:
        h.start_next_cycle()
        return True
    return False
