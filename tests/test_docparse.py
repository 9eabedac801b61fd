"""ipfsnap.docparse: every way a hostile JSON or TOML document fails is one exception type,
and valid documents parse exactly as the standard parsers do."""

from __future__ import annotations

import json
import sys
import tomllib
from typing import Any

import pytest

from ipfsnap.docparse import MalformedDocument, parse_json, parse_toml
from ipfsnap.errors import FormatError

#: far beyond any recursion limit the interpreter could be run with (default 1000)
DEEP = 100_000
#: one digit more than Python converts from text (4300 by default)
TOO_MANY_DIGITS = sys.get_int_max_str_digits() + 1


def _fails(call: Any, *args: Any, **kwargs: Any) -> MalformedDocument:
    with pytest.raises(MalformedDocument) as info:
        call(*args, **kwargs)
    exc = info.value
    assert isinstance(exc, ValueError)  # callers' `except ValueError` keeps working
    assert exc.reason == str(exc) and exc.reason
    return exc


@pytest.mark.parametrize("doc", [
    b'{"a": [1, 2.5, "x", true, null, {"b": {}}], "c": "\\u00e9"}',
    '{"a": [1, 2.5, "x", true, null, {"b": {}}], "c": "\\u00e9"}',
    bytearray(b'[1, "two", [3]]'),
    "  42 ",
    '{"big": ' + "9" * (TOO_MANY_DIGITS - 1) + "}",  # at the limit: still an int
    "[" * 500 + "]" * 500,  # nested, but well inside the recursion limit
    '"caf\u00e9"'.encode("utf-16"),  # json.loads detects UTF-16 from the BOM
])
def test_valid_json_parses_as_json_loads(doc: str | bytes | bytearray) -> None:
    assert parse_json(doc) == json.loads(doc)


def test_json_hooks_are_passed_through() -> None:
    seen: list[dict[str, Any]] = []

    def hook(d: dict[str, Any]) -> Any:
        seen.append(d)
        return tuple(sorted(d))

    got = parse_json(b'{"x": {"b": 1, "a": 2.5}, "y": NaN}', object_hook=hook,
                     parse_float=lambda s: f"float {s}", parse_constant=lambda s: f"const {s}")
    assert got == ("x", "y")
    assert seen == [{"b": 1, "a": "float 2.5"}, {"x": ("a", "b"), "y": "const NaN"}]


@pytest.mark.parametrize("doc", [
    b"[" * DEEP + b"]" * DEEP,
    "[" * DEEP,  # unterminated too: the depth is what fails first
    b'{"a":' * DEEP + b"1" + b"}" * DEEP,
])
def test_json_nested_too_deep_is_malformed(doc: str | bytes) -> None:
    exc = _fails(parse_json, doc)
    assert exc.reason.startswith("nested too deeply")
    assert isinstance(exc.__cause__, RecursionError)


def test_json_integer_over_the_digit_limit_is_malformed() -> None:
    exc = _fails(parse_json, b"[" + b"7" * TOO_MANY_DIGITS + b"]")
    assert str(sys.get_int_max_str_digits()) in exc.reason  # the limit, as Python words it


# (lone surrogates, e.g. b"\xed\xa0\x80", are let through: json.loads decodes bytes with
# "surrogatepass")
@pytest.mark.parametrize("doc", [b'"\xff"', b'{"a": "\xc3"}', b'["\x80"]'])
def test_json_bad_utf8_is_malformed(doc: bytes) -> None:
    exc = _fails(parse_json, doc)
    assert isinstance(exc.__cause__, UnicodeDecodeError)
    assert "utf-8" in exc.reason


@pytest.mark.parametrize("doc", [b"", b"{", b'{"a" 1}', b"[1,]", b"nul", b"1 2"])
def test_json_syntax_errors_are_malformed_with_the_position(doc: bytes) -> None:
    exc = _fails(parse_json, doc)
    assert isinstance(exc.__cause__, json.JSONDecodeError)
    assert "char" in exc.reason  # JSONDecodeError says where: "line 1 column 2 (char 1)"


def test_json_hook_value_error_keeps_its_text() -> None:
    def no_float(text: str) -> float:
        raise ValueError(f"number {text} out of range")

    assert _fails(parse_json, "[1e400]", parse_float=no_float).reason == \
        "number 1e400 out of range"


def test_json_hook_ipfsnap_error_passes_through() -> None:
    def refuse(name: str) -> Any:
        raise FormatError(f"non-standard number {name}")

    with pytest.raises(FormatError, match="non-standard number Infinity"):
        parse_json("[Infinity]", parse_constant=refuse)


def test_valid_toml_parses_as_tomllib() -> None:
    doc = 'a = 1\n[b]\nc = ["x", [2, 3.5]]\nd = { e = true }\n' + "f = " + "[" * 200 + \
        "]" * 200 + "\n"
    assert parse_toml(doc) == tomllib.loads(doc)


@pytest.mark.parametrize("doc", [
    "a = " + "[" * DEEP + "]" * DEEP + "\n",
    "a = " + "{ b = " * DEEP + "1" + " }" * DEEP + "\n",
])
def test_toml_nested_too_deep_is_malformed(doc: str) -> None:
    exc = _fails(parse_toml, doc)
    assert exc.reason.startswith("nested too deeply")
    assert isinstance(exc.__cause__, RecursionError)


def test_toml_integer_over_the_digit_limit_is_malformed() -> None:
    exc = _fails(parse_toml, "a = " + "7" * TOO_MANY_DIGITS + "\n")
    assert str(sys.get_int_max_str_digits()) in exc.reason


@pytest.mark.parametrize("doc", ["a = ", "[a\n", "a = 1\na = 2\n", "a = 1979-05-27T07:32:00Zz"])
def test_toml_syntax_errors_are_malformed(doc: str) -> None:
    exc = _fails(parse_toml, doc)
    assert isinstance(exc.__cause__, tomllib.TOMLDecodeError)
