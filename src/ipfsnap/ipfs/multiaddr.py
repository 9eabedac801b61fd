"""API endpoints: multiaddrs and URLs, and where to find the daemon's address.

An :class:`Endpoint` is what the HTTP faces connect to. It is parsed from a multiaddr as Kubo
writes it to ``$IPFS_PATH/api`` (``/ip4/127.0.0.1/tcp/5001``, js-ipfs appends ``/http`` and no
newline) or from a URL (``http://127.0.0.1:5001``).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ipfsnap.ipfs.errors import APINotFound, BadMultiaddr

log = logging.getLogger(__name__)

#: an api file is one short line; anything bigger is not an api file
MAX_API_FILE = 4096


@dataclass(frozen=True)
class Endpoint:
    """Where the RPC API listens. ``auth`` is the ``Authorization`` header value, never shown."""

    host: str
    port: int
    scheme: str = "http"
    auth: str | None = field(default=None, repr=False, compare=False)
    #: where the address came from (``--ipfs-api``, ``/root/.ipfs/api``...), for messages
    source: str = field(default="", compare=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return self.url

    def with_auth(self, auth: str | None) -> Endpoint:
        return Endpoint(self.host, self.port, self.scheme, auth, self.source)


def _port(text: str, addr: str) -> int:
    # ASCII digits only: str.isdigit() also accepts "²", which int() refuses; at most 5
    # digits, so int() never meets a hostile 5000-digit string
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or not 0 < int(text) < 65536:
        raise BadMultiaddr(f"IPFS API address {addr!r}: bad TCP port {text!r}")
    return int(text)


def parse_multiaddr(addr: str, *, auth: str | None = None, source: str = "") -> Endpoint:
    """``/ip4|ip6|dns4|dns6|dns/HOST/tcp/PORT[/http|/https]`` -> :class:`Endpoint`."""
    parts = addr.strip().split("/")
    if len(parts) < 5 or parts[0] != "":
        raise BadMultiaddr(
            f"IPFS API address {addr!r}: expected /ip4|ip6|dns4|dns6|dns/HOST/tcp/PORT[/http]"
        )
    proto, host, tproto, port_text, *rest = parts[1:]
    if proto == "ip4":
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise BadMultiaddr(f"IPFS API address {addr!r}: bad IPv4 address {host!r}") from None
    elif proto == "ip6":
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise BadMultiaddr(f"IPFS API address {addr!r}: bad IPv6 address {host!r}") from None
    elif proto in ("dns", "dns4", "dns6"):
        if not host or len(host) > 253 or any(c.isspace() or c in "/[]@" for c in host):
            raise BadMultiaddr(f"IPFS API address {addr!r}: bad DNS name {host!r}")
    elif proto == "unix":
        raise BadMultiaddr(f"IPFS API address {addr!r}: unix socket APIs are not supported")
    else:
        raise BadMultiaddr(f"IPFS API address {addr!r}: unsupported protocol {'/' + proto!r}")
    if tproto != "tcp":
        raise BadMultiaddr(f"IPFS API address {addr!r}: expected /tcp after the host")
    port = _port(port_text, addr)
    scheme = "http"
    if rest == ["http"] or rest == [] or rest == [""]:
        scheme = "http"
    elif rest == ["https"] or rest == ["tls", "http"]:
        scheme = "https"
    else:
        raise BadMultiaddr(
            f"IPFS API address {addr!r}: unsupported suffix {'/' + '/'.join(rest)!r}"
            " (want /http or /https)"
        )
    return Endpoint(host, port, scheme, auth, source)


def parse_url(url: str, *, auth: str | None = None, source: str = "") -> Endpoint:
    """``http(s)://host[:port][/]`` -> :class:`Endpoint` (port 5001 when omitted for http)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise BadMultiaddr(f"IPFS API address {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadMultiaddr(f"IPFS API address {url!r}: expected http://HOST:PORT or a multiaddr")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BadMultiaddr(f"IPFS API address {url!r}: must not carry a path or query")
    if parts.username is not None:
        raise BadMultiaddr(
            f"IPFS API address {url!r}: put credentials in ipfs_auth / IPFSNAP_IPFS_AUTH"
        )
    if port is None:
        port = 443 if parts.scheme == "https" else 5001
    elif port == 0:
        raise BadMultiaddr(f"IPFS API address {url!r}: port 0")
    return Endpoint(parts.hostname, port, parts.scheme, auth, source)


def parse_api(text: str, *, auth: str | None = None, source: str = "") -> Endpoint:
    """A multiaddr or a URL."""
    text = text.strip()
    if text.startswith("/"):
        return parse_multiaddr(text, auth=auth, source=source)
    if "://" in text:
        return parse_url(text, auth=auth, source=source)
    raise BadMultiaddr(f"IPFS API address {text!r}: expected a multiaddr (/ip4/...) or a URL")


def read_api_file(path: Path, *, auth: str | None = None) -> Endpoint | None:
    """The endpoint written in a repo's ``api`` file, or None when there is no such file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_API_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read IPFS api file %s: %s", path, exc)
        return None
    if len(data) > MAX_API_FILE:
        raise BadMultiaddr(f"IPFS api file {path}: too large to be an api file")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise BadMultiaddr(f"IPFS api file {path}: not ASCII text") from None
    return parse_api(text, auth=auth, source=str(path))


def discover_api(
    explicit: str | None = None,
    auth: str | None = None,
    *,
    repo_candidates: Iterable[Path] = (),
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> Endpoint:
    """Find the API: ``explicit``, ``$IPFS_PATH/api``, each of ``repo_candidates``, ``~/.ipfs``.

    ``explicit`` is the merged CLI/env/config value (see :func:`ipfsnap.config.load_config`).
    ``repo_candidates`` lets the caller put the managed node's repo before ``~/.ipfs``.
    """
    env = os.environ if environ is None else environ
    if explicit:
        return parse_api(explicit, auth=auth, source="explicit address")
    tried: list[str] = []
    repos: list[Path] = []
    if env.get("IPFS_PATH"):
        repos.append(Path(env["IPFS_PATH"]))
    repos.extend(repo_candidates)
    home_dir = home if home is not None else Path(env.get("HOME") or Path.home())
    repos.append(home_dir / ".ipfs")
    for repo in repos:
        api_file = repo / "api"
        tried.append(str(api_file))
        endpoint = read_api_file(api_file, auth=auth)
        if endpoint is not None:
            log.debug("IPFS API %s from %s", endpoint, api_file)
            return endpoint
    raise APINotFound(
        "no IPFS API found: give --ipfs-api (or IPFSNAP_IPFS_API, config ipfs_api), "
        f"start a daemon (ipfsnap ipfs daemon), or create one of: {', '.join(tried)}"
    )
