"""Plain data of the snapshot model (containerd's Info/Usage/Mount) and the remote-layer
protocol the lazy filesystem implements."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

#: Label containerd's unpacker puts on Prepare: the committed name (chainID) the layer will
#: get. Its presence is what asks the snapshotter to try a remote (lazy) mount.
TARGET_SNAPSHOT_LABEL = "containerd.io/snapshot.ref"
#: Label (value "true") of a snapshot that is thrown away after use (the active snapshot of a
#: ``run --rm`` container): its creation and removal are not synced to disk (a crash may
#: forget either: a stray directory, removed by cleanup, or a row whose owner is gone).
VOLATILE_LABEL = "ipfsnap.io/snapshot.volatile"
#: Label (and value) marking a committed snapshot whose fs dir is a remote mount, as the
#: reference marks it; restore_remote() re-mounts every snapshot carrying it.
REMOTE_LABEL = "containerd.io/snapshot/remote"
REMOTE_LABEL_VALUE = "remote snapshot"
#: Prefix of the labels that describe the remote layer (reference, digest, urls, ...).
REMOTE_LABEL_PREFIX = "containerd.io/snapshot/remote/"


class Kind(enum.StrEnum):
    """containerd's snapshot kinds."""

    VIEW = "view"
    ACTIVE = "active"
    COMMITTED = "committed"


@dataclass
class Info:
    """containerd's snapshots.Info: ``name`` is the key (active/view) or the committed name;
    ``parent`` is the committed parent's name or ""."""

    name: str
    kind: Kind
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created: datetime | None = None
    updated: datetime | None = None


@dataclass(frozen=True)
class Usage:
    """Disk usage: bytes of allocated blocks and number of distinct inodes."""

    size: int
    inodes: int


@dataclass
class Mount:
    """One mount as containerd describes it (``type``, ``source``, ``options``)."""

    type: str
    source: str
    options: list[str] = field(default_factory=list)


class RemoteFileSystem(Protocol):
    """A filesystem that can mount a remote layer lazily (the FUSE layer filesystem).

    ``mountpoint`` is the snapshot's ``fs`` directory; ``labels`` are the snapshot's labels
    (the ``containerd.io/snapshot/remote/...`` ones say which layer). Each raises an
    :class:`ipfsnap.errors.IpfsnapError` on failure.
    """

    def mount(self, mountpoint: Path, labels: Mapping[str, str]) -> None: ...

    def check(self, mountpoint: Path, labels: Mapping[str, str]) -> None: ...

    def unmount(self, mountpoint: Path) -> None: ...


class Snapshotter(Protocol):
    """containerd's snapshots API as the rest of ipfsnap uses it.

    Implemented in-process by :class:`ipfsnap.snapshot.SnapshotStore` and, over the
    snapshotter service's socket, by the service client, so image code (rpull, run) works
    with either.
    """

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]: ...

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]: ...

    def mounts(self, key: str) -> list[Mount]: ...

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None: ...

    def remove(self, key: str) -> None: ...

    def stat(self, key: str) -> Info: ...
