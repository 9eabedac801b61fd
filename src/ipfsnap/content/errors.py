"""Errors of the local content and image store, imports, exports and registry pulls."""

from __future__ import annotations

from ipfsnap.errors import FormatError, IpfsnapError, NotFoundError, StoreError, UsageError


class BlobNotFound(NotFoundError):
    """A blob is not in the local content store."""


class ImageNotFound(NotFoundError):
    """No image has this name in the local store."""


class IncompleteImage(StoreError):
    """An image tree refers to blobs that are not in the store."""


class StoreCorrupt(StoreError):
    """The store's own files (names database) cannot be read."""


class ArchiveError(FormatError):
    """An image archive or layout (OCI layout, oci-archive, docker-archive) is unusable."""


class AmbiguousImport(UsageError):
    """An import cannot decide which name(s) to give the images it contains."""


class RegistryError(IpfsnapError):
    """A registry request failed (network, HTTP status, protocol)."""


class RegistryAuthError(RegistryError):
    """The registry refused our credentials or token."""
