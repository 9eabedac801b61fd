"""Errors of the snapshot store, the mount helpers and the layer unpacker.

Each leaf derives from one of the branches in :mod:`ipfsnap.errors`, so the service can map
them to containerd's gRPC codes (NotFound, AlreadyExists, FailedPrecondition, ...) by family.
"""

from __future__ import annotations

from ipfsnap.errors import (
    AlreadyExistsError,
    FormatError,
    IntegrityError,
    LimitExceeded,
    MountError,
    NotFoundError,
    SnapshotError,
    UnsafePathError,
)


class SnapshotNotFound(NotFoundError):
    """No snapshot has the given key or name (containerd: NotFound)."""


class SnapshotExists(AlreadyExistsError):
    """A snapshot with the given key or name already exists (containerd: AlreadyExists)."""


class SnapshotStateError(SnapshotError):
    """The operation does not fit the snapshot's kind or relations (containerd:
    FailedPrecondition): committing a view, a parent that is not committed, removing a
    snapshot that still has children."""


class SnapshotHasChildren(SnapshotStateError):
    """Removing a snapshot that other snapshots use as their parent."""


class SnapshotInvalidArgument(SnapshotError):
    """A malformed request: empty key, bad filter, a field that cannot be updated
    (containerd: InvalidArgument)."""


class SnapshotUnavailable(SnapshotError):
    """A remote (lazily mounted) layer in the snapshot's chain is not usable right now
    (containerd: Unavailable)."""


class SnapshotMountError(MountError):
    """mount(2)/umount(2) of a snapshot's filesystem failed."""


class LayerFormatError(FormatError):
    """A layer stream is not a readable (optionally gzip/zstd compressed) tar archive."""


class LayerUnsafeEntry(UnsafePathError):
    """A layer entry would write outside the snapshot directory or through a symlink."""


class LayerTooLarge(LimitExceeded):
    """A layer's uncompressed size (or an entry's claimed size) exceeds the configured limit."""


class DiffIDMismatch(IntegrityError):
    """The uncompressed layer does not hash to the expected diffID."""


class LayerWriteError(SnapshotError):
    """Writing a layer entry into the snapshot directory failed (disk full, permissions)."""
