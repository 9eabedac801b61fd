"""Session fixtures of the interop tests: the Go checker binary and the tar fixtures.

The checker is built once per source version (keyed by the sha256 of main.go and the Go
version) into pytest's cache dir, offline, in GOPATH mode against Debian's copy of the
reference library under /usr/share/gocode. A missing ``go`` or a missing Go package fails
the tests (never skips them).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from tests.interop import fixtures
from tests.interop.gochecker import CheckerUnavailable, build_checker
from tests.support import require, require_tool


@pytest.fixture(scope="session")
def go_checker(request: pytest.FixtureRequest) -> Path:
    """The checker binary; fails (never skips) when Go or the reference is missing."""
    require_tool("go")
    if getattr(request.config, "cache", None) is not None:
        cache = Path(request.config.cache.mkdir("interop-go-checker"))
    else:  # pytest run with -p no:cacheprovider
        cache = Path(tempfile.gettempdir()) / "ipfsnap-interop-go-checker"
    try:
        return build_checker(cache)
    except CheckerUnavailable as e:
        require(False, str(e))
        raise


@pytest.fixture(scope="session")
def interop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("interop")


@pytest.fixture(scope="session")
def feature_tar(interop_dir: Path) -> Path:
    return fixtures.write_feature_tar(interop_dir / "features.tar")


@pytest.fixture(scope="session")
def dotslash_tar(interop_dir: Path) -> Path:
    """The same entries with "./" before every name and a "./" root entry."""
    return fixtures.write_feature_tar(interop_dir / "features-dotslash.tar", prefix="./")


@pytest.fixture(scope="session")
def big_tar(interop_dir: Path) -> Path:
    return fixtures.write_big_tar(interop_dir / "big.tar")
