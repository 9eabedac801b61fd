"""Errors of the IPFS client: one class per failure kind, each naming the call, CID and API.

They all derive from :class:`ipfsnap.errors.IPFSError` (or :class:`~ipfsnap.errors.UsageError`
for malformed input), so callers outside this package never need to import it.
"""

from __future__ import annotations

from ipfsnap.errors import IPFSError, UsageError


def call_message(call: str, api: str, detail: str, cid: str | None = None) -> str:
    """``"cat bafy...: <detail> (IPFS API http://127.0.0.1:5001)"``, one line."""
    subject = f"{call} {cid}" if cid else call
    return f"ipfs {subject}: {detail} (IPFS API {api})"


class IPFSCallError(IPFSError):
    """A call to the daemon failed; ``call``, ``api`` and ``cid`` say which one."""

    #: whether repeating an idempotent call may succeed
    retryable: bool = False

    def __init__(self, call: str, api: str, detail: str, cid: str | None = None) -> None:
        super().__init__(call_message(call, api, detail, cid))
        self.call = call
        self.api = api
        self.cid = cid
        self.detail = detail


class DaemonUnreachable(IPFSCallError):
    """No connection to the API (refused, reset, DNS failure, closed early)."""

    retryable = True
    #: True when the connection was open and broke later (the request may have arrived)
    connected = False


class IPFSTimeout(IPFSCallError):
    """The call did not finish within its timeout (client side or the daemon's ``timeout=``)."""

    retryable = True


class IPFSNotFound(IPFSCallError):
    """The daemon says the CID or path does not exist (or cannot be resolved)."""


class IPFSHTTPError(IPFSCallError):
    """The daemon answered with an HTTP error; ``message`` is the daemon's own text."""

    def __init__(
        self, call: str, api: str, status: int, message: str, cid: str | None = None
    ) -> None:
        super().__init__(call, api, f"HTTP {status}: {message}", cid)
        self.status = status
        self.message = message
        # 502/503/504 come from proxies and restarting daemons: worth another try
        self.retryable = status in (502, 503, 504)


class StreamError(IPFSCallError):
    """The daemon reported an error after the body started (``X-Stream-Error`` trailer)."""

    retryable = True


class ShortRead(IPFSCallError):
    """The body had fewer (or more) bytes than asked for."""

    retryable = True

    def __init__(
        self, call: str, api: str, detail: str, cid: str | None = None, *, final: bool = False
    ) -> None:
        super().__init__(call, api, detail, cid)
        # a read past the end of the content: repeating it cannot help
        self.retryable = not final


class BadReply(IPFSCallError):
    """The daemon answered something this client cannot parse (not JSON, missing field)."""


class BadCID(IPFSError, UsageError):
    """A string is not a valid CID (or uses a codec/hash this client does not know)."""


class BadMultiaddr(IPFSError, UsageError):
    """An API address is neither a supported multiaddr nor an http(s) URL."""


class APINotFound(IPFSError):
    """No IPFS API address was given and none was found in the usual places."""
