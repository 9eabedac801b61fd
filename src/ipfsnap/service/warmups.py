"""Warm-ups of pulled images' commands, run by the snapshotter between a pull and a run.

After ``ipfsnap image rpull`` with the stargz snapshotter the image's layers are mounted
lazily and nothing of its files is local. The command that will most likely run first is
the image's own (Entrypoint + Cmd, e.g. ``python3`` for a python image), and its exec reads
its files one round trip at a time (runtime/warm.py). The pull asks the snapshotter to read
them right away (the ``warm`` request): first the two files a runtime reads before any
command (``runtime.startfiles.RUNTIME_FILES``), then the command's executable, interpreters
and libraries, so they cross the network while the pull's command exits and ``ipfsnap
run`` starts; the run finds them in the chunk cache. The order matters: an IPFS peer sends
blocks in the order they were asked for, and the run's own read of ``/etc/passwd`` queued
behind the command's megabytes made the start slower, not faster (docs/benchmarks.md). A
run of another command loses nothing but the bytes read (bounded by ``[run] warm_bytes``).
The files are looked up in the layers themselves (runtime/layers.py): no container, so no
overlay mount, exists yet.

The snapshotter runs them (the pull's command exits at once) and owns the layers they read:
a layer is unmounted only after every warm-up reading it has stopped (:class:`GuardedRemote`),
so a warm-up never keeps a removed layer's mount busy. Warm-ups are bounded in number
(:data:`MAX_RUNNING`), bytes and time (:data:`DEADLINE`), and never fail anything.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ipfsnap.snapshot.types import RemoteFileSystem

log = logging.getLogger(__name__)

#: warm-ups at once: each has the warm-up's reader threads, and pulls come one at a time
#: from a user; more than a few at once means a burst of pulls whose runs are not near
MAX_RUNNING = 4
#: seconds a warm-up may run before it is stopped: a python start's files take ~1-2 s over
#: bitswap; far longer means a slow network, where the run reads for itself anyway
DEADLINE = 60.0
#: seconds a removal waits for a stopped warm-up's thread to leave (the warm-up's own stop
#: waits up to 2 s for its reads in flight first)
JOIN_TIMEOUT = 5.0


@dataclass(frozen=True)
class WarmRequest:
    """What to warm: the process an image starts by default, in its layers."""

    #: the image's top layer snapshot (for messages)
    key: str
    #: layer directories, topmost first
    layers: tuple[Path, ...]
    args: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str


class _Warmer(Protocol):
    """What is used here of runtime.warm.ExecWarmer."""

    def start(self, args: Sequence[str], env: Sequence[str], cwd: str = "/", *,
              first: Sequence[str] = ()) -> None: ...
    def wait(self, timeout: float | None = None) -> bool: ...
    def stop(self) -> object: ...


class _WarmUp:
    """One warm-up; :meth:`halt` stops it once, whoever calls first (its own thread at the
    end, or a layer's removal)."""

    def __init__(self, request: WarmRequest, warmer: _Warmer) -> None:
        self.request = request
        self.warmer = warmer
        self.thread: threading.Thread | None = None
        self._halted = False
        self._lock = threading.Lock()

    def run(self, deadline: float) -> None:
        # imported with the first warm-up: the snapshotter's start does not pay for it
        from ipfsnap.runtime.startfiles import RUNTIME_FILES

        try:
            with self._lock:
                if self._halted:  # stopped before it began (a removal right after the pull)
                    return
                # under the lock: a halt() now waits until its reader threads exist to stop
                self.warmer.start(self.request.args, self.request.env, self.request.cwd,
                                  first=RUNTIME_FILES)
            if not self.warmer.wait(deadline):
                log.info("%s: warm-up stopped after %.0f s", self.request.key, deadline)
        except Exception:  # a warm-up never fails anything
            log.exception("%s: warm-up failed", self.request.key)
        finally:
            self.halt()

    def halt(self) -> None:
        with self._lock:
            if self._halted:
                return
            self._halted = True
        # stops its reads not begun, waits (bounded) for those in flight, logs what it did
        self.warmer.stop()


def exec_warmer(request: WarmRequest, budget: int, *, start_files: bool = True) -> _Warmer:
    """The real warm-up of ``request``: runtime.warm.ExecWarmer over its layers."""
    # imported with the first warm-up: the snapshotter's start does not pay for it
    from ipfsnap.runtime.layers import LayeredTree
    from ipfsnap.runtime.warm import ExecWarmer

    return ExecWarmer(LayeredTree(request.layers), budget, name=f"pull of {request.key}",
                      start_files=start_files)


class WarmUps:
    """The running warm-ups of a snapshotter."""

    def __init__(self, budget: int, *, max_running: int = MAX_RUNNING,
                 deadline: float = DEADLINE,
                 make_warmer: Callable[[WarmRequest, int], _Warmer] | None = None) -> None:
        self.budget = budget
        self._make_warmer = make_warmer or exec_warmer
        self.max_running = max_running
        self.deadline = deadline
        self._lock = threading.Lock()
        self._running: list[_WarmUp] = []
        self._closed = False

    def start(self, request: WarmRequest) -> bool:
        """Begin warming ``request`` in the background; False when it is not started (no
        budget, no command, too many running, or shutting down)."""
        if self.budget <= 0 or not request.args or not request.layers:
            return False
        with self._lock:
            if self._closed or len(self._running) >= self.max_running:
                log.info("%s: not warmed (%s)", request.key,
                         "stopping" if self._closed else f"{len(self._running)} running")
                return False
            warm = _WarmUp(request, self._make_warmer(request, self.budget))
            thread = warm.thread = threading.Thread(target=self._run, args=(warm,),
                                                    daemon=True, name=f"warm {request.key[:19]}")
            self._running.append(warm)
        thread.start()
        return True

    def _run(self, warm: _WarmUp) -> None:
        try:
            warm.run(self.deadline)
        finally:
            with self._lock:
                self._running.remove(warm)

    def stop_reading(self, layer: Path) -> None:
        """Stop (and wait for) every warm-up reading ``layer``: before it is unmounted."""
        self._stop([w for w in self._snapshot() if layer in w.request.layers])

    def stop_all(self) -> None:
        """Stop every warm-up and refuse new ones (the snapshotter is stopping)."""
        with self._lock:
            self._closed = True
        self._stop(self._snapshot())

    def running(self) -> list[WarmRequest]:
        return [w.request for w in self._snapshot()]

    def _snapshot(self) -> list[_WarmUp]:
        with self._lock:
            return list(self._running)

    @staticmethod
    def _stop(warms: Sequence[_WarmUp]) -> None:
        for w in warms:
            w.halt()
        for w in warms:
            # halt() waited (bounded) for the reads in flight; the thread leaves right after
            # (bounded too: a read stuck in a layer's filesystem is left to its thread, and
            # the unmount then detaches the busy layer)
            if w.thread is not None:
                w.thread.join(JOIN_TIMEOUT)


class GuardedRemote:
    """A ``RemoteFileSystem`` that stops the warm-ups reading a layer before unmounting it."""

    def __init__(self, remote: RemoteFileSystem, warmups: WarmUps) -> None:
        self.remote = remote
        self.warmups = warmups

    def mount(self, mountpoint: Path, labels: Mapping[str, str]) -> None:
        self.remote.mount(mountpoint, labels)

    def check(self, mountpoint: Path, labels: Mapping[str, str]) -> None:
        self.remote.check(mountpoint, labels)

    def unmount(self, mountpoint: Path) -> None:
        self.warmups.stop_reading(mountpoint)
        self.remote.unmount(mountpoint)
