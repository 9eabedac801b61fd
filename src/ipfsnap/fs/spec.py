"""The JSON spec a layer worker is started with, and its status file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ipfsnap.estargz.footer import TAIL_READ_SIZE
from ipfsnap.fs.errors import WorkerSpecError

#: kernel read-ahead of a layer mount, KiB (the FUSE default is 128). The kernel splits a
#: sequential read into requests of at most read_ahead_kb (and at most 1 MiB: libfuse 3.14
#: negotiates max_pages = 256), so 128 KiB meant 800 Python-served requests per 100 MiB;
#: 4096 gives 1 MiB requests and lets the kernel ask for the next 4 MiB (the default
#: eStargz chunk) while the reader is still in the current one, so the worker loads or
#: fetches the next chunk while serving this one. A read(2) that stops early is not hurt:
#: the kernel grows the window only while reads stay sequential. The cost is in mmap
#: faults (exec, ld.so), which read this much around the faulting page: a fault within
#: 2 MiB of a chunk boundary also fetches the neighbouring chunk (measured: 8.4 instead of
#: 4.2 MiB for one page at 3.5 MiB of a 12 MiB file; 1024 would not, but then a cold
#: sequential read waits for each chunk in turn). 0 = kernel default.
DEFAULT_READ_AHEAD_KB = 4096


@dataclass
class SourceSpec:
    """Where the blob is: ``kind`` "file" (``path``) or "ipfs" (``api`` + ``cid``)."""

    kind: str
    path: str = ""
    api: str = ""
    cid: str = ""
    auth: str = ""


@dataclass
class WorkerSpec:
    mountpoint: str
    source: SourceSpec
    #: expected TOC digest; the layer is never mounted unverified
    toc_digest: str
    #: directory of this layer's verified chunks (``<cache root>/<layer key>``)
    cache_dir: str
    #: JSON status file, rewritten atomically about every ``status_interval`` seconds
    status_path: str
    #: the layer's digest (for status and logs)
    layer: str = ""
    #: bound of all the layer directories under the cache root, bytes (0 = unlimited)
    cache_size_limit: int = 0
    #: blob size; None = ask the source (file size or IPFS files/stat)
    blob_size: int | None = None
    noprefetch: bool = False
    no_background_fetch: bool = False
    #: bytes prefetched from the blob's start when it has no prefetch landmark
    prefetch_size: int = 0
    prefetch_timeout_sec: float = 10.0
    max_concurrency: int = 2
    fetching_timeout_sec: float = 300.0
    max_retries: int = 5
    #: bytes one coalesced source request may span
    max_span: int = 8 << 20
    #: chunks fetched ahead of a sequential reader (0 = off), see layer.DEFAULT_READAHEAD
    readahead: int = 0
    #: on-demand reads also fetch uncached neighbour chunks inside aligned windows of this
    #: many bytes (0 = off), see layer.DEFAULT_NEIGHBOUR_SPAN
    neighbour_span: int = 0
    #: prefetch requests: at most this many bytes each, this many at once
    prefetch_span: int = 1 << 20
    prefetch_concurrency: int = 4
    #: on-demand reads: concurrent range requests of about this many bytes (0 = off)
    read_split_size: int = 0
    #: background fetch: seconds without foreground reads (any layer) before a request,
    #: and seconds between two background requests (any layer)
    silence_period: float = 5.0
    fetch_period: float = 0.25
    #: kernel read-ahead of the mount, KiB (0 = kernel default), see DEFAULT_READ_AHEAD_KB
    read_ahead_kb: int = DEFAULT_READ_AHEAD_KB
    attr_timeout: float = 1.0
    entry_timeout: float = 1.0
    status_interval: float = 1.0
    #: estargz hostile-input limits (None = library defaults)
    max_toc_size: int | None = None
    max_entries: int | None = None
    max_name_length: int | None = None
    #: open files with FOPEN_DIRECT_IO (no page cache; breaks mmap/exec: benchmarks only)
    direct_io: bool = False
    #: extra FUSE mount options
    fuse_options: list[str] = field(default_factory=list)
    #: bytes of the blob's end read in one request when the TOC is opened, beyond the
    #: IPFS block holding the footer (source.TailReader, estargz.footer.TAIL_READ_SIZE)
    toc_tail: int = TAIL_READ_SIZE
    #: parsed-TOC cache (fs/tablecache.py): "wait" = adopt the tables a warm-up stored,
    #: waiting for a warm-up still running; "adopt" = adopt stored tables, never wait
    #: (parse in parallel; for measurements); "off" = always parse, store nothing
    toc_cache: str = "wait"
    log_level: str = "INFO"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or not isinstance(data.get("source"), dict):
                raise TypeError("not an object with a source object")
            known = {f.name for f in fields(cls)}
            unknown = set(data) - known
            if unknown:
                raise TypeError(f"unknown keys {sorted(unknown)}")
            src = SourceSpec(**data.pop("source"))
            spec = cls(source=src, **data)
        except (ValueError, TypeError) as exc:
            raise WorkerSpecError(f"layer worker spec: invalid: {exc}") from None
        if spec.source.kind not in ("file", "ipfs"):
            raise WorkerSpecError(f"layer worker spec: unknown source kind {spec.source.kind!r}")
        if spec.toc_cache not in ("wait", "adopt", "off"):
            raise WorkerSpecError(f"layer worker spec: bad toc_cache {spec.toc_cache!r}")
        if not spec.toc_digest.startswith("sha256:"):
            raise WorkerSpecError(f"layer worker spec: bad toc_digest {spec.toc_digest!r}")
        return spec


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` so readers see the old or the new file, never a partial one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
