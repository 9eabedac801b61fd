"""The lean TOC index: fast paths (entry conversion while parsing, clean-name shortcut,
single-chunk files) must accept and reject exactly what the thorough paths do."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest

from ipfsnap.estargz import InvalidTOC, UnsafeEntry
from ipfsnap.estargz.reader import _checked_name, _fast_name
from ipfsnap.estargz.toc import _entry_checked, entry_from_json, parse_toc_json
from ipfsnap.estargz.types import DEFAULT_LIMITS
from tests.estargz.helpers import Item, build_bytes, make_tar, open_bytes, with_toc

D = "sha256:" + hashlib.sha256(b"x").hexdigest()
E = "sha256:" + hashlib.sha256(b"y").hexdigest()


@pytest.fixture(scope="module")
def sample() -> bytes:
    items = [Item("a", "dir"), Item("a/f", data=b"0123456789" * 300), Item("g", data=b"x")]
    blob, _ = build_bytes(make_tar(items), chunk_size=1024)
    return blob


def _open(blob: bytes, entries: list[dict[str, Any]], **doc: Any) -> Any:
    return open_bytes(with_toc(blob, {"version": 1, "entries": entries, **doc}))


@pytest.mark.parametrize(
    "name",
    [
        "a", "a/b", "a/b/", "./a", "a//b", "a/./b", ".hidden", "a/.b/", "a/b/.", "./",
        "", ".", "..x", "a/..x", "x" * 1024, "x" * 1025, "é" * 1024, "a/b//", "/a", "a/../b",
        "..", "a\x00b",
    ],
)
def test_fast_name_agrees_with_the_checked_path(name: str) -> None:
    limits = DEFAULT_LIMITS
    fast = _fast_name(name, limits.max_name_length // 4)
    try:
        slow: str | Exception = _checked_name(name, "t", limits)
    except (UnsafeEntry, InvalidTOC) as exc:
        slow = exc
    if fast is None:
        return  # the caller takes the checked path
    assert fast == slow


@pytest.mark.parametrize(
    "d",
    [
        {"name": "a", "type": "reg", "size": 3, "mode": 420, "digest": D, "chunkDigest": D},
        {"name": "a", "type": "reg", "size": None, "modtime": None, "uid": 70000},
        {"name": "a", "type": "reg", "size": 1, "digest": D, "chunkDigest": E, "offset": 9},
        {"name": "a", "type": "dir", "xattrs": {"user.k": "dmFs"}, "unknown": [1, 2]},
        {"name": "a", "type": "char", "devMajor": 1, "devMinor": 3, "userName": "root"},
        {"name": "a", "type": "reg", "size": 1 << 63},
        {"name": "a", "type": "reg", "size": (1 << 63) - 1},
        {"name": "a", "type": "reg", "mode": False},
        {"name": "a", "type": "reg", "chunkDigest": "sha256:00"},
        {"name": "a", "type": "reg", "digest": D.upper()},
        {"name": "a", "type": "reg", "userName": 5},
        {"name": "a", "type": "reg", "xattrs": {"k": 1}},
        {"name": "a", "type": ["reg"]},
        {"name": None, "type": "reg"},
    ],
)
def test_fast_entry_conversion_agrees_with_the_checked_one(d: dict[str, Any]) -> None:
    try:
        want: object = _entry_checked(d, 0)
    except InvalidTOC:
        want = InvalidTOC
    try:
        got: object = entry_from_json(d, 0, {})
    except InvalidTOC:
        got = InvalidTOC
    assert got == want
    # and through the parser's object hook, inside a document
    doc = json.dumps({"version": 1, "entries": [d]})
    try:
        parsed: object = parse_toc_json(doc.encode(), "b", 10)[0]
    except InvalidTOC:
        parsed = InvalidTOC
    assert parsed == want


def test_xattrs_that_look_like_an_entry_stay_xattrs(sample: bytes) -> None:
    # "fifo" is valid base64, so this xattr map reads like an entry object to a parser
    x = {"name": "YQ==", "type": "fifo"}
    idx = _open(sample, [{"name": "d", "type": "dir", "mode": 493, "xattrs": x}])
    assert idx.entry("d").xattrs == {"name": b"a", "type": base64.b64decode("fifo")}


def test_entry_like_document_keys_are_ignored(sample: bytes) -> None:
    idx = _open(sample, [{"name": "d", "type": "dir", "mode": 493}], name="x", type="reg", size=1)
    assert [p for p, _ in idx.walk()] == ["", "d"]


def test_index_cleans_names_and_toc_entries_keep_them_as_written(sample: bytes) -> None:
    entries: list[dict[str, Any]] = [
        {"name": "./d/", "type": "dir", "mode": 493},
        {"name": "d//e/", "type": "dir", "mode": 488},
        {"name": ".hidden", "type": "symlink", "linkName": "d"},
        {"name": "d/./s", "type": "symlink", "linkName": "../x"},
    ]
    idx = _open(sample, entries)
    assert [p for p, _ in idx.walk()] == ["", ".hidden", "d", "d/e", "d/s"]
    assert idx.entry("d/e").mode == 488 and idx.entry("d").name == "d"
    assert [e.name for e in idx.toc_entries] == [e["name"] for e in entries]
    assert len(idx) == 4


def test_repeated_hardlink_name_is_counted_once(sample: bytes) -> None:
    real = open_bytes(sample)
    g = real.chunks("g")[0]
    entries: list[dict[str, Any]] = [
        {"name": "g", "type": "reg", "size": 1, "offset": g.offset, "digest": g.chunk_digest},
        {"name": "h", "type": "hardlink", "linkName": "g"},
        {"name": "h", "type": "hardlink", "linkName": "g"},
    ]
    idx = _open(sample, entries)
    assert idx.nlink("g") == 2 and idx.nlink("h") == 2 and idx.entry("h") is idx.entry("g")


def test_shadowed_duplicate_chunks_stay_in_all_chunks(sample: bytes) -> None:
    real = open_bytes(sample)
    g, f = real.chunks("g")[0], real.chunks("a/f")[0]
    entries: list[dict[str, Any]] = [
        {"name": "g", "type": "reg", "size": 1, "offset": g.offset, "chunkDigest": g.chunk_digest},
        {"name": "g", "type": "reg", "size": 1024, "offset": f.offset,
         "chunkDigest": f.chunk_digest},
    ]
    idx = _open(sample, entries)
    assert idx.chunks("g")[0].chunk_digest == f.chunk_digest
    assert sorted(c.chunk_digest for _, c in idx.all_chunks) == sorted(
        [g.chunk_digest, f.chunk_digest]
    )
    # the single-entry fast path ends each extent where the next listed member starts
    assert idx.chunks("g")[0].end == min(o for o in (g.offset, idx.toc_offset) if o > f.offset)
    assert idx.chunks("g")[0].end != f.end  # (the TOC above no longer lists a/f's chunks)
