"""TOC JSON: writing it as the reference does (tab indent, Go field order, omitempty) and
parsing untrusted TOC JSON into :class:`TOCEntry` objects with strict type checks."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from ipfsnap.docparse import MalformedDocument, parse_json
from ipfsnap.estargz.errors import InvalidTOC
from ipfsnap.estargz.types import ENTRY_TYPES, INT_MAX, TOCEntry

log = logging.getLogger(__name__)

TOC_VERSION = 1
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")
#: Go's encoding/json escapes these for HTML safety; we do the same so TOCs look alike
_GO_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_GO_ESCAPE_RE = re.compile("[<>&\u2028\u2029]")
_INT_MAX = INT_MAX
#: JSON string literal, non-ASCII kept as is (as Go writes it)
_STR = json.JSONEncoder(ensure_ascii=False).encode


def entry_to_json(e: TOCEntry) -> dict[str, Any]:
    """The JSON object of one entry, keys in the reference's order, empty values omitted."""
    d: dict[str, Any] = {"name": e.name, "type": e.type}
    for key, value in (
        ("size", e.size),
        ("modtime", e.modtime),
        ("linkName", e.link_name),
        ("mode", e.mode),
        ("uid", e.uid),
        ("gid", e.gid),
        ("userName", e.user_name),
        ("groupName", e.group_name),
        ("offset", e.offset),
        ("devMajor", e.dev_major),
        ("devMinor", e.dev_minor),
    ):
        if value:
            d[key] = value
    if e.xattrs:
        d["xattrs"] = {k: base64.b64encode(v).decode("ascii") for k, v in sorted(e.xattrs.items())}
    for key, value in (
        ("digest", e.digest),
        ("chunkOffset", e.chunk_offset),
        ("chunkSize", e.chunk_size),
        ("chunkDigest", e.chunk_digest),
        ("innerOffset", e.inner_offset),
    ):
        if value:
            d[key] = value
    return d


def _value(v: Any, indent: str) -> str:
    if isinstance(v, dict):
        inner = indent + "\t"
        body = ",\n".join(f"{inner}{_STR(k)}: {_STR(x)}" for k, x in v.items())
        return "{\n" + body + "\n" + indent + "}"
    return _STR(v) if isinstance(v, str) else str(v)


def toc_json(entries: Iterable[TOCEntry]) -> bytes:
    """The TOC document, tab-indented, no trailing newline (as ``json.MarshalIndent``).

    Formatted by hand: the same text as ``json.dumps(doc, indent="\t")``, several times
    faster for TOCs of 100k entries since strings go through the C encoder."""
    items = []
    for e in entries:
        fields = ",\n".join(
            f"\t\t\t{_STR(k)}: {_value(v, chr(9) * 3)}" for k, v in entry_to_json(e).items()
        )
        items.append("\t\t{\n" + fields + "\n\t\t}")
    if items:
        body = ",\n".join(items)
        text = f'{{\n\t"version": {TOC_VERSION},\n\t"entries": [\n{body}\n\t]\n}}'
    else:
        text = f'{{\n\t"version": {TOC_VERSION},\n\t"entries": []\n}}'
    text = _GO_ESCAPE_RE.sub(lambda m: _GO_ESCAPES[m.group(0)], text)
    # Names from tar headers may hold bytes that are not UTF-8 (kept as surrogates);
    # Go replaces them with U+FFFD, and so do we.
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace").encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise InvalidTOC(f"TOC JSON: non-standard number {name}")


def _int(d: dict[str, Any], key: str, where: str) -> int:
    v = d.get(key, 0)
    if v is None:
        return 0
    if type(v) is not int or not 0 <= v <= _INT_MAX:
        raise InvalidTOC(f"{where}: field {key!r} must be a non-negative integer, got {v!r}")
    return v


