"""Fixtures of the snapshotter service tests: real daemon processes per test, cleaned up."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipfsnap.config import Config, load_config
from ipfsnap.fs.spec import read_status
from ipfsnap.service import SnapshotterClient, lock_holder
from ipfsnap.service.errors import ServiceUnavailable
from ipfsnap.snapshot import TARGET_SNAPSHOT_LABEL
from ipfsnap.snapshot.mount import mounts_under
from tests.fs.layers import Blob, build_blob, every_type_items
from tests.fs.mounts import labels_for


@dataclass
class Svc:
    """One state dir with its config file; the daemon runs as a separate process."""

    state: Path
    config: Config

    def client(self, timeout: float | None = 120.0) -> SnapshotterClient:
        return SnapshotterClient(self.state, timeout=timeout)

    def pid(self) -> int | None:
        return lock_holder(self.state)

    def wait_gone(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while lock_holder(self.state) is not None:
            assert time.monotonic() < deadline, f"snapshotter of {self.state} did not exit"
            time.sleep(0.05)

    def kill9(self) -> int:
        pid = self.pid()
        assert pid and pid > 0
        os.kill(pid, signal.SIGKILL)
        self.wait_gone()
        return pid

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``ipfsnap --state-dir S --config C ARGS`` (stdout is a pipe, not a tty)."""
        cmd = [sys.executable, "-m", "ipfsnap.cli.main", "--state-dir", str(self.state),
               "--config", str(self.config.config_path), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"{cmd} exited {res.returncode}: {res.stderr}")
        return res


def _cleanup(svc: Svc) -> None:
    pid = svc.pid()
    if pid is not None:
        try:
            with svc.client(timeout=30) as c:
                c.stop(wait=60)
        except (ServiceUnavailable, OSError, AssertionError):
            if pid > 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    # workers (own sessions) and mounts left by a test that crashed things on purpose
    workers = svc.state / "fs" / "workers"
    if workers.is_dir():
        for d in workers.iterdir():
            st = read_status(d / "status.json") or {}
            wpid = int(st.get("pid", 0) or 0)
            if wpid > 0 and st.get("state") != "unmounted":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(wpid, signal.SIGKILL)
    for m in mounts_under(svc.state):
        subprocess.run(["umount", "-l", m], check=False, capture_output=True)


@pytest.fixture
def make_svc(tmp_path: Path) -> Iterator[Callable[..., Svc]]:
    made: list[Svc] = []

    def make(name: str = "s", config_text: str = "") -> Svc:
        state = tmp_path / name
        state.mkdir()
        cfg_path = tmp_path / f"{name}.toml"
        cfg_path.write_text(config_text or "prefetch_timeout_sec = 10\n", encoding="utf-8")
        config = load_config(config_path=cfg_path, state_dir=state, environ={})
        svc = Svc(state, config)
        made.append(svc)
        return svc

    yield make
    for svc in made:
        _cleanup(svc)


@pytest.fixture(scope="session")
def layer_blob(tmp_path_factory: pytest.TempPathFactory) -> Blob:
    d = tmp_path_factory.mktemp("svcblobs")
    return build_blob(every_type_items(), Path(d) / "every.blob")


def remote_labels(blob: Blob, target: str) -> dict[str, str]:
    """Labels of a prepare that asks for a lazy (remote) mount of ``blob`` as ``target``."""
    return {**labels_for(blob), TARGET_SNAPSHOT_LABEL: target}
