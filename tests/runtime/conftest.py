"""Fixtures for the runtime tests: a busybox rootfs built from Debian's busybox-static."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipfsnap.runtime import ContainerStore
from ipfsnap.runtime.containers import mountinfo_targets, unmount_all

BUSYBOX = Path("/bin/busybox")

PASSWD = """root:x:0:0:root:/root:/bin/sh
alice:x:1000:1000:Alice:/home/alice:/bin/sh
"""
GROUP = """root:x:0:
tty:x:5:
staff:x:50:alice
alice:x:1000:
"""


def make_busybox_rootfs(root: Path) -> Path:
    """/bin/busybox plus one symlink per applet, /etc/passwd with root and alice (1000)."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for name in applets:
        if name != "busybox":
            os.symlink("busybox", root / "bin" / name)
    for d in ("etc", "proc", "sys", "dev", "root", "home/alice", "var", "data"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(mode=0o1777)
    (root / "tmp").chmod(0o1777)
    os.chown(root / "home" / "alice", 1000, 1000)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    return root


@pytest.fixture(scope="session")
def busybox_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not BUSYBOX.exists():
        pytest.fail("required for this test but missing: /bin/busybox (busybox-static)")
    return make_busybox_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")


@pytest.fixture
def rootfs(busybox_template: Path, tmp_path: Path) -> Path:
    """A private copy of the busybox rootfs (containers write into it)."""
    dst = tmp_path / "rootfs"
    shutil.copytree(busybox_template, dst, symlinks=True)
    return dst


@pytest.fixture
def runtime_state(state_dir: Path) -> Iterator[Path]:
    """A state dir whose containers, mounts and runc state are all removed afterwards."""
    yield state_dir
    store = ContainerStore(state_dir)
    for cid in set(store.ids()) | set(store.runc.list_ids() if store.runc.root.exists() else []):
        # cleanup of a failed test must not hide its failure
        with contextlib.suppress(Exception):
            store.destroy(cid, force=True)
    # run --snapshotter=stargz starts the state dir's snapshotter service on demand
    from ipfsnap.service import paths as service_paths
    from ipfsnap.service.client import SnapshotterClient

    if service_paths.lock_holder(state_dir) is not None:
        with contextlib.suppress(Exception), SnapshotterClient(state_dir) as client:
            client.stop()
    for target in reversed(mountinfo_targets()):
        if target.startswith(str(state_dir) + "/"):
            unmount_all(Path(target))
