"""Session fixtures of the interop tests: the Go checker binary and the tar fixtures.

The checker is built once per source version (keyed by the sha256 of main.go and the Go
version) into pytest's cache dir, offline, in GOPATH mode against Debian's copy of the
reference library under /usr/share/gocode. A missing ``go`` or a missing Go package fails
the tests (never skips them).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.interop import fixtures
from tests.support import require, require_tool

CHECKER_SRC = Path(__file__).resolve().parent / "checker" / "main.go"
#: Debian installs Go libraries' source here (golang-*-dev packages)
DEBIAN_GOCODE = Path("/usr/share/gocode")
REFERENCE_PKG = DEBIAN_GOCODE / "src/github.com/containerd/stargz-snapshotter/estargz"


def build_checker(cache_root: Path) -> Path:
    """Build (or reuse) the checker binary under ``cache_root``; raise RuntimeError with
    the compiler's output when it does not build."""
    go = require_tool("go")
    require(
        REFERENCE_PKG.is_dir(),
        f"{REFERENCE_PKG} (apt golang-github-containerd-stargz-snapshotter-dev)",
    )
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(CHECKER_SRC.read_bytes() + version.encode()).hexdigest()[:16]
    out_dir = cache_root / key
    binary = out_dir / "checker"
    if binary.exists():
        return binary
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        GO111MODULE="off",  # GOPATH mode: no go.mod, no module download
        GOPROXY="off",
        GOFLAGS="",
        GOPATH=f"{DEBIAN_GOCODE}:{out_dir / 'gopath'}",
        GOCACHE=str(cache_root / "gocache"),
    )
    tmp = out_dir / "checker.tmp"
    proc = subprocess.run(
        [go, "build", "-o", str(tmp), str(CHECKER_SRC)],
        env=env, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"building {CHECKER_SRC} failed:\n{proc.stderr}")
    tmp.rename(binary)
    return binary


@pytest.fixture(scope="session")
def go_checker(request: pytest.FixtureRequest) -> Path:
    cache = Path(request.config.cache.mkdir("interop-go-checker"))
    try:
        return build_checker(cache)
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


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
