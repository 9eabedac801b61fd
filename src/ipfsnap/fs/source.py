"""Where a layer's blob bytes come from: a local file or an IPFS node.

A :class:`BlobSource` is synchronous (the same object serves ``estargz.open_layer``, which is
synchronous) and thread-safe; the fetcher calls it from worker threads so several ranges are
in flight at once (``max_concurrency``) while the trio loop keeps serving FUSE requests.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

from ipfsnap.fs.errors import FetchError
from ipfsnap.ipfs import IPFSClient, RetryPolicy, normalize_cid

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
