"""Sans-IO HTTP/1.1 for the RPC API: requests, responses with trailers, a connection pool.

Nothing here touches a socket. An exchange is a generator that *yields* I/O operations
(:class:`Connect`, :class:`Send`, :class:`RecvInto`, :class:`Sleep`) and receives their
results; the sync face (:mod:`ipfsnap.ipfs.client`, stdlib sockets) and the trio face
(:mod:`ipfsnap.ipfs.aclient`) each drive the same generators, so framing, keep-alive, retries
and byte counting exist once. A face reports failures by throwing into the generator:
``TimeoutError`` when an operation exceeds its ``timeout``, ``OSError`` for socket errors.

h11 parses every response head and every error reply. A 2xx body framed by chunked encoding
or Content-Length -- the hot path: range reads, full reads, JSON replies -- is decoded here
instead (:class:`ChunkedDecoder`, :class:`LengthDecoder`), straight out of a receive buffer
each connection keeps, into a :class:`BodySink`; chunked trailers are parsed too: Kubo reports
errors that happen after it has sent ``200 OK`` in an ``X-Stream-Error`` trailer, which many
HTTP clients silently drop.

Why not h11 for bodies: it copies every byte twice through its receive buffer and costs ~3 us
of Python per event, and receiving into a fresh ``bytes`` per ``recv`` makes the kernel
zero-fill new pages for every body byte: on the 2-core VMs ipfsnap was measured on, page
faults cost ~1 ms of CPU per MiB, more than the copy itself (docs/benchmarks.md, IPFS client).
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import h11

from ipfsnap.ipfs.multiaddr import Endpoint

log = logging.getLogger(__name__)

#: a connection's receive buffer: big enough that a loopback socket, which holds up to a few
#: hundred KiB when the reader lags, is drained in one system call; allocated once per
#: connection (pooled connections keep theirs, so its pages stay mapped); 1 MiB measured no
#: better
RECV_SIZE = 256 * 1024
#: a chunk-size line is at most 16 hex digits plus an extension nobody sends: look for its end
#: in this many bytes before trying :data:`MAX_LINE`
SHORT_LINE = 64
#: an error body longer than this is cut (the daemon's messages are one line of JSON)
MAX_ERROR_BODY = 64 * 1024
#: a response head longer than this is not one we accept (h11's own default limit)
MAX_HEAD = 16 * 1024
#: a chunk-size line or trailer line longer than this is not HTTP we accept
MAX_LINE = 4096
#: trailer lines accepted (Kubo sends one)
MAX_TRAILERS = 64
#: idle pooled connections older than this are dropped rather than reused: Node's http server
#: (js-ipfs) closes idle keep-alive connections after 5 s, so reuse must stay below that
POOL_IDLE_SECONDS = 4.0
#: idle connections kept per client
POOL_MAX_IDLE = 8

#: what can be sent, and what bodies are made of
Buffer = bytes | bytearray | memoryview
#: (start, end) of body bytes within a received buffer
Span = tuple[int, int]


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
    data: Buffer
    timeout: float


@dataclass(frozen=True)
class RecvInto:
    """Answer: how many bytes were received into ``buffer`` (at most its length); 0 at the
    end of the stream."""

    transport: Any
    buffer: memoryview
    timeout: float


@dataclass(frozen=True)
class Sleep:
    seconds: float


Op = Connect | Send | RecvInto | Sleep
T = TypeVar("T")
#: a plan: yields operations, gets their results sent back, returns T
Plan = Generator[Op, Any, T]


@dataclass(frozen=True)
class Done(Generic[T]):
    """A plan's result, from :func:`advance`."""

    value: T


def advance(plan: Plan[T], value: Any, error: BaseException | None) -> Op | Done[T]:
    """Resume ``plan`` with the last operation's result (or its error): its next operation,
    or :class:`Done`. The faces' drivers are loops around this."""
    try:
        return plan.throw(error) if error is not None else plan.send(value)
    except StopIteration as stop:
        return Done(stop.value)


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    #: None: no body; otherwise the body's pieces, sent with chunked transfer encoding (a
    #: piece may be a reused buffer: it is sent before the next one is asked for)
    body: Iterable[Buffer] | None = None


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


