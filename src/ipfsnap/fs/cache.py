"""Verified chunk cache: a directory of files named by chunk digest, plus a small LRU in RAM.

Layout: ``<cache dir>/<hex of chunk sha256>``; the directory is per layer (the caller passes
``<cache root>/<layer key>``). Entries are written to a temp file in the same directory and
renamed into place, so a crash leaves either nothing or a whole file. A read re-hashes the
file (sha256 runs at ~800 MB/s here, a 4 MiB chunk costs ~5 ms) and a mismatch deletes the
entry and reports a miss, so the caller refetches: the cache can never serve wrong bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger(__name__)

#: chunks kept in RAM; at the default 4 MiB chunk size 8 entries are 32 MiB at most, enough
#: for a few sequential readers to hit the chunk they are in without re-reading the disk
DEFAULT_MEMORY_ENTRIES = 8


def _hex(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise ValueError(f"unsupported chunk digest {digest!r}")
    return hexpart


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class ChunkCache:
    """Thread-safe; disk calls are blocking (call them from a worker thread)."""

    def __init__(self, directory: Path, memory_entries: int = DEFAULT_MEMORY_ENTRIES) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._memory_entries = memory_entries
        self._lock = threading.Lock()
        #: corrupt entries found (and dropped) since start
        self.corrupt = 0

    def path(self, digest: str) -> Path:
        return self.directory / _hex(digest)

    def contains(self, digest: str) -> bool:
        """Whether an entry exists (not verified: cheap, for status and planning)."""
        with self._lock:
            if digest in self._memory:
                return True
        return self.path(digest).exists()

    def get_memory(self, digest: str) -> bytes | None:
        with self._lock:
            data = self._memory.get(digest)
            if data is not None:
                self._memory.move_to_end(digest)
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
        self._remember(digest, data)
        return data

    def put(self, digest: str, data: bytes, remember: bool = True) -> None:
        """Store a chunk the caller has verified. A failing disk only costs a refetch later.

        ``remember=False`` (background fetch) keeps it out of the RAM LRU, so bulk fetching
        does not evict the chunks foreground readers are using."""
        if remember:
            self._remember(digest, data)
        path = self.path(digest)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("chunk cache %s: cannot write (%s); continuing without it", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def digests(self) -> set[str]:
        """Digests of the entries on disk (by name, unverified)."""
        out: set[str] = set()
        try:
            names = os.listdir(self.directory)
        except OSError:
            return out
        for name in names:
            if len(name) == 64 and not name.startswith("."):
                out.add("sha256:" + name)
        return out

    def drop_memory(self) -> None:
        with self._lock:
            self._memory.clear()
