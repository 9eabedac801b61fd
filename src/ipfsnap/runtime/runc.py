"""A thin wrapper around Debian's ``runc`` binary.

Every call uses ``runc --root <state_dir>/runc`` so that ipfsnap instances with different state
dirs never see each other's containers (runc's default root /run/runc is global).

Foreground runs use ``runc run``: runc itself forwards every signal it receives to the
container's init (except SIGCHLD/SIGWINCH/SIGURG, which it handles) and exits with the
container's status (128+N when the init was killed by signal N), and deletes the container when
it exits. With a terminal (``process.terminal``), runc allocates the pty, puts our terminal in
raw mode and copies both ways; without one, the container's stdio is piped through runc.

ipfsnap sits between the user and runc, so it must pass signals on too. It blocks the
forwardable signals, waits for them with ``sigtimedwait`` and sends each to runc, except a
signal the terminal driver generated (Ctrl-C, Ctrl-\\: ``si_code == SI_KERNEL``), which the
kernel already delivered to runc (same foreground process group); forwarding it would double it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ipfsnap.runtime.errors import RuncError

log = logging.getLogger(__name__)

#: signals ipfsnap passes on to runc (and runc to the container's init) during a foreground run
FORWARDED_SIGNALS: frozenset[signal.Signals] = frozenset(
    {
        signal.SIGINT,
        signal.SIGTERM,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
    }
)

#: si_code of a signal sent by the kernel itself (the tty driver for Ctrl-C), not by kill(2)
SI_KERNEL = 0x80

#: how long one wait for a signal lasts before the child is polled again (seconds); SIGCHLD
#: normally wakes the wait at once, this only bounds the latency if it was coalesced away
_WAIT_SLICE = 0.5

#: seconds a runc bookkeeping call (state, kill, delete, list) may take
_CALL_TIMEOUT = 60


@dataclass(frozen=True)
class RuncState:
    """What ``runc state`` says about one container."""

    id: str
    status: str  # created | running | paused | stopped
    pid: int
    bundle: str


def have_terminal() -> bool:
    """Whether ``runc run`` with a terminal can find our console: one of stdin/stdout/stderr
    is a tty, or this process has a controlling terminal (runc tries them in that order)."""
    if any(os.isatty(fd) for fd in (0, 1, 2)):
        return True
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def exit_status(returncode: int) -> int:
    """A shell-style status: 128+N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class Runc:
    """runc with a private root under ``state_dir``."""

    def __init__(self, state_dir: Path, binary: str = "runc") -> None:
        self.root = state_dir / "runc"
        found = shutil.which(binary)
        self.binary = found or binary

    def _base(self) -> list[str]:
        return [self.binary, "--root", str(self.root)]

    def _call(self, args: Sequence[str], what: str) -> subprocess.CompletedProcess[str]:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            return subprocess.run(
                [*self._base(), *args],
                capture_output=True,
                text=True,
                timeout=_CALL_TIMEOUT,
                check=False,
            )
        except FileNotFoundError as exc:
            raise RuncError(f"runc ({self.binary}): not installed") from exc
        except subprocess.TimeoutExpired as exc:
            raise RuncError(f"runc {what}: no answer in {_CALL_TIMEOUT}s") from exc

    # -- queries ------------------------------------------------------------------------------

    def state(self, container_id: str) -> RuncState | None:
        """runc's view of a container, or None if runc does not know it."""
        if not (self.root / container_id).exists():
            return None
        proc = self._call(["state", container_id], f"state {container_id}")
        if proc.returncode != 0:
            return None
        try:
            doc: dict[str, Any] = json.loads(proc.stdout)
            return RuncState(
                id=str(doc["id"]),
                status=str(doc["status"]),
                pid=int(doc.get("pid") or 0),
                bundle=str(doc.get("bundle", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise RuncError(f"runc state {container_id}: unreadable answer: {exc}") from exc

    def list_ids(self) -> list[str]:
        if not self.root.exists():
            return []
        proc = self._call(["list", "-q"], "list")
        if proc.returncode != 0:
            raise RuncError(f"runc list: {proc.stderr.strip() or proc.returncode}")
        return [line for line in proc.stdout.splitlines() if line]

    # -- lifecycle ----------------------------------------------------------------------------

    def kill(
        self, container_id: str, sig: int = signal.SIGTERM, all_processes: bool = False
    ) -> None:
        args = ["kill", *(["--all"] if all_processes else []), container_id, str(int(sig))]
        proc = self._call(args, f"kill {container_id}")
        if proc.returncode != 0:
            raise RuncError(f"runc kill {container_id}: {proc.stderr.strip() or proc.returncode}")

    def delete(self, container_id: str, force: bool = False) -> None:
        args = ["delete", *(["--force"] if force else []), container_id]
        proc = self._call(args, f"delete {container_id}")
        if proc.returncode != 0 and self.state(container_id) is not None:
            raise RuncError(f"runc delete {container_id}: {proc.stderr.strip() or proc.returncode}")

    def run_detached(self, container_id: str, bundle: Path, log_path: Path) -> int:
        """``runc run -d``: start the container and return its init pid; its stdout and
        stderr (and runc's own messages) go to ``log_path``, stdin is /dev/null."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # runc writes the pid file before it returns; ``runc state`` would say pid 0 for a
        # container that has already exited
        pid_file = bundle / "init.pid"
        with open(log_path, "ab") as logf, open(os.devnull, "rb") as null:
            try:
                proc = subprocess.run(
                    [*self._base(), "run", "-d", "--pid-file", str(pid_file), "--bundle",
                     str(bundle), container_id],
                    stdin=null,
                    stdout=logf,
                    stderr=logf,
                    timeout=_CALL_TIMEOUT,
                    check=False,
                )
            except FileNotFoundError as exc:
                raise RuncError(f"runc ({self.binary}): not installed") from exc
            except subprocess.TimeoutExpired as exc:
                raise RuncError(
                    f"runc run -d {container_id}: no answer in {_CALL_TIMEOUT}s"
                ) from exc
        if proc.returncode != 0:
            tail = _tail(log_path)
            raise RuncError(f"runc run -d {container_id} failed: {tail or proc.returncode}")
        try:
            return int(pid_file.read_text(encoding="ascii").strip())
        except (OSError, ValueError) as exc:
            raise RuncError(
                f"runc run -d {container_id}: no init pid in {pid_file}: {exc}"
            ) from exc

    def run_foreground(
        self,
        container_id: str,
        bundle: Path,
        *,
        stdin: IO[Any] | int | None = None,
        stdout: IO[Any] | int | None = None,
        stderr: IO[Any] | int | None = None,
    ) -> int:
        """``runc run`` in the foreground; returns the container's exit status.

        Our stdio (or the given files) pass through; forwardable signals that reach this
        process are sent on to runc (see the module docstring).
        """
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        wanted = set(FORWARDED_SIGNALS) | {signal.SIGCHLD}
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)

        def unblock() -> None:  # runs in the child between fork and exec
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

        try:
            try:
                child = subprocess.Popen(
                    [*self._base(), "run", "--bundle", str(bundle), container_id],
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    preexec_fn=unblock,  # the CLI is single-threaded here
                )
            except FileNotFoundError as exc:
                raise RuncError(f"runc ({self.binary}): not installed") from exc
            same_pgrp = os.getpgid(child.pid) == os.getpgrp()
            while True:
                code = child.poll()
                if code is not None:
                    break
                info = signal.sigtimedwait(wanted, _WAIT_SLICE)
                if info is None or info.si_signo == signal.SIGCHLD:
                    continue
                if info.si_code == SI_KERNEL and same_pgrp:
                    log.debug("signal %d from the terminal: runc got it too", info.si_signo)
                    continue
                log.debug("forwarding signal %d to runc (pid %d)", info.si_signo, child.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, info.si_signo)
            return exit_status(code)
        finally:
            # drop signals that arrived while runc was exiting: they were meant for it
            while signal.sigtimedwait(wanted, 0) is not None:
                pass
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _tail(path: Path, limit: int = 400) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    lines = [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""
