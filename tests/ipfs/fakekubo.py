"""A tiny scripted HTTP/1.1 server on loopback that replays recorded Kubo responses.

Each accepted connection is served on its own thread; every request is parsed (head and a
``Content-Length`` or chunked body) and handed to the test's ``handler``, which returns raw
bytes to write, or one of the actions :data:`STALL` / :data:`CLOSE` (or bytes ending in
:data:`CLOSE`: those bytes, then the connection is closed). The server records
every request so tests can check what the client sent.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

STALL = b"__stall__"
CLOSE = b"__close__"


@dataclass
class Seen:
    method: str
    path: str
    params: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes
    conn_id: int


Handler = Callable[[Seen], bytes]


@dataclass
class FakeKubo:
    handler: Handler
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0

    def __post_init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def api(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.port}/http"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket, conn_id: int) -> None:
        f = conn.makefile("rb")
        try:
            while not self._stop.is_set():
                line = f.readline()
                if not line:
                    return
                method, target, _ = line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while True:
                    h = f.readline().decode()
                    if h in ("\r\n", "\n", ""):
                        break
                    k, v = h.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
                body = b""
                if headers.get("transfer-encoding") == "chunked":
                    while True:
                        size = int(f.readline().strip(), 16)
                        if size == 0:
                            while f.readline() not in (b"\r\n", b""):
                                pass
                            break
                        body += f.read(size)
                        f.readline()
                elif "content-length" in headers:
                    body = f.read(int(headers["content-length"]))
                url = urlsplit(target)
                seen = Seen(method, url.path, parse_qsl(url.query), headers, body, conn_id)
                self.seen.append(seen)
                reply = self.handler(seen)
                if reply == STALL:
                    self._stop.wait(30)
                    return
                if reply == CLOSE:
                    return
                if reply.endswith(CLOSE):  # send what precedes, then hang up
                    conn.sendall(reply[:-len(CLOSE)])
                    return
                conn.sendall(reply)
        except OSError:
            return
        finally:
            f.close()
            conn.close()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            # wakes the thread blocked in accept(); close() alone does not on Linux
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        for t in self._threads:
            t.join(timeout=5)


def http_reply(
    status: int,
    body: bytes,
    *,
    headers: list[tuple[str, str]] | None = None,
    chunked: bool = False,
    trailers: list[tuple[str, str]] | None = None,
    reason: str = "",
    chunk: int = 1000,
) -> bytes:
    """Raw bytes of one HTTP/1.1 response, like Kubo's (chunked with trailers if asked)."""
    reason = reason or {200: "OK", 400: "Bad Request", 404: "Not Found",
                        500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "X")
    lines = [f"HTTP/1.1 {status} {reason}"]
    for k, v in headers or []:
        lines.append(f"{k}: {v}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        if trailers:
            lines.append("Trailer: " + ", ".join(k for k, _ in trailers))
        out = ("\r\n".join(lines) + "\r\n\r\n").encode()
        for i in range(0, len(body), chunk):
            piece = body[i:i + chunk]
            out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        out += b"0\r\n"
        for k, v in trailers or []:
            out += f"{k}: {v}\r\n".encode()
        return out + b"\r\n"
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def kubo_error(message: str, status: int = 500) -> bytes:
    """Kubo's JSON error body: ``{"Message": ..., "Code": 0, "Type": "error"}``."""
    body = json.dumps({"Message": message, "Code": 0, "Type": "error"}).encode() + b"\n"
    return http_reply(status, body, headers=[("Content-Type", "application/json"),
                                             ("Vary", "Origin")])


def kubo_json(obj: object) -> bytes:
    body = json.dumps(obj).encode() + b"\n"
    return http_reply(200, body, headers=[("Content-Type", "application/json")], chunked=True,
                      trailers=[("X-Stream-Error", "")])


def kubo_cat(data: bytes, *, stream_error: str = "", declared: int | None = None,
             cut: int | None = None) -> bytes:
    """A Kubo ``cat`` reply: chunked, ``X-Content-Length``, trailer ``X-Stream-Error``.

    ``cut``: send only that many body bytes, then the terminating chunk (a short body).
    """
    sent = data if cut is None else data[:cut]
    size = len(data) if declared is None else declared
    return http_reply(
        200, sent,
        headers=[("Content-Type", "text/plain"), ("X-Content-Length", str(size)),
                 ("X-Stream-Output", "1"), ("Access-Control-Expose-Headers",
                                            "X-Stream-Output, X-Chunked-Output, X-Content-Length")],
        chunked=True, trailers=[("X-Stream-Error", stream_error)] if stream_error else [],
    )
