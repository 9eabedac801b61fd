"""The trio face: the same plans as :mod:`.client`, driven by trio sockets, cancellable.

Plain HTTP only (an ``https`` endpoint raises :class:`BadMultiaddr`). Use one client within
one ``trio.run``; cancelling a call (a cancel scope) closes its connection, never pools it.
``add`` reads its file with blocking reads of 1 MiB between sends.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import trio

from ipfsnap.config import Config
from ipfsnap.ipfs.client import _endpoint, endpoint_from_config
from ipfsnap.ipfs.core import (
    DEFAULT_TIMEOUT,
    RPC,
    AddResult,
    BlockStat,
    FileStat,
    Peer,
    RetryPolicy,
)
from ipfsnap.ipfs.errors import BadMultiaddr
from ipfsnap.ipfs.http import Connect, ConnectionPool, Plan, RecvInto, Send, Sleep
from ipfsnap.ipfs.multiaddr import Endpoint
from ipfsnap.progress import Progress

log = logging.getLogger(__name__)


class _TrioTransport:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    def close(self) -> None:
        self.stream.socket.close()


async def run_plan_async(plan: Plan) -> Any:
    """Drive a plan with trio I/O and return its result."""
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
                    with trio.move_on_after(op.timeout) as scope:
                        # the stream has no receive-into; its socket does (same semantics)
                        value = await op.transport.stream.socket.recv_into(op.buffer)
                    if scope.cancelled_caught:
                        error = TimeoutError(f"no data within {op.timeout:g} s")
                elif isinstance(op, Send):
                    with trio.move_on_after(op.timeout) as scope:
                        await op.transport.stream.send_all(op.data)
                    if scope.cancelled_caught:
                        error = TimeoutError(f"could not send within {op.timeout:g} s")
                elif isinstance(op, Connect):
                    with trio.move_on_after(op.timeout) as scope:
                        stream = await trio.open_tcp_stream(op.endpoint.host, op.endpoint.port)
                        value = _TrioTransport(stream)
                    if scope.cancelled_caught:
                        error = TimeoutError(f"no connection within {op.timeout:g} s")
                elif isinstance(op, Sleep):
                    await trio.sleep(op.seconds)
                else:  # pragma: no cover
                    raise TypeError(f"unknown plan operation {op!r}")
            except OSError as exc:
                error = exc
            except trio.BrokenResourceError as exc:
                error = ConnectionResetError(str(exc) or "connection broken")
            except trio.ClosedResourceError as exc:
                error = ConnectionAbortedError(str(exc) or "connection closed")
    finally:
        plan.close()


class AsyncIPFSClient:
    """Trio Kubo RPC client with the same calls as :class:`~ipfsnap.ipfs.IPFSClient`."""

    def __init__(
        self,
        endpoint: Endpoint | str | None = None,
        *,
        auth: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.endpoint = _endpoint(endpoint, auth)
        if self.endpoint.scheme != "http":
            raise BadMultiaddr(
                f"IPFS API {self.endpoint.url}: the trio client speaks plain HTTP only"
            )
        self._rpc = RPC(self.endpoint, timeout=timeout, retry=retry, pool=ConnectionPool())

    @classmethod
    def from_config(
        cls, cfg: Config, repo_candidates: Iterable[Path] | None = None, **kw: Any
    ) -> AsyncIPFSClient:
        kw.setdefault("retry", RetryPolicy.from_config(cfg.blob))
        return cls(endpoint_from_config(cfg, repo_candidates), **kw)

    def __repr__(self) -> str:
        return f"AsyncIPFSClient({self.endpoint.url})"

    async def aclose(self) -> None:
        self._rpc.pool.close_all()

    async def __aenter__(self) -> AsyncIPFSClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def cat(self, cid: str, offset: int = 0, length: int | None = None, *,
                  timeout: float | None = None) -> bytes:
        result: bytes = await run_plan_async(self._rpc.cat(cid, offset, length, timeout=timeout))
        return result

    async def cat_into(self, cid: str, offset: int, length: int | None,
                       sink: Callable[[bytes], object], *, timeout: float | None = None) -> int:
        n: int = await run_plan_async(
            self._rpc.cat_into(cid, offset, length, sink, timeout=timeout))
        return n

    async def files_stat(self, cid: str, *, timeout: float | None = None) -> FileStat:
        result: FileStat = await run_plan_async(self._rpc.files_stat(cid, timeout=timeout))
        return result

    async def file_size(self, cid: str, *, timeout: float | None = None) -> int:
        n: int = await run_plan_async(self._rpc.file_size(cid, timeout=timeout))
        return n

    async def block_get(self, cid: str, *, timeout: float | None = None) -> bytes:
        result: bytes = await run_plan_async(self._rpc.block_get(cid, timeout=timeout))
        return result

    async def block_stat(self, cid: str, *, timeout: float | None = None) -> BlockStat:
        result: BlockStat = await run_plan_async(self._rpc.block_stat(cid, timeout=timeout))
        return result

    async def add(self, source: str | os.PathLike[str] | IO[bytes] | bytes,
                  name: str | None = None, *, pin: bool = True, timeout: float | None = None,
                  progress: Progress | None = None) -> AddResult:
        result: AddResult = await run_plan_async(
            self._rpc.add(source, name, pin=pin, timeout=timeout, progress=progress))
        return result

    async def pin_add(self, cid: str, *, timeout: float | None = None) -> list[str]:
        result: list[str] = await run_plan_async(self._rpc.pin_add(cid, timeout=timeout))
        return result

    async def id(self) -> dict[str, Any]:
        result: dict[str, Any] = await run_plan_async(self._rpc.id())
        return result

    async def version(self) -> dict[str, Any]:
        result: dict[str, Any] = await run_plan_async(self._rpc.version())
        return result

    async def swarm_connect(self, addr: str, *, timeout: float | None = None) -> list[str]:
        result: list[str] = await run_plan_async(self._rpc.swarm_connect(addr, timeout=timeout))
        return result

    async def swarm_peers(self) -> list[Peer]:
        result: list[Peer] = await run_plan_async(self._rpc.swarm_peers())
        return result

    async def bootstrap_list(self) -> list[str]:
        result: list[str] = await run_plan_async(self._rpc.bootstrap_list())
        return result

    async def bootstrap_rm_all(self) -> list[str]:
        result: list[str] = await run_plan_async(self._rpc.bootstrap_rm_all())
        return result

    async def bootstrap_add(self, addr: str) -> list[str]:
        result: list[str] = await run_plan_async(self._rpc.bootstrap_add(addr))
        return result

    async def shutdown(self) -> None:
        await run_plan_async(self._rpc.shutdown())
