"""The ContainerStore API in-process: release callbacks and cleanup on failure/interruption."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from ipfsnap.runtime import ContainerConfig, ContainerRecord, ContainerStore, Interrupted
from ipfsnap.runtime.containers import MountRootfs, is_mountpoint, mountinfo_targets
from tests.support import require_root, require_tool

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _needs_runc() -> None:
    require_root()
    require_tool("runc")


def bind(source: Path) -> MountRootfs:
    def mount(target: Path) -> None:
        subprocess.run(["mount", "--bind", str(source), str(target)], check=True)

    return mount


def assert_no_trace(state: Path, cid: str) -> None:
    assert not (state / "containers" / cid).exists()
    assert ContainerStore(state).runc.state(cid) is None
    assert not [m for m in mountinfo_targets() if m.startswith(str(state) + "/")]


def test_foreground_run_in_process(runtime_state: Path, rootfs: Path, tmp_path: Path) -> None:
    store = ContainerStore(runtime_state)
    released: list[ContainerRecord] = []
    record = store.create("p1", image="img", snapshot_key="snap-p1", rm=False)
    out = tmp_path / "out"
    with out.open("wb") as f:
        code = store.run(
            record,
            ContainerConfig(args=["sh", "-c", "echo in; exit 6"]),
            mount_rootfs=bind(rootfs),
            release=released.append,
            stdout=f,
        )
    assert code == 6 and out.read_text() == "in\n"
    assert store.load("p1").exit_code == 6
    assert is_mountpoint(store.rootfs("p1"))  # kept until rm (no --rm)
    assert store.status("p1").status == "exited"
    store.destroy("p1", released.append)
    assert [r.snapshot_key for r in released] == ["snap-p1"]
    assert_no_trace(runtime_state, "p1")


def test_sigterm_while_preparing_cleans_up(runtime_state: Path, rootfs: Path) -> None:
    store = ContainerStore(runtime_state)
    released: list[str] = []
    record = store.create("p2", snapshot_key="snap-p2", rm=False)

    def mount_then_terminated(target: Path) -> None:
        subprocess.run(["mount", "--bind", str(rootfs), str(target)], check=True)
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. the user's `kill` during a long unpack

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as exc:
        store.run(
            record,
            ContainerConfig(args=["true"]),
            mount_rootfs=mount_then_terminated,
            release=lambda r: released.append(r.snapshot_key),
        )
    assert exc.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
    assert released == ["snap-p2"]
    assert_no_trace(runtime_state, "p2")


def test_failing_mount_or_bundle_cleans_up(runtime_state: Path, rootfs: Path) -> None:
    store = ContainerStore(runtime_state)
    released: list[str] = []

    def broken(target: Path) -> None:
        raise OSError("disk on fire")

    record = store.create("p3", snapshot_key="k3")
    with pytest.raises(OSError, match="disk on fire"):
        store.run(record, ContainerConfig(args=["true"]), mount_rootfs=broken,
                  release=lambda r: released.append(r.snapshot_key))  # fmt: skip
    assert_no_trace(runtime_state, "p3")
    # an unknown user is found only once the rootfs is mounted: the mount is undone
    record = store.create("p4", snapshot_key="k4")
    with pytest.raises(Exception, match="nobody-here"):
        store.run(
            record,
            ContainerConfig(args=["true"], user="nobody-here"),
            mount_rootfs=bind(rootfs),
            release=lambda r: released.append(r.snapshot_key),
        )
    assert released == ["k3", "k4"]
    assert_no_trace(runtime_state, "p4")
