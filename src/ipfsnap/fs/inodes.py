"""The inode table of a layer, built once from its :class:`LayerIndex`.

Translation to what overlayfs expects of a lower layer (as containerd unpacks layers):
- ``dir/.wh.NAME`` (a whiteout) becomes a char device 0/0 named ``NAME``;
- ``dir/.wh..wh..opq`` (opaque marker) becomes ``trusted.overlay.opaque=y`` on ``dir``, and
  the marker itself is hidden;
- landmark files and the TOC entry are hidden;
- hardlinks share one inode whose ``nlink`` counts the names.

Memory: one small slotted object per inode plus one dict per directory; file chunks are not
copied here (looked up in the index when a file is opened).
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Iterable, Iterator
from datetime import datetime
from itertools import starmap
from operator import attrgetter
from typing import Protocol

import msgspec

from ipfsnap.estargz.types import LANDMARKS, TOC_TAR_NAME, TOCEntry
from ipfsnap.whiteouts import OPAQUE_WHITEOUT, OPAQUE_XATTR, WHITEOUT_PREFIX

log = logging.getLogger(__name__)

ROOT_INODE = 1
#: the xattr namespace of overlayfs' own metadata
OVERLAY_XATTRS = "trusted.overlay."

_TYPE_BITS = {
    "dir": stat.S_IFDIR,
    "reg": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


class IndexView(Protocol):
    """What the inode table needs of an ``estargz.LayerIndex``."""

    def walk(self) -> Iterable[tuple[str, TOCEntry]]: ...


class Inode(msgspec.Struct, eq=False, gc=False):
    """One inode. A ``msgspec.Struct`` (made in C: the unpickling of a 100k-entry table
    builds all of them with one ``starmap``), compared by identity like a plain object,
    not tracked by the cyclic GC (it refers to strings, bytes, and dicts of those only)."""

    ino: int
    #: path in the layer of the entry holding the content (hardlink target for links)
    path: str
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    nlink: int = 1
    rdev: int = 0
    target: bytes = b""
    xattrs: dict[str, bytes] | None = None
    #: name -> inode number, directories only (insertion order = readdir order)
    children: dict[bytes, int] | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


#: parsed modtimes by text: layers repeat them a lot (builders clamp mtimes, files of one
#: package share theirs); bounded so a hostile TOC of distinct values cannot grow it
_MODTIME_MEMO: dict[str, int] = {}
_MODTIME_MEMO_MAX = 4096


def parse_modtime(text: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 ``modtime`` (0 when absent or invalid)."""
    if not text:
        return 0
    ns = _MODTIME_MEMO.get(text)
    if ns is None:
        ns = _parse_modtime(text)
        if len(_MODTIME_MEMO) >= _MODTIME_MEMO_MAX:
            _MODTIME_MEMO.clear()
        _MODTIME_MEMO[text] = ns
    return ns


#: seconds since the epoch of a minute ("YYYY-MM-DDTHH:MM:"), or -1 when that text is not
#: one (a minute's start is a multiple of 60, never -1), for :func:`_parse_modtime`;
#: bounded as the memo above
_MINUTE_MEMO: dict[str, int] = {}


def _minute(prefix: str) -> int:
    if not (prefix.isascii() and prefix[10] == "T" and prefix[13] == ":"
            and prefix[16] == ":" and prefix[11:13].isdigit() and prefix[14:16].isdigit()):
        return -1
    h, m = int(prefix[11:13]), int(prefix[14:16])
    if h > 23 or m > 59:
        return -1
    try:
        day = int(datetime.fromisoformat(prefix[:10] + "T00:00:00Z").timestamp())
    except (ValueError, OverflowError):
        return -1
    return day + 3600 * h + 60 * m


