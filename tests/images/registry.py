"""A real Debian ``docker-registry`` on 127.0.0.1 for tests, and a test-only push helper.

The helper speaks the distribution API directly (monolithic blob upload: POST then PUT with
``?digest=``; PUT of manifests), so pull tests do not depend on ipfsnap's own code to seed the
registry.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ipfsnap.oci import digest_hex


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Registry:
    host: str  # "127.0.0.1:<port>"
    root: Path
    proc: subprocess.Popen[bytes]


@contextmanager
def run_registry(workdir: Path, binary: str = "docker-registry") -> Iterator[Registry]:
    """Start a registry with filesystem storage under ``workdir``; stop it on exit."""
    port = free_port()
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = open(workdir / "registry.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=log)
    reg = Registry(f"127.0.0.1:{port}", workdir, proc)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"docker-registry exited {proc.returncode}: "
                    + (workdir / "registry.log").read_text(errors="replace")[-500:]
                )
            try:
                status, _, _ = request(reg.host, "GET", "/v2/")
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("docker-registry did not answer within 30 s")
            time.sleep(0.1)
        yield reg
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def request(
    host: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def push_blob(host: str, repo: str, data: bytes, digest: str) -> None:
    status, headers, body = request(host, "POST", f"/v2/{repo}/blobs/uploads/")
    assert status == 202, (status, body)
    location = urllib.parse.urljoin(f"http://{host}/", headers["location"])
    parts = urllib.parse.urlsplit(location)
    query = parts.query + ("&" if parts.query else "") + urllib.parse.urlencode({"digest": digest})
    status, _, body = request(
        host,
        "PUT",
        f"{parts.path}?{query}",
        data,
        {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
    )
    assert status == 201, (status, body)


def push_manifest(host: str, repo: str, ref: str, data: bytes, media_type: str) -> None:
    status, _, body = request(
        host, "PUT", f"/v2/{repo}/manifests/{ref}", data, {"Content-Type": media_type}
    )
    assert status == 201, (status, body)


def push_layout(host: str, repo: str, tag: str, layout: Path) -> None:
    """Push every blob of an OCI layout (children first) and tag its first index entry."""
    index = json.loads((layout / "index.json").read_bytes())
    top = index["manifests"][0]
    blobs = layout / "blobs" / "sha256"

    def blob(digest: str) -> bytes:
        return (blobs / digest_hex(digest)).read_bytes()

    def push_tree(desc: dict[str, object], ref: str) -> None:
        digest = str(desc["digest"])
        media_type = str(desc["mediaType"])
        doc = json.loads(blob(digest))
        if "manifests" in doc:
            for m in doc["manifests"]:
                if (blobs / digest_hex(m["digest"])).exists():
                    push_tree(m, m["digest"])
        else:
            for child in [doc["config"], *doc["layers"]]:
                push_blob(host, repo, blob(child["digest"]), child["digest"])
        push_manifest(host, repo, ref, blob(digest), media_type)

    push_tree(top, tag)

