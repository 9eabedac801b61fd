"""Fixtures for every test; shared helpers live in tests/support.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

# Fixture modules, one per area, each owned by that area's tests.
pytest_plugins = ["tests.fixtures.ipfs", "tests.fixtures.images"]


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A private ipfsnap state dir, so tests never touch /var/lib/ipfsnap."""
    d = tmp_path / "state"
    d.mkdir()
    yield d
