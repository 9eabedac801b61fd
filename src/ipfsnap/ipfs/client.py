"""The synchronous face: blocking stdlib sockets driving the shared plans of :mod:`.core`."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from ipfsnap.config import Config
from ipfsnap.ipfs.core import (
    DEFAULT_TIMEOUT,
    RPC,
    AddResult,
    BlockStat,
    FileStat,
    Peer,
    RetryPolicy,
)
from ipfsnap.ipfs.http import Connect, ConnectionPool, Plan, RecvInto, Send, Sleep
from ipfsnap.ipfs.multiaddr import Endpoint, discover_api, parse_api
from ipfsnap.progress import Progress

log = logging.getLogger(__name__)


def _connect(endpoint: Endpoint, timeout: float) -> socket.socket:
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    try:
        # requests are small writes followed by a wait: Nagle would delay each by up to 40 ms
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if endpoint.scheme == "https":
            ctx = ssl.create_default_context()
            return ctx.wrap_socket(sock, server_hostname=endpoint.host)
    except BaseException:
        sock.close()
        raise
    return sock


def run_plan(plan: Plan) -> Any:
    """Drive a plan with blocking I/O and return its result."""
    value: Any = None
    error: BaseException | None = None
    try:
        while True:
            try:
                op = plan.throw(error) if error is not None else plan.send(value)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            try:
                if isinstance(op, RecvInto):
                    # settimeout is a system call (it switches blocking mode): only on change
                    if op.transport.gettimeout() != op.timeout:
                        op.transport.settimeout(op.timeout)
                    value = op.transport.recv_into(op.buffer)
                elif isinstance(op, Send):
                    if op.transport.gettimeout() != op.timeout:
                        op.transport.settimeout(op.timeout)
                    op.transport.sendall(op.data)
                elif isinstance(op, Connect):
                    value = _connect(op.endpoint, op.timeout)
                elif isinstance(op, Sleep):
                    time.sleep(op.seconds)
                else:  # pragma: no cover - plans only yield the four operations
                    raise TypeError(f"unknown plan operation {op!r}")
            except OSError as exc:  # includes TimeoutError
                error = exc
    finally:
        plan.close()


def endpoint_from_config(cfg: Config, repo_candidates: Iterable[Path] | None = None) -> Endpoint:
    """The API of ``cfg`` (``ipfs_api``/env/CLI), else the managed repo, else the usual files."""
    candidates = [cfg.ipfs_repo] if repo_candidates is None else list(repo_candidates)
    return discover_api(cfg.ipfs_api, cfg.ipfs_auth, repo_candidates=candidates)


def _endpoint(endpoint: Endpoint | str | None, auth: str | None) -> Endpoint:
    if endpoint is None:
        return discover_api(None, auth)
    if isinstance(endpoint, str):
        return parse_api(endpoint, auth=auth)
    return endpoint.with_auth(auth) if auth is not None else endpoint


class IPFSClient:
    """Blocking Kubo RPC client; thread-safe, with a keep-alive connection pool."""

    def __init__(
        self,
        endpoint: Endpoint | str | None = None,
        *,
        auth: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.endpoint = _endpoint(endpoint, auth)
        self._rpc = RPC(self.endpoint, timeout=timeout, retry=retry, pool=ConnectionPool())

    @classmethod
    def from_config(
        cls, cfg: Config, repo_candidates: Iterable[Path] | None = None, **kw: Any
    ) -> IPFSClient:
        kw.setdefault("retry", RetryPolicy.from_config(cfg.blob))
        return cls(endpoint_from_config(cfg, repo_candidates), **kw)

    def __repr__(self) -> str:
        return f"IPFSClient({self.endpoint.url})"

    def close(self) -> None:
        self._rpc.pool.close_all()

    def __enter__(self) -> IPFSClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # reads
    def cat(self, cid: str, offset: int = 0, length: int | None = None, *,
            timeout: float | None = None) -> bytes:
        """``length`` bytes at ``offset`` (None: to the end); exactly that many or an error."""
        result: bytes = run_plan(self._rpc.cat(cid, offset, length, timeout=timeout))
        return result

    def cat_into(self, cid: str, offset: int, length: int | None,
                 sink: Callable[[bytes], object], *, timeout: float | None = None) -> int:
        """Stream the range into ``sink``; returns the byte count."""
        n: int = run_plan(self._rpc.cat_into(cid, offset, length, sink, timeout=timeout))
        return n

    def files_stat(self, cid: str, *, timeout: float | None = None) -> FileStat:
        result: FileStat = run_plan(self._rpc.files_stat(cid, timeout=timeout))
        return result

    def file_size(self, cid: str, *, timeout: float | None = None) -> int:
        n: int = run_plan(self._rpc.file_size(cid, timeout=timeout))
        return n

    def block_get(self, cid: str, *, timeout: float | None = None) -> bytes:
        result: bytes = run_plan(self._rpc.block_get(cid, timeout=timeout))
        return result

    def block_stat(self, cid: str, *, timeout: float | None = None) -> BlockStat:
        result: BlockStat = run_plan(self._rpc.block_stat(cid, timeout=timeout))
        return result

    # writes
    def add(self, source: str | os.PathLike[str] | IO[bytes] | bytes, name: str | None = None,
            *, pin: bool = True, timeout: float | None = None,
            progress: Progress | None = None) -> AddResult:
        result: AddResult = run_plan(
            self._rpc.add(source, name, pin=pin, timeout=timeout, progress=progress))
        return result

    def pin_add(self, cid: str, *, timeout: float | None = None) -> list[str]:
        result: list[str] = run_plan(self._rpc.pin_add(cid, timeout=timeout))
        return result

    # node
    def id(self) -> dict[str, Any]:
        result: dict[str, Any] = run_plan(self._rpc.id())
        return result

    def version(self) -> dict[str, Any]:
        result: dict[str, Any] = run_plan(self._rpc.version())
        return result

    def swarm_connect(self, addr: str, *, timeout: float | None = None) -> list[str]:
        result: list[str] = run_plan(self._rpc.swarm_connect(addr, timeout=timeout))
        return result

    def swarm_peers(self) -> list[Peer]:
        result: list[Peer] = run_plan(self._rpc.swarm_peers())
        return result

    def bootstrap_list(self) -> list[str]:
        result: list[str] = run_plan(self._rpc.bootstrap_list())
        return result

    def bootstrap_rm_all(self) -> list[str]:
        result: list[str] = run_plan(self._rpc.bootstrap_rm_all())
        return result

    def bootstrap_add(self, addr: str) -> list[str]:
        result: list[str] = run_plan(self._rpc.bootstrap_add(addr))
        return result

    def shutdown(self) -> None:
        run_plan(self._rpc.shutdown())


class CIDReader:
    """``RangeReader`` over one CID (for :func:`ipfsnap.estargz.open_layer`)."""

    def __init__(self, client: IPFSClient, cid: str) -> None:
        self.client = client
        self.cid = cid

    def read_at(self, offset: int, length: int) -> bytes:
        return self.client.cat(self.cid, offset, length)
