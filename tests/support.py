"""Shared test helpers (import: ``from tests.support import require``).

Integration tests need real things (root, FUSE, runc, an IPFS daemon, Go). When one is
missing the test FAILS, never skips, so a CI machine without it cannot pass by accident.
A developer on a partial machine may set ``IPFSNAP_TEST_ALLOW_SKIP=1`` to turn those
failures into skips locally; CI never sets it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def require(condition: bool, what: str) -> None:
    """Fail (or, with IPFSNAP_TEST_ALLOW_SKIP=1 outside CI, skip) unless ``condition``."""
    if condition:
        return
    if os.environ.get("IPFSNAP_TEST_ALLOW_SKIP") == "1" and os.environ.get("CI") != "true":
        pytest.skip(f"missing: {what}")
    pytest.fail(f"required for this test but missing: {what}", pytrace=False)


def require_root() -> None:
    require(os.geteuid() == 0, "root")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"executable {name!r} on PATH")
    assert path is not None
    return path


def require_fuse() -> None:
    require_root()
    require(Path("/dev/fuse").exists(), "/dev/fuse")
    require_tool("fusermount3")


