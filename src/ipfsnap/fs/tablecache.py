"""Parsed-TOC cache: a layer's :class:`LayerTables`, handed from its warm-up to its mount.

Why: a lazy pull mounts its layers one after the other (containerd's model: a layer's parent
is committed before it is prepared), and each mount used to parse its layer's TOC in its own
worker (``open_layer`` + ``LayerTables.from_index``: 0.2-1.5 s for the 2-9k-entry layers of
the hello-bench image on a loaded 2-core machine), although the warm-up of that layer
(``worker --warm``, started while the earlier layers mount) had parsed the same TOC a moment
before and thrown the result away. Now the warm-up leaves its tables here and the worker
adopts them: one parse per layer, done off the mount path.

Layout: ``<cache root>/.tables/`` (0700; the chunk cache's scans skip names starting with
"."), per layer

- ``<layer hex>-<toc hex>.tables`` (0600): one JSON header line, then the pickled tables.
  The header names the layer digest, the TOC digest, :data:`FORMAT_VERSION`, a fingerprint of
  the code that builds the tables (:func:`code_fingerprint`), the parse limits, and the
  payload's length and sha256. Written to a temp file and renamed into place. A file whose
  header does not match what the reader expects (another TOC, version, code or limits), whose
  payload is short or fails its checksum, that is not owned by us or is group/other
  accessible, or that does not unpickle to ``LayerTables``, is refused (logged with the
  reason) and deleted; the caller parses the TOC instead. The TOC digest is in the name and
  in the header: tables are never used for a TOC other than the one they were built from.
- ``<layer hex>.warm``: an empty lock file. A warm-up holds an exclusive ``flock`` on it
  while it works (parse, store, prefetch). For a warm-up in a new process the mounter takes
  the lock *before* it starts the process and hands the locked descriptor to it
  (``--lock-fd``), so there is no window in which a worker could miss a warm-up that was
  started but has not locked yet; the warm spare (a process started ahead) takes it itself
  within milliseconds of the request (a worker that missed it only parses the TOC itself).
  The kernel drops the lock when the warm-up exits, however it exits.

Waiting rather than parsing in parallel: a worker whose layer is still warming waits for the
warm-up to finish (bounded by ``fetching_timeout_sec + prefetch_timeout_sec``, the warm-up's
own bounds) and then adopts its tables, instead of parsing the same TOC on the same two
cores: a parse is CPU-bound, so a second one in parallel makes both slower, and waiting for
the whole warm-up (prefetch included) also keeps the worker from fetching the same
prioritized chunks a second time. Measured in docs/benchmarks.md (hello-bench, "Layer mount
handoff"); ``toc_cache = "adopt"`` in the worker spec is the parse-in-parallel variant kept
for that measurement.

Trust: the payload is a pickle, loaded only from files in a directory that only our user can
write (the state dir is root-only), checked for our owner and 0600 before unpickling; the
checksum detects corruption and truncation (a crash, a full disk), not an attacker (who could
write the checksum too, and could as well write the chunk cache or the worker spec).

Bounds: at most :data:`MAX_FILES` files and :data:`MAX_BYTES` bytes of tables; the oldest
go first when a new one is stored. A layer's tables (and its lock file, if no warm-up holds
it) are removed when its mount is unmounted (``LayerMounter.unmount``, which the snapshot
store calls when the layer's snapshot is removed, and ``snapshotter stop``).

Engineer note: :data:`FORMAT_VERSION` must be bumped when ``LayerTables`` (or what it holds:
``InodeTable``, ``ChunkTable``) changes meaning without a change in the files that
:func:`code_fingerprint` hashes; any edit of those files already invalidates old tables.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import pickle
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ipfsnap.docparse import MalformedDocument, parse_json
from ipfsnap.estargz.types import Limits

if TYPE_CHECKING:  # the mounter (snapshotter process) needs no tables code
    from ipfsnap.fs.layer import LayerTables

log = logging.getLogger(__name__)

#: bump when LayerTables' content changes meaning (see the module doc)
FORMAT_VERSION = 1
#: directory under the chunk cache root ("." first: the chunk cache's scans skip it)
TABLES_DIR = ".tables"
MAGIC = "ipfsnap-layer-tables"
SUFFIX = ".tables"
LOCK_SUFFIX = ".warm"
#: files kept at most: a pull warms at most 8 next layers (the layers.next label's bound) and
#: the worker of every mounted layer stores its own, so 64 covers several images' layers
MAX_FILES = 64
#: bytes of tables kept at most: the tables of a 100k-entry layer pickle to ~15 MB (the
#: hello-bench layers, 2-9k entries, to 0.3-1.3 MB), so 512 MiB keeps dozens of big layers
MAX_BYTES = 512 << 20
#: a header line longer than this is not ours
MAX_HEADER = 4096
#: how often a waiting worker polls the warm-up's lock (seconds): small against a mount
POLL = 0.02
#: modules whose source decides what LayerTables holds (their bytes are fingerprinted)
FINGERPRINTED = ("ipfsnap.fs.layer", "ipfsnap.fs.inodes", "ipfsnap.fs.chunks",
                 "ipfsnap.estargz.reader", "ipfsnap.estargz.toc", "ipfsnap.estargz.types",
                 __name__)

_FINGERPRINT: str | None = None


def code_fingerprint() -> str:
    """sha256 (first 16 hex) of the source of :data:`FINGERPRINTED`, once per process."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        h = hashlib.sha256()
        for name in FINGERPRINTED:
            spec = importlib.util.find_spec(name)
            origin = spec.origin if spec is not None else None
            h.update(name.encode() + b"\0")
            try:
                h.update(Path(origin).read_bytes() if origin else b"no source")
            except OSError:
                h.update(b"unreadable")
        _FINGERPRINT = h.hexdigest()[:16]
    return _FINGERPRINT


