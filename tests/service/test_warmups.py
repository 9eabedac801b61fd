"""service/warmups.py: warm-ups of pulled images' commands: bounded, stopped before a layer
they read is unmounted (and only those), all stopped at shutdown; the real warm-up over
layer directories reads the start files first, then the command."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from ipfsnap.runtime.layers import LayeredTree
from ipfsnap.runtime.startfiles import RUNTIME_FILES
from ipfsnap.runtime.warm import ExecWarmer, WarmStats
from ipfsnap.service.warmups import GuardedRemote, WarmRequest, WarmUps


class GatedWarmer:
    """Records what it was asked; its reads "run" until stopped or released."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.release = threading.Event()
        self.started = threading.Event()
        self.stops = 0
        self.args: tuple[Sequence[str], Sequence[str]] | None = None

    def start(self, args: Sequence[str], env: Sequence[str], cwd: str = "/", *,
              first: Sequence[str] = ()) -> None:
        self.args = (list(args), list(first))
        self.started.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.release.wait(timeout)

    def stop(self) -> object:
        self.stops += 1
        self.events.append("warm-up stopped")
        self.release.set()
        return None


class RecordingRemote:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def mount(self, mountpoint: Path, labels: Mapping[str, str]) -> None:
        self.events.append(f"mount {mountpoint.name}")

    def check(self, mountpoint: Path, labels: Mapping[str, str]) -> None:
        self.events.append(f"check {mountpoint.name}")

    def unmount(self, mountpoint: Path) -> None:
        self.events.append(f"unmount {mountpoint.name}")


def request(key: str, *layers: str, args: tuple[str, ...] = ("python3",)) -> WarmRequest:
    return WarmRequest(key, tuple(Path("/snap") / n for n in layers), args, ("PATH=/bin",), "/")


@pytest.fixture
def setup() -> tuple[WarmUps, list[str], list[GatedWarmer]]:
    events: list[str] = []
    warmers: list[GatedWarmer] = []

    def make(req: WarmRequest, budget: int) -> GatedWarmer:
        warmers.append(GatedWarmer(events))
        return warmers[-1]

    return WarmUps(1 << 20, make_warmer=make), events, warmers


def test_a_layer_is_unmounted_only_after_its_warm_ups_stopped(
        setup: tuple[WarmUps, list[str], list[GatedWarmer]]) -> None:
    warmups, events, warmers = setup
    assert warmups.start(request("a", "3", "2", "1"))
    assert warmups.start(request("b", "9"))
    for w in warmers:
        assert w.started.wait(10)
    assert warmers[0].args == (["python3"], list(RUNTIME_FILES))
    remote = GuardedRemote(RecordingRemote(events), warmups)
    remote.mount(Path("/snap/4"), {})
    remote.unmount(Path("/snap/2"))
    # the warm-up reading layer 2 stopped (once) before the unmount; the other one runs on
    assert events == ["mount 4", "warm-up stopped", "unmount 2"]
    assert warmers[0].stops == 1 and warmers[1].stops == 0
    assert [r.key for r in warmups.running()] == ["b"]
    warmups.stop_all()
    assert warmers[1].stops == 1 and warmups.running() == []
    assert not warmups.start(request("c", "1"))  # stopping: no new warm-up


def test_bounds_and_nothing_to_do(setup: tuple[WarmUps, list[str], list[GatedWarmer]]) -> None:
    warmups, _, warmers = setup
    assert not warmups.start(request("none", "1", args=()))
    assert not warmups.start(WarmRequest("nolayers", (), ("sh",), (), "/"))
    for i in range(warmups.max_running):
        assert warmups.start(request(f"k{i}", str(i)))
    assert not warmups.start(request("one-too-many", "9"))
    warmers[0].release.set()  # the first one ends by itself: room for another
    for _ in range(100):
        if len(warmups.running()) < warmups.max_running:
            break
        threading.Event().wait(0.05)
    assert warmups.start(request("next", "8"))
    warmups.stop_all()
    assert all(w.stops == 1 for w in warmers)  # once each, whoever stopped it
    assert WarmUps(0).start(request("nobudget", "1")) is False


def test_a_warm_up_ends_by_itself_at_its_deadline() -> None:
    events: list[str] = []
    w = GatedWarmer(events)
    warmups = WarmUps(1 << 20, deadline=0.05, make_warmer=lambda r, b: w)
    assert warmups.start(request("slow", "1"))
    for _ in range(200):
        if not warmups.running():
            break
        threading.Event().wait(0.05)
    assert warmups.running() == [] and w.stops == 1


def test_the_real_warm_up_reads_start_files_then_the_command(tmp_path: Path) -> None:
    top, low = tmp_path / "top", tmp_path / "low"
    (low / "etc").mkdir(parents=True)
    (low / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (low / "etc/group").write_text("root:x:0:\n")
    (low / "usr/bin").mkdir(parents=True)
    (low / "usr/bin/interp").write_bytes(b"\0" * 5000)
    (top / "bin").mkdir(parents=True)
    (top / "bin/prog").write_text("#!/usr/bin/interp -x\n")
    (top / "bin/prog").chmod(0o755)
    done: list[WarmStats] = []

    class Keep(ExecWarmer):
        def stop(self, timeout: float = 2.0) -> WarmStats:
            done.append(super().stop(timeout))
            return done[-1]

    def make(req: WarmRequest, budget: int) -> Keep:
        return Keep(LayeredTree(req.layers), budget, threads=1)

    warmups = WarmUps(1 << 20, make_warmer=make)
    assert warmups.start(WarmRequest("img", (top, low), ("prog",), ("PATH=/bin",), "/"))
    for _ in range(200):
        if done:
            break
        threading.Event().wait(0.05)
    stats = done[0]
    # one reader thread: the order is the order asked
    assert stats.paths == ("/etc/passwd", "/etc/group", "/bin/prog", "/usr/bin/interp")
    assert stats.bytes == 26 + 10 + 21 + 5000


def test_a_warm_up_stopped_before_it_began_never_starts() -> None:
    """A removal right after the pull can stop a warm-up whose thread has not run yet: it
    must not start reading (or leave reader threads behind) afterwards."""
    events: list[str] = []
    w = GatedWarmer(events)
    warmups = WarmUps(1 << 20, make_warmer=lambda r, b: w)
    gate = threading.Lock()
    gate.acquire()
    real_run = warmups._run

    def held_run(warm: object) -> None:
        with gate:  # the warm-up's thread waits here until the stop below is done
            real_run(warm)  # type: ignore[arg-type]

    warmups._run = held_run  # type: ignore[method-assign]
    assert warmups.start(request("early", "1"))
    running = warmups._snapshot()
    for warm in running:
        warm.halt()
    gate.release()
    for warm in running:
        assert warm.thread is not None
        warm.thread.join(10)
    assert w.stops == 1 and w.args is None  # stopped once, never started
    assert warmups.running() == []
