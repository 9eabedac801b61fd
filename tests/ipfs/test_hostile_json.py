"""Hostile JSON from an IPFS daemon or repo (nested thousands deep, not UTF-8, not JSON) ends
as the package's own errors naming the API or file, never as RecursionError/ValueError.
The client's replies are covered in test_client.py; these are the error-message parser and
the managed node's RPC and repo-config readers."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipfsnap.ipfs.core import _json_message
from ipfsnap.ipfs.http import Response
from ipfsnap.ipfs.node import NodeError, _load_config, rpc_call

#: far beyond the interpreter's recursion limit (1000 by default)
DEEP = b"[" * 100_000 + b"]" * 100_000


def test_error_message_of_a_deep_reply_is_its_first_line() -> None:
    msg = _json_message(Response(500, "Internal Server Error", {}, body=DEEP))
    assert msg == "[" * 500  # the text, cut as for any reply that is not JSON


@pytest.mark.parametrize("body, want", [
    (b'{"Message": "merkledag: not found", "Code": 0}', "merkledag: not found"),
    (b"not json\nsecond line", "not json"),
    (b'"\xff"', '"\ufffd"'),  # decoded with replacement first: the text is shown as is
    (b"", "Internal Server Error"),
])
def test_error_message_of_any_reply(body: bytes, want: str) -> None:
    assert _json_message(Response(500, "Internal Server Error", {}, body=body)) == want


@pytest.fixture
def api() -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    """A one-route HTTP server answering each POST with the next (status, body) queued."""
    replies: list[tuple[int, bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            status, body = replies.pop(0)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", replies
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_rpc_reply_nested_deep_is_a_node_error(api: tuple[str, list[tuple[int, bytes]]]) -> None:
    url, replies = api
    replies.append((200, DEEP))
    with pytest.raises(NodeError, match=rf"^IPFS API {url}: id: reply is not JSON$"):
        rpc_call(url, "id", timeout=10.0)


@pytest.mark.parametrize("body, detail", [
    (DEEP, (DEEP[:40]).decode()),  # not parsed: the body itself is the detail
    (b'{"Message": "no such peer"}', "no such peer"),
    (b'["Message"]', '["Message"]'),  # JSON, but not an object: the body as well
])
def test_rpc_http_error_detail(api: tuple[str, list[tuple[int, bytes]]], body: bytes,
                               detail: str) -> None:
    url, replies = api
    replies.append((500, body))
    with pytest.raises(NodeError) as info:
        rpc_call(url, "swarm/connect", timeout=10.0)
    assert str(info.value).startswith(f"IPFS API {url}: swarm/connect: HTTP 500: {detail}")


@pytest.mark.parametrize("content, reason", [
    (DEEP, "nested too deeply"),
    (b'{"Identity": "\xff"}', "utf-8"),
    (b'{"Identity": ', "Expecting value"),
])
def test_repo_config_hostile(tmp_path: Path, content: bytes, reason: str) -> None:
    (tmp_path / "config").write_bytes(content)
    with pytest.raises(NodeError, match=rf"config: cannot read IPFS repo config: .*{reason}"):
        _load_config(tmp_path)


def test_repo_config_valid(tmp_path: Path) -> None:
    (tmp_path / "config").write_text('{"Addresses": {"API": "/ip4/127.0.0.1/tcp/5001"}}')
    assert _load_config(tmp_path) == {"Addresses": {"API": "/ip4/127.0.0.1/tcp/5001"}}