def limits_key(limits: Limits) -> str:
    return (f"{limits.max_toc_size}/{limits.max_entries}/{limits.max_name_length}/"
            f"{limits.max_chunk_size}")


def _hex(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef"
                                                          for c in hexpart):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return hexpart


@dataclass
class TableKey:
    """What tables must have been built from to be adopted."""

    layer: str
    toc_digest: str
    limits: str

    def header(self, payload: bytes) -> dict[str, object]:
        return {"magic": MAGIC, "version": FORMAT_VERSION, "code": code_fingerprint(),
                "layer": self.layer, "toc": self.toc_digest, "limits": self.limits,
                "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


class TableCache:
    """The ``.tables`` directory of one chunk cache root."""

    def __init__(self, cache_root: Path, *, max_files: int = MAX_FILES,
                 max_bytes: int = MAX_BYTES) -> None:
        self.dir = cache_root / TABLES_DIR
        self.max_files = max_files
        self.max_bytes = max_bytes

    # -- paths ----------------------------------------------------------------------------
    def path(self, layer: str, toc_digest: str) -> Path:
        return self.dir / f"{_hex(layer)}-{_hex(toc_digest)}{SUFFIX}"

    def lock_path(self, layer: str) -> Path:
        return self.dir / f"{_hex(layer)}{LOCK_SUFFIX}"

    def _mkdir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- read -----------------------------------------------------------------------------
    def load(self, key: TableKey) -> LayerTables | None:
        """The tables stored for ``key``, or None (missing, or refused: logged, deleted)."""
        path = self.path(key.layer, key.toc_digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("parsed-TOC cache %s: cannot open (%s): parsing the TOC", path, exc)
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                    return self._refuse(path, f"owner {st.st_uid} / mode "
                                              f"{st.st_mode & 0o777:o}, not ours and 0600")
                data = f.read()
        except OSError as exc:
            log.warning("parsed-TOC cache %s: cannot read (%s): parsing the TOC", path, exc)
            return None
        nl = data.find(b"\n", 0, MAX_HEADER)
        if nl < 0:
            return self._refuse(path, "no header line")
        try:
            # a header of MAX_HEADER "[" is nested past the recursion limit: docparse turns
            # that RecursionError into a refusal too
            header = parse_json(data[:nl])
        except MalformedDocument as exc:
            return self._refuse(path, f"header is not JSON: {exc}")
        payload = memoryview(data)[nl + 1:]
        if not isinstance(header, dict) or header.get("magic") != MAGIC:
            return self._refuse(path, "not a parsed-TOC cache file")
        want = key.header(b"")
        for field in ("version", "code", "layer", "toc", "limits"):
            if header.get(field) != want[field]:
                return self._refuse(path, f"{field} {header.get(field)!r} is not the "
                                          f"expected {want[field]!r}")
        if header.get("size") != len(payload):
            return self._refuse(path, f"payload is {len(payload)} bytes, header says "
                                      f"{header.get('size')!r} (truncated?)")
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            return self._refuse(path, "payload does not match its sha256 (corrupt)")
        from ipfsnap.fs.layer import LayerTables

        try:
            tables = pickle.loads(payload)
        except Exception as exc:  # any unpickling failure means "parse instead"
            return self._refuse(path, f"payload does not unpickle: {exc!r}")
        if not isinstance(tables, LayerTables):
            return self._refuse(path, f"payload is a {type(tables).__name__}, not LayerTables")
        return tables

    def _refuse(self, path: Path, why: str) -> LayerTables | None:
        log.warning("parsed-TOC cache %s refused (%s): parsing the TOC instead", path, why)
        with contextlib.suppress(OSError):
            path.unlink()
        return None

    # -- write ----------------------------------------------------------------------------
    def store(self, key: TableKey, tables: LayerTables) -> bool:
        """Store ``tables`` for ``key`` atomically; whether it was stored (never raises on
        I/O errors: the cache only saves a parse)."""
        return self.store_payload(key, pickle.dumps(tables, protocol=pickle.HIGHEST_PROTOCOL))

    def store_payload(self, key: TableKey, payload: bytes) -> bool:
        """:meth:`store` for tables already pickled (``payload``)."""
        header = json.dumps(key.header(payload), sort_keys=True).encode() + b"\n"
        if len(header) + len(payload) > self.max_bytes:
            log.info("parsed-TOC cache: tables of layer %s (%d bytes) exceed the cache bound "
                     "(%d), not stored", key.layer, len(payload), self.max_bytes)
            return False
        path = self.path(key.layer, key.toc_digest)
        try:
            self._mkdir()
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.dir)
        except OSError as exc:
            log.warning("parsed-TOC cache %s: cannot write: %s", self.dir, exc)
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(header)
                f.write(payload)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            log.warning("parsed-TOC cache %s: cannot write: %s", path, exc)
            return False
        self.prune(keep=path)
        return True

    def prune(self, keep: Path | None = None) -> int:
        """Delete the oldest tables beyond the bounds (never ``keep``); how many went."""
        try:
            entries = []
            for e in os.scandir(self.dir):
                if e.name.endswith(SUFFIX) and not e.name.startswith("."):
                    st = e.stat(follow_symlinks=False)
                    entries.append((st.st_mtime, e.path, st.st_size))
                elif e.name.endswith(".tmp") and \
                        time.time() - e.stat(follow_symlinks=False).st_mtime > 600:
                    # left by a crash mid-write (a write takes well under a second)
                    os.unlink(e.path)
        except OSError as exc:
            log.debug("parsed-TOC cache %s: prune: %s", self.dir, exc)
            return 0
        entries.sort()
        total = sum(size for _, _, size in entries)
        count = len(entries)
        removed = 0
        for _, p, size in entries:
            if count <= self.max_files and total <= self.max_bytes:
                break
            if keep is not None and p == str(keep):
                continue
            with contextlib.suppress(OSError):
                os.unlink(p)
                removed += 1
            count -= 1
            total -= size
        if removed:
            log.info("parsed-TOC cache %s: removed the %d oldest tables (bounds: %d files, "
                     "%d bytes)", self.dir, removed, self.max_files, self.max_bytes)
        return removed

    def remove_layer(self, layer: str) -> None:
        """Remove every stored tables file of ``layer`` and its lock file (unless a warm-up
        holds it: the warm-up's tables then stay until they are pruned)."""
        try:
            prefix = _hex(layer)
            names = os.listdir(self.dir)
        except (ValueError, OSError):
            return
        for name in names:
            if name.startswith(prefix + "-") and name.endswith(SUFFIX):
                with contextlib.suppress(OSError):
                    os.unlink(self.dir / name)
        lock = self.dir / (prefix + LOCK_SUFFIX)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(lock)
        except OSError:
            pass  # a warm-up holds it
        finally:
            os.close(fd)

    # -- warm-up lock ---------------------------------------------------------------------
    def lock_warm(self, layer: str) -> int | None:
        """Take the warm-up lock of ``layer``: the locked descriptor (inheritable by a
        child through ``pass_fds``), or None when another warm-up holds it."""
        self._mkdir()
        fd = os.open(self.lock_path(layer), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        return fd

    def warming(self, layer: str) -> bool:
        """Whether a warm-up of ``layer`` holds its lock now."""
        try:
            fd = os.open(self.lock_path(layer), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False

    def wait_warm(self, layer: str, timeout: float,
                  clock: Callable[[], float] = time.monotonic) -> bool:
        """Wait until no warm-up of ``layer`` runs; False if one still runs after
        ``timeout`` seconds."""
        deadline = clock() + timeout
        while self.warming(layer):
            if clock() >= deadline:
                return False
            time.sleep(POLL)
        return True
