"""Errors of the eStargz format library, one leaf per failure, under ipfsnap's branches."""

from __future__ import annotations

from ipfsnap.errors import (
    FormatError,
    IntegrityError,
    LimitExceeded,
    NotFoundError,
    UnsafePathError,
)


class EStargzError(FormatError):
    """Base for format problems of an eStargz / stargz / zstd:chunked blob."""


class TruncatedBlob(EStargzError):
    """The blob (or a range of it) ends before the data it must contain."""


class BadFooter(EStargzError):
    """The blob ends with no recognisable eStargz, stargz or zstd:chunked footer."""


class BadCompression(EStargzError):
    """A gzip member or zstd frame is corrupt, or the input tar stream is unreadable."""


class InvalidTOC(EStargzError):
    """The TOC JSON is malformed or inconsistent (types, chunk layout, offsets)."""


class BadTar(EStargzError):
    """The input tar stream of a build is malformed."""


class TOCDigestMismatch(IntegrityError):
    """The TOC JSON does not hash to the expected TOC digest."""


class ChunkDigestMismatch(IntegrityError):
    """A decompressed chunk does not hash to its ``chunkDigest``."""


class TOCTooLarge(LimitExceeded):
    """The compressed or uncompressed TOC exceeds ``Limits.max_toc_size``."""


class TooManyEntries(LimitExceeded):
    """The TOC has more entries than ``Limits.max_entries``."""


class NameTooLong(LimitExceeded):
    """An entry name or link target exceeds ``Limits.max_name_length``."""


class ChunkTooLarge(LimitExceeded):
    """A chunk claims more uncompressed bytes than ``Limits.max_chunk_size``."""


class UnsafeEntry(UnsafePathError):
    """An entry is absolute, has ``..`` components, or links outside the layer."""


class PrioritizedFileNotFound(NotFoundError):
    """A file asked to be prioritized at build time is not in the tar."""
