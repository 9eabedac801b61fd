"""Registry pulls: a real Debian docker-registry on loopback (anonymous), and a small fake
registry for token auth, redirects and bad answers."""

from __future__ import annotations

import base64
import http.server
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ipfsnap.cli.main import main
from ipfsnap.content import ImageNotFound, ImageStore, RegistryAuthError, RegistryError
from ipfsnap.content.registry import parse_challenge, pull_image
from ipfsnap.content.sample import SampleImage
from ipfsnap.errors import NotFoundError
from ipfsnap.oci import DigestMismatch, digest_hex, parse_platform
from tests.images.registry import free_port, push_layout, run_registry
from tests.support import require_tool


@pytest.fixture
def registry(
    tmp_path: Path, busybox_image: SampleImage, busybox_multiarch: SampleImage
) -> Iterator[str]:
    binary = require_tool("docker-registry")
    with run_registry(tmp_path / "registry", binary) as reg:
        push_layout(reg.host, "test/busybox", "1", busybox_image.layout)
        push_layout(reg.host, "test/busybox", "multi", busybox_multiarch.layout)
        yield reg.host


def test_pull_real_registry(
    registry: str, state_dir: Path, busybox_image: SampleImage, busybox_multiarch: SampleImage
) -> None:
    store = ImageStore(state_dir)
    rec = pull_image(store, f"{registry}/test/busybox:1")
    assert rec.name == f"{registry}/test/busybox:1"
    assert rec.target == busybox_image.target
    store.check_complete(rec.target)
    assert store.resolve(rec.name).config.cmd == ["/bin/sh"]
    by_digest = pull_image(store, f"{registry}/test/busybox@{busybox_image.target.digest}")
    assert by_digest.target == rec.target
    # multi-platform: index kept whole, only the selected platform's manifest fetched (the
    # amd64 manifest equals the single image's, so drop that first)
    amd = busybox_multiarch.manifests["linux/amd64"]
    arm = busybox_multiarch.manifests["linux/arm64"]
    store.remove(rec.name)
    store.remove(by_digest.name)
    store.gc()
    assert list(store.blobs.list()) == []
    multi = pull_image(
        store, f"{registry}/test/busybox:multi", platform=parse_platform("linux/arm64")
    )
    assert multi.target == busybox_multiarch.target
    assert store.blobs.exists(arm.digest)
    assert not store.blobs.exists(amd.digest)
    assert store.manifest_for(multi.target, parse_platform("linux/arm64")) == arm
    pull_image(store, f"{registry}/test/busybox:multi", all_platforms=True)
    assert store.blobs.exists(amd.digest) and store.blobs.exists(arm.digest)
    with pytest.raises(NotFoundError, match="linux/s390x"):
        pull_image(store, f"{registry}/test/busybox:multi", platform=parse_platform("linux/s390x"))


