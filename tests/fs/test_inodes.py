"""The inode table built from a real index of a layer with every entry type."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ipfsnap.estargz import FileRangeReader, open_layer
from ipfsnap.estargz.types import TOCEntry
from ipfsnap.fs.inodes import OPAQUE_XATTR, InodeTable, parse_modtime
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
        assert {k: getattr(a, k) for k in a.__slots__} == \
            {k: getattr(b, k) for k in b.__slots__}
