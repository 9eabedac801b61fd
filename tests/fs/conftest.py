"""Fixtures of the lazy filesystem tests: blobs built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fs.layers import Blob, build_blob, every_type_items


@pytest.fixture(scope="session")
def every_type_blob(tmp_path_factory: pytest.TempPathFactory) -> Blob:
    d = tmp_path_factory.mktemp("fsblobs")
    return build_blob(every_type_items(), Path(d) / "every.blob")