def _parse_modtime(text: str) -> int:
    # the form writers use ("2023-11-14T22:13:20Z", Go's RFC 3339 in UTC): the minute's
    # start (memoized: a layer's files share few minutes) plus the seconds, several times
    # faster than fromisoformat; anything else (or a field out of range) takes the general
    # path, which gives the same value for this form
    if len(text) == 20 and text[19] == "Z":
        prefix = text[:17]
        base = _MINUTE_MEMO.get(prefix)
        if base is None:
            base = _minute(prefix)
            if len(_MINUTE_MEMO) >= _MODTIME_MEMO_MAX:
                _MINUTE_MEMO.clear()
            _MINUTE_MEMO[prefix] = base
        sec = text[17:19]
        if base != -1 and sec.isascii() and sec.isdigit() and sec < "60":
            return (base + int(sec)) * 1_000_000_000
    try:
        if "." not in text:
            # Python 3.11's fromisoformat reads RFC 3339 with "Z" itself; only a fraction
            # (nanoseconds, which datetime cannot hold) needs taking apart
            return int(datetime.fromisoformat(text.strip()).timestamp()) * 1_000_000_000
    except (ValueError, OverflowError):
        pass
    try:
        s = text.strip()
        if s.endswith("Z"):
            s = s[:-1] + "+00:00"
        frac_ns = 0
        # datetime keeps microseconds only: take the fraction apart to keep nanoseconds
        if "." in s:
            head, _, rest = s.partition(".")
            # one scan, one cut: cutting a character at a time copied the rest each time,
            # quadratic in a hostile TOC's fraction (80,000 digits: 0.66 s; issue 8)
            n = 0
            while n < len(rest) and rest[n].isdigit():
                n += 1
            digits, rest = rest[:n], rest[n:]
            frac_ns = int((digits + "000000000")[:9]) if digits else 0
            s = head + rest
        dt = datetime.fromisoformat(s)
        return int(dt.timestamp()) * 1_000_000_000 + frac_ns
    except (ValueError, OverflowError):
        log.debug("unparseable modtime %r", text)
        return 0


def _named(walk: Iterable[tuple[str, TOCEntry]]) -> Iterator[tuple[str, str, str, TOCEntry]]:
    """``(path, parent, name, entry)`` of an index's ``walk()``, paths cleaned."""
    for raw_path, entry in walk:
        path = raw_path.strip("/")
        parent, _, name = path.rpartition("/")
        yield path, parent, name, entry


def _clean(path: str) -> str:
    return path.strip("/")


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition("/")
    return parent, name