class BodySink(Protocol):
    """Where a streamed 2xx body goes.

    ``write`` gets views into the connection's receive buffer: copy what you keep, the memory
    is reused by the next receive. A sink with ``direct`` set may also hand out its own memory
    with ``reserve`` (up to ``n`` bytes; None: not now); the face receives into it and the
    exchange calls ``commit`` with the count received.
    """

    direct: bool

    def write(self, piece: memoryview) -> None: ...

    def reserve(self, n: int) -> memoryview | None: ...

    def commit(self, n: int) -> None: ...


class CallbackSink:
    """Hands each piece to ``fn`` as a new ``bytes`` the callee may keep."""

    direct = False

    def __init__(self, fn: Callable[[bytes], object]) -> None:
        self._fn = fn

    def write(self, piece: memoryview) -> None:
        self._fn(bytes(piece))

    def reserve(self, n: int) -> memoryview | None:
        return None

    def commit(self, n: int) -> None:  # pragma: no cover - reserve never gives memory
        raise AssertionError("CallbackSink has no memory to commit to")


class ViewSink:
    """Receives a body straight into a caller's writable buffer: no allocation, no copy.

    The exchange receives into the unfilled rest of the buffer, so framing bytes that arrive
    with the body may land there before they are squeezed out: give it a view as long as the
    body (:class:`~ipfsnap.ipfs.core._RangeSink` lends no more than the length asked for).
    :meth:`release` drops every view of the buffer, so its owner may resize it afterwards.
    """

    direct = True

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._lent: memoryview | None = None
        self.size = 0

    def write(self, piece: memoryview) -> None:
        n = len(piece)
        if self.size + n > len(self._view):
            raise ValueError(f"body overflows the {len(self._view)}-byte buffer")
        self._view[self.size:self.size + n] = piece
        self.size += n

    def reserve(self, n: int) -> memoryview | None:
        if self._lent is not None:
            self._lent.release()
            self._lent = None
        if self.size >= len(self._view):
            return None
        self._lent = self._view[self.size:self.size + n]
        return self._lent

    def commit(self, n: int) -> None:
        self.size += n

    def release(self) -> None:
        if self._lent is not None:
            self._lent.release()
            self._lent = None
        self._view.release()


class BufferSink:
    """Collects a body into one ``bytes`` built in place: :meth:`getvalue` does not copy.

    With ``capacity`` (the body's expected size) the buffer is allocated once and bodies are
    received straight into it (a :class:`ViewSink` over it); without, or past it, the buffer
    grows as pieces arrive. ``BytesIO`` rather than ``bytearray``: its ``getvalue`` hands over
    its internal ``bytes`` when the sizes match (CPython), where ``bytes(bytearray)`` would
    copy the whole body into fresh pages.
    """

    def __init__(self, capacity: int | None = None) -> None:
        # bytes(n) is calloc'd: fresh zero pages the kernel maps on first write, instead of a
        # zero-fill pass; BytesIO holds the only reference, so it writes in place
        self._bio = io.BytesIO(bytes(capacity)) if capacity else io.BytesIO()
        self._fixed = ViewSink(self._bio.getbuffer()) if capacity else None
        self._cap = capacity or 0
        self.size = 0
        self.direct = self._fixed is not None

    def write(self, piece: memoryview) -> None:
        n = len(piece)
        if self._fixed is not None and self.size + n <= self._cap:
            self._fixed.write(piece)
        else:
            self._release()
            self._bio.seek(self.size)
            self._bio.write(piece)
        self.size += n

    def reserve(self, n: int) -> memoryview | None:
        return self._fixed.reserve(n) if self._fixed is not None else None

    def commit(self, n: int) -> None:
        assert self._fixed is not None, "commit without reserve"
        self._fixed.commit(n)
        self.size += n

    def _release(self) -> None:
        # every view must go, or BytesIO refuses to resize and getvalue copies
        if self._fixed is not None:
            self._fixed.release()
            self._fixed = None

    def getvalue(self) -> bytes:
        """The bytes written so far; the sink must not be used afterwards."""
        self._release()
        self._bio.truncate(self.size)
        return self._bio.getvalue()


