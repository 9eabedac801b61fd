"""Image references: ``python``, ``python:3.9``, ``localhost:5000/x:tag``,
``docker.io/library/busybox:latest``, ``name@sha256:...``, and ``ipfs://<CID>``.

Names are normalised as Docker does: no domain means ``docker.io``; a one-component path on
``docker.io`` gets ``library/``; no tag and no digest means ``:latest``. ``ipfs://`` names
keep their CID text as given (the ipfs package normalises CIDs; oci imports nothing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ipfsnap.oci.digest import validate_digest
from ipfsnap.oci.errors import InvalidDigest, InvalidReference

DEFAULT_DOMAIN = "docker.io"
DEFAULT_TAG = "latest"
IPFS_SCHEME = "ipfs://"

# path component: lower-case alphanumerics separated by ".", "_", "__" or runs of "-"
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
# domain: host name labels (or a bracketed IPv6 address) with an optional port
_DOMAIN = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
)
# tags are at most 128 characters (distribution spec)
_TAG = re.compile(r"[\w][\w.-]{0,127}")
# CIDs are multibase strings: base32 (b...), base58btc (Qm... / z...), etc.
_CID = re.compile(r"[A-Za-z0-9]{10,200}")
#: the distribution spec limits a repository name to 255 characters
MAX_NAME = 255


@dataclass(frozen=True)
class Reference:
    """A parsed, normalised image reference. ``cid`` is set for ``ipfs://`` names only."""

    domain: str = ""
    path: str = ""
    tag: str = ""
    digest: str = ""
    cid: str = ""

    @property
    def is_ipfs(self) -> bool:
        return bool(self.cid)

    @property
    def repository(self) -> str:
        """``domain/path`` (no tag or digest); the ``ipfs://CID`` name for IPFS refs."""
        if self.cid:
            return IPFS_SCHEME + self.cid
        return f"{self.domain}/{self.path}"

    @property
    def name(self) -> str:
        """The full normalised name, as stored in the image store."""
        if self.cid:
            return IPFS_SCHEME + self.cid
        text = self.repository
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + self.digest
        return text

    def __str__(self) -> str:
        return self.name

    def with_tag(self, tag: str) -> Reference:
        if self.cid:
            raise InvalidReference(f"image {self.name}: ipfs:// references cannot be tagged")
        if _TAG.fullmatch(tag) is None:
            raise InvalidReference(f"invalid tag {tag!r}")
        return Reference(self.domain, self.path, tag, "")


def parse_reference(text: str) -> Reference:
    """Parse and normalise an image reference; raises :class:`InvalidReference`."""
    if not isinstance(text, str) or not text or text != text.strip():
        raise InvalidReference(f"invalid image reference {text!r}")
    if text.startswith(IPFS_SCHEME):
        cid = text[len(IPFS_SCHEME) :]
        if _CID.fullmatch(cid) is None:
            raise InvalidReference(f"invalid image reference {text!r}: bad CID")
        return Reference(cid=cid)
    if "://" in text:
        raise InvalidReference(f"invalid image reference {text!r}: unsupported scheme")
    rest = text
    digest = ""
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        try:
            validate_digest(digest, f"image reference {text!r}")
        except InvalidDigest as exc:
            raise InvalidReference(str(exc)) from None
    tag = ""
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if _TAG.fullmatch(tag) is None:
            raise InvalidReference(f"invalid image reference {text!r}: bad tag {tag!r}")
    parts = rest.split("/")
    domain = DEFAULT_DOMAIN
    first = parts[0]
    if len(parts) > 1 and (
        "." in first or ":" in first or first == "localhost" or first.startswith("[")
    ):
        if _DOMAIN.fullmatch(first) is None:
            raise InvalidReference(f"invalid image reference {text!r}: bad domain {first!r}")
        domain = first
        parts = parts[1:]
    if domain in ("index.docker.io", "registry-1.docker.io"):
        domain = DEFAULT_DOMAIN
    if not parts or not all(_COMPONENT.fullmatch(p) for p in parts):
        raise InvalidReference(
            f"invalid image reference {text!r}: repository must be lower-case"
            " components separated by '/'"
        )
    if domain == DEFAULT_DOMAIN and len(parts) == 1:
        parts = ["library", *parts]
    path = "/".join(parts)
    if len(domain) + 1 + len(path) > MAX_NAME:
        raise InvalidReference(f"invalid image reference {text!r}: name too long")
    if not tag and not digest:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest)


def normalize_name(text: str) -> str:
    """The store key for a user-given reference."""
    return parse_reference(text).name
