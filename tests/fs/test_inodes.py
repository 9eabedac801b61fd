"""The inode table built from a real index of a layer with every entry type."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from ipfsnap.estargz import FileRangeReader, open_layer
from ipfsnap.estargz.reader import LayerIndex
from ipfsnap.estargz.types import DEFAULT_LIMITS, TOCEntry
from ipfsnap.fs.inodes import InodeTable, parse_modtime
from ipfsnap.whiteouts import OPAQUE_XATTR
from tests.fs.layers import MTIME, Blob, Item, build_blob, every_type_items


def table_of(blob: Blob) -> InodeTable:
    with open(blob.path, "rb") as f:
        index = open_layer(FileRangeReader(f), blob.size, toc_digest=blob.toc_digest)
        return InodeTable.build(index)


def node(table: InodeTable, path: str):  # type: ignore[no-untyped-def]
    parts = [p for p in path.split("/") if p]
    cur = table.root
    for p in parts:
        assert cur.children is not None, path
        cur = table.get(cur.children[p.encode()])  # type: ignore[assignment]
        assert cur is not None
    return cur


def test_every_entry_type(every_type_blob: Blob) -> None:
    t = table_of(every_type_blob)
    items = {it.name: it for it in every_type_items()}
    for name, it in items.items():
        if os.path.basename(name).startswith(".wh."):
            continue
        n = node(t, name)
        if it.kind == "hardlink":
            continue
        assert stat.S_IMODE(n.mode) == it.mode, name
        assert (n.uid, n.gid) == (it.uid, it.gid), name
        assert n.mtime_ns == MTIME * 10**9, name
        kind = {
            "file": stat.S_ISREG, "dir": stat.S_ISDIR, "symlink": stat.S_ISLNK,
            "char": stat.S_ISCHR, "block": stat.S_ISBLK, "fifo": stat.S_ISFIFO,
        }[it.kind]
        assert kind(n.mode), name
        if it.kind == "file":
            assert n.size == len(it.data)
        if it.kind == "symlink":
            assert n.target == it.link.encode()
        if it.kind in ("char", "block"):
            assert n.rdev == os.makedev(it.major, it.minor)
        for k, v in it.xattrs.items():
            assert n.xattrs is not None and n.xattrs[k] == v.encode()


def test_hardlinks_share_inode_and_count_links(every_type_blob: Blob) -> None:
    t = table_of(every_type_blob)
    big = node(t, "data/big")
    assert node(t, "links/hard").ino == big.ino == node(t, "links/hard2").ino
    assert big.nlink == 3
    assert node(t, "etc/one").nlink == 1


def test_whiteouts_and_opaque_dirs(every_type_blob: Blob) -> None:
    t = table_of(every_type_blob)
    dirx = node(t, "dirx")
    assert dirx.children is not None
    assert b".wh.gone" not in dirx.children
    gone = node(t, "dirx/gone")
    assert stat.S_ISCHR(gone.mode) and gone.rdev == 0 and stat.S_IMODE(gone.mode) == 0
    opq = node(t, "opaque")
    assert opq.children is not None
    assert list(opq.children) == [b"kept"]
    assert opq.xattrs == {OPAQUE_XATTR: b"y"}


def test_landmarks_and_toc_hidden_implicit_dirs_made(tmp_path: Path) -> None:
    items = [Item("a", "file", b"a"), Item("b/c/d", "file", b"d")]
    blob = build_blob(items, tmp_path / "p.blob", prioritize=("a",))
    t = table_of(blob)
    assert t.root.children is not None
    assert sorted(t.root.children) == [b"a", b"b"]
    assert stat.S_ISDIR(node(t, "b/c").mode)
    # root nlink = 2 + subdirectories
    assert t.root.nlink == 3


def test_directory_nlink_and_dotless_children(every_type_blob: Blob) -> None:
    t = table_of(every_type_blob)
    assert node(t, "implicit").nlink == 3  # itself, "." and child/".."
    assert node(t, "etc").nlink == 2


def test_invalid_entries_are_dropped() -> None:
    class Index:
        def walk(self):  # type: ignore[no-untyped-def]
            yield "", TOCEntry(name="", type="dir", mode=0o755)
            yield "f", TOCEntry(name="f", type="reg", mode=0o644)
            yield "f/under", TOCEntry(name="f/under", type="reg")  # parent is a file
            yield "x/.wh..", TOCEntry(name="x/.wh..", type="reg")  # whiteout of ".."
            yield "h", TOCEntry(name="h", type="hardlink", link_name="missing")
            yield "s", TOCEntry(name="s", type="socket")

    t = InodeTable.build(Index())
    assert t.root.children is not None
    assert sorted(t.root.children) == [b"f", b"x"]
    x = t.get(t.root.children[b"x"])
    assert x is not None and x.children == {}


def test_parse_modtime() -> None:
    assert parse_modtime("2020-09-13T12:26:40Z") == 1_600_000_000 * 10**9
    assert parse_modtime("2020-09-13T12:26:40.123456789Z") == 1_600_000_000 * 10**9 + 123456789
    assert parse_modtime("2020-09-13T14:26:40+02:00") == 1_600_000_000 * 10**9
    assert parse_modtime("") == 0
    assert parse_modtime("garbage") == 0


def test_parse_modtime_memo_is_bounded_and_consistent() -> None:
    from ipfsnap.fs import inodes

    texts = [f"2021-01-01T00:{m:02d}:{s:02d}Z" for m in range(60) for s in range(60)]
    texts += [f"2021-01-01T00:00:00.{n:09d}Z" for n in range(2000)]
    first = [parse_modtime(t) for t in texts]
    # answers from the memo equal the first computation, and the memo stays bounded
    assert [parse_modtime(t) for t in texts] == first
    assert len(inodes._MODTIME_MEMO) <= inodes._MODTIME_MEMO_MAX
    assert first[61] == (1609459200 + 61) * 10**9
    assert first[3600 + 7] == 1609459200 * 10**9 + 7
    assert parse_modtime("2021-02-30T00:00:00Z") == 0  # invalid, also the second time
    assert parse_modtime("2021-02-30T00:00:00Z") == 0


def test_table_pickles_column_wise(every_type_blob: Blob) -> None:
    import pickle

    t = table_of(every_type_blob)
    state = t.__getstate__()
    # one list per field, not one pickled object per inode
    assert set(state) == {"columns", "by_path"}
    back = pickle.loads(pickle.dumps(t, protocol=pickle.HIGHEST_PROTOCOL))
    assert len(back) == len(t) and back.by_path == t.by_path
    for a, b in zip(t.inodes[1:], back.inodes[1:], strict=True):
        assert a is not None and b is not None
        assert msgspec.structs.asdict(a) == msgspec.structs.asdict(b)


# -- the inline fast path of InodeTable.build gives what the general path gives -----------

_D = "sha256:" + "cd" * 32


def _tricky_entries() -> list[TOCEntry]:
    """Entries exercising every branch of the inode table (fast path and general)."""
    t = "2021-03-04T05:06:07Z"
    return [
        TOCEntry(name=".no.prefetch.landmark", type="reg", size=1, offset=10, digest=_D),
        TOCEntry(name="./", type="dir", mode=0o700, uid=1, gid=2, modtime=t),
        TOCEntry(name="usr/", type="dir", mode=0o755, modtime=t, user_name="root"),
        TOCEntry(name="usr/bin/", type="dir", mode=0o755, modtime="2021-03-04T05:06:07.5Z"),
        TOCEntry(name="usr/bin/a", type="reg", size=3, offset=20, digest=_D, mode=0o4755,
                 modtime="1969-12-31T23:59:59Z"),
        TOCEntry(name="usr/bin/b", type="symlink", link_name="a", mode=0o777,
                 modtime="2021-03-04T07:06:07+02:00"),
        TOCEntry(name="usr/bin/c", type="hardlink", link_name="usr/bin/a"),
        TOCEntry(name="aaa/first", type="hardlink", link_name="usr/bin/a"),  # walked before
        TOCEntry(name="usr/bin/x", type="reg", xattrs={"user.k": b"v",
                                                       "trusted.overlay.redirect": b"/e"}),
        TOCEntry(name="usr/bin/y", type="reg", xattrs={"trusted.overlay.opaque": b"y"}),
        TOCEntry(name="usr/bin/dev", type="char", dev_major=1, dev_minor=3, mode=0o666),
        TOCEntry(name="usr/bin/blk", type="block", dev_major=2**40, dev_minor=7),
        TOCEntry(name="usr/bin/fifo", type="fifo", modtime="garbage"),
        TOCEntry(name="usr/lib/", type="dir", xattrs={"user.d": b"1"}, modtime=t),
        TOCEntry(name="usr/lib/.wh..wh..opq", type="reg"),
        TOCEntry(name="usr/lib/.wh.gone", type="reg", modtime=t),
        TOCEntry(name="usr/lib/.wh.", type="reg"),
        TOCEntry(name="usr/lib/.hidden", type="reg", mode=0o600, modtime="2021-13-04T05:06:07Z"),
        TOCEntry(name="usr/lib/late/deep/file", type="reg", modtime="2021-03-04T24:06:07Z"),
        TOCEntry(name="usr/lib/late/", type="dir", mode=0o711, modtime="2021-03-04T05:60:07Z"),
        TOCEntry(name="usr/lib/sym", type="symlink", link_name="/\udcff/x", modtime="x" * 20),
        TOCEntry(name="usr/lib/twice", type="reg", modtime="2021-03-04T05:06:60Z"),
        TOCEntry(name="usr/lib/twice", type="symlink", link_name="t"),
        TOCEntry(name="usr/lib/dir2/", type="dir"),
        TOCEntry(name="usr/lib/dir2/", type="dir", mode=0o700),
        TOCEntry(name=".wh.top", type="reg"),
        TOCEntry(name="stargz.index.json", type="reg"),
        TOCEntry(name="ü/é", type="reg", modtime="2021-03-04T05:06:0٧Z"),
        TOCEntry(name="w/.wh.dir/", type="dir"),
        TOCEntry(name="w/.wh.dir/child", type="reg"),
    ]


def _same_tables(a: InodeTable, b: InodeTable) -> None:
    assert len(a) == len(b)
    assert a.by_path == b.by_path
    for x, y in zip(a.inodes[1:], b.inodes[1:], strict=True):
        assert x is not None and y is not None
        assert msgspec.structs.asdict(x) == msgspec.structs.asdict(y), x.path


class _WalkOnly:
    """An index view with only ``walk()`` (raw paths, as other views may give them)."""

    def __init__(self, index: LayerIndex) -> None:
        self.index = index

    def walk(self) -> Iterator[tuple[str, TOCEntry]]:
        for path, e in self.index.walk():
            yield (path + "/" if e.type == "dir" and path else path), e


def test_fast_build_equals_general_build() -> None:
    index = LayerIndex(compression="gzip", toc_digest=_D, toc_offset=1000, blob_size=2000,
                       payload_end=1000, toc_entries=_tricky_entries(), limits=DEFAULT_LIMITS,
                       name="tricky")
    general = InodeTable.build_general(index)
    _same_tables(InodeTable.build(index), general)
    _same_tables(InodeTable.build(_WalkOnly(index)), general)
    # and without hardlinks (the build then does not track entries seen)
    no_links = [e for e in _tricky_entries() if e.type != "hardlink"]
    plain = LayerIndex(compression="gzip", toc_digest=_D, toc_offset=1000, blob_size=2000,
                       payload_end=1000, toc_entries=no_links, limits=DEFAULT_LIMITS,
                       name="plain")
    assert not plain.has_hardlinks and index.has_hardlinks
    _same_tables(InodeTable.build(plain), InodeTable.build_general(plain))
    # the cases the test is about are there
    assert node(general, "usr/bin/c").ino == node(general, "aaa/first").ino
    assert node(general, "usr/bin/a").nlink == 3
    assert general.get(general.by_path["usr/lib"]).xattrs == {  # type: ignore[union-attr]
        "user.d": b"1", OPAQUE_XATTR: b"y"}
    assert stat.S_ISLNK(node(general, "usr/lib/twice").mode)
    assert "w/.wh.dir/child" not in general.by_path


def test_fast_build_equals_general_build_on_a_real_layer(every_type_blob: Blob) -> None:
    with open(every_type_blob.path, "rb") as f:
        index = open_layer(FileRangeReader(f), every_type_blob.size,
                           toc_digest=every_type_blob.toc_digest)
    _same_tables(InodeTable.build(index), InodeTable.build_general(index))


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**37), 2**37), st.integers(0, 999_999_999))
def test_modtime_fast_path_matches_the_general_parse(secs: int, frac: int) -> None:
    try:
        dt = datetime.fromtimestamp(secs, UTC)
    except (ValueError, OverflowError):
        return
    if not 1 <= dt.year <= 9999:
        return
    text = f"{dt.year:04d}-" + dt.strftime("%m-%dT%H:%M:%SZ")
    assert parse_modtime(text) == secs * 10**9
    # the general path (a fraction) agrees with the fast one
    frac_text = text[:-1] + f".{frac:09d}Z"
    assert parse_modtime(frac_text) == secs * 10**9 + frac