class ChunkedDecoder:
    """Incremental decoder of a chunked body and its trailers.

    :meth:`feed` returns where the body bytes are in the buffer it is given, as ``(start,
    end)`` spans, so they can be copied out or moved in place without an intermediate
    ``bytes``; only a chunk-size or trailer line split across two receives is carried over (as
    at most :data:`MAX_LINE` bytes).
    """

    _DATA, _AFTER_DATA, _SIZE, _TRAILER = range(4)

    def __init__(self) -> None:
        self._state = self._SIZE
        self._remaining = 0
        self._partial = b""
        self.done = False
        self.trailers: dict[str, str] = {}
        #: bytes received after the end of the body (a pipelining server; never reuse)
        self.extra = b""

    def feed(self, data: Buffer, start: int = 0, end: int | None = None) -> list[Span]:
        """Spans of body bytes in ``data[start:end]``; ValueError on malformed framing."""
        view = memoryview(data)
        end = len(view) if end is None else end
        out: list[Span] = []
        pos = start
        while pos < end and not self.done:
            if self._state == self._DATA:
                take = min(self._remaining, end - pos)
                out.append((pos, pos + take))
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = self._AFTER_DATA
                continue
            if self._state == self._AFTER_DATA:
                # exactly CRLF: fail on the first wrong byte rather than wait for a line end
                got = bytes(view[pos:min(end, pos + 2 - len(self._partial))])
                pos += len(got)
                self._partial += got
                if not b"\r\n".startswith(self._partial):
                    raise ValueError("missing CRLF after a chunk")
                if len(self._partial) == 2:
                    self._partial = b""
                    self._state = self._SIZE
                continue
            line, pos = self._line(view, pos, end)
            if line is None:
                break
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
                self.extra = bytes(view[pos:end])
            else:
                if len(self.trailers) >= MAX_TRAILERS:
                    raise ValueError("too many trailers")
                key, sep, value = line.partition(b":")
                if not sep:
                    raise ValueError(f"bad trailer line {line[:40]!r}")
                self.trailers[key.strip().lower().decode("latin-1")] = (
                    value.strip().decode("latin-1"))
        return out

    def _line(self, view: memoryview, pos: int, end: int) -> tuple[bytes | None, int]:
        """(the line at ``pos`` without its CRLF, position after it), or (None, ``end``)
        when the line is not complete yet (its start is kept for the next feed)."""
        kept = len(self._partial)
        # lines are short (a size line is <= 16 hex digits): look at a small window first
        for window in (SHORT_LINE, MAX_LINE):
            take = min(end - pos, window)
            joined = self._partial + bytes(view[pos:pos + take])
            stop = joined.find(b"\r\n")
            if stop >= 0 or take == end - pos:
                break
        if stop >= MAX_LINE or (stop < 0 and len(joined) >= MAX_LINE):
            raise ValueError("chunk-size or trailer line too long")
        if stop < 0:
            self._partial = joined
            return None, end
        self._partial = b""
        return joined[:stop], pos + stop + 2 - kept


class LengthDecoder:
    """A body of ``length`` bytes (Content-Length), with :class:`ChunkedDecoder`'s interface."""

    def __init__(self, length: int) -> None:
        self._remaining = length
        self.done = length == 0
        self.trailers: dict[str, str] = {}
        self.extra = b""

    def feed(self, data: Buffer, start: int = 0, end: int | None = None) -> list[Span]:
        end = len(data) if end is None else end
        take = min(self._remaining, end - start)
        self._remaining -= take
        self.done = not self._remaining
        if start + take < end:
            self.extra = bytes(memoryview(data)[start + take:end])
        return [(start, start + take)] if take else []


Decoder = ChunkedDecoder | LengthDecoder


