"""TOC JSON: the reference's layout, and strict parsing of untrusted documents."""

from __future__ import annotations

import json

import pytest

from ipfsnap.estargz import InvalidTOC, TOCEntry, TooManyEntries
from ipfsnap.estargz.toc import entry_from_json, entry_to_json, parse_toc_json, toc_json

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
