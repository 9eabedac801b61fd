"""ipfsnap.service: the snapshotter daemon that owns the snapshot store and the lazy mounts.

Public API
- :class:`SnapshotterClient` (``snapshot.Snapshotter`` over ``<state>/snapshotter.sock``, plus
  ``update``/``walk``/``usage``/``status``/``ping``/``stop``), :func:`connect_or_start`,
  :func:`connect_if_running` (read-only queries: never starts one).
- :class:`Daemon` / :func:`serve`: the daemon itself (``ipfsnap snapshotter --foreground``).
- :mod:`ipfsnap.service.protocol`: the JSON-lines socket protocol; :mod:`.paths`: file layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipfsnap._lazy import lazy_exports

if TYPE_CHECKING:
    from ipfsnap.service.client import (
        SnapshotterClient,
        connect_if_running,
        connect_or_start,
        start_daemon,
    )
    from ipfsnap.service.daemon import Daemon, serve
    from ipfsnap.service.errors import (
        DaemonAlreadyRunning,
        DaemonStartError,
        ProtocolError,
        RemoteInternalError,
        ServiceUnavailable,
    )
    from ipfsnap.service.paths import STARGZ_ROOT, lock_holder, stargz_root
    from ipfsnap.service.protocol import LayerState

__all__ = [
    "STARGZ_ROOT",
    "Daemon",
    "DaemonAlreadyRunning",
    "DaemonStartError",
    "LayerState",
    "ProtocolError",
    "RemoteInternalError",
    "ServiceUnavailable",
    "SnapshotterClient",
    "connect_if_running",
    "connect_or_start",
    "lock_holder",
    "serve",
    "stargz_root",
    "start_daemon",
]

# Submodules load on first use of one of their names (see ipfsnap._lazy).
if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_exports(__name__, __file__)
