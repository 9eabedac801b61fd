"""Where each snapshotter keeps its snapshots: the one definition rpull, mount, run and the
snapshotter service all use.

Like containerd's separate snapshotter plugins, "stargz" (lazy layers, FUSE mounts from
IPFS) and "overlayfs" (layers fetched whole and unpacked) have separate stores, so a lazily
mounted layer is never reused by the overlayfs path::

    <state_dir>/snapshots/stargz      SnapshotStore(remote=LayerMounter): the lazy one
    <state_dir>/snapshots/overlayfs   SnapshotStore(): full unpack only
"""

from __future__ import annotations

from pathlib import Path

from ipfsnap.errors import UsageError

STARGZ = "stargz"
OVERLAYFS = "overlayfs"
#: every snapshotter name, default (the seed workflow's lazy one) first
SNAPSHOTTERS = (STARGZ, OVERLAYFS)
#: the snapshotter whose store mounts eStargz layers lazily
LAZY_SNAPSHOTTERS = frozenset({STARGZ})
#: directory under the state dir holding one store per snapshotter
SNAPSHOTS_DIR = "snapshots"


def snapshotter_root(state_dir: Path, name: str) -> Path:
    """The SnapshotStore root of snapshotter ``name`` under ``state_dir``."""
    if name not in SNAPSHOTTERS:
        raise UsageError(
            f"unknown snapshotter {name!r} (choose from {', '.join(SNAPSHOTTERS)})"
        )
    return Path(state_dir) / SNAPSHOTS_DIR / name


def is_lazy(name: str) -> bool:
    """Whether snapshotter ``name`` mounts eStargz layers lazily."""
    return name in LAZY_SNAPSHOTTERS
