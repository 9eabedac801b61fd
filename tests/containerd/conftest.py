"""Fixture ``containerd_env``: a private containerd with ipfsnap as its proxy snapshotter
(see :mod:`tests.containerd.env`), torn down after the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.containerd.env import ContainerdEnv, start_env
from tests.support import require, require_root, require_tool

ContainerdFactory = Callable[..., ContainerdEnv]


@pytest.fixture
def containerd_env() -> Iterator[ContainerdFactory]:
    """``containerd_env(ipfs_api=None, config="")`` -> a running :class:`ContainerdEnv`
    (``config``: the ipfsnap config.toml text its commands and snapshotter use)."""
    require_root()
    require_tool("containerd")
    require_tool("ctr")
    require_tool("runc")
    require_tool("containerd-shim-runc-v2")
    require_tool("fusermount3")
    require(Path("/dev/fuse").exists(), "/dev/fuse")
    envs: list[ContainerdEnv] = []

    def start(ipfs_api: str | None = None, config: str = "") -> ContainerdEnv:
        envs.append(start_env(ipfs_api, config))
        return envs[-1]

    try:
        yield start
    finally:
        for env in envs:
            env.teardown()
