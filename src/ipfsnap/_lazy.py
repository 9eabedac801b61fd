"""Lazy package namespaces (PEP 562), so ``import ipfsnap.<package>`` stays cheap.

A package ``__init__`` that re-exports its public names eagerly makes every user pay for
every submodule: ``from ipfsnap.ipfs.multiaddr import parse_api`` would load trio through
``ipfsnap.ipfs.aclient``, and the CLI would start in a second instead of a tenth of one.
Packages instead list which submodule defines each name; the submodule is imported on the
first access to one of its names. Type checkers see the plain imports (under
``TYPE_CHECKING``), so ``mypy --strict`` keeps checking every name.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, Iterable[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``.

    ``exports`` maps a submodule (relative, e.g. ``".client"``) to the names it defines that
    the package re-exports.
    """
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        # Cache on the package so later lookups are plain attribute reads.
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__
