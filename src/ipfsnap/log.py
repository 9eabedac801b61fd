"""Logging set-up for the CLI and daemons: one handler on stderr, a logger per module."""

from __future__ import annotations

import logging
import sys


def setup_logging(verbosity: int = 0, *, daemon: bool = False) -> None:
    """Configure the root logger. ``verbosity``: 0 warnings, 1 info, 2+ debug."""
    level = logging.WARNING
    if verbosity == 1 or (daemon and verbosity == 0):
        level = logging.INFO
    elif verbosity >= 2:
        level = logging.DEBUG
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if daemon or verbosity else (
        "%(levelname)s: %(message)s"
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
