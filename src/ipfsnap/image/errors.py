"""Errors of the image area (rpull and unpacking here; ipfs-push adds its own leaves).

Each derives from a branch of :mod:`ipfsnap.errors`; messages name the image, blob or CID.
"""

from __future__ import annotations

from ipfsnap.errors import (
    FormatError,
    IntegrityError,
    IPFSError,
    NotFoundError,
    RuntimeFailure,
    UsageError,
)


class BadImageRef(UsageError):
    """An rpull reference is not ``CID``, ``ipfs://CID`` or ``/ipfs/CID``."""


class RemoteImageFormatError(FormatError):
    """An IPFS-enabled image is malformed: a root that is not a descriptor, a descriptor
    without an ``ipfs://`` url, a config whose diff_ids do not fit the layers."""


class BlobVerificationError(IntegrityError):
    """A blob fetched from IPFS does not match the digest or size of its descriptor."""


class BlobFetchError(IPFSError):
    """Fetching a blob from IPFS failed (the IPFS error is in the message)."""


class PlatformNotFound(NotFoundError):
    """An image index has no manifest for the requested platform."""


class UnpackError(FormatError):
    """A layer cannot be unpacked into a snapshot (unexpected mounts, missing blob)."""


# -- ipfs-push and conversion --------------------------------------------------------------


class LayerConversionError(FormatError):
    """A layer cannot be converted to eStargz (corrupt or truncated tar, bad compression)."""


class UnsupportedMediaType(FormatError):
    """An image holds a blob whose media type push/convert does not know what to do with."""


class SourceBlobMismatch(IntegrityError):
    """A local blob's content does not match the digest or size its descriptor gives."""


class PushError(IPFSError):
    """Adding a blob of an image to IPFS failed (the IPFS error is in the message)."""


class CIDMismatch(IntegrityError):
    """The daemon returned a CID for a blob that differs from the CID computed locally."""


# -- image optimize (workload recording) ---------------------------------------------------


class RecordError(RuntimeFailure):
    """Recording the files a workload reads failed (strace missing, no trace written)."""
