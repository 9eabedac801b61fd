"""The containerd-model snapshot store: metadata in sqlite, one directory per snapshot.

Layout under ``root``::

    metadata.db            sqlite (WAL), table ``snapshots``
    snapshots/<id>/fs      the snapshot's files (upperdir of an active snapshot, or the
                           mount point of a remote layer)
    snapshots/<id>/work    overlay workdir (active snapshots only)

Model (as containerd's): ``prepare`` makes an *active* (writable) snapshot on top of a
*committed* parent, ``view`` a read-only one, ``commit`` turns an active snapshot into a
committed one under a new name (same id and directory). Keys and committed names share one
namespace. Every operation is one sqlite transaction; directories are created before the
row's transaction commits and removed after a removal commits, so a crash leaves at most
stray directories, which :meth:`SnapshotStore.cleanup` removes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ipfsnap.errors import IpfsnapError
from ipfsnap.snapshot import mount as mountlib
from ipfsnap.snapshot.errors import (
    SnapshotExists,
    SnapshotHasChildren,
    SnapshotInvalidArgument,
    SnapshotNotFound,
    SnapshotStateError,
    SnapshotUnavailable,
)
from ipfsnap.snapshot.filters import compile_filters
from ipfsnap.snapshot.types import (
    REMOTE_LABEL,
    REMOTE_LABEL_VALUE,
    TARGET_SNAPSHOT_LABEL,
    VOLATILE_LABEL,
    Info,
    Kind,
    Mount,
    RemoteFileSystem,
    Usage,
)

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: ids name directories
    key       TEXT NOT NULL UNIQUE,               -- key (active/view) or committed name
    kind      TEXT NOT NULL CHECK (kind IN ('active', 'view', 'committed')),
    parent_id INTEGER REFERENCES snapshots(id),
    labels    TEXT NOT NULL DEFAULT '{}',         -- JSON object of str -> str
    created   TEXT NOT NULL,                      -- ISO 8601, UTC
    updated   TEXT NOT NULL,
    size      INTEGER NOT NULL DEFAULT 0,         -- usage recorded at commit
    inodes    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""


@dataclass
class _Row:
    id: int
    key: str
    kind: Kind
    parent_id: int | None
    labels: dict[str, str]
    created: datetime
    updated: datetime
    size: int
    inodes: int


def _now() -> datetime:
    return datetime.now(UTC)


def _disk_usage(path: Path) -> Usage:
    """Allocated bytes (st_blocks are 512-byte units) and distinct inodes under ``path``,
    hardlinks counted once, symlinks not followed."""
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [str(path)]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Usage(0, 0)
    seen.add((st.st_dev, st.st_ino))
    size += st.st_blocks * 512
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                ident = (st.st_dev, st.st_ino)
                if ident in seen:
                    continue
                seen.add(ident)
                size += st.st_blocks * 512
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
    return Usage(size, len(seen))


def _overlay_index_option() -> list[str]:
    # Like containerd: with the "index" feature available, turn it off so that one lower
    # layer may be shared by many overlays and re-used across remounts.
    return ["index=off"] if os.path.exists("/sys/module/overlay/parameters/index") else []


class SnapshotStore:
    """Snapshots persisted under ``root``; ``remote`` mounts lazily fetched layers."""

    def __init__(
        self, root: Path | str, remote: RemoteFileSystem | None = None, *, restore: bool = True
    ) -> None:
        self.root = Path(root).absolute()
        if any(c in str(self.root) for c in ",:"):
            # overlay's options separate dirs with ':' and options with ','
            raise SnapshotInvalidArgument(
                f"snapshot store root {self.root} must not contain ',' or ':'"
            )
        self.remote = remote
        self._snapdir = self.root / "snapshots"
        self._snapdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        self._lock = threading.RLock()
        self._remount_lock = threading.Lock()
        self._db = sqlite3.connect(
            self.root / "metadata.db", isolation_level=None, check_same_thread=False, timeout=30
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # every commit synced (the default; explicit because _tx lowers it per transaction)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            self._db.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
        self._overlay_extra = _overlay_index_option()
        if restore and remote is not None:
            self.restore_remote()

    # ---- plumbing -------------------------------------------------------------------

    def close(self, *, unmount_remote: bool = False) -> None:
        """Close the database; with ``unmount_remote`` also unmount every remote layer
        (the snapshotter stopping). Without it the mounts stay, and the next open's
        :meth:`restore_remote` checks them."""
        with self._lock:
            if unmount_remote:
                rows = [
                    self._row(r)
                    for r in self._db.execute(f"SELECT {self._COLS} FROM snapshots ORDER BY id")
                ]
                for row in reversed(rows):  # children before parents
                    if REMOTE_LABEL in row.labels:
                        self._unmount_remote(self.fs_path(row.id))
            self._db.close()

    def __enter__(self) -> SnapshotStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self, write: bool = True, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction. ``durable=False``: its commit is not synced (WAL with
        ``synchronous=NORMAL``: still atomic and ordered, since the WAL is append-only and the
        next synced commit or checkpoint covers it, but a power loss may forget it). Each
        synced commit is an fdatasync, 5-25 ms on a busy disk."""
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    def _dir(self, sid: int) -> Path:
        return self._snapdir / str(sid)

    def fs_path(self, sid: int) -> Path:
        """The ``fs`` directory of the snapshot with id ``sid``."""
        return self._dir(sid) / "fs"

    def _work_path(self, sid: int) -> Path:
        return self._dir(sid) / "work"

    @staticmethod
    def _row(r: tuple[object, ...]) -> _Row:
        sid, key, kind, parent_id, labels, created, updated, size, inodes = r
        return _Row(
            id=int(str(sid)),
            key=str(key),
            kind=Kind(str(kind)),
            parent_id=int(str(parent_id)) if parent_id is not None else None,
            labels=dict(json.loads(str(labels))),
            created=datetime.fromisoformat(str(created)),
            updated=datetime.fromisoformat(str(updated)),
            size=int(str(size)),
            inodes=int(str(inodes)),
        )

    _COLS = "id, key, kind, parent_id, labels, created, updated, size, inodes"

    def _get(self, db: sqlite3.Connection, key: str) -> _Row:
        r = db.execute(f"SELECT {self._COLS} FROM snapshots WHERE key = ?", (key,)).fetchone()
        if r is None:
            raise SnapshotNotFound(f"snapshot {key!r} not found")
        return self._row(r)

    def _get_id(self, db: sqlite3.Connection, sid: int) -> _Row:
        r = db.execute(f"SELECT {self._COLS} FROM snapshots WHERE id = ?", (sid,)).fetchone()
        if r is None:  # foreign keys make this impossible short of a corrupt db
            raise SnapshotNotFound(f"snapshot with id {sid} not found")
        return self._row(r)

    def _chain(self, db: sqlite3.Connection, row: _Row) -> list[_Row]:
        """Ancestors of ``row``, nearest first."""
        out: list[_Row] = []
        pid = row.parent_id
        while pid is not None:
            p = self._get_id(db, pid)
            out.append(p)
            pid = p.parent_id
        return out

    def _info(self, db: sqlite3.Connection, row: _Row) -> Info:
        parent = self._get_id(db, row.parent_id).key if row.parent_id is not None else ""
        return Info(
            name=row.key,
            kind=row.kind,
            parent=parent,
            labels=dict(row.labels),
            created=row.created,
            updated=row.updated,
        )

    # ---- creation -------------------------------------------------------------------

    def _create(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None
    ) -> tuple[_Row, list[_Row]]:
        if not key:
            raise SnapshotInvalidArgument("snapshot key must not be empty")
        labels = dict(labels or {})
        with self._tx(durable=VOLATILE_LABEL not in labels) as db:
            if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
                raise SnapshotExists(f"snapshot {key!r} already exists")
            parent_row: _Row | None = None
            if parent:
                try:
                    parent_row = self._get(db, parent)
                except SnapshotNotFound:
                    raise SnapshotNotFound(
                        f"parent snapshot {parent!r} of {key!r} not found"
                    ) from None
                if parent_row.kind is not Kind.COMMITTED:
                    raise SnapshotStateError(
                        f"parent snapshot {parent!r} of {key!r} is {parent_row.kind}, not committed"
                    )
            now = _now().isoformat()
            cur = db.execute(
                "INSERT INTO snapshots (key, kind, parent_id, labels, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    key,
                    str(kind),
                    parent_row.id if parent_row else None,
                    json.dumps(labels),
                    now,
                    now,
                ),
            )
            sid = int(cur.lastrowid or 0)
            row = self._get_id(db, sid)
            chain = self._chain(db, row)
            self._make_dir(row, chain)
        return row, chain

    def _make_dir(self, row: _Row, chain: list[_Row]) -> None:
        # Build in a temporary directory and rename into place, so <id> never exists
        # half-made; a stray dir with this id (a crash after mkdir, before the row's
        # commit, then an id reused by sqlite) belongs to no row and is removed first.
        tmp = Path(tempfile.mkdtemp(prefix="new-", dir=self._snapdir))
        try:
            (tmp / "fs").mkdir(mode=0o755)
            os.chmod(tmp / "fs", 0o755)  # umask-proof
            if row.kind is Kind.ACTIVE:
                (tmp / "work").mkdir(mode=0o711)
            if chain:
                # The upper dir's root is the merged root: give it the parent's owner.
                st = os.stat(self.fs_path(chain[0].id))
                os.lchown(tmp / "fs", st.st_uid, st.st_gid)
            final = self._dir(row.id)
            if os.path.lexists(final):
                log.warning("removing stale snapshot directory %s", final)
                self._remove_dir(final)
            os.rename(tmp, final)
        except BaseException:
            self._remove_dir(tmp)
            raise

    # ---- mounts ---------------------------------------------------------------------

    def _check_available(self, row: _Row, chain: list[_Row]) -> None:
        for r in [row, *chain]:
            if REMOTE_LABEL not in r.labels:
                continue
            mp = self.fs_path(r.id)
            try:
                if self.remote is not None:
                    self._check_or_remount(r, mp)
                elif not mountlib.is_mountpoint(mp):
                    raise SnapshotUnavailable(f"remote layer {r.key!r} is not mounted at {mp}")
            except Exception as exc:
                raise SnapshotUnavailable(
                    f"layer {r.key!r} of snapshot {row.key!r} is unavailable: {exc}"
                ) from exc

    def _check_or_remount(self, row: _Row, mp: Path) -> None:
        """Check a remote layer's mount; mount it again if it fails (its worker died, or
        IPFS was unreachable when :meth:`restore_remote` ran), as a restart would."""
        assert self.remote is not None
        try:
            self.remote.check(mp, row.labels)
            return
        except Exception as exc:
            with self._remount_lock:  # one remount at a time: no two workers on one path
                try:
                    self.remote.check(mp, row.labels)
                    return
                except Exception:
                    pass
                log.info("remote snapshot %r at %s fails its check, remounting: %s",
                         row.key, mp, exc)
                self._unmount_remote(mp)
                self.remote.mount(mp, row.labels)
                self.remote.check(mp, row.labels)
                log.info("restored remote snapshot %r at %s", row.key, mp)

    def _mounts_for(self, row: _Row, chain: list[_Row]) -> list[Mount]:
        self._check_available(row, chain)
        if not chain:
            flag = "ro" if row.kind is Kind.VIEW else "rw"
            return [Mount("bind", str(self.fs_path(row.id)), [flag, "rbind"])]
        if row.kind is Kind.VIEW and len(chain) == 1:
            return [Mount("bind", str(self.fs_path(chain[0].id)), ["ro", "rbind"])]
        options = list(self._overlay_extra)
        if row.kind is Kind.ACTIVE:
            options.append(f"workdir={self._work_path(row.id)}")
            options.append(f"upperdir={self.fs_path(row.id)}")
        options.append("lowerdir=" + ":".join(str(self.fs_path(p.id)) for p in chain))
        return [Mount("overlay", "overlay", options)]

    # ---- the containerd API ---------------------------------------------------------

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """Create an active snapshot ``key`` on ``parent`` and return its mounts.

        With the :data:`TARGET_SNAPSHOT_LABEL` label and a remote filesystem, first try to
        mount the layer remotely: on success commit it as the target name and raise
        :class:`SnapshotExists` (containerd then skips unpacking), on failure fall back to a
        normal active snapshot.
        """
        labels = dict(labels or {})
        row, chain = self._create(Kind.ACTIVE, key, parent, labels)
        target = labels.get(TARGET_SNAPSHOT_LABEL)
        if target and self.remote is not None:
            self._prepare_remote(row, target, labels)
        return self._mounts_for(row, chain)

    def _prepare_remote(self, row: _Row, target: str, labels: dict[str, str]) -> None:
        mp = self.fs_path(row.id)
        log.info("snapshot %r: mounting remote layer for %r at %s", row.key, target, mp)
        try:
            self.remote.mount(mp, labels)  # type: ignore[union-attr]
        except Exception as exc:
            log.warning(
                "snapshot %r: remote mount for %r failed, falling back to a normal snapshot: %s",
                row.key,
                target,
                exc,
            )
            # A filesystem that failed half-way must not leave a mount over the upper
            # dir the normal path is about to unpack into.
            self._unmount_remote(mp)
            return
        remote_labels = {**labels, REMOTE_LABEL: REMOTE_LABEL_VALUE}
        try:
            self._commit(target, row.key, remote_labels, Usage(0, 0))
        except SnapshotExists:
            # Someone committed the target meanwhile: it is there, so containerd's
            # expectation holds; drop our now useless active snapshot.
            log.info("snapshot %r: target %r appeared meanwhile; dropping it", row.key, target)
            self.remove(row.key)
        except BaseException:
            # As the reference: no fallback to a normal snapshot once the filesystem has
            # used the directory; unmount and report.
            self._unmount_remote(mp)
            raise
        log.info("snapshot %r: committed remote snapshot %r", row.key, target)
        raise SnapshotExists(f"target snapshot {target!r} already exists (remote layer)")

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """Create a read-only view ``key`` of ``parent`` and return its mounts."""
        row, chain = self._create(Kind.VIEW, key, parent, labels)
        return self._mounts_for(row, chain)

    def mounts(self, key: str) -> list[Mount]:
        """The mounts of active or view snapshot ``key`` (again)."""
        with self._tx(write=False) as db:
            row = self._get(db, key)
            chain = self._chain(db, row)
        if row.kind is Kind.COMMITTED:
            raise SnapshotStateError(
                f"snapshot {key!r} is committed; only active or view snapshots have mounts"
            )
        return self._mounts_for(row, chain)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        """Commit active snapshot ``key`` as ``name`` (its labels become ``labels``)."""
        with self._tx(write=False) as db:
            row = self._get(db, key)
        if row.kind is not Kind.ACTIVE:
            raise SnapshotStateError(f"snapshot {key!r} is {row.kind}, not active: cannot commit")
        usage = _disk_usage(self.fs_path(row.id))
        self._commit(name, key, dict(labels or {}), usage)

    def _commit(self, name: str, key: str, labels: dict[str, str], usage: Usage) -> None:
        if not name:
            raise SnapshotInvalidArgument(f"commit of {key!r}: name must not be empty")
        with self._tx() as db:
            row = self._get(db, key)
            if row.kind is not Kind.ACTIVE:
                raise SnapshotStateError(
                    f"snapshot {key!r} is {row.kind}, not active: cannot commit"
                )
            if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
                raise SnapshotExists(f"snapshot {name!r} already exists (commit of {key!r})")
            db.execute(
                "UPDATE snapshots SET key = ?, kind = 'committed', labels = ?, updated = ?,"
                " size = ?, inodes = ? WHERE id = ?",
                (name, json.dumps(labels), _now().isoformat(), usage.size, usage.inodes, row.id),
            )

    def remove(self, key: str) -> None:
        """Remove snapshot ``key`` and its directory; refused while it has children."""
        # A volatile snapshot's removal is not synced: a crash may bring its row back, without
        # its directory; the container that owned it is gone, and a new one with the same id
        # removes it (cli/run.py). Read outside the write transaction: labels of a volatile
        # snapshot never change, at worst one removal is synced for nothing.
        with self._lock:
            peek = self._db.execute(
                "SELECT labels FROM snapshots WHERE key = ?", (key,)).fetchone()
        durable = peek is None or VOLATILE_LABEL not in json.loads(str(peek[0]))
        with self._tx(durable=durable) as db:
            row = self._get(db, key)
            children = [
                str(r[0])
                for r in db.execute(
                    "SELECT key FROM snapshots WHERE parent_id = ? ORDER BY id LIMIT 5", (row.id,)
                )
            ]
            if children:
                raise SnapshotHasChildren(
                    f"snapshot {key!r} has children ({', '.join(map(repr, children))}): "
                    "remove them first"
                )
            if REMOTE_LABEL in row.labels:
                # Unmount first, while the row still says what is mounted there; a
                # failure leaves a stray mount that the directory removal detaches.
                self._unmount_remote(self.fs_path(row.id))
            db.execute("DELETE FROM snapshots WHERE id = ?", (row.id,))
        # After the commit: the row is gone even if the directory cannot be removed yet
        # (cleanup() retries), as containerd does.
        try:
            self._remove_dir(self._dir(row.id))
        except (OSError, IpfsnapError) as exc:
            log.warning(
                "snapshot %r removed, but not its directory (cleanup retries): %s", key, exc
            )

    def stat(self, key: str) -> Info:
        with self._tx(write=False) as db:
            return self._info(db, self._get(db, key))

    def update(self, info: Info, fieldpaths: Sequence[str] | None = None) -> Info:
        """Update the labels of snapshot ``info.name``; ``fieldpaths`` as containerd's:
        empty or ``labels`` replaces all labels, ``labels.<k>`` sets (or, when absent from
        ``info.labels``, deletes) one label. Nothing else can be updated."""
        with self._tx() as db:
            row = self._get(db, info.name)
            labels = dict(row.labels)
            if not fieldpaths:
                labels = dict(info.labels)
            for fp in fieldpaths or ():
                if fp == "labels":
                    labels = dict(info.labels)
                elif fp.startswith("labels."):
                    k = fp[len("labels.") :]
                    if k in info.labels:
                        labels[k] = info.labels[k]
                    else:
                        labels.pop(k, None)
                else:
                    raise SnapshotInvalidArgument(
                        f"snapshot {info.name!r}: cannot update field {fp!r} (only labels)"
                    )
            db.execute(
                "UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?",
                (json.dumps(labels), _now().isoformat(), row.id),
            )
            return self._info(db, self._get_id(db, row.id))

    def walk(self, filters: Sequence[str] = ()) -> list[Info]:
        """Every snapshot matching any of ``filters`` (containerd syntax subset)."""
        pred = compile_filters(filters)
        with self._tx(write=False) as db:
            rows = [
                self._row(r) for r in db.execute(f"SELECT {self._COLS} FROM snapshots ORDER BY id")
            ]
            by_id = {r.id: r for r in rows}
            infos = [
                Info(
                    name=r.key,
                    kind=r.kind,
                    parent=by_id[r.parent_id].key if r.parent_id is not None else "",
                    labels=dict(r.labels),
                    created=r.created,
                    updated=r.updated,
                )
                for r in rows
            ]
        return [i for i in infos if pred(i)]

    def usage(self, key: str) -> Usage:
        """Disk usage: measured now for an active snapshot, recorded at commit otherwise
        (0 for remote layers, whose bytes are fetched lazily)."""
        with self._tx(write=False) as db:
            row = self._get(db, key)
        if row.kind is Kind.ACTIVE:
            return _disk_usage(self.fs_path(row.id))
        return Usage(row.size, row.inodes)

    def path(self, key: str) -> Path:
        """The ``fs`` directory of snapshot ``key`` (where a layer is unpacked)."""
        with self._tx(write=False) as db:
            return self.fs_path(self._get(db, key).id)

    def parent_paths(self, key: str) -> list[Path]:
        """The ``fs`` directories of ``key``'s ancestors, nearest first (the lower layers
        :func:`~ipfsnap.snapshot.apply.apply_layer` copies implied directories from)."""
        with self._tx(write=False) as db:
            return [self.fs_path(r.id) for r in self._chain(db, self._get(db, key))]

    # ---- maintenance ----------------------------------------------------------------

    def cleanup(self) -> list[Path]:
        """Remove directories under ``snapshots/`` that belong to no snapshot; return them."""
        removed: list[Path] = []
        with self._lock:
            with self._tx(write=False) as db:
                ids = {str(r[0]) for r in db.execute("SELECT id FROM snapshots")}
            for name in sorted(os.listdir(self._snapdir)):
                if name in ids:
                    continue
                d = self._snapdir / name
                try:
                    self._unmount_remote(d / "fs")
                    self._remove_dir(d)
                    removed.append(d)
                except (OSError, IpfsnapError) as exc:
                    log.warning("cleanup: cannot remove %s: %s", d, exc)
        return removed

    def restore_remote(self) -> dict[str, str]:
        """Check every remote snapshot's mount; mount again those that are not working.

        Returns ``{name: error}`` for the ones that could not be restored (also logged);
        snapshots on top of those report :class:`SnapshotUnavailable` until fixed.
        """
        failures: dict[str, str] = {}
        with self._tx(write=False) as db:
            rows = [
                self._row(r) for r in db.execute(f"SELECT {self._COLS} FROM snapshots ORDER BY id")
            ]
        for row in rows:
            if REMOTE_LABEL not in row.labels:
                continue
            mp = self.fs_path(row.id)
            if self.remote is None:
                failures[row.key] = "no remote filesystem configured"
                continue
            if mountlib.is_mountpoint(mp):
                try:
                    self.remote.check(mp, row.labels)
                    continue
                except Exception as exc:
                    log.info(
                        "remote snapshot %r at %s fails its check, remounting: %s", row.key, mp, exc
                    )
                    self._unmount_remote(mp)
            try:
                self.remote.mount(mp, row.labels)
                log.info("restored remote snapshot %r at %s", row.key, mp)
            except Exception as exc:
                log.error("cannot restore remote snapshot %r at %s: %s", row.key, mp, exc)
                failures[row.key] = str(exc)
        return failures

    def _unmount_remote(self, mp: Path) -> None:
        if self.remote is not None:
            try:
                self.remote.unmount(mp)
            except Exception as exc:
                log.debug("remote unmount of %s: %s", mp, exc)
        # Whatever is left (no remote configured, or it failed): detach it, so that
        # removing the directory can never descend into a mounted filesystem.
        for m in mountlib.mounts_under(mp):
            try:
                mountlib.unmount(m, lazy=True)
            except (OSError, IpfsnapError) as exc:
                log.warning("cannot unmount %s: %s", m, exc)

    def _remove_dir(self, d: Path) -> None:
        for m in mountlib.mounts_under(d):
            mountlib.unmount(m, lazy=True)
        if mountlib.mounts_under(d):
            raise SnapshotStateError(f"snapshot directory {d} still has mounts; not removing")
        # rmtree uses the fd-based implementation on Linux: it never follows symlinks.
        shutil.rmtree(d, ignore_errors=False, onerror=None)
