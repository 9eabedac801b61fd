"""ipfsnap.snapshot: containerd-model snapshot store, overlay mounts, safe layer unpacking.

Remote (lazily fetched) layers come in only through the :class:`RemoteFileSystem` protocol;
this package never imports the FUSE filesystem.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipfsnap._lazy import lazy_exports

if TYPE_CHECKING:
    from ipfsnap.snapshot.apply import (
        DEFAULT_APPLY_LIMITS,
        ESTARGZ_METADATA,
        ApplyLimits,
        ApplyResult,
        apply_layer,
    )
    from ipfsnap.snapshot.mount import mount_all, unmount
    from ipfsnap.snapshot.store import SnapshotStore
    from ipfsnap.snapshot.types import (
        REMOTE_LABEL,
        REMOTE_LABEL_PREFIX,
        REMOTE_LABEL_VALUE,
        TARGET_SNAPSHOT_LABEL,
        VOLATILE_LABEL,
        Info,
        Kind,
        Mount,
        RemoteFileSystem,
        Snapshotter,
        Usage,
    )

__all__ = [
    "DEFAULT_APPLY_LIMITS",
    "ESTARGZ_METADATA",
    "REMOTE_LABEL",
    "REMOTE_LABEL_PREFIX",
    "REMOTE_LABEL_VALUE",
    "TARGET_SNAPSHOT_LABEL",
    "VOLATILE_LABEL",
    "ApplyLimits",
    "ApplyResult",
    "Info",
    "Kind",
    "Mount",
    "RemoteFileSystem",
    "SnapshotStore",
    "Snapshotter",
    "Usage",
    "apply_layer",
    "mount_all",
    "unmount",
]

# Submodules load on first use of one of their names (see ipfsnap._lazy).
if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_exports(__name__, __file__)
