"""Building the Go checker (tests/interop/checker/main.go) offline, for tests and benchmarks.

GOPATH mode against Debian's copy of the reference library under /usr/share/gocode
(golang-github-containerd-stargz-snapshotter-dev pulls in its Go dependencies: klauspost
compress, go-digest, x/sync, tar-split); no module download, no network.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

CHECKER_SRC = Path(__file__).resolve().parent / "checker" / "main.go"
#: Debian installs Go libraries' source here (golang-*-dev packages)
DEBIAN_GOCODE = Path("/usr/share/gocode")
REFERENCE_PKG = DEBIAN_GOCODE / "src/github.com/containerd/stargz-snapshotter/estargz"


class CheckerUnavailable(RuntimeError):
    """Go, the reference source, or a dependency is missing, or the checker does not build."""


def build_checker(cache_root: Path) -> Path:
    """Build (or reuse) the checker under ``cache_root``, keyed by the source and Go version."""
    go = shutil.which("go")
    if go is None:
        raise CheckerUnavailable("executable 'go' on PATH (apt golang-go)")
    if not REFERENCE_PKG.is_dir():
        raise CheckerUnavailable(
            f"{REFERENCE_PKG} (apt golang-github-containerd-stargz-snapshotter-dev)"
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
    tmp = out_dir / f"checker.tmp{os.getpid()}"
    log.info("building %s", CHECKER_SRC)
    proc = subprocess.run(
        [go, "build", "-o", str(tmp), str(CHECKER_SRC)],
        env=env, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise CheckerUnavailable(f"building {CHECKER_SRC} failed:\n{proc.stderr}")
    tmp.rename(binary)
    return binary
