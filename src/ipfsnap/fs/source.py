"""Where a layer's blob bytes come from: a local file or an IPFS node.

A :class:`BlobSource` is synchronous (the same object serves ``estargz.open_layer``, which is
synchronous) and thread-safe; the fetcher calls it from worker threads so several ranges are
in flight at once (``max_concurrency``) while the trio loop keeps serving FUSE requests.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Protocol

from ipfsnap.errors import IpfsnapError
from ipfsnap.fs.errors import FetchError

log = logging.getLogger(__name__)


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

    Wraps ``ipfsnap.ipfs.IPFSClient``, which owns retries with backoff, per-call timeouts
    and the byte-count check; this class only adapts it (one client per thread, because a
    pooled HTTP connection must not be shared by two requests at once).
    """

    def __init__(self, api: str, cid: str, *, timeout: float, retries: int,
                 auth: str | None = None, size: int | None = None) -> None:
        self.name = f"ipfs://{cid}"
        self.cid = cid
        self._api = api
        self._auth = auth
        self._timeout = timeout
        self._retries = retries
        self._size = size
        self._local = threading.local()

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            # Imported lazily: the IPFS client is another package, only needed here.
            from ipfsnap import ipfs

            client = _make_client(ipfs, self._api, self._auth, self._timeout, self._retries)
            self._local.client = client
        return client

    def size(self) -> int:
        if self._size is None:
            try:
                self._size = int(self._client().file_size(self.cid))
            except IpfsnapError:
                raise
            except Exception as exc:  # a bug or transport error we did not wrap
                raise FetchError(f"{self.name}: files/stat failed: {exc}") from exc
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        try:
            data = self._client().cat(self.cid, offset=offset, length=length)
        except IpfsnapError:
            raise
        except Exception as exc:
            raise FetchError(f"{self.name}: cat at {offset}+{length} failed: {exc}") from exc
        if len(data) != length:
            raise FetchError(
                f"{self.name}: cat at {offset} returned {len(data)} bytes, wanted {length}"
            )
        return bytes(data)

    def close(self) -> None:
        client = getattr(self._local, "client", None)
        close = getattr(client, "close", None)
        if callable(close):
            close()


def _make_client(mod: Any, api: str, auth: str | None, timeout: float, retries: int) -> Any:
    """Build an ``IPFSClient`` passing only the options its signature accepts."""
    import inspect

    cls = mod.IPFSClient
    endpoint: Any = api
    discover = getattr(mod, "discover_api", None)
    if callable(discover):
        try:
            endpoint = discover(explicit=api, auth=auth)
        except TypeError:
            endpoint = discover(api)
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    for name, value in (("timeout", timeout), ("retries", retries), ("max_retries", retries)):
        if name in params:
            kwargs[name] = value
    return cls(endpoint, **kwargs)