def _str(d: dict[str, Any], key: str, where: str) -> str:
    v = d.get(key, "")
    if v is None:
        return ""
    if not isinstance(v, str):
        raise InvalidTOC(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    return v


def _digest(d: dict[str, Any], key: str, where: str) -> str:
    v = _str(d, key, where)
    if v and not _DIGEST_RE.match(v):
        raise InvalidTOC(f"{where}: field {key!r} is not a sha256 digest: {v[:80]!r}")
    return v


def _entry_checked(d: Any, index: int) -> TOCEntry:
    """The slow, thorough conversion: exact messages for whatever is wrong."""
    where = f"TOC entry #{index}"
    if not isinstance(d, dict):
        raise InvalidTOC(f"{where}: not a JSON object")
    name = d.get("name")
    if not isinstance(name, str):
        raise InvalidTOC(f"{where}: missing or non-string name")
    where = f"TOC entry #{index} {name[:200]!r}"
    typ = d.get("type")
    if not isinstance(typ, str) or typ not in ENTRY_TYPES:
        raise InvalidTOC(f"{where}: unknown type {typ!r}")
    return TOCEntry(
        name=name,
        type=str(typ),
        size=_int(d, "size", where),
        modtime=_str(d, "modtime", where),
        link_name=_str(d, "linkName", where),
        mode=_int(d, "mode", where),
        uid=_int(d, "uid", where),
        gid=_int(d, "gid", where),
        user_name=_str(d, "userName", where),
        group_name=_str(d, "groupName", where),
        dev_major=_int(d, "devMajor", where),
        dev_minor=_int(d, "devMinor", where),
        xattrs=_xattrs(d.get("xattrs"), where),
        digest=_digest(d, "digest", where),
        offset=_int(d, "offset", where),
        chunk_offset=_int(d, "chunkOffset", where),
        chunk_size=_int(d, "chunkSize", where),
        chunk_digest=_digest(d, "chunkDigest", where),
        inner_offset=_int(d, "innerOffset", where),
    )


def _xattrs(raw_x: Any, where: str) -> dict[str, bytes]:
    xattrs: dict[str, bytes] = {}
    if raw_x is None:
        return xattrs
    if not isinstance(raw_x, dict):
        raise InvalidTOC(f"{where}: xattrs must be an object")
    for k, v in raw_x.items():
        if not isinstance(v, str):
            raise InvalidTOC(f"{where}: xattr {k!r} value must be base64 text")
        try:
            xattrs[k] = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidTOC(f"{where}: xattr {k!r} value is not base64") from None
    return xattrs


def entry_from_json(d: Any, index: int, shared: dict[str, str] | None = None) -> TOCEntry:
    """One untrusted TOC entry object as a :class:`TOCEntry`, or raise :class:`InvalidTOC`.

    The fast path checks every field with a few type/range tests and builds the entry
    directly; anything unusual (nulls, wrong types, bad digests) goes through
    :func:`_entry_checked`, which accepts or rejects exactly the same input but says
    precisely what is wrong. ``shared`` interns repeated strings (owner names, modtimes)
    across the entries of one TOC, which keeps a 100k-entry index small."""
    if d.__class__ is not dict:
        return _entry_checked(d, index)
    g = d.get
    name = g("name")
    typ = g("type")
    if name.__class__ is not str or typ.__class__ is not str or typ not in ENTRY_TYPES:
        return _entry_checked(d, index)
    size = g("size", 0)
    mode = g("mode", 0)
    uid = g("uid", 0)
    gid = g("gid", 0)
    dev_major = g("devMajor", 0)
    dev_minor = g("devMinor", 0)
    offset = g("offset", 0)
    chunk_offset = g("chunkOffset", 0)
    chunk_size = g("chunkSize", 0)
    inner_offset = g("innerOffset", 0)
    for v in (size, mode, uid, gid, dev_major, dev_minor, offset, chunk_offset, chunk_size,
              inner_offset):
        if v.__class__ is not int or v < 0 or v > _INT_MAX:
            return _entry_checked(d, index)
    modtime = g("modtime", "")
    link_name = g("linkName", "")
    user_name = g("userName", "")
    group_name = g("groupName", "")
    digest = g("digest", "")
    chunk_digest = g("chunkDigest", "")
    for s in (modtime, link_name, user_name, group_name, digest, chunk_digest):
        if s.__class__ is not str:
            return _entry_checked(d, index)
    if digest and not _DIGEST_RE.match(digest):
        return _entry_checked(d, index)
    if chunk_digest:
        if chunk_digest == digest:
            chunk_digest = digest  # one string object for both (single-chunk files)
        elif not _DIGEST_RE.match(chunk_digest):
            return _entry_checked(d, index)
    raw_x = g("xattrs")
    xattrs = {} if raw_x is None else _xattrs(raw_x, f"TOC entry #{index} {name[:200]!r}")
    if shared is not None:
        modtime = shared.setdefault(modtime, modtime)
        user_name = shared.setdefault(user_name, user_name)
        group_name = shared.setdefault(group_name, group_name)
    return TOCEntry(name, typ, size, modtime, link_name, mode, uid, gid, user_name, group_name,
                    dev_major, dev_minor, xattrs, digest, offset, chunk_offset, chunk_size,
                    chunk_digest, inner_offset)


def _entry_hook(blob: str, max_entries: int, shared: dict[str, str]) -> Callable[[Any], Any]:
    """A ``json.loads`` object hook turning entry objects into :class:`TOCEntry` as they
    are parsed, so the parse never holds the per-entry dicts of the whole TOC at once.

    An object is converted when it looks like an entry (string ``name``, known ``type``)
    and holds a non-string value: a valid ``xattrs`` object holds only strings, so it is
    never mistaken for an entry. Objects left as dicts are converted (or rejected) by
    :func:`decode_entries` afterwards, with the same checks. Objects with a ``name`` count
    against ``max_entries`` as they are parsed (a closure: this runs 100k times)."""
    count = 0

    def hook(d: dict[str, Any]) -> Any:
        nonlocal count
        if "name" not in d:
            return d
        count += 1
        if count > max_entries:
            from ipfsnap.estargz.errors import TooManyEntries

            raise TooManyEntries(f"{blob}: TOC has more than {max_entries} entries, the limit")
        typ = d.get("type")
        if typ.__class__ is not str or typ not in ENTRY_TYPES or "entries" in d:
            return d
        if d.get("mode").__class__ is int:  # nearly every entry: no need to look further
            return entry_from_json(d, count - 1, shared)
        for v in d.values():
            if v.__class__ is not str:
                return entry_from_json(d, count - 1, shared)
        return d

    return hook


def decode_entries(text: str, blob: str, max_entries: int) -> list[TOCEntry]:
    """Entries of an untrusted TOC document given as text (limits on size are checked by
    the caller); names as written."""
    from ipfsnap.estargz.errors import TooManyEntries

    shared: dict[str, str] = {}
    hook = _entry_hook(blob, max_entries, shared)
    try:
        try:
            doc = parse_json(text, parse_constant=_reject_constant, object_hook=hook)
        except MalformedDocument as exc:
            raise InvalidTOC(f"{blob}: TOC is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
            raise InvalidTOC(f"{blob}: TOC JSON has no entries list")
        version = doc.get("version")
        if type(version) is not int:
            raise InvalidTOC(f"{blob}: TOC version {version!r} is not an integer")
        raw: list[Any] = doc["entries"]
        if len(raw) > max_entries:
            raise TooManyEntries(f"{blob}: TOC has {len(raw)} entries, limit is {max_entries}")
        for i, d in enumerate(raw):
            if d.__class__ is not TOCEntry:
                raw[i] = entry_from_json(d, i, shared)
    except InvalidTOC as exc:
        if str(exc).startswith(blob + ": "):
            raise
        raise InvalidTOC(f"{blob}: {exc}") from None
    return raw


class _TOCDocument(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The TOC document as the fast decoder reads it (any other shape: the stdlib path)."""

    version: int
    entries: list[TOCEntry]


_DECODER = msgspec.json.Decoder(_TOCDocument)
_DIGEST_PREFIX = b"sha256:"
_HEX_DIGITS = b"0123456789abcdef"
#: "sha256:" + 64 hex digits
_DIGEST_LEN = 71
#: digests checked at once (~1 MB of text)
_DIGEST_BATCH = 16384


def _digests_ok(digests: list[str]) -> bool:
    """Whether every string is ``sha256:`` + 64 lower-case hex digits, checked on batches
    of distinct ones at once (a regex per digest cost ~0.1 s per 100k entries; batches keep
    the copies small): each is 71 characters, so in their concatenation the prefix must sit
    at every 71st position, and with those prefixes removed only hex digits may remain."""
    for i in range(0, len(digests), _DIGEST_BATCH):
        distinct = set(digests[i : i + _DIGEST_BATCH])
        n = len(distinct)
        if set(map(len, distinct)) != {_DIGEST_LEN}:
            return False
        try:
            joined = "".join(distinct).encode("ascii")
        except UnicodeEncodeError:
            return False
        for k, ch in enumerate(_DIGEST_PREFIX):
            if joined[k::_DIGEST_LEN] != bytes((ch,)) * n:
                return False
        hexes = joined.replace(_DIGEST_PREFIX, b"")
        if len(hexes) != 64 * n or hexes.translate(None, _HEX_DIGITS):
            return False
    return True


#: how the writers (the reference, ipfsnap) lay a non-empty TOC out, around its entries
_WRITERS_HEAD = b'{\n\t"version": 1,\n\t"entries": [\n'
_WRITERS_TAIL = b"\n\t]\n}"
#: between two entries in that layout: JSON strings hold no raw newline, so this is always
#: structure (though not necessarily between two entries of the array: see below)
_BETWEEN = b"},\n\t\t{"
#: bytes of entries decoded at a time (~10k entries): small enough that the strings the
#: decoder makes per entry are shared slice by slice, big enough to cost nothing
_SLICE = 4 << 20
_ENTRIES_DECODER = msgspec.json.Decoder(list[TOCEntry])


def _decode_in_slices(buf: bytes | bytearray, start: int, end: int) -> list[TOCEntry]:
    """The entries of the array whose elements are ``buf[start:end]``, decoded a slice at a
    time, sharing equal owner names and digests within the TOC as it goes (the decoder
    makes a string per value: ~220 bytes per entry more at the peak of a whole decode).

    Each slice is cut at a comma of ``_BETWEEN`` and must decode on its own as the elements
    of an array; then the whole is the array of all of them in order (the slices joined by
    those commas are the original text). A cut at a comma that is not between two elements
    of the array leaves a slice that does not decode, and the caller takes the stdlib path.
    """
    out: list[TOCEntry] = []
    shared: dict[str, str] = {}
    share = shared.setdefault
    pos = start
    while pos < end:
        cut = buf.find(_BETWEEN, pos + _SLICE, end) if end - pos > _SLICE else -1
        stop = end if cut < 0 else cut + 1  # keep the "}", drop the ","
        with memoryview(buf)[pos:stop] as piece:
            part = _ENTRIES_DECODER.decode(b"[" + piece + b"]")
        for e in part:
            if e.user_name:
                e.user_name = share(e.user_name, e.user_name)
            if e.group_name:
                e.group_name = share(e.group_name, e.group_name)
            if e.chunk_digest and e.chunk_digest == e.digest:
                e.chunk_digest = e.digest
        out += part
        pos = stop + 1
    return out


def decode_entries_fast(buf: bytes | bytearray, max_entries: int, start: int = 0,
                        end: int | None = None) -> list[TOCEntry] | None:
    """Entries of a TOC document in UTF-8 (``buf[start:end]``) decoded by msgspec (C)
    straight into :class:`TOCEntry` structs, or None when the document is anything but the
    plain shape writers produce; :func:`decode_entries` then decides, with exact messages.

    Equivalence: the decoder accepts a subset of what the stdlib path accepts and yields
    the same values for it: strict JSON (the stdlib's NaN/Infinity extension is rejected,
    as the stdlib path also does), UTF-8 only (the stdlib path also takes UTF-16/32 and
    encoded surrogates), no unknown fields (so no nested object beyond ``xattrs`` can be
    counted as an entry), no nulls, non-negative int64 integers, base64 ``xattrs`` (checked
    by differential fuzzing against ``base64.b64decode(validate=True)``), duplicate keys
    resolved as the stdlib does (the last wins); types and digests are checked here.
    ``max_entries``: every object starts with a ``{`` byte, so a document with no more
    than ``max_entries + 1`` of them (the document itself) cannot hold too many entries;
    otherwise the stdlib path applies the limit while parsing, which bounds memory."""
    end = len(buf) if end is None else end
    if buf.count(b"{", start, end) > max_entries + 1:
        return None
    try:
        if (end - start > _SLICE and buf.startswith(_WRITERS_HEAD, start)
                and buf.endswith(_WRITERS_TAIL, start, end)):
            entries = _decode_in_slices(buf, start + len(_WRITERS_HEAD), end - len(_WRITERS_TAIL))
        else:
            with memoryview(buf)[start:end] as raw:
                entries = _DECODER.decode(raw).entries
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
        return None
    if not {e.type for e in entries} <= ENTRY_TYPES:
        return None
    digests = [e.digest for e in entries if e.digest]
    digests += [e.chunk_digest for e in entries if e.chunk_digest]
    if not _digests_ok(digests):
        return None
    return entries


def parse_toc_json(data: bytes | str, blob: str, max_entries: int) -> list[TOCEntry]:
    """Entries of an untrusted TOC document (limits on size are checked by the caller)."""
    if not isinstance(data, str):
        fast = decode_entries_fast(data, max_entries)
        if fast is not None:
            return fast
        try:
            # as json.loads does with bytes: UTF-8 (or UTF-16/32 by detection)
            data = data.decode(json.detect_encoding(data), "surrogatepass")
        except (UnicodeDecodeError, LookupError) as exc:
            raise InvalidTOC(f"{blob}: TOC is not valid JSON: {exc}") from None
    return decode_entries(data, blob, max_entries)
