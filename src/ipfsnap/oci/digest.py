"""Digests: ``sha256:<64 lower hex>`` only (the only algorithm OCI images use in practice)."""

from __future__ import annotations

import hashlib
import re

from ipfsnap.oci.errors import DigestMismatch, InvalidDigest

#: sha256 is 32 bytes = 64 hex digits; OCI requires lower-case hex for sha256
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def validate_digest(value: object, what: str = "digest") -> str:
    """Return ``value`` if it is a valid sha256 digest, else raise :class:`InvalidDigest`.

    ``what`` names the object in the message (``"layer 2 of manifest sha256:..."``).
    """
    if not isinstance(value, str):
        raise InvalidDigest(f"{what}: digest must be a string, got {type(value).__name__}")
    if _DIGEST_RE.fullmatch(value) is None:
        shown = value if len(value) <= 80 else value[:77] + "..."
        if ":" in value and not value.startswith("sha256:"):
            algo = value.split(":", 1)[0]
            raise InvalidDigest(f"{what}: unsupported digest algorithm {algo!r} in {shown!r}")
        raise InvalidDigest(f"{what}: invalid digest {shown!r} (want sha256:<64 lower hex>)")
    return value


def is_digest(value: object) -> bool:
    return isinstance(value, str) and _DIGEST_RE.fullmatch(value) is not None


def digest_hex(digest: str) -> str:
    """The 64 hex digits of a valid digest."""
    return validate_digest(digest)[len("sha256:") :]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify_bytes(data: bytes, digest: str, size: int | None = None, what: str = "blob") -> None:
    """Raise :class:`DigestMismatch` unless ``data`` has this digest (and size)."""
    if size is not None and len(data) != size:
        raise DigestMismatch(f"{what} {digest}: size {len(data)} != expected {size}")
    got = sha256_digest(data)
    if got != digest:
        raise DigestMismatch(f"{what} {digest}: content hashes to {got}")
