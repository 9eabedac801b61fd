"""Private IPFS networks: the Kubo ``swarm.key`` format (pre-shared key, PSK v1).

A swarm key file is three lines::

    /key/swarm/psk/1.0.0/
    /base16/
    <64 hex digits: 32 random bytes>

Nodes holding the same key can talk to each other and to nobody else (libp2p pnet encrypts
every connection with the key before any other handshake). Kubo and the managed js-ipfs node
read it from ``$REPO/swarm.key``. The key is a secret: nothing here logs it or puts it in an
error message.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ipfsnap.errors import ConfigError

log = logging.getLogger(__name__)

#: libp2p's PSK v1 header line; the only version that exists
PSK_HEADER = "/key/swarm/psk/1.0.0/"
#: encodings Kubo accepts for the key line
ENCODINGS = ("/base16/", "/base64/", "/bin/")
#: a PSK v1 key is 32 bytes (the XSalsa20 key size), so 64 hex digits in base16
KEY_BYTES = 32
#: file name inside an IPFS repo
SWARM_KEY_FILE = "swarm.key"
#: environment variable that makes daemons refuse to start without a key
ENV_FORCE_PNET = "LIBP2P_FORCE_PNET"


class SwarmKeyError(ConfigError):
    """A swarm key file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class SwarmKey:
    """A parsed swarm key. ``repr`` hides the secret."""

    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise SwarmKeyError(f"swarm key: must be {KEY_BYTES} bytes, got {len(self.key)}")

    def to_text(self) -> str:
        """The file content in Kubo's canonical base16 form (with a final newline)."""
        return f"{PSK_HEADER}\n/base16/\n{self.key.hex()}\n"

    def fingerprint(self) -> str:
        """A short non-secret identifier (first bytes of a hash) for logs and messages."""
        import hashlib

        return hashlib.sha256(b"ipfsnap-swarm-key\0" + self.key).hexdigest()[:12]


def generate_swarm_key() -> SwarmKey:
    """A fresh key from the OS's cryptographic random source."""
    return SwarmKey(secrets.token_bytes(KEY_BYTES))


def parse_swarm_key(text: str, source: str = "swarm key") -> SwarmKey:
    """Parse swarm key file content; ``source`` (a path) names the file in errors."""
    lines = [line.strip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) != 3:
        raise SwarmKeyError(
            f"{source}: malformed swarm key: expected 3 lines (header, encoding, key), "
            f"got {len(lines)}"
        )
    header, encoding, body = lines
    if header != PSK_HEADER:
        raise SwarmKeyError(f"{source}: malformed swarm key: first line must be {PSK_HEADER}")
    if encoding == "/base16/":
        if len(body) != 2 * KEY_BYTES:
            raise SwarmKeyError(
                f"{source}: malformed swarm key: key line must be {2 * KEY_BYTES} hex digits, "
                f"got {len(body)} characters"
            )
        try:
            key = bytes.fromhex(body)
        except ValueError:
            raise SwarmKeyError(
                f"{source}: malformed swarm key: key line is not hexadecimal"
            ) from None
    elif encoding == "/base64/":
        import base64
        import binascii

        try:
            key = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise SwarmKeyError(f"{source}: malformed swarm key: key line is not base64") from None
    elif encoding == "/bin/":
        key = body.encode("latin-1", errors="replace")
    else:
        raise SwarmKeyError(
            f"{source}: malformed swarm key: unknown encoding line (want one of "
            f"{', '.join(ENCODINGS)})"
        )
    if len(key) != KEY_BYTES:
        raise SwarmKeyError(
            f"{source}: malformed swarm key: key must be {KEY_BYTES} bytes, got {len(key)}"
        )
    return SwarmKey(key)


def read_swarm_key(path: Path) -> SwarmKey:
    """Read and validate a swarm key file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SwarmKeyError(f"{path}: no such swarm key file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SwarmKeyError(f"{path}: cannot read swarm key: {exc}") from None
    return parse_swarm_key(text, str(path))


def repo_swarm_key(repo: Path) -> SwarmKey | None:
    """The key of an IPFS repo, or None if it has no ``swarm.key`` (public network)."""
    path = repo / SWARM_KEY_FILE
    if not path.exists():
        return None
    return read_swarm_key(path)


def write_swarm_key(repo: Path, key: SwarmKey) -> Path:
    """Install ``key`` as ``$repo/swarm.key``, readable by the owner only."""
    repo.mkdir(parents=True, exist_ok=True, mode=0o700)  # a new repo: owner-only, as Kubo's
    path = repo / SWARM_KEY_FILE
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(key.to_text())
    os.replace(tmp, path)
    log.info("swarm key %s installed in %s", key.fingerprint(), path)
    return path


def force_pnet(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``LIBP2P_FORCE_PNET`` demands a private network (Kubo: set to "1")."""
    env = os.environ if environ is None else environ
    return env.get(ENV_FORCE_PNET, "").strip() == "1"
