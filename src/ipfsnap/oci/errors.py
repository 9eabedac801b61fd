"""Errors of the OCI types package: bad digests, documents, media types, references."""

from __future__ import annotations

from ipfsnap.errors import FormatError, IntegrityError, LimitExceeded, UsageError


class OCIFormatError(FormatError):
    """An OCI/Docker document (index, manifest, config, descriptor) is malformed."""


class InvalidDigest(OCIFormatError):
    """A digest string is not ``sha256:`` followed by 64 lower-case hex digits."""


class UnknownMediaType(OCIFormatError):
    """A document or descriptor has a media type ipfsnap does not handle."""


class DocumentTooLarge(LimitExceeded):
    """A JSON document is larger than the configured maximum."""


class DigestMismatch(IntegrityError):
    """Content does not hash to the digest (or size) that describes it."""


class InvalidReference(UsageError):
    """An image reference (name) cannot be parsed."""


class InvalidPlatform(UsageError):
    """A ``--platform`` value is not ``os/arch[/variant]``."""