class InodeTable:
    def __init__(self) -> None:
        self.inodes: list[Inode | None] = [None]  # inode numbers start at 1
        self.by_path: dict[str, int] = {}
        root = self._new("", stat.S_IFDIR | 0o755)
        root.children = {}
        root.nlink = 2

    def _new(self, path: str, mode: int) -> Inode:
        node = Inode(len(self.inodes), path, mode)
        self.inodes.append(node)
        self.by_path[path] = node.ino
        return node

    # -- pickling (the worker's TOC parser child sends the table back) ---------------------
    #: Inode fields in the column order of the pickled state (``ino`` is the position)
    _COLUMNS = ("path", "mode", "uid", "gid", "size", "mtime_ns", "nlink", "rdev", "target",
                "xattrs", "children")

    def __getstate__(self) -> dict[str, object]:
        """Columns instead of one pickled object per inode: pickling 100k objects goes
        through Python code per object and took ~1.2 s for a 100k-entry layer; lists of
        plain values are pickled by C code alone."""
        nodes = self.inodes[1:]
        if any(n is None for n in nodes):
            raise ValueError("inode table with holes cannot be pickled")
        cols = [list(map(attrgetter(name), nodes)) for name in self._COLUMNS]
        return {"columns": cols, "by_path": self.by_path}

    def __setstate__(self, state: dict[str, object]) -> None:
        cols = state["columns"]
        by_path = state["by_path"]
        assert isinstance(cols, list) and isinstance(by_path, dict)
        n = len(cols[0]) if cols else 0
        inodes: list[Inode | None] = [None]
        # Inode's fields are ino followed by the columns, in order: one C call per inode
        inodes.extend(starmap(Inode, zip(range(1, n + 1), *cols, strict=True)))
        self.inodes = inodes
        self.by_path = by_path

    def get(self, ino: int) -> Inode | None:
        if 0 < ino < len(self.inodes):
            return self.inodes[ino]
        return None

    @property
    def root(self) -> Inode:
        node = self.inodes[ROOT_INODE]
        assert node is not None
        return node

    def __len__(self) -> int:
        return len(self.inodes) - 1

    def _dir(self, path: str) -> Inode:
        """The directory inode at ``path``, created (0755, root) if the TOC lacks it."""
        ino = self.by_path.get(path)
        if ino is not None:
            node = self.inodes[ino]
            assert node is not None
            if node.children is None:
                raise ValueError(f"{path!r} is used as a directory but is not one")
            return node
        parent_path, name = _split(path)
        parent = self._dir(parent_path)
        node = self._new(path, stat.S_IFDIR | 0o755)
        node.children = {}
        node.nlink = 2
        assert parent.children is not None
        parent.children[name.encode("utf-8", "surrogateescape")] = node.ino
        parent.nlink += 1
        return node

    @classmethod
    def build(cls, index: IndexView) -> InodeTable:
        """The table of every entry ``index.walk()`` yields.

        The entries nearly every layer consists of (a directory, regular file or symlink
        without xattrs, whose parent directory is already in the table, not a whiteout nor
        a hidden name) are added inline here; everything else goes through :meth:`_add`.
        Both give the same inode (``tests/fs/test_inodes.py`` compares them): inline saves
        four calls per entry, about half of the time for a 100k-entry layer."""
        table = cls()
        inodes = table.inodes
        by_path = table.by_path
        seen: dict[int, int] = {}
        memo = _MODTIME_MEMO
        new = Inode
        S_IFDIR, S_IFREG, S_IFLNK = stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK
        # without hardlinks (an index that says so) no entry comes twice: no need to track
        links = bool(getattr(index, "has_hardlinks", True))
        walk_named = getattr(index, "walk_named", None)
        named: Iterable[tuple[str, str, str, TOCEntry]] = (
            walk_named() if walk_named is not None else _named(index.walk())
        )
        # the parent of the previous entry, when it is a directory in the table: siblings
        # come one after the other, and a path's inode does not change once it is a
        # directory's (later entries only add paths below it)
        cur_parent: str | None = None
        cur_node: Inode | None = None
        for path, parent_path, name, entry in named:
            typ = entry.type
            first = False
            if typ == "reg" and links:
                # an index may yield a hardlink as its resolved target entry: same object
                ino = seen.get(id(entry))
                if ino is not None:
                    target = inodes[ino]
                    assert target is not None
                    entry = TOCEntry(name=path, type="hardlink", link_name=target.path)
                    typ = "hardlink"
                else:
                    first = True
            if typ == "reg" or typ == "dir" or typ == "symlink":
                if parent_path == cur_parent:
                    parent = cur_node
                else:
                    pino = by_path.get(parent_path)
                    parent = inodes[pino] if pino is not None else None
                    if parent is not None and parent.children is not None:
                        cur_parent, cur_node = parent_path, parent
                kids = parent.children if parent is not None else None
                if (kids is not None and name and not entry.xattrs
                        and not name.startswith(WHITEOUT_PREFIX)
                        and (parent_path or (name != TOC_TAR_NAME and name not in LANDMARKS))
                        and (typ != "dir" or path not in by_path)):
                    assert parent is not None
                    mt = entry.modtime
                    ns = memo.get(mt) if mt else 0
                    if ns is None:
                        ns = parse_modtime(mt)
                    perm = entry.mode & 0o7777
                    ino = len(inodes)
                    if typ == "dir":
                        node = new(ino, path, S_IFDIR | perm, entry.uid, entry.gid, 0, ns, 2,
                                   children={})
                        parent.nlink += 1
                    elif typ == "reg":
                        node = new(ino, path, S_IFREG | perm, entry.uid, entry.gid, entry.size,
                                   ns)
                    else:
                        link = entry.link_name.encode("utf-8", "surrogateescape")
                        node = new(ino, path, S_IFLNK | perm, entry.uid, entry.gid, len(link),
                                   ns, target=link)
                    inodes.append(node)
                    by_path[path] = ino
                    kids[name.encode("utf-8", "surrogateescape")] = ino
                    if first:
                        seen[id(entry)] = ino
                    continue
            try:
                table._add(path, entry)
            except ValueError as exc:
                log.warning("layer entry %r ignored: %s", path, exc)
                continue
            if first and path in by_path:
                seen[id(entry)] = by_path[path]
        return table

    @classmethod
    def build_general(cls, index: IndexView) -> InodeTable:
        """:meth:`build` with every entry through :meth:`_add` (the reference for tests)."""
        table = cls()
        seen: dict[int, int] = {}
        for raw_path, entry in index.walk():
            path = _clean(raw_path)
            first = False
            if entry.type == "reg":
                ino = seen.get(id(entry))
                if ino is not None:
                    target = table.inodes[ino]
                    assert target is not None
                    entry = TOCEntry(name=path, type="hardlink", link_name=target.path)
                else:
                    first = True
            try:
                table._add(path, entry)
            except ValueError as exc:
                log.warning("layer entry %r ignored: %s", path, exc)
                continue
            if first and path in table.by_path:
                seen[id(entry)] = table.by_path[path]
        return table

    def _add(self, path: str, entry: TOCEntry) -> None:
        if path == "":
            if entry.type == "dir":
                self._fill(self.root, entry)
            return
        parent_path, name = _split(path)
        if parent_path == "" and name == TOC_TAR_NAME:
            return
        if name in LANDMARKS and parent_path == "":
            return
        parent = self._dir(parent_path)
        assert parent.children is not None
        if name == OPAQUE_WHITEOUT:
            if parent.xattrs is None:
                parent.xattrs = {}
            parent.xattrs[OPAQUE_XATTR] = b"y"
            return
        if name.startswith(WHITEOUT_PREFIX):
            hidden = name[len(WHITEOUT_PREFIX):]
            if not hidden or hidden in (".", ".."):
                log.warning("layer entry %r: invalid whiteout ignored", path)
                return
            node = self._new(path, stat.S_IFCHR)
            node.rdev = 0
            node.mtime_ns = parse_modtime(entry.modtime)
            parent.children[hidden.encode("utf-8", "surrogateescape")] = node.ino
            return
        bname = name.encode("utf-8", "surrogateescape")
        if entry.type == "hardlink":
            target = _clean(entry.link_name)
            tino = self.by_path.get(target)
            tnode = self.inodes[tino] if tino is not None else None
            if tnode is None or tnode.children is not None:
                log.warning("layer entry %r: hardlink to missing %r ignored", path, target)
                return
            tnode.nlink += 1
            self.by_path[path] = tnode.ino
            parent.children[bname] = tnode.ino
            return
        if entry.type == "dir":
            if path in self.by_path:
                dnode = self._dir(path)
            else:
                dnode = self._new(path, stat.S_IFDIR)
                dnode.children = {}
                dnode.nlink = 2
                parent.children[bname] = dnode.ino
                parent.nlink += 1
            self._fill(dnode, entry)
            return
        bits = _TYPE_BITS.get(entry.type)
        if bits is None:
            log.warning("layer entry %r: unsupported type %r ignored", path, entry.type)
            return
        node = self._new(path, bits)
        self._fill(node, entry)
        parent.children[bname] = node.ino

    def _fill(self, node: Inode, entry: TOCEntry) -> None:
        node.mode = stat.S_IFMT(node.mode) | (entry.mode & 0o7777)
        node.uid = entry.uid
        node.gid = entry.gid
        node.mtime_ns = parse_modtime(entry.modtime)
        if entry.xattrs:
            # overlayfs obeys trusted.overlay.* on a lower layer (redirect, opaque): only
            # this table decides them (from whiteout markers), as the full unpack does
            kept = {k: v for k, v in entry.xattrs.items() if not k.startswith(OVERLAY_XATTRS)}
            if len(kept) != len(entry.xattrs):
                log.warning("layer entry %r: xattrs %s dropped", node.path,
                            sorted(set(entry.xattrs) - set(kept)))
            if kept:
                if node.xattrs is None:
                    node.xattrs = {}
                node.xattrs.update(kept)
        if entry.type == "reg":
            node.size = entry.size
        elif entry.type == "symlink":
            node.target = entry.link_name.encode("utf-8", "surrogateescape")
            node.size = len(node.target)
        elif entry.type in ("char", "block"):
            node.rdev = _makedev(entry.dev_major, entry.dev_minor)


def _makedev(major: int, minor: int) -> int:
    # Linux's encoding (glibc gnu_dev_makedev), computed here so a hostile TOC with huge
    # numbers cannot make os.makedev raise
    major &= 0xFFFFFFFF
    minor &= 0xFFFFFFFF
    return (
        ((major & 0xFFF) << 8) | ((major & ~0xFFF) << 32) | (minor & 0xFF) | ((minor & ~0xFF) << 12)
    )
