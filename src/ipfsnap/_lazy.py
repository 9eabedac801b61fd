"""Lazy package namespaces (PEP 562), so ``import ipfsnap.<package>`` stays cheap.

A package ``__init__`` that re-exports its public names eagerly makes every user pay for
every submodule: ``from ipfsnap.ipfs.multiaddr import parse_api`` would load trio through
``ipfsnap.ipfs.aclient``, and the CLI would start in a second instead of a tenth of one.

A lazy package writes its re-exports once, as ordinary imports under ``if TYPE_CHECKING:``
(so type checkers see every name), and calls :func:`lazy_exports`, which reads that block
from the package's source to learn which submodule defines each name; the submodule is
imported on the first access to one of its names.
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def parse_exports(init_file: str | Path) -> dict[str, str]:
    """``{name: absolute module}`` of the ``from M import N`` statements under the
    module-level ``if TYPE_CHECKING:`` blocks of ``init_file``."""
    tree = ast.parse(Path(init_file).read_text(encoding="utf-8"), str(init_file))
    where: dict[str, str] = {}
    for node in tree.body:
        if not (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Name)
            and node.test.id == "TYPE_CHECKING"
        ):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.level == 0:
                for alias in stmt.names:
                    where[alias.asname or alias.name] = stmt.module
    return where


def lazy_exports(
    package: str, init_file: str
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` (whose ``__init__`` is ``init_file``)."""
    where = parse_exports(init_file)

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        # Cache on the package so later lookups are plain attribute reads.
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__
