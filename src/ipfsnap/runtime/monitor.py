"""The monitor of a detached container: starts it with runc and records how it exits.

``runc run -d`` starts the container and exits; the container's init is then an orphan whose
exit status only its new parent can read. The monitor is that parent, as containerd's shim
is: a process of its own session that marks itself a *child subreaper*
(``prctl(PR_SET_CHILD_SUBREAPER)``), so the orphaned init is re-parented to it rather than
to pid 1; it waits for the init and writes the exit status into the container's record
(``state.json``: ``exit_code``, ``finished``), where ``ipfsnap ps`` reads it.

Run as ``python -m ipfsnap.runtime.monitor STATE_DIR ID RUNC READY_FD`` by
:meth:`ContainerStore.run` (it forks once more and the first process exits at once), which
waits for one line on ``READY_FD``: ``ok PID`` once runc
has started the container, or ``error MESSAGE``. Its own messages go to ``monitor.log`` in
the container's directory. ``ipfsnap rm`` may delete the container while the monitor waits:
both take the container directory's ``flock`` around writing/removing it (see
:func:`ipfsnap.runtime.containers.locked_dir`), so a late exit status never recreates a
removed container.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from ipfsnap.errors import IpfsnapError

log = logging.getLogger(__name__)

#: prctl option: orphaned descendants are re-parented to this process (linux/prctl.h)
PR_SET_CHILD_SUBREAPER = 36
#: seconds between checks of an init that is not our child (subreaper unavailable)
_POLL = 0.5


def _become_subreaper() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)  # libc; find_library would run ldconfig
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_CHILD_SUBREAPER): %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def _wait_init(pid: int) -> int | None:
    """Reap ``pid`` (and any other orphan handed to us); its shell-style exit status, or None
    when it is not our child (then wait until it is gone: the status is lost)."""
    from ipfsnap.runtime.runc import exit_status

    while True:
        try:
            reaped, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
        if reaped == pid:
            return exit_status(os.waitstatus_to_exitcode(status))
    while Path(f"/proc/{pid}").exists():
        time.sleep(_POLL)
    return None


def record_exit(state_dir: Path, container_id: str, code: int | None) -> None:
    """Write the exit status into the container's record, unless it was removed meanwhile."""
    from ipfsnap.runtime.containers import RECORD, ContainerStore, locked_dir

    store = ContainerStore(state_dir)
    with locked_dir(store.path(container_id)) as exists:
        if not exists or not (store.path(container_id) / RECORD).exists():
            log.info("container %s: removed before it exited", container_id)
            return
        record = store.load(container_id)
        record.exit_code = code
        record.finished = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        store.save(record)


def monitor(state_dir: Path, container_id: str, runc_binary: str, ready_fd: int) -> int:
    # imported here: ``python -m`` runs this module, which the package must not import first
    from ipfsnap.runtime.containers import ContainerStore

    store = ContainerStore(state_dir, runc_binary)
    d = store.path(container_id)
    ready = os.fdopen(ready_fd, "w", encoding="utf-8")
    try:
        _become_subreaper()
        pid = store.runc.run_detached(container_id, d, d / "log")
    except IpfsnapError as exc:
        ready.write(f"error {exc}\n")
        ready.flush()
        # Exit without closing: the pipe closes only when this process is gone, and the
        # starting command reads it to EOF after an error, so no monitor of a failed start
        # outlives the command (a normal return would close it first, then finalize).
        logging.shutdown()
        os._exit(1)
    ready.write(f"ok {pid}\n")
    ready.close()
    code = _wait_init(pid)
    log.info("container %s (pid %d) exited with status %s", container_id, pid, code)
    record_exit(state_dir, container_id, code)
    return 0


def main(argv: list[str]) -> int:
    state_dir, container_id, runc_binary, ready_fd = argv
    # double fork: the starting command reaps this process at once and leaves no child
    # behind; the monitor proper (the grandchild) is re-parented when that command exits
    if os.fork() > 0:
        os._exit(0)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s monitor %(levelname)s %(message)s"
    )
    # the user's Ctrl-C or a closed terminal of the starting command must not end the monitor
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    return monitor(Path(state_dir), container_id, runc_binary, int(ready_fd))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