def test_pull_errors_real_registry(
    registry: str, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ImageStore(state_dir)
    with pytest.raises(ImageNotFound, match="HTTP 404"):
        pull_image(store, f"{registry}/test/busybox:nope")
    with pytest.raises(ImageNotFound):
        pull_image(store, f"{registry}/test/other:1")
    assert store.list() == [] and list(store.blobs.list()) == []
    # through the CLI: one line, exit 1
    code = main(["--state-dir", str(state_dir), "image", "pull", f"{registry}/test/busybox:nope"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "test/busybox:nope" in err
    code = main(["--state-dir", str(state_dir), "image", "pull", f"{registry}/test/busybox:1"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith(f"{registry}/test/busybox:1 sha256:")


def test_unreachable_registry(state_dir: Path) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(RegistryError, match=f"cannot reach 127.0.0.1:{port}"):
        pull_image(ImageStore(state_dir), f"127.0.0.1:{port}/x:1")


def test_parse_challenge() -> None:
    kind, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull"'
    )
    assert kind == "bearer"
    assert params == {
        "realm": "https://auth.example/token",
        "service": "reg",
        "scope": "repository:a/b:pull",
    }


# -- a fake registry with token auth -----------------------------------------------------


@dataclass
class Fake:
    layout: Path
    tags: dict[str, str]
    token: str = "s3cret"
    corrupt: set[str] = field(default_factory=set)
    wrong_header_digest: bool = False
    #: "user:password" to require Basic auth instead of Bearer tokens
    basic: str = ""
    token_requests: list[str] = field(default_factory=list)
    port: int = 0
    #: the token server's reply body as is (default: the token as JSON)
    token_body: bytes | None = None


def _handler(fake: Fake) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            return None

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path.startswith("/token"):
                fake.token_requests.append(self.path)
                body = fake.token_body
                self._send(200, json.dumps({"token": fake.token}).encode() if body is None
                           else body)
                return
            m = re.fullmatch(r"/storage/(sha256:[0-9a-f]{64})", self.path)
            if m:
                data = (fake.layout / "blobs/sha256" / digest_hex(m.group(1))).read_bytes()
                if m.group(1) in fake.corrupt:
                    data = data[:-1] + bytes([data[-1] ^ 1])
                self._send(200, data)
                return
            if fake.basic:
                want = "Basic " + base64.b64encode(fake.basic.encode()).decode()
                if self.headers.get("Authorization") != want:
                    self._send(401, b"{}", {"WWW-Authenticate": 'Basic realm="fake"'})
                    return
            elif self.headers.get("Authorization") != f"Bearer {fake.token}":
                realm = f"http://127.0.0.1:{fake.port}/token"
                self._send(
                    401,
                    b'{"errors":[{"code":"UNAUTHORIZED"}]}',
                    {
                        "WWW-Authenticate": f'Bearer realm="{realm}",service="fake",'
                        'scope="repository:test/app:pull"'
                    },
                )
                return
            m = re.fullmatch(r"/v2/test/app/manifests/(.+)", self.path)
            if m:
                ref = fake.tags.get(m.group(1), m.group(1))
                path = fake.layout / "blobs/sha256" / ref.removeprefix("sha256:")
                if not path.is_file():
                    self._send(
                        404,
                        b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}',
                    )
                    return
                data = path.read_bytes()
                digest = "sha256:" + ("0" * 64 if fake.wrong_header_digest else path.name)
                ctype = json.loads(data).get("mediaType", "application/json")
                self._send(200, data, {"Content-Type": ctype, "Docker-Content-Digest": digest})
                return
            m = re.fullmatch(r"/v2/test/app/blobs/(sha256:[0-9a-f]{64})", self.path)
            if m:
                self._send(307, b"", {"Location": f"/storage/{m.group(1)}"})
                return
            self._send(404, b"{}")

    return Handler


@pytest.fixture
def fake_registry(busybox_multiarch: SampleImage) -> Iterator[Fake]:
    fake = Fake(busybox_multiarch.layout, {"multi": busybox_multiarch.target.digest})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_token_auth_and_redirects(
    fake_registry: Fake, state_dir: Path, busybox_multiarch: SampleImage
) -> None:
    store = ImageStore(state_dir)
    rec = pull_image(
        store,
        f"127.0.0.1:{fake_registry.port}/test/app:multi",
        platform=parse_platform("linux/amd64"),
    )
    assert rec.target == busybox_multiarch.target
    assert len(fake_registry.token_requests) == 1  # token reused for every later request
    assert "scope=repository%3Atest%2Fapp%3Apull" in fake_registry.token_requests[0]
    assert "service=fake" in fake_registry.token_requests[0]
    store.check_complete(rec.target)


def test_bad_token_is_refused(fake_registry: Fake, state_dir: Path) -> None:
    fake_registry.token = ""  # token endpoint answers with no token
    with pytest.raises(RegistryAuthError, match="sent no token"):
        pull_image(ImageStore(state_dir), f"127.0.0.1:{fake_registry.port}/test/app:multi")


def test_token_reply_nested_deep_is_refused(fake_registry: Fake, state_dir: Path) -> None:
    # json.loads raised RecursionError out of the pull (found reading the code, issue 8)
    fake_registry.token_body = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(RegistryAuthError, match="sent no token"):
        pull_image(ImageStore(state_dir), f"127.0.0.1:{fake_registry.port}/test/app:multi")


def test_corrupt_blob_leaves_store_unchanged(
    fake_registry: Fake, state_dir: Path, busybox_multiarch: SampleImage
) -> None:
    fake_registry.corrupt.add(busybox_multiarch.layer_digests[1])
    store = ImageStore(state_dir)
    with pytest.raises(DigestMismatch, match=busybox_multiarch.layer_digests[1]):
        pull_image(store, f"127.0.0.1:{fake_registry.port}/test/app:multi")
    assert store.list() == [] and list(store.blobs.list()) == []


def test_header_digest_mismatch(fake_registry: Fake, state_dir: Path) -> None:
    fake_registry.wrong_header_digest = True
    store = ImageStore(state_dir)
    with pytest.raises(DigestMismatch, match="Docker-Content-Digest"):
        pull_image(store, f"127.0.0.1:{fake_registry.port}/test/app:multi")
    assert list(store.blobs.list()) == []


def test_pull_by_wrong_digest(
    fake_registry: Fake, state_dir: Path, busybox_multiarch: SampleImage
) -> None:
    """Asking for digest A but getting other bytes: the digest in the reference wins."""
    amd = busybox_multiarch.manifests["linux/amd64"]
    fake_registry.tags["sha256:" + "a" * 64] = amd.digest
    with pytest.raises(DigestMismatch, match="hashing to"):
        pull_image(
            ImageStore(state_dir), f"127.0.0.1:{fake_registry.port}/test/app@sha256:{'a' * 64}"
        )


def test_basic_auth_from_environment(
    fake_registry: Fake, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_registry.basic = "alice:pw"
    ref = f"127.0.0.1:{fake_registry.port}/test/app:multi"
    monkeypatch.delenv("IPFSNAP_REGISTRY_USER", raising=False)
    with pytest.raises(RegistryAuthError, match="requires authentication"):
        pull_image(ImageStore(state_dir), ref)
    monkeypatch.setenv("IPFSNAP_REGISTRY_USER", "alice")
    monkeypatch.setenv("IPFSNAP_REGISTRY_PASSWORD", "wrong")
    with pytest.raises(RegistryAuthError, match="refused our credentials"):
        pull_image(ImageStore(state_dir), ref)
    monkeypatch.setenv("IPFSNAP_REGISTRY_PASSWORD", "pw")
    assert pull_image(ImageStore(state_dir), ref).name == ref


@pytest.mark.parametrize("body, want", [
    (b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}', "manifest unknown"),
    (b'{"errors":[{"code":"DENIED"},{"code":"X","message":"m"}]}', "DENIED; m"),
    (b'{"errors":[7,{"code":"DENIED"}]}', "DENIED"),  # odd items skipped, not fatal
    (b'{"errors":5}', ""),  # raised TypeError out of the pull before
    (b'["errors"]', ""),
    (b"", ""),  # a HEAD reply has no body
    (b"<html>502 Bad Gateway</html>", ""),
    (b'{"errors":' * 100_000, ""),  # nested too deep for the parser
    (b'{"errors":[{"message":"\xff"}]}', ""),  # not UTF-8
])
def test_error_detail_of_any_body(body: bytes, want: str) -> None:
    from ipfsnap.content.registry import error_detail

    assert error_detail(body) == want
