"""The sans-IO HTTP core: body decoders and whole exchanges against scripted peers.

An exchange is driven here without sockets: each receive gets the next scripted piece of the
reply, cut to the buffer offered, so every way a reply can be split across receives (chunk
boundaries, size lines, trailers, heads) is reachable deterministically, for each kind of sink
(in place into a presized result, a growing result, a callback).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable
from typing import Any

import h11
import pytest

from ipfsnap.ipfs.http import (
    MAX_ERROR_BODY,
    MAX_LINE,
    BodySink,
    Buffer,
    BufferSink,
    CallbackSink,
    ChunkedDecoder,
    Connection,
    ConnectionBroken,
    LengthDecoder,
    Plan,
    RecvInto,
    Request,
    Response,
    Send,
    ViewSink,
    exchange,
    reusable,
)

HEAD = (b"HTTP/1.1 200 OK\r\nTrailer: X-Stream-Error\r\nX-Stream-Output: 1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")


def encode(pieces: list[bytes], trailers: list[tuple[str, str]]) -> bytes:
    out = b""
    for p in pieces:
        out += f"{len(p):X};ext=1\r\n".encode() + p + b"\r\n"
    out += b"0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in trailers) + b"\r\n"
    return out


def decode_all(dec: ChunkedDecoder | LengthDecoder, raw: bytes, steps: Iterable[int]) -> bytes:
    got = b""
    pos = 0
    for step in steps:
        if dec.done:
            break
        data = raw[pos:pos + step]
        got += b"".join(data[a:b] for a, b in dec.feed(data))
        pos += step
    return got


@pytest.mark.parametrize("seed", range(30))
def test_any_split_decodes_the_same(seed: int) -> None:
    rng = random.Random(seed)
    pieces = [rng.randbytes(rng.choice([1, 2, 17, 4096, 70000])) for _ in range(rng.randrange(8))]
    raw = encode(pieces, [("X-Stream-Error", "boom: it broke")]) + b"EXTRA"
    dec = ChunkedDecoder()
    got = b""
    pos = 0
    while not dec.done:
        assert pos < len(raw), "decoder not done after the whole stream"
        step = rng.choice([1, 2, 3, 5, 100, 65536, len(raw)])
        # fed from the middle of a reused buffer, as from a receive buffer: what lies around
        # the range (stale bytes of earlier receives) must never be read
        data = b"\r\n0\r\n" + raw[pos:pos + step] + b"#!#!"
        end = len(data) - 4
        got += b"".join(data[a:b] for a, b in dec.feed(data, 5, end))
        pos += step
    assert got == b"".join(pieces)
    assert dec.trailers == {"x-stream-error": "boom: it broke"}
    rest = dec.extra + raw[pos:]
    assert rest == b"EXTRA"


def test_every_two_part_split_from_a_reused_buffer() -> None:
    pieces = [b"abc", b"\r\n", b"x" * 20]
    raw = encode(pieces, [("X-Stream-Error", "e")])
    for cut in range(len(raw) + 1):
        dec = ChunkedDecoder()
        got = b""
        for part in (raw[:cut], raw[cut:]):
            # stale bytes around the range, as in a receive buffer: never to be read
            data = b"\r\n" + part + b"#!"
            got += b"".join(data[a:b] for a, b in dec.feed(data, 2, len(data) - 2))
        assert got == b"".join(pieces) and dec.done, cut
        assert dec.trailers == {"x-stream-error": "e"} and dec.extra == b""


def test_spans_point_into_the_fed_range() -> None:
    raw = b"xx" + encode([b"abc", b"de"], []) + b"yy"
    dec = ChunkedDecoder()
    spans = dec.feed(raw, 2, len(raw) - 2)
    assert [raw[a:b] for a, b in spans] == [b"abc", b"de"]
    assert dec.done and dec.extra == b""


@pytest.mark.parametrize(
    "raw",
    [b"zz\r\n", b"5\r\nabcdeXX", b"-1\r\n", b"1" * 5000, b"0\r\nno colon\r\n",
     b"11111111111111111\r\n", b"5\r\nabcde\rX"],
)
def test_malformed_framing(raw: bytes) -> None:
    with pytest.raises(ValueError):
        ChunkedDecoder().feed(raw)


@pytest.mark.parametrize("step", [1, 7, 1000, 3 * MAX_LINE])
def test_endless_size_line_is_refused_without_buffering_it(step: int) -> None:
    # a hostile daemon sends a chunk-size line that never ends: fail once it passes MAX_LINE
    dec = ChunkedDecoder()
    raw = b"f" * (4 * MAX_LINE)
    with pytest.raises(ValueError, match="too long"):
        for pos in range(0, len(raw), step):
            dec.feed(raw[pos:pos + step])
            assert len(dec._partial) < MAX_LINE
    # the same with a leading zero run that would still parse as a small number
    with pytest.raises(ValueError):
        ChunkedDecoder().feed(b"0" * 40 + b"1\r\n")


def test_trailer_flood_is_refused() -> None:
    raw = b"0\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(100)) + b"\r\n"
    with pytest.raises(ValueError, match="too many trailers"):
        ChunkedDecoder().feed(raw)


def test_length_decoder_any_split() -> None:
    body = bytes(range(256)) * 40
    for step in (1, 3, 255, 4096, len(body) + 5):
        dec = LengthDecoder(len(body))
        assert decode_all(dec, body + b"more", [step] * (len(body) + 10)) == body
        assert dec.done
    dec = LengthDecoder(4)
    assert dec.feed(b"abcdEF") == [(0, 4)] and dec.extra == b"EF"
    assert LengthDecoder(0).done


# -- whole exchanges against a scripted peer ------------------------------------------------


def drive(plan: Plan[Any], incoming: list[bytes]) -> tuple[Any, bytes]:
    """Run ``plan``: each receive takes the next scripted piece (cut to the buffer; the rest
    stays for the next receive), 0 (end of stream) when the script is used up."""
    queue = list(incoming)
    sent = bytearray()
    value: Any = None
    while True:
        try:
            op = plan.send(value)
        except StopIteration as stop:
            return stop.value, bytes(sent)
        value = None
        if isinstance(op, Send):
            sent += op.data
        elif isinstance(op, RecvInto):
            if not queue:
                value = 0
                continue
            piece = queue.pop(0)
            n = min(len(piece), len(op.buffer))
            op.buffer[:n] = piece[:n]
            if n < len(piece):
                queue.insert(0, piece[n:])
            value = n
        else:  # pragma: no cover - exchanges only send and receive
            raise AssertionError(f"unexpected operation {op!r}")


def split(raw: bytes, rng: random.Random, cuts: Iterable[int] = ()) -> list[bytes]:
    """``raw`` in random pieces, always also cut at ``cuts``."""
    points = {0, len(raw), *cuts}
    for _ in range(rng.randrange(1, 40)):
        points.add(rng.randrange(len(raw) + 1))
    edges = sorted(p for p in points if 0 <= p <= len(raw))
    return [raw[a:b] for a, b in itertools.pairwise(edges) if b > a]


def new_conn() -> Connection:
    return Connection(transport=None, h11=h11.Connection(h11.CLIENT))


GET = Request("POST", "/api/v0/cat?arg=x", [("Host", "x")])


def run(incoming: list[bytes], sink: BodySink | None = None,
        conn: Connection | None = None) -> tuple[Response, Connection]:
    conn = conn or new_conn()
    resp, _sent = drive(exchange(conn, GET, 5.0, sink), incoming)
    assert isinstance(resp, Response)
    return resp, conn


def _buffer(size: int) -> tuple[BodySink, Callable[[], bytes]]:
    sink = BufferSink(size)
    return sink, sink.getvalue


def _growing(size: int) -> tuple[BodySink, Callable[[], bytes]]:
    sink = BufferSink()
    return sink, sink.getvalue


def _callback(size: int) -> tuple[BodySink, Callable[[], bytes]]:
    pieces: list[bytes] = []
    return CallbackSink(pieces.append), lambda: b"".join(pieces)


def _caller_buffer(size: int) -> tuple[BodySink, Callable[[], bytes]]:
    buf = bytearray(size)
    sink = ViewSink(memoryview(buf))
    return sink, lambda: bytes(buf[:sink.size])


#: each kind of sink, made for a body of a given size: (sink, what it received)
SINKS: dict[str, Callable[[int], tuple[BodySink, Callable[[], bytes]]]] = {
    "in-place": _buffer,
    "growing": _growing,
    "callback": _callback,
    "caller-buffer": _caller_buffer,
}


@pytest.mark.parametrize("kind", SINKS)
@pytest.mark.parametrize("seed", range(12))
def test_chunked_reply_split_anywhere(kind: str, seed: int) -> None:
    rng = random.Random(seed)
    pieces = [rng.randbytes(rng.choice([1, 9, 300, 70000, 262144])) for _ in range(1, 6)]
    body = b"".join(pieces)
    raw = HEAD + encode(pieces, [("X-Stream-Error", "")] if seed % 2 else [])
    # cut right around every chunk boundary too: size lines split across receives
    boundaries = [i for i in range(len(raw)) if raw.startswith(b"\r\n", i)]
    cuts = [b + d for b in rng.sample(boundaries, min(10, len(boundaries))) for d in (0, 1, 2)]
    sink, value = SINKS[kind](len(body))
    resp, conn = run(split(raw, rng, cuts), sink)
    assert value() == body
    assert resp.status == 200 and resp.received == len(body)
    assert resp.trailers == ({"x-stream-error": ""} if seed % 2 else {})
    assert reusable(conn)


@pytest.mark.parametrize("kind", SINKS)
def test_stream_error_trailer_reaches_the_response(kind: str) -> None:
    raw = HEAD + encode([b"a" * 1000], [("X-Stream-Error", "merkledag: not found")])
    sink, value = SINKS[kind](1000)
    resp, _ = run([raw[i:i + 7] for i in range(0, len(raw), 7)], sink)
    assert resp.trailers["x-stream-error"] == "merkledag: not found" and value() == b"a" * 1000


@pytest.mark.parametrize("kind", SINKS)
@pytest.mark.parametrize("cut_at", ["in a chunk", "in a size line", "in the trailers",
                                    "before the last CRLF"])
def test_truncated_reply_is_a_broken_connection(kind: str, cut_at: str) -> None:
    raw = HEAD + encode([b"x" * 5000, b"y" * 5000], [("X-Stream-Error", "")])
    body_at = len(HEAD)
    cut = {"in a chunk": body_at + 2000, "in a size line": body_at + 5007 + 2,
           "in the trailers": len(raw) - 6, "before the last CRLF": len(raw) - 1}[cut_at]
    sink, _ = SINKS[kind](10000)
    with pytest.raises(ConnectionBroken) as info:
        run([raw[:cut]], sink)
    assert not info.value.before_reply and "cut short" in str(info.value)


def test_no_reply_at_all_is_before_reply() -> None:
    with pytest.raises(ConnectionBroken) as info:
        run([])
    assert info.value.before_reply


@pytest.mark.parametrize("kind", SINKS)
def test_content_length_reply(kind: str) -> None:
    body = bytes(range(256)) * 20
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    for step in (1, 1000, len(raw)):
        sink, value = SINKS[kind](len(body))
        resp, conn = run([raw[i:i + step] for i in range(0, len(raw), step)], sink)
        assert value() == body and resp.received == len(body) and reusable(conn)
    sink, _ = SINKS[kind](len(body))
    with pytest.raises(ConnectionBroken):
        run([raw[:-10]], sink)


def test_bytes_after_the_reply_make_the_connection_unusable() -> None:
    raw = HEAD + encode([b"abc"], []) + b"HTTP/1.1 200 OK\r\n"
    resp, conn = run([raw])
    assert resp.body == b"abc" and not reusable(conn)


def test_connection_close_is_not_reused() -> None:
    raw = HEAD.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + encode([b"a"], [])
    resp, conn = run([raw])
    assert resp.body == b"a" and not reusable(conn)


def test_collected_reply_and_the_next_request_on_the_same_connection() -> None:
    raw = HEAD + encode([b'{"ID":', b'"x"}'], [("X-Stream-Error", "")])
    resp, conn = run([raw])
    assert resp.body == b'{"ID":"x"}' and reusable(conn)
    resp2, _ = run([raw[:5], raw[5:]], conn=conn)
    assert resp2.body == b'{"ID":"x"}' and conn.uses == 2


def test_informational_head_then_reply_and_bare_lf_heads() -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\n" + HEAD + encode([b"ok"], [])
    resp, _ = run([raw[:10], raw[10:40], raw[40:]])
    assert resp.status == 200 and resp.body == b"ok"
    lf = b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"
    resp, _ = run([lf])
    assert resp.body == b"ok"


def test_error_reply_is_collected_and_cut() -> None:
    big = b"e" * (3 * MAX_ERROR_BODY)
    raw = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n\r\n" % len(big) + big
    pieces: list[bytes] = []
    resp, conn = run([raw[:100], raw[100:]], CallbackSink(pieces.append))
    assert resp.status == 500 and resp.body == big[:MAX_ERROR_BODY] and pieces == []
    assert resp.received == len(big) and reusable(conn)


def test_endless_head_is_refused() -> None:
    raw = b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 10000
    with pytest.raises(ConnectionBroken, match="head too long"):
        run([raw])


def test_request_body_is_valid_chunked_encoding() -> None:
    pieces: list[Buffer] = [b"head", memoryview(b"0123456789" * 1000), b"", bytearray(b"tail")]
    req = Request("POST", "/api/v0/add", [("Host", "x")], pieces)
    reply = HEAD + encode([b'{"Hash":"x"}'], [])
    resp, sent = drive(exchange(new_conn(), req, 5.0), [reply])
    assert resp.body == b'{"Hash":"x"}'
    head, _, body = sent.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    dec = ChunkedDecoder()
    assert b"".join(body[a:b] for a, b in dec.feed(body)) == b"".join(bytes(p) for p in pieces)
    assert dec.done and dec.extra == b""


def test_buffer_sink_beyond_its_capacity_and_short() -> None:
    sink = BufferSink(4)
    space = sink.reserve(100)
    assert space is not None and len(space) == 4
    space[:2] = b"ab"
    sink.commit(2)
    sink.write(memoryview(b"cdef"))  # past the capacity: grows
    assert sink.reserve(10) is None
    assert sink.getvalue() == b"abcdef"
    short = BufferSink(1000)
    short.write(memoryview(b"xyz"))
    assert short.getvalue() == b"xyz"
    assert BufferSink().getvalue() == b""
