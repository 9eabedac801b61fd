"""ipfsnap.fs: the lazy layer filesystem (eStargz over FUSE, chunks fetched on demand).

Public API
- :class:`LayerMounter` (``snapshot.RemoteFileSystem``): ``mount(mountpoint, labels)`` starts
  one worker process per layer and returns once the layer is verified (TOC digest),
  prefetched and mounted, or raises ``LayerMountError``/``WorkerSpecError`` (the caller falls
  back to a full fetch); ``check`` (worker alive, mount answers a stat within 5 s);
  ``unmount`` (``fusermount3 -u``, lazily ``-z`` when busy). ``status(mountpoint)`` /
  ``all_status()`` return the workers' status for ``ipfsnap snapshot status``.
- Labels: see :mod:`ipfsnap.fs.mounter` (the reference's names plus ``ipfsnap.io/layer.*``
  and ``ipfsnap.io/ipfs.api``, the API of the request that mounts the layer).
- Worker: ``python -m ipfsnap.fs.worker SPEC.json`` (:class:`WorkerSpec`), own session, exits
  when unmounted (or on SIGTERM, unmounting first).
- Status file (JSON, rewritten atomically every ``status_interval`` s): ``state``
  (starting|prefetching|ready|complete|failed|unmounted), ``mountpoint``, ``layer``,
  ``source``, ``pid``, ``size`` (blob bytes), ``chunk_bytes`` / ``cached_bytes`` (compressed
  bytes of all distinct chunks / of those verified in the cache), ``percent``,
  ``fetched_bytes`` and ``source_calls`` (read from the source by this worker), ``entries``,
  ``last_error``, ``updated`` (epoch seconds).
- Disk cache: ``<state>/fs/cache/<layer digest hex>/<chunk sha256 hex>``, verified on read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipfsnap._lazy import lazy_exports

if TYPE_CHECKING:
    from ipfsnap.fs.mounter import (
        IPFS_API_LABEL,
        LAYER_DIGEST_LABEL,
        LOCAL_PATH_LABEL,
        PREFETCH_SIZE_LABEL,
        SIZE_LABEL,
        TOC_DIGEST_LABEL,
        URLS_LABEL,
        LayerMounter,
    )
    from ipfsnap.fs.spec import SourceSpec, WorkerSpec, read_status

__all__ = [
    "IPFS_API_LABEL",
    "LAYER_DIGEST_LABEL",
    "LOCAL_PATH_LABEL",
    "PREFETCH_SIZE_LABEL",
    "SIZE_LABEL",
    "TOC_DIGEST_LABEL",
    "URLS_LABEL",
    "LayerMounter",
    "SourceSpec",
    "WorkerSpec",
    "read_status",
]

# Submodules load on first use of one of their names (see ipfsnap._lazy).
if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_exports(__name__, __file__)
