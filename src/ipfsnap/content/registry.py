"""Pulls from an OCI distribution (Docker registry v2) API, stdlib HTTP only.

Flow: GET the manifest (Accept: OCI and Docker index/manifest types), verify its digest (the
one in the reference, and ``Docker-Content-Digest`` when sent), then fetch the manifests of the
selected platform (or all with ``all_platforms``), their configs and layers, each streamed into
the blob store with digest and size verification. Indexes are stored whole; the name is set
only after the whole tree is present. Auth: a 401 with ``WWW-Authenticate: Bearer realm=...,
service=..., scope=...`` fetches a token from the realm (with basic credentials from
``IPFSNAP_REGISTRY_USER``/``IPFSNAP_REGISTRY_PASSWORD`` when set) and retries; a ``Basic``
challenge uses those credentials directly.

HTTPS is used except for loopback registries (``localhost``, ``127.0.0.0/8``, ``::1``) or
with ``plain_http``.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import logging
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from ipfsnap.content.errors import ImageNotFound, RegistryAuthError, RegistryError
from ipfsnap.content.store import ImageRecord, ImageStore
from ipfsnap.docparse import MalformedDocument, parse_json
from ipfsnap.errors import IpfsnapError, NotFoundError, UsageError
from ipfsnap.oci import (
    MAX_DOCUMENT_SIZE,
    Descriptor,
    DigestMismatch,
    Index,
    Manifest,
    Platform,
    Reference,
    UnknownMediaType,
    best_match,
    host_platform,
    mediatypes,
    parse_document,
    parse_reference,
    sha256_digest,
)
from ipfsnap.progress import Progress

log = logging.getLogger(__name__)

ENV_USER = "IPFSNAP_REGISTRY_USER"
ENV_PASSWORD = "IPFSNAP_REGISTRY_PASSWORD"
#: redirects followed per request (registries redirect blob GETs to object storage once)
MAX_REDIRECTS = 5
DEFAULT_TIMEOUT = 60.0
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def registry_host(domain: str) -> str:
    """The host serving the API for a reference domain (``docker.io`` is special)."""
    return "registry-1.docker.io" if domain == "docker.io" else domain


def is_loopback(host: str) -> bool:
    hostname = urllib.parse.urlsplit("//" + host).hostname or host
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="..."`` -> ("bearer", {realm, service, ...})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE_PARAM.findall(rest))


def error_detail(body: bytes) -> str:
    """The messages of a registry's error reply (``{"errors": [{"code": .., "message": ..}]}``,
    the distribution spec's shape) joined with "; ", or "" when the body has none."""
    try:
        doc = parse_json(body)
    except MalformedDocument:
        return ""
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list):
        return ""
    return "; ".join(
        str(e.get("message") or e.get("code")) for e in errors if isinstance(e, dict)
    )


@dataclass
class _Response:
    status: int
    headers: Mapping[str, str]
    resp: http.client.HTTPResponse
    conn: http.client.HTTPConnection


