"""A private containerd (Debian's 1.6) with ipfsnap registered as proxy snapshotter, for
tests (fixture ``containerd_env`` in this directory's conftest) and benchmarks.

:func:`start_env` starts, in a short private directory under /tmp (unix socket paths are
limited to 107 bytes):

- ``ipfsnap snapshotter --foreground --grpc-address <dir>/ipfsnap.sock`` on its own state dir;
- containerd with its own root, state, socket and ``opt`` dir, CRI off, and
  ``[proxy_plugins.ipfsnap]`` pointing at that socket.

Teardown kills and deletes every task and container, removes the images (containerd then
removes their snapshots), stops containerd, stops the snapshotter with ``snapshotter stop``
(its lazy layers unmounted) and detaches whatever is still mounted under the directory.
containerd's shims keep sockets under /run/containerd/s (FACTS.md section 5); deleting the
tasks ends the shims, which removes them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import ROOT

#: seconds to wait for a daemon's socket to appear (containerd: ~1 s, Python: ~0.5 s)
START_TIMEOUT = 60.0
NAMESPACE = "ipfsnap-test"


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args!r} exited with {proc.returncode}: "
                                 f"{log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear: {log.read_text(errors='replace')}")
        time.sleep(0.05)


def _mounts_under(d: Path) -> list[str]:
    prefix = str(d) + "/"
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp.startswith(prefix):
                out.append(mp)
    return out


@dataclass
class ContainerdEnv:
    dir: Path
    ipfs_api: str | None
    namespace: str = NAMESPACE
    snap_proc: subprocess.Popen[bytes] | None = None
    ctd_proc: subprocess.Popen[bytes] | None = None
    snap_starts: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def grpc_address(self) -> Path:
        return self.dir / "ipfsnap.sock"

    @property
    def state(self) -> Path:
        return self.dir / "ipfsnap"

    @property
    def config(self) -> Path:
        return self.dir / "ipfsnap.toml"

    def ipfsnap_argv(self, *args: str) -> list[str]:
        argv = [sys.executable, "-m", "ipfsnap.cli.main", "--state-dir", str(self.state),
                "--config", str(self.config)]
        if self.ipfs_api:
            argv += ["--ipfs-api", self.ipfs_api]
        return argv + list(args)

    def ipfsnap(self, *args: str, check: bool = True, timeout: float = 300
                ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            self.ipfsnap_argv("--containerd", str(self.address), "--namespace", self.namespace,
                              *args),
            capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"ipfsnap {' '.join(args)}: exit {res.returncode}\n"
                                 f"{res.stdout}\n{res.stderr}")
        return res

    def ctr(self, *args: str, check: bool = True, timeout: float = 120,
            namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = ["ctr", "-a", str(self.address), "-n", namespace or self.namespace, *args]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: exit {res.returncode}\n"
                                 f"{res.stdout}\n{res.stderr}\n"
                                 f"snapshotter log:\n{self.snapshotter_log()[-4000:]}")
        return res

    def snapshotter_log(self) -> str:
        p = self.dir / f"snapshotter-{self.snap_starts}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    # ---- the ipfsnap snapshotter -----------------------------------------------------------

    def start_snapshotter(self) -> None:
        self.snap_starts += 1
        log = self.dir / f"snapshotter-{self.snap_starts}.log"
        with contextlib.suppress(FileNotFoundError):
            self.grpc_address.unlink()
        with open(log, "wb") as f:
            self.snap_proc = subprocess.Popen(
                self.ipfsnap_argv("-v", "snapshotter", "--foreground", "--grpc-address",
                                  str(self.grpc_address)),
                stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                env={**os.environ, **self.extra_env},
            )
        _wait_socket(self.grpc_address, self.snap_proc, log)

    def wait_reconnected(self) -> None:
        """Until containerd talks to the (re)started snapshotter again: its proxy client
        redials with exponential backoff capped at 3 s (containerd 1.6 services/server), and
        calls fail fast as Unavailable meanwhile."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            res = self.ctr("snapshots", "--snapshotter", "ipfsnap", "ls", check=False)
            if res.returncode == 0:
                return
            if "unavailable" not in res.stderr or time.monotonic() > deadline:
                raise AssertionError(f"containerd does not reach the snapshotter: {res.stderr}")
            time.sleep(0.2)

    def kill_snapshotter(self, sig: int = signal.SIGTERM) -> None:
        """End the snapshotter process as a restart would (mounts stay)."""
        proc = self.snap_proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.snap_proc = None

    def stop_snapshotter(self) -> None:
        """``snapshotter stop``: unmount every lazy layer, then exit."""
        if self.snap_proc is not None and self.snap_proc.poll() is None:
            subprocess.run(self.ipfsnap_argv("snapshotter", "stop"), capture_output=True,
                           timeout=60, cwd=ROOT)
        self.kill_snapshotter()

    # ---- containerd -----------------------------------------------------------------------

    def start_containerd(self) -> None:
        d = self.dir
        config = d / "containerd.toml"
        config.write_text(f"""version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{self.address}"
[ttrpc]
  address = "{self.address}.ttrpc"
[debug]
  address = "{d}/debug.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[proxy_plugins.ipfsnap]
  type = "snapshot"
  address = "{self.grpc_address}"
""")
        log = d / "containerd.log"
        with open(log, "wb") as f:
            self.ctd_proc = subprocess.Popen(
                ["containerd", "--config", str(config)], stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True)
        _wait_socket(self.address, self.ctd_proc, log)

    def teardown(self) -> None:
        if self.ctd_proc is not None and self.ctd_proc.poll() is None:
            for ns in self.ctr("namespaces", "ls", "-q", check=False).stdout.split():
                self._clean_namespace(ns)
            self.ctd_proc.terminate()
            try:
                self.ctd_proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.ctd_proc.kill()
                self.ctd_proc.wait()
        self.stop_snapshotter()
        for mp in reversed(_mounts_under(self.dir)):
            subprocess.run(["umount", "-l", mp], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _clean_namespace(self, ns: str) -> None:
        for task in self.ctr("tasks", "ls", "-q", namespace=ns, check=False).stdout.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", task, namespace=ns, check=False)
            for _ in range(100):
                if self.ctr("tasks", "delete", task, namespace=ns, check=False).returncode == 0:
                    break
                time.sleep(0.1)
        for c in self.ctr("containers", "ls", "-q", namespace=ns, check=False).stdout.split():
            self.ctr("containers", "delete", c, namespace=ns, check=False)
        images = self.ctr("images", "ls", "-q", namespace=ns, check=False).stdout.split()
        if images:
            self.ctr("images", "rm", "--sync", *images, namespace=ns, check=False)


def start_env(ipfs_api: str | None = None, config: str = "") -> ContainerdEnv:
    """A running :class:`ContainerdEnv`; call its ``teardown()`` when done."""
    env = ContainerdEnv(Path(tempfile.mkdtemp(prefix="ictd-", dir="/tmp")), ipfs_api)
    try:
        env.config.write_text(config)
        env.start_snapshotter()
        env.start_containerd()
    except BaseException:
        env.teardown()
        raise
    return env
