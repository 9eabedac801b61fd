"""Progress lines for long work (push, pull, conversion).

Shown on stderr only when stderr is a terminal; silent when piped, so scripts see only results
on stdout. Library code takes a :class:`Progress` (or ``None``) and never prints itself.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Protocol, TextIO


class Progress(Protocol):
    """What library code reports to; the CLI decides whether anything is shown."""

    def update(self, key: str, status: str, done: int = 0, total: int = 0) -> None: ...

    def finish(self, key: str, status: str) -> None: ...


class NullProgress:
    """Reports nowhere."""

    def update(self, key: str, status: str, done: int = 0, total: int = 0) -> None:
        return None

    def finish(self, key: str, status: str) -> None:
        return None


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


class TerminalProgress:
    """One status line per key, redrawn in place at most every ``interval`` seconds."""

    def __init__(self, stream: TextIO | None = None, interval: float = 0.1) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._interval = interval
        self._last = 0.0
        self._lock = threading.Lock()
        self._lines: dict[str, str] = {}

    def _draw(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last < self._interval:
            return
        self._last = now
        line = " | ".join(self._lines.values())[-200:]
        self._stream.write("\r\x1b[K" + line)
        self._stream.flush()

    def update(self, key: str, status: str, done: int = 0, total: int = 0) -> None:
        text = f"{key}: {status}"
        if total:
            text += f" {_human(done)}/{_human(total)}"
        elif done:
            text += f" {_human(done)}"
        with self._lock:
            self._lines[key] = text
            self._draw(False)

    def finish(self, key: str, status: str) -> None:
        with self._lock:
            self._lines.pop(key, None)
            self._stream.write(f"\r\x1b[K{key}: {status}\n")
            self._draw(True)


def progress_for(stream: TextIO | None = None) -> Progress:
    """A terminal progress when ``stream`` (default stderr) is a tty, else a silent one."""
    s = stream if stream is not None else sys.stderr
    if s.isatty():
        return TerminalProgress(s)
    return NullProgress()
