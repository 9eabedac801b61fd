"""Helpers for tests with real FUSE mounts through LayerMounter."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ipfsnap.config import Config
from ipfsnap.fs import (
    LAYER_DIGEST_LABEL,
    LOCAL_PATH_LABEL,
    SIZE_LABEL,
    TOC_DIGEST_LABEL,
    LayerMounter,
)
from ipfsnap.fs.mounter import is_mountpoint
from tests.fs.layers import Blob


def labels_for(blob: Blob, path: Path | None = None) -> dict[str, str]:
    return {
        LAYER_DIGEST_LABEL: blob.digest,
        TOC_DIGEST_LABEL: blob.toc_digest,
        LOCAL_PATH_LABEL: str(path or blob.path),
        SIZE_LABEL: str(blob.size),
    }


def make_mounter(state: Path, *, background: bool = True, **extra: Any) -> LayerMounter:
    cfg = Config(state_dir=state)
    cfg.no_background_fetch = not background
    cfg.blob.fetching_timeout_sec = 20
    cfg.blob.neighbour_span = 0  # tests count the bytes of exactly the chunks they read
    opts: dict[str, Any] = {"status_interval": 0.1, "log_level": "DEBUG"}
    opts.update(extra)
    return LayerMounter(cfg, ready_timeout=60, extra=opts)


def wait_status(m: LayerMounter, mp: Path, pred: Callable[[dict[str, Any]], bool],
                timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    st: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        st = m.status(mp)
        if st is not None and pred(st):
            return st
        time.sleep(0.05)
    raise AssertionError(f"status of {mp} never matched; last: {st}")


def fresh_status(m: LayerMounter, mp: Path) -> dict[str, Any]:
    """A status written after now (the worker rewrites it every status_interval)."""
    now = time.time()
    return wait_status(m, mp, lambda s: s.get("updated", 0) > now + 0.01)


@contextmanager
def mounted(m: LayerMounter, mp: Path, labels: dict[str, str]) -> Iterator[Path]:
    m.mount(mp, labels)
    try:
        yield mp
    finally:
        m.unmount(mp)
        assert not is_mountpoint(mp)
