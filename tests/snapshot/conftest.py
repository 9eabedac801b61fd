"""Fixtures of the snapshot tests: a store root and mount cleanup."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ipfsnap.snapshot.mount import mounts_under, unmount


@pytest.fixture(autouse=True)
def _unmount_leftovers(tmp_path: Path) -> Iterator[None]:
    """Whatever a test mounted under its tmp_path is unmounted afterwards, pass or fail."""
    yield
    for m in mounts_under(tmp_path):
        unmount(m, lazy=True)


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    return tmp_path / "store"
