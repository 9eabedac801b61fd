"""The trio face: the same plans as :mod:`.client`, driven by trio sockets, cancellable.

Plain HTTP only (an ``https`` endpoint raises :class:`BadMultiaddr`). Use one client within
one ``trio.run``; cancelling a call (a cancel scope) closes its connection, never pools it.
``add`` reads its file with blocking reads of 1 MiB between sends.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import trio

from ipfsnap.ipfs.core import RPC, ClientBase, HasRPC
from ipfsnap.ipfs.http import Connect, Done, Plan, RecvInto, Send, Sleep, advance

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class _TrioTransport:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    def close(self) -> None:
        self.stream.socket.close()


async def run_plan_async(plan: Plan[T]) -> T:
    """Drive a plan with trio I/O and return its result."""
    try:
        op = advance(plan, None, None)
        while not isinstance(op, Done):
            value: Any = None
            error: OSError | None = None
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
            op = advance(plan, value, error)
        return op.value
    finally:
        plan.close()


def awaiting(
    plan: Callable[Concatenate[RPC, P], Plan[T]],
) -> Callable[Concatenate[HasRPC, P], Awaitable[T]]:
    """The :class:`RPC` plan ``plan`` as a trio method (same parameters and result)."""

    @functools.wraps(plan)
    async def method(self: HasRPC, /, *args: P.args, **kw: P.kwargs) -> T:
        return await run_plan_async(plan(self._rpc, *args, **kw))

    return method


class AsyncIPFSClient(ClientBase):
    """Trio Kubo RPC client with the same calls as :class:`~ipfsnap.ipfs.IPFSClient`."""

    schemes = ("http",)

    async def aclose(self) -> None:
        self._rpc.pool.close_all()

    async def __aenter__(self) -> AsyncIPFSClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # reads
    cat = awaiting(RPC.cat)
    cat_into = awaiting(RPC.cat_into)
    files_stat = awaiting(RPC.files_stat)
    file_size = awaiting(RPC.file_size)
    block_get = awaiting(RPC.block_get)
    block_stat = awaiting(RPC.block_stat)
    # writes
    add = awaiting(RPC.add)
    pin_add = awaiting(RPC.pin_add)
    # node
    id = awaiting(RPC.id)
    version = awaiting(RPC.version)
    swarm_connect = awaiting(RPC.swarm_connect)
    swarm_peers = awaiting(RPC.swarm_peers)
    bootstrap_list = awaiting(RPC.bootstrap_list)
    bootstrap_rm_all = awaiting(RPC.bootstrap_rm_all)
    bootstrap_add = awaiting(RPC.bootstrap_add)
    shutdown = awaiting(RPC.shutdown)