@dataclass
class Connection:
    transport: Any
    h11: h11.Connection
    idle_since: float = 0.0
    uses: int = 0
    #: set when the body was decoded here instead of by h11: whether the connection may carry
    #: another request (h11's own state no longer says so)
    fast_keep_alive: bool | None = None
    #: the receive buffer (made on first use, kept while the connection lives)
    scratch: bytearray = field(default_factory=bytearray, repr=False)


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


def open_connection(endpoint: Endpoint, timeout: float) -> Plan[Connection]:
    """Plan -> a fresh :class:`Connection` (``OSError``/``TimeoutError`` propagate)."""
    transport = yield Connect(endpoint, timeout)
    return Connection(transport, h11.Connection(h11.CLIENT))


def _send_request(conn: Connection, request: Request, timeout: float) -> Plan[None]:
    """Send the head through h11 and frame the body's chunks here: h11 would join each piece
    with its framing (a copy of every uploaded byte); the bytes on the wire are the same."""
    h = conn.h11
    headers = list(request.headers)
    headers.append(("Content-Length", "0") if request.body is None
                   else ("Transfer-Encoding", "chunked"))
    head = h.send(h11.Request(method=request.method, target=request.target, headers=headers))
    pending = head or b""
    if request.body is not None:
        for piece in request.body:
            if len(piece):
                # the size line rides with whatever small bytes precede it: one send each
                yield Send(conn.transport, pending + b"%x\r\n" % len(piece), timeout)
                yield Send(conn.transport, piece, timeout)
                pending = b"\r\n"
    end = h.send(h11.EndOfMessage()) or b""
    yield Send(conn.transport, pending + end, timeout)


def _head_end(buf: bytearray, start: int, end: int) -> int:
    """Index just past the blank line ending the head in ``buf[start:end]``, or -1.
    Bare-LF line ends are accepted, as h11 does."""
    found = [i for i in (buf.find(b"\n\r\n", start, end), buf.find(b"\n\n", start, end))
             if i >= 0]
    if not found:
        return -1
    i = min(found)
    return i + (3 if buf[i + 1:i + 2] == b"\r" else 2)


def exchange(
    conn: Connection,
    request: Request,
    timeout: float,
    sink: BodySink | None = None,
) -> Plan[Response]:
    """Plan -> :class:`Response`: send ``request`` on ``conn`` and read the whole reply.

    A 2xx body goes to ``sink`` when given (streaming), else into ``Response.body``; error
    bodies are always collected (cut at :data:`MAX_ERROR_BODY`). Leaves ``conn`` ready for the
    next request when the server keeps it alive; the caller decides (see :func:`reusable`).
    Raises :class:`ConnectionBroken` when the peer goes away or speaks broken HTTP.
    """
    h = conn.h11
    conn.uses += 1
    if not conn.scratch:
        conn.scratch = bytearray(RECV_SIZE)
    buf = conn.scratch
    view = memoryview(buf)
    start = filled = 0
    replied = False
    try:
        yield from _send_request(conn, request, timeout)
        # the head (and any 1xx heads before it), parsed by h11
        while True:
            stop = _head_end(buf, start, filled)
            if stop < 0:
                if filled - start >= MAX_HEAD:
                    raise ConnectionBroken("reply head too long", not replied)
                if filled == len(buf):
                    buf[:filled - start] = buf[start:filled]
                    start, filled = 0, filled - start
                n = yield RecvInto(conn.transport, view[filled:], timeout)
                if not n:
                    raise ConnectionBroken("connection closed by the daemon", not replied)
                replied = True
                filled += n
                continue
            h.receive_data(bytes(buf[start:stop]))
            start = stop
            event = h.next_event()
            if isinstance(event, h11.InformationalResponse):
                continue
            if not isinstance(event, h11.Response):
                raise ConnectionBroken(f"unexpected HTTP event {type(event).__name__}",
                                       not replied)
            break
        response = Response(
            status=event.status_code,
            reason=event.reason.decode("latin-1"),
            headers={k.decode("latin-1").lower(): v.decode("latin-1")
                     for k, v in event.headers},
        )
        decoder = _decoder(response)
        if decoder is not None:
            if sink is not None:
                yield from _fast_body(conn, event, response, decoder, sink, timeout, start,
                                      filled)
                return response
            own = BufferSink()
            yield from _fast_body(conn, event, response, decoder, own, timeout, start, filled)
            response.body = own.getvalue()
            return response
        # error replies and bodies delimited by the connection's end: h11 all the way
        if filled > start:
            h.receive_data(bytes(buf[start:filled]))
        ok = 200 <= response.status < 300
        stream = sink if ok else None
        limit = None if ok else MAX_ERROR_BODY
        body = bytearray()
        while True:
            ev = h.next_event()
            if ev is h11.NEED_DATA:
                n = yield RecvInto(conn.transport, view, timeout)
                h.receive_data(bytes(buf[:n]))
                continue
            if isinstance(ev, h11.Data):
                response.received += len(ev.data)
                if stream is not None:
                    stream.write(memoryview(ev.data))
                elif limit is None or len(body) < limit:
                    body += ev.data
                continue
            if isinstance(ev, h11.EndOfMessage):
                response.trailers = {k.decode("latin-1").lower(): v.decode("latin-1")
                                     for k, v in ev.headers}
                response.body = bytes(body if limit is None else body[:limit])
                return response
            if isinstance(ev, h11.ConnectionClosed):
                raise ConnectionBroken("connection closed by the daemon", False)
            raise ConnectionBroken(f"unexpected HTTP event {type(ev).__name__}", False)
    except TimeoutError:
        raise
    except h11.ProtocolError as exc:
        if not replied:
            raise ConnectionBroken(f"connection closed before the reply ({exc})", True) from exc
        raise ConnectionBroken(f"reply cut short or malformed ({exc})", False) from exc
    except OSError as exc:
        detail = exc.strerror or str(exc) or type(exc).__name__
        raise ConnectionBroken(f"connection failed: {detail}", not replied) from exc


