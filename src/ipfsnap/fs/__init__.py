"""ipfsnap.fs: the lazy layer filesystem (eStargz over FUSE, chunks fetched on demand).

Public API: :class:`LayerMounter` (the ``snapshot.RemoteFileSystem`` implementation), the
worker spec/status types, and the building blocks (sources, chunk cache, fetcher).
"""

from ipfsnap.fs.mounter import (
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