class RegistryClient:
    """Minimal distribution API client for one registry host."""

    def __init__(
        self,
        host: str,
        *,
        plain_http: bool = False,
        username: str | None = None,
        password: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.host = host
        self.scheme = "http" if plain_http or is_loopback(host) else "https"
        self.timeout = timeout
        env = os.environ
        self.username = username if username is not None else env.get(ENV_USER)
        self.password = password if password is not None else env.get(ENV_PASSWORD)
        self._auth: str | None = None

    # -- HTTP ----------------------------------------------------------------------------
    def _connect(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        if scheme == "https":
            return http.client.HTTPSConnection(netloc, timeout=self.timeout)
        return http.client.HTTPConnection(netloc, timeout=self.timeout)

    def _send(self, method: str, url: str, headers: dict[str, str], what: str) -> _Response:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            conn = self._connect(parts.scheme, parts.netloc)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            try:
                conn.request(method, path, headers=headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise RegistryError(f"{what}: cannot reach {parts.netloc}: {exc}") from None
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                location = urllib.parse.urljoin(url, resp.getheader("Location", ""))
                resp.read()
                conn.close()
                if urllib.parse.urlsplit(location).netloc != parts.netloc:
                    # never send registry credentials to the storage backend we're sent to
                    headers = {k: v for k, v in headers.items() if k != "Authorization"}
                url = location
                continue
            return _Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp, conn)
        raise RegistryError(f"{what}: more than {MAX_REDIRECTS} redirects")

    def _basic(self) -> str | None:
        if self.username is None:
            return None
        raw = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _token(self, params: dict[str, str], scope: str, what: str) -> str:
        realm = params.get("realm")
        if not realm:
            raise RegistryAuthError(f"{what}: Bearer challenge without realm")
        query = {"service": params.get("service", ""), "scope": params.get("scope", scope)}
        url = (
            realm
            + ("&" if "?" in realm else "?")
            + urllib.parse.urlencode({k: v for k, v in query.items() if v})
        )
        headers = {}
        basic = self._basic()
        if basic:
            headers["Authorization"] = basic
        r = self._send("GET", url, headers, f"{what}: token")
        try:
            body = r.resp.read(1 << 20)
        finally:
            r.conn.close()
        if r.status != 200:
            raise RegistryAuthError(f"{what}: token server {realm} answered HTTP {r.status}")
        try:
            obj = parse_json(body)
        except MalformedDocument as exc:
            raise RegistryAuthError(
                f"{what}: token server {realm} sent no token (reply is not JSON: {exc})"
            ) from None
        token = (obj.get("token") or obj.get("access_token")) if isinstance(obj, dict) else None
        if not isinstance(token, str) or not token:
            raise RegistryAuthError(f"{what}: token server {realm} sent no token")
        return "Bearer " + token

    def request(
        self, method: str, path: str, *, accept: str | None = None, what: str, scope: str = ""
    ) -> _Response:
        """Send with auth; on 401 answer the challenge once and retry."""
        url = f"{self.scheme}://{self.host}{path}"
        for attempt in range(2):
            headers = {"User-Agent": "ipfsnap"}
            if accept:
                headers["Accept"] = accept
            if self._auth:
                headers["Authorization"] = self._auth
            r = self._send(method, url, headers, what)
            if r.status != 401 or attempt == 1:
                break
            challenge = r.headers.get("www-authenticate", "")
            r.resp.read()
            r.conn.close()
            kind, params = parse_challenge(challenge)
            if kind == "bearer":
                self._auth = self._token(params, scope, what)
            elif kind == "basic" and self._basic():
                self._auth = self._basic()
            else:
                raise RegistryAuthError(
                    f"{what}: registry {self.host} requires authentication"
                    f" ({challenge or 'no challenge'})"
                )
        if r.status == 401:
            r.conn.close()
            raise RegistryAuthError(f"{what}: registry {self.host} refused our credentials")
        return r

    @staticmethod
    def _error(r: _Response, what: str) -> IpfsnapError:
        try:
            detail = error_detail(r.resp.read(64 << 10))
        except (OSError, http.client.HTTPException):
            detail = ""
        finally:
            r.conn.close()
        message = f"{what}: HTTP {r.status}" + (f" ({detail})" if detail else "")
        if r.status == 404:
            return ImageNotFound(message)
        return RegistryError(message)

    # -- API -----------------------------------------------------------------------------
    def get_manifest(self, repo: str, reference: str, what: str) -> tuple[bytes, str, str]:
        """(bytes, media type from Content-Type, Docker-Content-Digest or "")."""
        r = self.request(
            "GET",
            f"/v2/{repo}/manifests/{reference}",
            accept=mediatypes.MANIFEST_ACCEPT,
            what=what,
            scope=f"repository:{repo}:pull",
        )
        if r.status != 200:
            raise self._error(r, what)
        try:
            body = r.resp.read(MAX_DOCUMENT_SIZE + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise RegistryError(f"{what}: reading manifest failed: {exc}") from None
        finally:
            r.conn.close()
        if len(body) > MAX_DOCUMENT_SIZE:
            raise RegistryError(f"{what}: manifest larger than {MAX_DOCUMENT_SIZE} bytes")
        ctype = r.headers.get("content-type", "").split(";")[0].strip()
        return body, ctype, r.headers.get("docker-content-digest", "")

    def fetch_blob(
        self,
        store: ImageStore,
        repo: str,
        desc: Descriptor,
        what: str,
        progress: Progress | None = None,
    ) -> bool:
        """Stream a blob into the store (verified); False if it was already there."""
        if store.blobs.exists(desc.digest):
            return False
        r = self.request(
            "GET", f"/v2/{repo}/blobs/{desc.digest}", what=what, scope=f"repository:{repo}:pull"
        )
        if r.status != 200:
            raise self._error(r, what)
        try:
            return store.blobs.ingest(
                _Reader(r.resp, what), desc.digest, desc.size, what=what, progress=progress
            )
        finally:
            r.conn.close()


class _Reader:
    """Network read errors -> RegistryError naming the blob."""

    def __init__(self, resp: http.client.HTTPResponse, what: str) -> None:
        self._resp, self._what = resp, what

    def read(self, n: int = -1) -> bytes:
        try:
            return self._resp.read(n)
        except (OSError, http.client.HTTPException) as exc:
            raise RegistryError(f"{self._what}: download failed: {exc}") from None


def _media_type(body: bytes, ctype: str, what: str) -> str:
    known = mediatypes.INDEX_TYPES | mediatypes.MANIFEST_TYPES
    if ctype in known:
        return ctype
    doc = parse_document(body, what)
    return doc.media_type


def pull_image(
    store: ImageStore,
    ref: str,
    *,
    plain_http: bool = False,
    platform: Platform | None = None,
    all_platforms: bool = False,
    progress: Progress | None = None,
    client: RegistryClient | None = None,
) -> ImageRecord:
    """Pull ``ref`` into the store and name it; returns the record."""
    parsed: Reference = parse_reference(ref)
    if parsed.is_ipfs:
        raise UsageError(f"image {parsed.name}: use 'image rpull' for ipfs:// references")
    name = parsed.name
    what = f"image {name}"
    client = client or RegistryClient(registry_host(parsed.domain), plain_http=plain_http)
    repo = parsed.path
    body, ctype, header_digest = client.get_manifest(repo, parsed.digest or parsed.tag, what)
    digest = sha256_digest(body)
    if parsed.digest and digest != parsed.digest:
        raise DigestMismatch(f"{what}: registry sent a manifest hashing to {digest}")
    if header_digest and header_digest != digest:
        raise DigestMismatch(
            f"{what}: Docker-Content-Digest {header_digest} but manifest hashes to {digest}"
        )
    mtype = _media_type(body, ctype, f"{what} manifest {digest}")
    target = Descriptor(mtype, digest, len(body))
    want = platform or host_platform()
    created: set[str] = set()
    try:
        with store.lease():
            doc = parse_document(body, f"{what} manifest {digest}", mtype)
            if store.blobs.ingest([body], digest, len(body), what="manifest"):
                created.add(digest)
            manifests: list[Descriptor]
            if isinstance(doc, Index):
                if all_platforms:
                    manifests = list(doc.manifests)
                else:
                    i = best_match(want, [m.platform for m in doc.manifests])
                    if i is None:
                        have = ", ".join(str(m.platform) for m in doc.manifests if m.platform)
                        raise NotFoundError(f"{what}: no manifest for platform {want} (has {have})")
                    manifests = [doc.manifests[i]]
            else:
                manifests = [target]
            for mdesc in manifests:
                if mdesc is target:
                    m = doc
                else:
                    if mediatypes.is_index(mdesc.media_type):
                        raise RegistryError(f"{what}: nested index {mdesc.digest} not supported")
                    mbody, _, _ = client.get_manifest(repo, mdesc.digest, what)
                    if sha256_digest(mbody) != mdesc.digest or len(mbody) != mdesc.size:
                        raise DigestMismatch(
                            f"{what}: manifest {mdesc.digest} content does not match its descriptor"
                        )
                    m = parse_document(mbody, f"{what} manifest {mdesc.digest}", mdesc.media_type)
                    if store.blobs.ingest([mbody], mdesc.digest, len(mbody), what="manifest"):
                        created.add(mdesc.digest)
                if not isinstance(m, Manifest):
                    raise RegistryError(f"{what}: {mdesc.digest} is not a manifest")
                for blob in (m.config, *m.layers):
                    if not (
                        mediatypes.is_config(blob.media_type)
                        or mediatypes.is_layer(blob.media_type)
                    ):
                        raise UnknownMediaType(
                            f"{what}: blob {blob.digest} has unknown media type {blob.media_type!r}"
                        )
                    if client.fetch_blob(store, repo, blob, f"blob {blob.digest}", progress):
                        created.add(blob.digest)
                        if progress is not None:
                            progress.finish(blob.digest[7:19], "done")
                store.read_config(m.config)
            record = store.put(name, target)
    except BaseException:
        store.discard_unreferenced(created)
        raise
    return record
