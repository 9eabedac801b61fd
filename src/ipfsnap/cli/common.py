"""Shared CLI helpers: the per-invocation context and small argument parsers."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ipfsnap.errors import UsageError

if TYPE_CHECKING:
    from ipfsnap.config import Config


@dataclass
class Context:
    """What every command gets: parsed global options and the loaded configuration."""

    args: argparse.Namespace
    _config: Config | None = field(default=None, repr=False)

    @property
    def config(self) -> Config:
        if self._config is None:
            from ipfsnap.config import load_config  # tomllib: only for commands that need it

            self._config = load_config(
                config_path=self.args.config,
                state_dir=self.args.state_dir,
                ipfs_api=self.args.ipfs_api,
            )
        return self._config


Handler = Callable[[argparse.Namespace, Context], int]


def parse_bool(text: str) -> bool:
    """``--estargz=false`` style booleans."""
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_size(text: str) -> int:
    """Sizes like ``4194304``, ``4MiB``, ``512k``."""
    low = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = 1
    for suffix, m in (("k", 1 << 10), ("m", 1 << 20), ("g", 1 << 30)):
        if low.endswith(suffix):
            low, mult = low[:-1], m
            break
    try:
        value = int(low) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"size must not be negative: {text!r}")
    return value


def print_line(line: str) -> None:
    """One result line on stdout, flushed at once (scripts and tests read it as it comes)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def print_json(obj: Any) -> None:
    """Machine-readable result on stdout, one JSON document per line."""
    print_line(json.dumps(obj, sort_keys=True))


def need(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)
