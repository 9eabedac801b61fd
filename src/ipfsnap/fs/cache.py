"""Verified chunk cache: a directory of files named by chunk digest, plus a small LRU in RAM.

Layout: ``<cache root>/<layer key>/<hex of chunk sha256>``; a :class:`ChunkCache` serves one
layer directory (the caller passes ``<cache root>/<layer key>``). Entries are written to a
temp file in the same directory and renamed into place, so a crash leaves either nothing or a
whole file. A read re-hashes the file (sha256 runs at ~800 MB/s here, a 4 MiB chunk costs
~5 ms) and a mismatch deletes the entry and reports a miss, so the caller refetches: the
cache can never serve wrong bytes.

Size limit (``cache_size_limit``, shared by every layer worker of one cache root)
- Accounting: ``<root>/.usage`` holds the total bytes of all entries under the root; it is
  read and updated under an ``flock`` of ``<root>/.lock`` (one lock + 42-byte read/write per
  stored chunk). A writer renames its temp file into place under that lock, so a scan never
  counts an entry its writer has not accounted for yet. It is rebuilt from a scan of the
  root when a worker starts, when it is missing or unreadable, when it is older than
  :data:`RESYNC_INTERVAL`, and on every eviction, so drift (entries dropped as corrupt,
  directories removed by the snapshotter) is bounded.
- Eviction: after a write pushes the total over the limit, the writer scans the root and
  unlinks the least recently used entries (oldest mtime first) until the total is at most
  :data:`EVICT_TO` of the limit (victims are chosen and subtracted under the lock and
  unlinked after it is released, so other workers' writes do not wait for the unlinks).
  Recency is our own, not atime (relatime makes atime useless): a hit touches the entry's
  mtime, at most once per :data:`TOUCH_INTERVAL`. Unlinking an entry that another thread
  or process is reading is safe: the reader's open file keeps its data until closed.
  Chunks of the prefetch range have no special standing; they are evicted like any other
  (they are refetched on their next read).
- A chunk larger than :data:`EVICT_TO` of the limit is never written (it would evict the
  whole cache, itself included): it is served from memory only.
- Background fetch asks :meth:`ChunkCache.background_room` before each request; it is
  refused once the cache would pass :data:`BACKGROUND_FILL` of the limit, so a limit smaller
  than the layers never makes background fetch and eviction chase each other.

Full disk: a write failing with ENOSPC/EDQUOT/EIO (or any other OSError) is skipped; the
verified bytes are still returned to the reader (and kept in RAM), one warning per
:data:`WARN_INTERVAL` is logged for the layer, and background fetch is refused for
:data:`WRITE_BACKOFF` seconds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: chunks kept in RAM; at the default 4 MiB chunk size 8 entries are 32 MiB at most, enough
#: for a few sequential readers to hit the chunk they are in without re-reading the disk
DEFAULT_MEMORY_ENTRIES = 8

#: accounting file and lock file in the cache root (names start with "." so that a scan for
#: layer directories and an ``ls`` of the root tell them apart)
USAGE_FILE = ".usage"
LOCK_FILE = ".lock"
#: eviction frees down to this fraction of the limit: one scan then pays for at least 20 %
#: of the limit worth of writes, instead of one scan per chunk when hovering at the limit
EVICT_TO = 0.80
#: background fetch stops filling at this fraction (above EVICT_TO, so that the room left
#: by an eviction is not entirely refilled by background fetch: foreground reads keep 10 %)
BACKGROUND_FILL = 0.90
#: a hit refreshes the entry's mtime at most this often (seconds): LRU at minute
#: granularity, without a metadata write on every read
TOUCH_INTERVAL = 60.0
#: the accounting is rebuilt from a scan when older than this (seconds)
RESYNC_INTERVAL = 300.0
#: temp files older than this (seconds) are left over from a crash; a write takes ms
STALE_TEMP = 600.0
#: background fetch pauses this long (seconds) after a failed cache write
WRITE_BACKOFF = 30.0
#: at most one warning about failing cache writes per layer per this many seconds
WARN_INTERVAL = 60.0
#: "total scanned_at\n", fixed width so that updates overwrite in place: a full disk
#: (tmpfs) has no room for a new file, but the page of an existing one stays writable
_USAGE_FORMAT = "{:20d} {:20.3f}\n"
_HEX = frozenset("0123456789abcdef")

#: write errors that mean "the disk is full or failing", as opposed to a bug
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})


def _hex(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise ValueError(f"unsupported chunk digest {digest!r}")
    return hexpart


def _is_entry_name(name: str) -> bool:
    return len(name) == 64 and all(c in _HEX for c in name)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class CacheEntry:
    """One chunk file found by a scan of the cache root."""

    path: str
    size: int
    mtime: float


class CacheAccounting:
    """Total size of the entries under one cache root, shared between processes.

    Every method is blocking (flock, scans): call them from a worker thread."""

    def __init__(self, root: Path, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"cache root {root}: size limit must be positive, got {limit}")
        self.root = root
        self.limit = limit
        root.mkdir(parents=True, exist_ok=True)
        #: entries this process evicted (all layers) since start
        self.evicted = 0
        self.scans = 0

    @property
    def evict_target(self) -> int:
        return int(self.limit * EVICT_TO)

    @contextlib.contextmanager
    def _locked(self, exclusive: bool = True) -> Iterator[int]:
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield fd
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> tuple[int, float] | None:
        try:
            with open(self.root / USAGE_FILE, "rb") as f:
                parts = f.read(128).split()
            total, scanned_at = int(parts[0]), float(parts[1])
        except (OSError, ValueError, IndexError):
            return None
        return (total, scanned_at) if total >= 0 else None

    def _write(self, total: int, scanned_at: float) -> None:
        data = _USAGE_FORMAT.format(max(0, total), scanned_at).encode()
        fd = os.open(self.root / USAGE_FILE, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)

    def scan(self) -> list[CacheEntry]:
        """Every entry under the root (unverified); removes temp files left by crashes."""
        self.scans += 1
        out: list[CacheEntry] = []
        now = time.time()
        try:
            layers = list(os.scandir(self.root))
        except OSError as exc:
            log.warning("chunk cache %s: cannot list: %s", self.root, exc)
            return out
        for layer in layers:
            if layer.name.startswith(".") or not layer.is_dir(follow_symlinks=False):
                continue
            try:
                entries = list(os.scandir(layer.path))
            except OSError:
                continue  # removed meanwhile
            for e in entries:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if _is_entry_name(e.name):
                    out.append(CacheEntry(e.path, st.st_size, st.st_mtime))
                elif e.name.endswith(".tmp") and now - st.st_mtime > STALE_TEMP:
                    with contextlib.suppress(OSError):
                        os.unlink(e.path)
        return out

    def _choose_victims(self, entries: list[CacheEntry], target: int
                        ) -> tuple[int, list[CacheEntry]]:
        """The least recently used entries to drop so that the total is <= target, and the
        total after dropping them."""
        total = sum(e.size for e in entries)
        if total <= target:
            return total, []
        entries.sort(key=lambda e: (e.mtime, e.path))
        victims: list[CacheEntry] = []
        for e in entries:
            if total <= target:
                break
            victims.append(e)
            total -= e.size
        return total, victims

    def _unlink(self, victims: list[CacheEntry], total: int) -> None:
        """Remove chosen entries; done after the lock is released (an unlink may take ms
        on a busy disk, and other workers' writes wait for the lock). If an entry is
        written again meanwhile, the fresh copy goes: that costs one refetch, and the
        accounting stays right (the writer counted it as a replacement)."""
        if not victims:
            return
        removed = 0
        for e in victims:
            try:
                os.unlink(e.path)
                removed += 1
            except FileNotFoundError:
                pass  # gone already (another worker, or dropped as corrupt)
            except OSError as exc:
                log.warning("chunk cache %s: cannot evict: %s", e.path, exc)
        self.evicted += removed
        log.info("chunk cache %s: evicted %d least recently used entries, %d bytes left "
                 "(limit %d)", self.root, removed, total, self.limit)

    def resync(self) -> int:
        """Rebuild the accounting from a scan (evicting if over the limit); the total."""
        with self._locked():
            total, victims = self._resync_locked()
        self._unlink(victims, total)
        return total

    def _resync_locked(self) -> tuple[int, list[CacheEntry]]:
        entries = self.scan()
        total = sum(e.size for e in entries)
        victims: list[CacheEntry] = []
        if total > self.limit:
            total, victims = self._choose_victims(entries, self.evict_target)
        self._write(total, time.time())
        return total, victims

    def usage(self) -> int:
        """Current total bytes (rebuilt by a scan when missing or stale)."""
        with self._locked(exclusive=False):
            got = self._read()
        if got is not None and time.time() - got[1] < RESYNC_INTERVAL:
            return got[0]
        return self.resync()

    def commit(self, tmp: Path, path: Path) -> int:
        """Rename a written temp file into place and account for it; evict if over the limit.

        The rename happens under the lock, so a scan (also under the lock) never counts an
        entry whose writer has not accounted for it yet. Returns the new total."""
        victims: list[CacheEntry] = []
        with self._locked():
            size = os.stat(tmp).st_size
            try:
                replaced = os.stat(path).st_size
            except FileNotFoundError:
                replaced = 0
            os.replace(tmp, path)
            delta = size - replaced
            got = self._read()
            if got is None or time.time() - got[1] >= RESYNC_INTERVAL or \
                    got[0] + delta > self.limit:
                total, victims = self._resync_locked()
            else:
                total = got[0] + delta
                self._write(total, got[1])
        self._unlink(victims, total)
        return total


class ChunkCache:
    """Thread-safe; disk calls are blocking (call them from a worker thread).

    ``limit`` (bytes, 0 = unlimited) bounds the total of every layer directory under
    ``root`` (default: the parent of ``directory``), see the module docstring."""

    def __init__(self, directory: Path, memory_entries: int = DEFAULT_MEMORY_ENTRIES, *,
                 limit: int = 0, root: Path | None = None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._memory_entries = memory_entries
        self._lock = threading.Lock()
        #: corrupt entries found (and dropped) since start
        self.corrupt = 0
        #: writes skipped because they failed (full disk ...) since start
        self.write_failures = 0
        self.last_write_error = ""
        self._backoff_until = 0.0
        self._warned_at = -WARN_INTERVAL
        self._suppressed = 0
        self._touched: dict[str, float] = {}
        self.account: CacheAccounting | None = None
        if limit > 0:
            self.account = CacheAccounting(root or directory.parent, limit)
            try:
                self.account.resync()
            except OSError as exc:
                log.warning("chunk cache %s: cannot set up accounting: %s", self.account.root,
                            exc)

    def path(self, digest: str) -> Path:
        return self.directory / _hex(digest)

    @property
    def max_entry(self) -> int | None:
        """Largest chunk this cache writes (None: no limit)."""
        return None if self.account is None else self.account.evict_target

    def contains(self, digest: str) -> bool:
        """Whether an entry exists (not verified: cheap, for status and planning)."""
        with self._lock:
            if digest in self._memory:
                return True
        return self.path(digest).exists()

    # -- recency ----------------------------------------------------------------------
    def _touch(self, digest: str) -> None:
        """Mark an entry as recently used (for eviction), at most once per TOUCH_INTERVAL."""
        if self.account is None:
            return
        now = time.monotonic()
        with self._lock:
            last = self._touched.get(digest)
            if last is not None and now - last < TOUCH_INTERVAL:
                return
            if len(self._touched) > 65536:  # bound the map; worst case one extra utime
                self._touched.clear()
            self._touched[digest] = now
        with contextlib.suppress(OSError):
            os.utime(self.path(digest))

    def get_memory(self, digest: str) -> bytes | None:
        with self._lock:
            data = self._memory.get(digest)
            if data is not None:
                self._memory.move_to_end(digest)
        if data is not None:
            self._touch(digest)
        return data

    def _remember(self, digest: str, data: bytes) -> None:
        if self._memory_entries <= 0:
            return
        with self._lock:
            self._memory[digest] = data
            self._memory.move_to_end(digest)
            while len(self._memory) > self._memory_entries:
                self._memory.popitem(last=False)

    def get(self, digest: str) -> bytes | None:
        """The verified chunk, or None (missing or corrupt: the caller fetches it)."""
        data = self.get_memory(digest)
        if data is not None:
            return data
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("chunk cache %s: cannot read: %s", path, exc)
            return None
        if sha256_digest(data) != digest:
            self.corrupt += 1
            log.error("chunk cache %s: content does not match %s, dropped and refetched",
                      path, digest)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        self._touch(digest)
        self._remember(digest, data)
        return data

    # -- writes -----------------------------------------------------------------------
    def put(self, digest: str, data: bytes, remember: bool = True) -> bool:
        """Store a chunk the caller has verified; whether it is now on disk.

        A failing disk only costs a refetch later: the error is logged (rate limited) and
        the caller serves ``data`` anyway. ``remember=False`` (background fetch) keeps it
        out of the RAM LRU, so bulk fetching does not evict the chunks foreground readers
        are using."""
        if remember:
            self._remember(digest, data)
        account = self.account
        if account is not None and len(data) > account.evict_target:
            log.debug("chunk %s: %d bytes, more than the cache may keep; not cached",
                      digest, len(data))
            return False
        path = self.path(digest)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            if account is None:
                os.replace(tmp, path)
            else:
                account.commit(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._write_failed(path, exc)
            return False
        if account is not None:
            with self._lock:
                self._touched[digest] = time.monotonic()
        return True

    def _write_failed(self, path: Path, exc: OSError) -> None:
        now = time.monotonic()
        with self._lock:
            self.write_failures += 1
            self.last_write_error = f"chunk cache {self.directory}: cannot write: {exc}"
            self._backoff_until = now + WRITE_BACKOFF
            if now - self._warned_at < WARN_INTERVAL:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._warned_at = now
        kind = "disk full or failing" if exc.errno in DISK_FULL_ERRNOS else "write error"
        log.warning("chunk cache %s: cannot write (%s: %s); serving from memory without "
                    "caching, background fetch paused %gs%s", path, kind, exc.strerror or exc,
                    WRITE_BACKOFF,
                    f" ({suppressed} similar failures not logged)" if suppressed else "")

    # -- background fetch -------------------------------------------------------------
    def background_room(self, nbytes: int) -> bool:
        """Whether background fetch may store ``nbytes`` more now (blocking).

        No after a failed write (for WRITE_BACKOFF seconds), nor when the cache would pass
        BACKGROUND_FILL of its limit."""
        if time.monotonic() < self._backoff_until:
            return False
        if self.account is None:
            return True
        try:
            usage = self.account.usage()
        except OSError as exc:
            log.warning("chunk cache %s: cannot read accounting: %s", self.account.root, exc)
            return False
        return usage + nbytes <= self.account.limit * BACKGROUND_FILL

    def digests(self) -> set[str]:
        """Digests of the entries on disk (by name, unverified)."""
        out: set[str] = set()
        try:
            names = os.listdir(self.directory)
        except OSError:
            return out
        for name in names:
            if _is_entry_name(name):
                out.add("sha256:" + name)
        return out

    def drop_memory(self) -> None:
        with self._lock:
            self._memory.clear()
