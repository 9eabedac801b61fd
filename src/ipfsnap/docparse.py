"""Parse JSON and TOML documents that may be hostile, with one exception for every failure.

The standard parsers fail on hostile input in several ways, not all of them ``ValueError``:

- ``json.JSONDecodeError`` / ``tomllib.TOMLDecodeError`` (both ``ValueError``): bad syntax;
- a plain ``ValueError`` for an integer longer than Python's 4300-digit limit
  (``sys.get_int_max_str_digits``);
- ``UnicodeDecodeError`` (a ``ValueError``): JSON bytes that are not UTF-8/16/32;
- ``RecursionError`` (*not* a ``ValueError``): arrays or objects nested a few thousand deep
  exhaust the interpreter's recursion limit in both parsers;
- whatever a hook passed in raises (``parse_float`` rejecting ``1e400`` ...).

:func:`parse_json` and :func:`parse_toml` turn every one of those into
:class:`MalformedDocument`, so callers catch one type and never need to know about
``RecursionError``. It subclasses ``ValueError`` (a caller's ``except ValueError`` keeps
working) and deliberately *not* :class:`ipfsnap.errors.IpfsnapError`: its message is only the
reason, without the object it was parsing, so each caller wraps it into its own error that
names the file, blob, peer or reply. An ipfsnap error a hook raises passes through as it is.

Only the standard library is imported: every package may import this module.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from typing import Any


class MalformedDocument(ValueError):
    """A document could not be parsed; ``str(exc)`` (also :attr:`reason`) says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _reason(exc: ValueError | RecursionError) -> str:
    if isinstance(exc, RecursionError):
        return f"nested too deeply ({exc})"
    return str(exc) or type(exc).__name__


def parse_json(
    data: str | bytes | bytearray,
    *,
    object_hook: Callable[[dict[str, Any]], Any] | None = None,
    parse_float: Callable[[str], Any] | None = None,
    parse_constant: Callable[[str], Any] | None = None,
) -> Any:
    """``json.loads(data, ...)`` raising only :class:`MalformedDocument` for bad input.

    Bytes are decoded as ``json.loads`` does (UTF-8, or UTF-16/32 by detection). The hooks
    are passed through; a ``ValueError`` one raises becomes the reason. Hooks left at None
    keep ``json.loads``'s fast path."""
    try:
        return json.loads(data, object_hook=object_hook, parse_float=parse_float,
                          parse_constant=parse_constant)
    except (ValueError, RecursionError) as exc:  # ValueError covers UnicodeDecodeError
        raise MalformedDocument(_reason(exc)) from exc


def parse_toml(text: str) -> dict[str, Any]:
    """``tomllib.loads(text)`` raising only :class:`MalformedDocument` for bad input."""
    try:
        return tomllib.loads(text)
    except (ValueError, RecursionError) as exc:
        raise MalformedDocument(_reason(exc)) from exc
