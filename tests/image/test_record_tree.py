"""image/record.MergedTree: the merged image tree that ``image optimize`` assigns accessed
files with, checked against a plain reference (every whiteout scans every path) on random
layer stacks, and indexed so a deletion touches only what is below it."""

from __future__ import annotations

import random
import tarfile

from ipfsnap.image.record import MergedTree, Node, _clean

NAMES = ["a", "b", "c"]


def _reference(layers: list[list[tarfile.TarInfo]]) -> dict[str, Node]:
    """The rules by their definition, one full scan per whiteout."""
    tree: dict[str, Node] = {}
    for i, members in enumerate(layers):
        this_layer: set[str] = set()
        for member in members:
            name = _clean(member.name)
            if not name:
                continue
            parent, _, base = name.rpartition("/")
            if base == ".wh..wh..opq":
                prefix = parent + "/" if parent else ""
                for p in [p for p in tree if p.startswith(prefix) and p not in this_layer]:
                    del tree[p]
                continue
            if base.startswith(".wh."):
                gone = (parent + "/" if parent else "") + base[4:]
                for p in [p for p in tree if p == gone or p.startswith(gone + "/")]:
                    del tree[p]
                continue
            if name in tree and tree[name].kind == "dir" and not member.isdir():
                for p in [p for p in tree if p.startswith(name + "/")]:
                    del tree[p]
            kind = ("reg" if member.isreg() else "dir" if member.isdir() else
                    "symlink" if member.issym() else "other")
            tree[name] = Node(i, kind, member.linkname if member.issym() else "")
            this_layer.add(name)
    return tree


def _member(rng: random.Random) -> tarfile.TarInfo:
    parts = [rng.choice(NAMES) for _ in range(rng.randint(1, 4))]
    kind = rng.choice(["reg", "reg", "dir", "dir", "sym", "wh", "opq"])
    if kind == "wh":
        parts[-1] = ".wh." + parts[-1]
    elif kind == "opq":
        parts[-1] = ".wh..wh..opq"
    info = tarfile.TarInfo(rng.choice(["", "./", "/"]) + "/".join(parts))
    if kind == "dir":
        info.type = tarfile.DIRTYPE
    elif kind == "sym":
        info.type = tarfile.SYMTYPE
        info.linkname = rng.choice(NAMES)
    return info


def test_random_stacks_match_the_rules() -> None:
    rng = random.Random(20261128)
    for case in range(400):
        layers = [[_member(rng) for _ in range(rng.randint(1, 25))]
                  for _ in range(rng.randint(1, 4))]
        tree = MergedTree()
        for i, members in enumerate(layers):
            tree.merge_layer(i, members)
        got = {p: Node(n.layer, n.kind, n.link) for p, n in tree.nodes.items()}
        assert got == _reference(layers), f"case {case}"


def test_a_whiteout_touches_only_what_is_below_it() -> None:
    tree = MergedTree()
    tree.merge_layer(0, [tarfile.TarInfo(f"usr/share/{i}/f") for i in range(2000)]
                     + [tarfile.TarInfo("etc/x")])
    looked: list[str] = []
    real = tree.below

    def counting(path: str) -> list[str]:
        out = real(path)
        looked.extend(out)
        return out

    tree.below = counting  # type: ignore[method-assign]
    tree.merge_layer(1, [tarfile.TarInfo(f"etc/.wh.x{i}") for i in range(500)]
                     + [tarfile.TarInfo("etc/.wh.x")])
    assert "etc/x" not in tree.nodes and len(tree.nodes) == 2000
    assert looked == []  # nothing was below etc/x*: the 2000 other paths were never looked at
    tree.merge_layer(2, [tarfile.TarInfo("usr/share/7/.wh..wh..opq")] * 50)
    assert len(looked) == 1  # usr/share/7/f, once: the repeated marker finds nothing more
    assert "usr/share/7/f" not in tree.nodes and "usr/share/8/f" in tree.nodes
