"""Errors of the lazy layer filesystem, under ipfsnap's branches."""

from __future__ import annotations

from ipfsnap.errors import IntegrityError, IPFSError, MountError, UsageError


class FetchError(IPFSError):
    """A byte range of a layer blob could not be fetched from its source."""


class FetchTimeout(FetchError):
    """Fetching a byte range took longer than ``fetching_timeout_sec``."""


class CacheCorrupt(IntegrityError):
    """A cached chunk no longer matches its digest (it is dropped and refetched)."""


class LayerMountError(MountError):
    """A lazy layer could not be mounted (the caller may fall back to a full fetch)."""


class WorkerSpecError(UsageError):
    """A layer worker spec or the snapshot labels describing a layer are invalid."""
