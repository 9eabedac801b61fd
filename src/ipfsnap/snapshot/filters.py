"""A subset of containerd's filter syntax, for :meth:`SnapshotStore.walk`.

``filter := selector ("," selector)*`` (all must match); several filter strings match when
any one does. ``selector := fieldpath [op value]`` with ``op`` one of ``==``, ``!=``, ``~=``
(regular expression search); without an operator the field must be present and non-empty.
``fieldpath := field ("." field)*``, a field being an identifier or a double-quoted string
(``labels."containerd.io/snapshot.ref"``); values are identifiers-like words or
double-quoted strings with backslash escapes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ipfsnap.snapshot.errors import SnapshotInvalidArgument
from ipfsnap.snapshot.types import Info

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
# An unquoted value runs until a separator or space.
_BARE_VALUE = re.compile(r"[^\s,\"]+")
_OPS = ("==", "!=", "~=")


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    op: str  # "" = presence
    value: str


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> SnapshotInvalidArgument:
        return SnapshotInvalidArgument(f"filter {self.text!r}: {what} at offset {self.pos}")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def quoted(self) -> str:
        assert self.text[self.pos] == '"'
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c == "\\" and self.pos + 1 < len(self.text):
                out.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            if c == '"':
                self.pos += 1
                return "".join(out)
            out.append(c)
            self.pos += 1
        raise self.fail("unterminated quoted string")

    def field(self) -> str:
        self.skip_ws()
        if self.pos < len(self.text) and self.text[self.pos] == '"':
            return self.quoted()
        m = _IDENT.match(self.text, self.pos)
        if not m:
            raise self.fail("expected a field name")
        self.pos = m.end()
        return m.group()

    def value(self) -> str:
        self.skip_ws()
        if self.pos < len(self.text) and self.text[self.pos] == '"':
            return self.quoted()
        m = _BARE_VALUE.match(self.text, self.pos)
        if not m:
            raise self.fail("expected a value")
        self.pos = m.end()
        return m.group()

    def selector(self) -> Selector:
        path = [self.field()]
        while self.pos < len(self.text) and self.text[self.pos] == ".":
            self.pos += 1
            path.append(self.field())
        self.skip_ws()
        op = self.text[self.pos : self.pos + 2]
        if op in _OPS:
            self.pos += 2
            return Selector(tuple(path), op, self.value())
        return Selector(tuple(path), "", "")

    def parse(self) -> list[Selector]:
        sels = [self.selector()]
        while True:
            self.skip_ws()
            if self.pos >= len(self.text):
                return sels
            if self.text[self.pos] != ",":
                raise self.fail("expected ',' or end")
            self.pos += 1
            sels.append(self.selector())


def _field_value(info: Info, path: tuple[str, ...]) -> str | None:
    head = path[0]
    if head == "labels":
        if len(path) == 1:
            return None
        return info.labels.get(".".join(path[1:]))
    if len(path) != 1:
        return None
    if head == "name":
        return info.name
    if head == "kind":
        return str(info.kind)
    if head == "parent":
        return info.parent
    return None


def _match(sel: Selector, info: Info) -> bool:
    value = _field_value(info, sel.fieldpath)
    if sel.op == "":
        return bool(value)
    if sel.op == "==":
        return value == sel.value
    if sel.op == "!=":
        return value != sel.value
    return value is not None and re.search(sel.value, value) is not None


def compile_filters(filters: Sequence[str]) -> Callable[[Info], bool]:
    """Compile filter strings into a predicate; no (or only empty) filters match all."""
    if isinstance(filters, str):
        filters = [filters]
    alternatives: list[list[Selector]] = []
    for text in filters:
        if not text.strip():
            continue
        sels = _Parser(text).parse()
        for s in sels:
            if s.op == "~=":
                try:
                    re.compile(s.value)
                except re.error as exc:
                    raise SnapshotInvalidArgument(
                        f"filter {text!r}: bad regular expression {s.value!r}: {exc}"
                    ) from exc
        alternatives.append(sels)
    if not alternatives:
        return lambda info: True

    def predicate(info: Info) -> bool:
        return any(all(_match(s, info) for s in alt) for alt in alternatives)

    return predicate