def _decoder(response: Response) -> Decoder | None:
    """The decoder for a 2xx body we read ourselves; None leaves the body to h11."""
    if not 200 <= response.status < 300 or response.status in (204, 205):
        return None
    # h11 has checked the framing headers: a Transfer-Encoding is exactly "chunked", a
    # Content-Length a valid number
    if response.headers.get("transfer-encoding", "").lower() == "chunked":
        return ChunkedDecoder()
    length = response.headers.get("content-length", "")
    if length.strip().isdigit():
        return LengthDecoder(int(length))
    return None


def _fast_body(
    conn: Connection,
    head: h11.Response,
    response: Response,
    decoder: Decoder,
    sink: BodySink,
    timeout: float,
    start: int,
    filled: int,
) -> Plan[None]:
    """Read a 2xx body with ``decoder`` into ``sink``, then renew ``conn``'s h11 state.
    ``conn.scratch[start:filled]`` holds body bytes already received with the head."""
    view = memoryview(conn.scratch)
    try:
        while True:
            for a, b in decoder.feed(view, start, filled):
                response.received += b - a
                sink.write(view[a:b])
            if decoder.done:
                break
            start = filled = 0
            space = sink.reserve(sys.maxsize) if sink.direct else None
            if space is None:
                filled = yield RecvInto(conn.transport, view, timeout)
                if not filled:
                    raise ConnectionBroken("reply cut short: connection closed mid-body", False)
                continue
            # straight into the sink's memory; the framing inside is squeezed out in place
            # (a memmove of what follows each chunk-size line, cheaper than copying it all)
            n = yield RecvInto(conn.transport, space, timeout)
            if not n:
                raise ConnectionBroken("reply cut short: connection closed mid-body", False)
            kept = 0
            for a, b in decoder.feed(space, 0, n):
                if a != kept:
                    space[kept:kept + b - a] = space[a:b]
                kept += b - a
            sink.commit(kept)
            response.received += kept
            if decoder.done:
                break
    except ValueError as exc:
        raise ConnectionBroken(f"malformed reply body ({exc})", False) from exc
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
