"""TOC JSON: the reference's layout, and strict parsing of untrusted documents."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipfsnap.estargz import InvalidTOC, TOCEntry, TooManyEntries
from ipfsnap.estargz import toc as toc_module
from ipfsnap.estargz.toc import (
    _digests_ok,
    decode_entries,
    decode_entries_fast,
    entry_from_json,
    entry_to_json,
    parse_toc_json,
    toc_json,
)

D = "sha256:" + "ab" * 32


def test_layout_is_tab_indented_go_order_no_trailing_newline() -> None:
    e = TOCEntry(
        name="a<b>&c",
        type="reg",
        size=5,
        mode=0o644,
        offset=77,
        digest=D,
        chunk_digest=D,
        xattrs={"user.z": b"\x00\xff", "user.a": b"x"},
    )
    out = toc_json([e])
    assert not out.endswith(b"\n")
    assert out.startswith(b'{\n\t"version": 1,\n\t"entries": [\n\t\t{\n\t\t\t"name": ')
    text = out.decode()
    # Go escapes HTML characters in strings
    assert '"a\\u003cb\\u003e\\u0026c"' in text
    keys = list(json.loads(out)["entries"][0])
    assert keys == ["name", "type", "size", "mode", "offset", "xattrs", "digest", "chunkDigest"]
    assert list(json.loads(out)["entries"][0]["xattrs"]) == ["user.a", "user.z"]


def test_empty_toc() -> None:
    assert toc_json([]) == b'{\n\t"version": 1,\n\t"entries": []\n}'


def test_entry_round_trip_every_field() -> None:
    e = TOCEntry(
        name="x",
        type="chunk",
        size=1,
        modtime="2020-01-01T00:00:00Z",
        link_name="l",
        mode=0o4755,
        uid=70000,
        gid=70001,
        user_name="u",
        group_name="g",
        dev_major=8,
        dev_minor=1,
        xattrs={"k": b"\x01"},
        digest=D,
        offset=9,
        chunk_offset=4096,
        chunk_size=4096,
        chunk_digest=D,
        inner_offset=12,
    )
    assert entry_from_json(json.loads(json.dumps(entry_to_json(e))), 0) == e


def test_non_utf8_names_become_replacement_chars() -> None:
    e = TOCEntry(name="bad\udcff", type="reg")
    assert "\ufffd" in json.loads(toc_json([e]))["entries"][0]["name"]


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "reg"},
        {"name": 1, "type": "reg"},
        {"name": "a", "type": "socket"},
        {"name": "a", "type": "reg", "size": -1},
        {"name": "a", "type": "reg", "size": 1.5},
        {"name": "a", "type": "reg", "size": True},
        {"name": "a", "type": "reg", "digest": "md5:00"},
        {"name": "a", "type": "reg", "xattrs": {"k": "!!"}},
        {"name": "a", "type": "reg", "xattrs": []},
        "not an object",
    ],
)
def test_bad_entries_are_rejected(bad: object) -> None:
    with pytest.raises(InvalidTOC):
        parse_toc_json(json.dumps({"version": 1, "entries": [bad]}).encode(), "b", 10)


@pytest.mark.parametrize(
    "doc",
    [b"", b"[]", b'{"version": 1}', b'{"entries": []}', b"{", b'{"version":NaN,"entries":[]}'],
)
def test_bad_documents_are_rejected(doc: bytes) -> None:
    with pytest.raises(InvalidTOC):
        parse_toc_json(doc, "b", 10)


def test_entry_count_limit() -> None:
    doc = json.dumps(
        {"version": 1, "entries": [{"name": str(i), "type": "dir"} for i in range(11)]}
    )
    with pytest.raises(TooManyEntries):
        parse_toc_json(doc.encode(), "b", 10)
    assert len(parse_toc_json(doc.encode(), "b", 11)) == 11


def test_hand_formatting_equals_json_module() -> None:
    entries = [
        TOCEntry(name="d", type="dir", mode=0o755, modtime="2020-01-01T00:00:00Z"),
        TOCEntry(
            name='q"\\\n\t\x01é文',
            type="reg",
            size=3,
            offset=5,
            digest=D,
            chunk_digest=D,
            xattrs={"user.a": b"\x00", "user.b": b"xyz"},
            uid=1,
            user_name="u",
        ),
        TOCEntry(name="c", type="chunk", offset=9, chunk_offset=4, chunk_size=4, chunk_digest=D),
    ]
    doc = {"version": 1, "entries": [entry_to_json(e) for e in entries]}
    assert toc_json(entries) == json.dumps(doc, indent="\t", ensure_ascii=False).encode()


# -- the msgspec fast path: a subset of the stdlib path, with the same values --------------

def _stdlib(doc: bytes, limit: int = 1000) -> list[TOCEntry] | str:
    """What the stdlib path alone makes of a document (entries, or the error class)."""
    try:
        text = doc.decode(json.detect_encoding(doc), "surrogatepass")
        return decode_entries(text, "b", limit)
    except (InvalidTOC, UnicodeDecodeError) as exc:
        return type(exc).__name__


def _check_same(doc: bytes, limit: int = 1000) -> bool:
    """The fast path's result equals the stdlib's whenever it gives one; True if it did."""
    fast = decode_entries_fast(doc, limit)
    if fast is None:
        return False
    assert fast == _stdlib(doc, limit)
    return True


@pytest.mark.parametrize(
    "doc, taken",
    [
        (toc_json([TOCEntry(name="a", type="reg", size=3, offset=5, digest=D, chunk_digest=D,
                            xattrs={"user.x": b"\x00\xff"}, modtime="2020-01-01T00:00:00Z")]),
         True),
        (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "size": 1, "size": 2}]}', True),
        (b'{"version": 99999999999999999999999, "entries": []}', True),
        (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "size": null}]}', False),
        (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "extra": {"name": "b"}}]}',
         False),
        (b'{"version": 1, "entries": [{"name": "a", "type": "reg"}], "name": "x"}', False),
        (b'{"version": 1, "entries": [{"name": "a\\udcff", "type": "reg"}]}', False),
        (b'{"version": 1, "entries": [{"name": "a", "type": "sock"}]}', False),
        (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "digest": "sha256:AB"}]}',
         False),
        (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "xattrs": {"k": "!!"}}]}',
         False),
        (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "size": 1e2}]}', False),
        (b'\xef\xbb\xbf{"version": 1, "entries": []}', False),
        ('{"version": 1, "entries": []}'.encode("utf-16"), False),
    ],
)
def test_fast_path_is_a_subset_of_the_stdlib_path(doc: bytes, taken: bool) -> None:
    assert _check_same(doc) is taken
    # whatever path is taken, parse_toc_json gives the stdlib path's verdict
    want = _stdlib(doc)
    try:
        got: list[TOCEntry] | str = parse_toc_json(doc, "b", 1000)
    except InvalidTOC as exc:
        got = type(exc).__name__
    assert got == want


def test_fast_path_leaves_the_entry_limit_to_the_stdlib_path() -> None:
    entries = [TOCEntry(name=str(i), type="dir") for i in range(11)]
    assert decode_entries_fast(toc_json(entries), 10) is None
    assert _check_same(toc_json(entries), 11)


def test_digest_check_of_the_fast_path() -> None:
    ok = "sha256:" + "0123456789abcdef" * 4
    assert _digests_ok([ok, ok, "sha256:" + "f" * 64])
    assert _digests_ok([])
    for bad in ([ok[:-1], "0" + ok], [ok.upper()], [ok + "\n"], ["sha256:" + "g" * 64],
                ["sha256:" + "a" * 63 + "é"], [ok[:-1] + " "], ["sha512:" + "a" * 64]):
        assert not _digests_ok(bad), bad


_names = st.text(st.characters(codec="utf-8"), max_size=8)
_ints = st.one_of(st.integers(0, 2**63 - 1), st.integers(-5, -1), st.just(2**63),
                  st.floats(allow_nan=False, allow_infinity=False), st.none(), st.booleans())
_strs = st.one_of(_names, st.none(), st.integers(0, 9))
_digests = st.one_of(st.just(""), st.just(D), st.just(D.upper()), _names)
_b64 = st.one_of(st.binary(max_size=6).map(lambda b: base64.b64encode(b).decode()), _names)
_entry = st.fixed_dictionaries(
    {"name": _names, "type": st.sampled_from(["dir", "reg", "chunk", "hardlink", "x"])},
    optional={"size": _ints, "mode": _ints, "offset": _ints, "modtime": _strs,
              "linkName": _strs, "userName": _strs, "digest": _digests,
              "chunkDigest": _digests, "xattrs": st.dictionaries(_names, _b64, max_size=2),
              "unknownField": _ints},
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_entry, max_size=5), st.sampled_from([None, "\t", 1]))
def test_fast_path_agrees_with_the_stdlib_path(entries: list[dict[str, object]],
                                               indent: str | int | None) -> None:
    doc = json.dumps({"version": 1, "entries": entries}, indent=indent,
                     ensure_ascii=False).encode("utf-8", "surrogatepass")
    _check_same(doc)


def _writers_doc(n: int) -> bytes:
    return toc_json([
        TOCEntry(name=f"d/f{i}", type="reg", size=1, offset=10 + i, digest=D, chunk_digest=D,
                 user_name="root", group_name="staff", xattrs={"user.i": bytes([i % 256])})
        for i in range(n)
    ])


def test_big_tocs_are_decoded_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(toc_module, "_SLICE", 300)  # many slices of a small document
    doc = _writers_doc(40)
    entries = decode_entries_fast(doc, 1000)
    assert entries is not None and entries == _stdlib(doc)
    # equal strings of different entries are one object (memory of big TOCs)
    assert all(e.user_name is entries[0].user_name for e in entries)
    assert all(e.chunk_digest is e.digest for e in entries)
    # a document of that layout whose cut falls inside an entry is left to the stdlib path
    nested = doc.replace(b'"type": "reg",', b'"type": "reg", "x": [\n\t\t{"a": 1},\n\t\t{}],', 1)
    assert decode_entries_fast(nested, 1000) is None
    assert parse_toc_json(nested, "b", 1000) == _stdlib(nested) == entries  # unknown: ignored
    # and so is one with anything after the entries array
    trailing = doc[: -len(b"\n\t]\n}")] + b'], "y": [\n\t]\n}'
    assert decode_entries_fast(trailing, 1000) is None
