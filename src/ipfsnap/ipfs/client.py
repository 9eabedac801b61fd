"""The synchronous face: blocking stdlib sockets driving the shared plans of :mod:`.core`."""

from __future__ import annotations

import functools
import logging
import socket
import ssl
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from ipfsnap.ipfs.core import RPC, ClientBase, HasRPC
from ipfsnap.ipfs.core import endpoint_from_config as endpoint_from_config
from ipfsnap.ipfs.http import Connect, Done, Plan, RecvInto, Send, Sleep, advance
from ipfsnap.ipfs.multiaddr import Endpoint

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


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


def run_plan(plan: Plan[T]) -> T:
    """Drive a plan with blocking I/O and return its result."""
    try:
        op = advance(plan, None, None)
        while not isinstance(op, Done):
            value: Any = None
            error: OSError | None = None
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
            op = advance(plan, value, error)
        return op.value
    finally:
        plan.close()


def blocking(plan: Callable[Concatenate[RPC, P], Plan[T]]) -> Callable[Concatenate[HasRPC, P], T]:
    """The :class:`RPC` plan ``plan`` as a blocking method (same parameters and result)."""

    @functools.wraps(plan)
    def method(self: HasRPC, /, *args: P.args, **kw: P.kwargs) -> T:
        return run_plan(plan(self._rpc, *args, **kw))

    return method


class IPFSClient(ClientBase):
    """Blocking Kubo RPC client; thread-safe, with a keep-alive connection pool.

    ``cat(cid, offset=0, length=None)`` gives exactly ``length`` bytes at ``offset`` (None: to
    the end) or raises; ``cat_into`` streams them to a callback, or receives them straight
    into a writable buffer the caller owns (no allocation, no copy: reuse it for large or
    repeated reads). See :class:`RPC` for each call's parameters.
    """

    def close(self) -> None:
        self._rpc.pool.close_all()

    def __enter__(self) -> IPFSClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # reads
    cat = blocking(RPC.cat)
    cat_into = blocking(RPC.cat_into)
    files_stat = blocking(RPC.files_stat)
    file_size = blocking(RPC.file_size)
    block_get = blocking(RPC.block_get)
    block_stat = blocking(RPC.block_stat)
    # writes
    add = blocking(RPC.add)
    pin_add = blocking(RPC.pin_add)
    # node
    id = blocking(RPC.id)
    version = blocking(RPC.version)
    swarm_connect = blocking(RPC.swarm_connect)
    swarm_peers = blocking(RPC.swarm_peers)
    bootstrap_list = blocking(RPC.bootstrap_list)
    bootstrap_rm_all = blocking(RPC.bootstrap_rm_all)
    bootstrap_add = blocking(RPC.bootstrap_add)
    shutdown = blocking(RPC.shutdown)


class CIDReader:
    """``RangeReader`` over one CID (for :func:`ipfsnap.estargz.open_layer`)."""

    def __init__(self, client: IPFSClient, cid: str) -> None:
        self.client = client
        self.cid = cid

    def read_at(self, offset: int, length: int) -> bytes:
        return self.client.cat(self.cid, offset, length)
