"""Errors of the snapshotter service (daemon, socket protocol, client)."""

from __future__ import annotations

from ipfsnap.errors import ServiceError


class ServiceUnavailable(ServiceError):
    """No snapshotter answers on the state dir's socket (not running, or stopping)."""


class DaemonAlreadyRunning(ServiceError):
    """Another snapshotter holds the state dir's lock."""


class DaemonStartError(ServiceError):
    """A snapshotter started on demand did not come up (its log file says why)."""


class ProtocolError(ServiceError):
    """A message on the snapshotter socket is malformed, too large, or of an unknown kind."""


class RemoteInternalError(ServiceError):
    """The snapshotter failed with an unexpected (non-ipfsnap) error; its log has the trace."""
