"""Where a layer's blob bytes come from: a local file or an IPFS node.

A :class:`BlobSource` is synchronous (the same object serves ``estargz.open_layer``, which is
synchronous) and thread-safe; the fetcher calls it from worker threads so several ranges are
in flight at once (``max_concurrency``) while the trio loop keeps serving FUSE requests.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Protocol

from ipfsnap.estargz.footer import TAIL_READ_SIZE, tail_start
from ipfsnap.fs.errors import FetchError
from ipfsnap.ipfs import IPFSClient, RetryPolicy, normalize_cid
from ipfsnap.ipfs.unixfs import CHUNK_SIZE

log = logging.getLogger(__name__)

#: seconds one socket operation with the IPFS daemon may wait (a stalled daemon)
SOCKET_TIMEOUT = 30.0


class BlobSource(Protocol):
    """Random access to one blob. Must be callable from several threads at once."""

    #: a short name for logs and errors (path or CID)
    name: str

    def read_at(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``, or raise an :class:`IpfsnapError`."""
        ...

    def size(self) -> int:
        """Size of the blob in bytes."""
        ...

    def close(self) -> None: ...


class LocalFileSource:
    """A blob in a local file (tests, blobs already in the content store)."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise FetchError(f"blob {path}: cannot open: {exc.strerror}") from exc

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def read_at(self, offset: int, length: int) -> bytes:
        out = bytearray()
        try:
            while len(out) < length:
                piece = os.pread(self._fd, length - len(out), offset + len(out))
                if not piece:
                    raise FetchError(
                        f"blob {self.name}: short read, wanted {length} bytes at offset "
                        f"{offset}, got {len(out)}"
                    )
                out += piece
        except OSError as exc:
            raise FetchError(f"blob {self.name}: read at {offset} failed: {exc.strerror}") from exc
        return bytes(out)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class IPFSSource:
    """A blob named by a CID, read with ``cat?offset=&length=`` through the Kubo RPC API.

    Wraps ``ipfsnap.ipfs.IPFSClient`` (thread-safe, pooled keep-alive connections), which owns
    bounded retries with backoff, per-call timeouts and the byte-count check.
    """

    def __init__(self, api: str, cid: str, *, timeout: float, retries: int,
                 auth: str | None = None, size: int | None = None) -> None:
        self.cid = normalize_cid(cid)
        self.name = f"ipfs://{self.cid}"
        # a socket wait longer than this is a stalled daemon; the whole fetch, retries
        # included, is bounded by ``timeout`` (fetching_timeout_sec)
        per_call = min(timeout, SOCKET_TIMEOUT) if timeout > 0 else SOCKET_TIMEOUT
        self._client = IPFSClient(
            api, auth=auth, timeout=per_call,
            retry=RetryPolicy(max_retries=retries, total=timeout if timeout > 0 else 300.0),
        )
        self._size = size

    def size(self) -> int:
        if self._size is None:
            self._size = self._client.file_size(self.cid)
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        data = self._client.cat(self.cid, offset=offset, length=length)
        if len(data) != length:  # the client checks too; never trust a short body
            raise FetchError(
                f"{self.name}: cat at {offset} returned {len(data)} bytes, wanted {length}"
            )
        return data

    def close(self) -> None:
        self._client.close()


class TailReader:
    """A range reader over ``source`` that reads the blob's end in one request.

    Opening a layer reads the footer (the blob's last bytes), then the TOC just before it:
    two requests, and through IPFS each one walks the file's DAG from its root and waits for
    bitswap (0.3-0.8 s for the footer of a fresh node's first layer, measured on the
    hello-bench image; docs/benchmarks.md "TOC in one request"). Here the first read that
    touches ``[start, size)`` fetches that whole range (``start`` from
    :func:`ipfsnap.estargz.footer.tail_start`, aligned to IPFS's 256 KiB leaves) and later
    reads inside it are served from memory; a read that begins before ``start`` (a TOC
    bigger than the guess) fetches only its part before ``start``. Reads wholly before the
    tail go to the source unchanged. Used while a layer is opened, by one thread. With
    ``span=0`` the tail is the block holding the footer: the blocks fetched are those of
    reading the footer and then the TOC, in one request when the TOC lies in that block.
    """

    def __init__(self, source: BlobSource, size: int, span: int = TAIL_READ_SIZE, *,
                 align: int = CHUNK_SIZE) -> None:
        self.source = source
        self.name = source.name
        self.size = size
        self.start = tail_start(size, span, align)
        self._tail: bytes | None = None
        #: requests sent to the source and the seconds they took (logs, tests)
        self.requests = 0
        self.seconds = 0.0

    def _fetch(self, offset: int, length: int) -> bytes:
        self.requests += 1
        t0 = time.monotonic()
        try:
            return self.source.read_at(offset, length)
        finally:
            self.seconds += time.monotonic() - t0

    def read_at(self, offset: int, length: int) -> bytes:
        end = offset + length
        if offset < 0 or length < 0 or end > self.size:
            raise FetchError(f"{self.name}: read of {length} bytes at offset {offset} is "
                             f"outside the {self.size}-byte blob")
        if length == 0 or end <= self.start:
            return self._fetch(offset, length) if length else b""
        if self._tail is None:
            self._tail = self._fetch(self.start, self.size - self.start)
        rest = self._tail[max(0, offset - self.start):end - self.start]
        if offset >= self.start:
            return rest
        return self._fetch(offset, self.start - offset) + rest
