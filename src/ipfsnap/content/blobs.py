"""Content-addressed blob store: ``<root>/blobs/sha256/<hex>``.

Every blob is verified while it streams in (sha256 and size) and written atomically: a temp
file in the same directory, fsync, rename onto the digest name, fsync of the directory. A
crash therefore leaves at most a stray temp file (``.ingest-*``, removed by garbage collection
once it is old), never a partial file under a digest name. Concurrent writers of the same blob
each write their own temp file; ``rename`` is atomic and both carry identical bytes, so
whichever lands last wins harmlessly.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from ipfsnap.content.errors import BlobNotFound
from ipfsnap.errors import StoreError
from ipfsnap.oci import DigestMismatch, digest_hex, is_digest, validate_digest
from ipfsnap.progress import Progress

log = logging.getLogger(__name__)

#: read/write unit while streaming; big enough that Python overhead per call is negligible
CHUNK = 1 << 20
TEMP_PREFIX = ".ingest-"


@runtime_checkable
class Readable(Protocol):
    """Anything with ``read(n)`` (files, HTTP responses, tar members)."""

    def read(self, n: int = -1, /) -> bytes: ...


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _chunks(src: Readable | Iterable[bytes]) -> Iterator[bytes]:
    if isinstance(src, Readable):
        while True:
            block = src.read(CHUNK)
            if not block:
                return
            yield block
    else:
        yield from src


class BlobStore:
    """Blobs under ``root/blobs/sha256``; ``root`` is ``<state_dir>/content``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.dir = self.root / "blobs" / "sha256"

    def _ensure(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"content store {self.dir}: cannot create: {exc}") from exc

    def path(self, digest: str) -> Path:
        return self.dir / digest_hex(digest)

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(f"blob {digest}: not in the content store") from None

    def open(self, digest: str) -> BinaryIO:
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise BlobNotFound(f"blob {digest}: not in the content store") from None

    def read(self, digest: str, max_size: int | None = None) -> bytes:
        """The whole blob (for documents); ``max_size`` guards against huge ones."""
        with self.open(digest) as f:
            data = f.read() if max_size is None else f.read(max_size + 1)
        return data

    def list(self) -> Iterator[str]:
        """Digests of all complete blobs."""
        if not self.dir.is_dir():
            return
        for entry in os.scandir(self.dir):
            name = "sha256:" + entry.name
            if is_digest(name) and entry.is_file():
                yield name

    def delete(self, digest: str) -> bool:
        """Remove a blob; False if it was not there."""
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def _temp(self) -> tuple[Path, BinaryIO]:
        self._ensure()
        tmp = self.dir / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        return tmp, open(tmp, "xb")

    def ingest(
        self,
        src: Readable | Iterable[bytes],
        digest: str,
        size: int | None = None,
        *,
        what: str = "blob",
        progress: Progress | None = None,
    ) -> bool:
        """Store ``src`` under ``digest``, verifying digest (and size) while streaming.

        Returns True if the blob was written, False if it was already present (then ``src``
        is not read). On any error nothing is stored under ``digest``.
        """
        validate_digest(digest, what)
        if self.exists(digest):
            return False
        self._write(src, expect=digest, size=size, what=what, progress=progress)
        return True

    def ingest_unknown(
        self,
        src: Readable | Iterable[bytes],
        *,
        what: str = "blob",
        progress: Progress | None = None,
    ) -> tuple[str, int]:
        """Store a stream whose digest is not known in advance; returns (digest, size)."""
        return self._write(src, expect=None, size=None, what=what, progress=progress)

    def write(self, data: bytes, digest: str | None = None, what: str = "blob") -> str:
        """Store bytes (verifying ``digest`` if given); returns the digest."""
        if digest is not None:
            self.ingest([data], digest, len(data), what=what)
            return digest
        return self.ingest_unknown([data], what=what)[0]

    def _write(
        self,
        src: Readable | Iterable[bytes],
        *,
        expect: str | None,
        size: int | None,
        what: str,
        progress: Progress | None,
    ) -> tuple[str, int]:
        label = f"{what} {expect}" if expect else what
        tmp, out = self._temp()
        ok = False
        try:
            h = hashlib.sha256()
            n = 0
            with out:
                # errors raised by the source (network, archive) propagate unchanged; only
                # our own file operations become StoreError
                for block in _chunks(src):
                    n += len(block)
                    if size is not None and n > size:
                        raise DigestMismatch(f"{label}: more than the expected {size} bytes")
                    h.update(block)
                    try:
                        out.write(block)
                    except OSError as exc:
                        raise StoreError(f"content store: writing {label} failed: {exc}") from exc
                    if progress is not None and expect:
                        progress.update(expect[7:19], "writing", n, size or 0)
                try:
                    out.flush()
                    os.fsync(out.fileno())
                except OSError as exc:
                    raise StoreError(f"content store: writing {label} failed: {exc}") from exc
            if size is not None and n != size:
                raise DigestMismatch(f"{label}: got {n} bytes, expected {size} (truncated?)")
            digest = "sha256:" + h.hexdigest()
            if expect is not None and digest != expect:
                raise DigestMismatch(f"{label}: content hashes to {digest}")
            try:
                os.replace(tmp, self.path(digest))
                _fsync_dir(self.dir)
            except OSError as exc:
                raise StoreError(f"content store: storing {label} failed: {exc}") from exc
            ok = True
            log.debug("stored blob %s (%d bytes)", digest, n)
            return digest, n
        finally:
            if not ok:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    def clean_temp(self, older_than: float = 3600.0) -> int:
        """Remove temp files older than ``older_than`` seconds (left by crashed writers).

        Only old ones: a young temp file may belong to a writer that is still running.
        """
        if not self.dir.is_dir():
            return 0
        removed = 0
        now = time.time()
        for entry in os.scandir(self.dir):
            if entry.name.startswith(TEMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    if now - entry.stat().st_mtime >= older_than:
                        os.unlink(entry.path)
                        removed += 1
        return removed
