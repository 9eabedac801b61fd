"""runtime/layers.py: layer directories read as the tree overlayfs shows (lookups and
listings), checked against a real read-only overlay mount of the same layers (the kernel is
the oracle); symlinks resolved across layers stay inside."""

from __future__ import annotations

import contextlib
import os
import random
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipfsnap.runtime.layers import LayeredTree, is_whiteout
from ipfsnap.runtime.spec import DirTree, SymlinkLoop, Tree, resolve_links
from ipfsnap.snapshot import Mount
from ipfsnap.snapshot.mount import mount_all, unmount
from ipfsnap.whiteouts import OPAQUE_XATTR
from tests.support import require_root


def _file(root: Path, rel: str, data: bytes = b"x") -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def _whiteout(root: Path, rel: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def _opaque(root: Path, rel: str) -> None:
    p = root / rel
    p.mkdir(parents=True, exist_ok=True)
    os.setxattr(p, OPAQUE_XATTR, b"y")


def _link(root: Path, rel: str, target: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, p)


@pytest.fixture
def layers(tmp_path: Path) -> list[Path]:
    """Three layers, topmost first, covering every rule of the lookup."""
    require_root()  # whiteouts are device nodes, opaque dirs a trusted.* xattr
    top, mid, low = (tmp_path / n for n in ("top", "mid", "low"))
    for d in (top, mid, low):
        d.mkdir()
    # low: the base
    _file(low, "etc/passwd", b"root:x:0:0\n")
    _file(low, "etc/gone", b"deleted above\n")
    _file(low, "usr/lib/a.so", b"low a\n")
    _file(low, "usr/lib/b.so", b"low b\n")
    _file(low, "opt/app/old", b"hidden by an opaque dir\n")
    _file(low, "srv/data/f", b"under a replaced dir\n")
    _file(low, "var/keep", b"low only\n")
    _link(low, "usr/bin/python3", "python3.11")
    # mid: overrides and deletions
    _file(mid, "usr/lib/a.so", b"mid a\n")
    _whiteout(mid, "etc/gone")
    _opaque(mid, "opt/app")
    _file(mid, "opt/app/new", b"opaque dir's own\n")
    _file(mid, "srv/data", b"a file replaces the dir\n")
    _file(mid, "usr/bin/python3.11", b"\x7fELF python\n")
    _link(mid, "lib64", "/usr/lib")
    # top: a whiteout of a whole directory, and an escape attempt
    _whiteout(top, "var")
    _link(top, "escape", "../../../../etc/passwd")
    _file(top, "usr/lib/c.so", b"top c\n")
    return [top, mid, low]


PATHS = ["etc/passwd", "etc/gone", "usr/lib/a.so", "usr/lib/b.so", "usr/lib/c.so",
         "opt/app/old", "opt/app/new", "srv/data", "srv/data/f", "var", "var/keep",
         "usr/bin/python3", "usr/bin/python3.11", "lib64", "escape", "nope", "usr/nope/x", ""]


@contextlib.contextmanager
def merged(layers: list[Path], target: Path) -> Iterator[Path]:
    """The kernel's view of ``layers`` (topmost first): a read-only overlay at ``target``."""
    target.mkdir()
    mount_all([Mount("overlay", "overlay",
                     ["ro", "lowerdir=" + ":".join(str(p) for p in layers)])], target)
    try:
        yield target
    finally:
        unmount(target)


def assert_same_entry(tree: LayeredTree, target: Path, parts: list[str], where: str) -> None:
    """The lookup of ``parts`` (a symlink-free path) in ``tree`` agrees with the mount."""
    want = target.joinpath(*parts)
    try:
        st = want.lstat()
    except OSError:
        assert tree.lstat(parts) is None, where
        assert tree.host_path(parts) is None, where
        return
    got = tree.lstat(parts)
    assert got is not None, where
    assert stat.S_IFMT(got.st_mode) == stat.S_IFMT(st.st_mode), where
    if stat.S_ISREG(st.st_mode):
        host = tree.host_path(parts)
        assert host is not None and host.read_bytes() == want.read_bytes(), where
    elif stat.S_ISLNK(st.st_mode):
        assert tree.readlink(parts) == os.readlink(want), where
    # a directory lists the names the mount has (the kernel's readdir also shows a whiteout
    # in a directory only one layer holds, whose lookup then fails); anything else nothing
    listed = sorted(n for n in os.listdir(want) if os.path.lexists(want / n)) \
        if stat.S_ISDIR(st.st_mode) else []
    assert sorted(tree.listdir(parts)) == listed, where


def test_lookups_match_a_real_overlay_mount(layers: list[Path], tmp_path: Path) -> None:
    tree = LayeredTree(layers)
    with merged(layers, tmp_path / "merged") as target:
        for rel in PATHS:
            assert_same_entry(tree, target, rel.split("/") if rel else [], rel)


def test_the_rules_by_name(layers: list[Path]) -> None:
    tree = LayeredTree(layers)
    top, mid, low = layers

    def host(rel: str) -> Path | None:
        return tree.host_path(rel.split("/"))

    assert host("usr/lib/a.so") == mid / "usr/lib/a.so"  # the topmost copy wins
    assert host("usr/lib/b.so") == low / "usr/lib/b.so"  # merged directories
    assert host("usr/lib/c.so") == top / "usr/lib/c.so"
    assert host("etc/gone") is None  # whiteout
    assert host("var/keep") is None  # a whiteout of its directory
    assert host("opt/app/old") is None  # opaque directory
    assert host("opt/app/new") == mid / "opt/app/new"
    assert host("srv/data/f") is None  # a file replaced the directory
    with pytest.raises(FileNotFoundError):
        tree.readlink(["nope"])
    assert is_whiteout((mid / "etc/gone").lstat())
    # listings: merged, without whiteouts, stopped by an opaque directory or a non-directory
    assert sorted(tree.listdir(["usr", "lib"])) == ["a.so", "b.so", "c.so"]
    assert tree.listdir(["etc"]) == ["passwd"]
    assert tree.listdir(["opt", "app"]) == ["new"]
    assert tree.listdir(["srv", "data"]) == [] and tree.listdir(["var"]) == []
    assert tree.listdir(["nope"]) == []
    assert "var" not in tree.listdir([]) and "escape" in tree.listdir([])


def test_symlinks_resolve_across_layers_and_never_leave(layers: list[Path]) -> None:
    tree = LayeredTree(layers)
    # python3 (low) -> python3.11 (mid)
    assert resolve_links(tree, "/usr/bin/python3", what="t") == ["usr", "bin", "python3.11"]
    # an absolute symlink in mid, followed by a name only low has
    assert resolve_links(tree, "/lib64/b.so", what="t") == ["usr", "lib", "b.so"]
    # .. stops at the root of the stack
    assert resolve_links(tree, "/escape", what="t") == ["etc", "passwd"]
    assert tree.host_path(["etc", "passwd"]) == layers[2] / "etc/passwd"


def test_a_symlink_loop_is_an_error(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _link(a, "x", "/y")
    _link(b, "y", "/x")
    with pytest.raises(SymlinkLoop, match="too many symlinks"):
        resolve_links(LayeredTree([a, b]), "/x", what="image layers")


def test_directory_lookups_are_cached(layers: list[Path], monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    tree = LayeredTree(layers)
    calls: list[str] = []
    real = os.getxattr

    def counting(path: object, name: str, **kw: bool) -> bytes:
        calls.append(str(path))
        return real(path, name, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "getxattr", counting)
    names = ["a.so", "b.so", "c.so"]
    for name in names:
        tree.host_path(["usr", "lib", name])
    first = len(calls)
    # usr and usr/lib of the three layers (b.so is found in the lowest)
    assert first == 6
    for name in names:
        tree.host_path(["usr", "lib", name])
    assert len(calls) == first


def _make(rng: random.Random, p: Path, content: str, names: list[str]) -> None:
    kind = rng.choice(["file", "file", "dir", "link", "whiteout", "opaque"])
    if kind == "file":
        p.write_bytes(content.encode())
    elif kind == "dir":
        p.mkdir()
    elif kind == "opaque":
        p.mkdir()
        os.setxattr(p, OPAQUE_XATTR, b"y")
    elif kind == "whiteout":
        os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    else:
        os.symlink(rng.choice(["/" + "/".join(rng.choice(names) for _ in range(2)),
                               rng.choice(names), "../" + rng.choice(names), "/nope"]), p)


def _random_layers(rng: random.Random, base: Path, count: int) -> list[Path]:
    """``count`` layers (topmost first) of random entries over a small name space, so that
    names collide across layers: files, directories, symlinks (relative, absolute, dangling,
    upward), whiteouts and opaque directories."""
    names = ["a", "b", "c"]
    layers = []
    for i in range(count):
        root = base / f"l{i}"
        root.mkdir()
        for _ in range(rng.randint(3, 12)):
            parts = [rng.choice(names) for _ in range(rng.randint(1, 3))]
            # never through a symlink of the layer (an absolute one would lead to the host):
            # every ancestor must be a real directory of this layer, or is made one
            where = root
            for name in parts[:-1]:
                where = where / name
                if not os.path.lexists(where):
                    where.mkdir()
                elif not stat.S_ISDIR(where.lstat().st_mode):
                    break
            else:
                p = where / parts[-1]
                if not os.path.lexists(p):
                    _make(rng, p, f"{i}:{'/'.join(parts)}", names)
        layers.append(root)
    return layers


def _all_paths(max_depth: int = 3) -> list[list[str]]:
    out: list[list[str]] = [[]]
    frontier: list[list[str]] = [[]]
    for _ in range(max_depth):
        frontier = [[*f, n] for f in frontier for n in ("a", "b", "c", "d")]
        out += frontier
    return out


def _resolved(tree: Tree, path: str) -> list[str] | str:
    try:
        return resolve_links(tree, path, what="t")
    except SymlinkLoop:
        return "loop"


def test_random_layer_stacks_match_the_kernels_overlay(tmp_path: Path) -> None:
    """40 random stacks of 2-4 layers: every lookup (type, content, link target, a
    directory's listing) and every symlink resolution inside the stack agree with overlayfs
    mounting the same layers."""
    require_root()
    rng = random.Random(20261128)
    for case in range(40):
        base = tmp_path / f"case{case}"
        base.mkdir()
        layers = _random_layers(rng, base, rng.randint(2, 4))
        tree = LayeredTree(layers)
        with merged(layers, base / "merged") as target:
            for parts in _all_paths():
                rel = "/".join(parts)
                where = f"case {case}: /{rel}"
                # the same resolution (or loop) through the merged mount as a plain directory
                assert (_resolved(tree, "/" + rel) == _resolved(DirTree(target), "/" + rel)), where
                if any((target / "/".join(parts[:i])).is_symlink() for i in range(1, len(parts))):
                    continue  # lookups take symlink-free paths (what resolve_links gives)
                assert_same_entry(tree, target, parts, where)
