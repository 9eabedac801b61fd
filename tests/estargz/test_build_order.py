"""The builder's prioritized order on hostile tars (issue 8, found reading the code): long
hardlink chains and deep trees are ordered without recursion (a chain of 1500 raised
RecursionError), names written twice cost O(1) each (20,000 took 24 s), and the order is
the one the recursive definition gives: parents, then hardlink targets, then the entry."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipfsnap.estargz import BadTar
from ipfsnap.estargz.types import PREFETCH_LANDMARK
from tests.estargz.helpers import Item, build_bytes, make_tar, toc_of


def _names(items: list[Item], prioritize: list[str]) -> list[str]:
    blob, _ = build_bytes(make_tar(items), prioritize=prioritize, chunk_size=1 << 20,
                          allow_missing_prioritized=True)
    return [e["name"].rstrip("/") for e in toc_of(blob)["entries"]]


def test_long_hardlink_chain_is_ordered() -> None:
    n = 1500
    items = [Item("f", data=b"x")]
    items += [Item(f"h{i}", "hardlink", link=f"h{i - 1}" if i else "f") for i in range(n)]
    names = _names(items, [f"h{n - 1}"])
    assert names[: n + 2] == ["f", *(f"h{i}" for i in range(n)), PREFETCH_LANDMARK]


def test_deep_tree_is_ordered() -> None:
    depth = 1200
    items = [Item("/".join(["d"] * (i + 1)), "dir") for i in range(depth)]
    items.append(Item("/".join(["d"] * depth) + "/f", data=b"x"))
    names = _names(items[::-1], [items[-1].name])
    assert names[: depth + 1] == [i.name for i in items]


def test_names_written_twice_keep_their_last_place() -> None:
    items = [Item(f"f{i}", data=b"a") for i in range(3)] + [Item("f0", data=b"b")]
    assert _names(items, ["f1"]) == ["f1", PREFETCH_LANDMARK, "f2", "f0"]


def test_hardlink_cycle_is_refused() -> None:
    items = [Item("a", "hardlink", link="b"), Item("b", "hardlink", link="a")]
    with pytest.raises(BadTar, match="hardlink cycle"):
        _names(items, ["a"])


def _reference(items: list[Item], prioritize: list[str]) -> list[str]:
    """The prioritized order by its recursive definition (small inputs only)."""
    last = {i.name: i for i in items}
    first: list[str] = []

    def move(name: str) -> None:
        if name not in last or name in first:
            return
        move(name.rpartition("/")[0])
        if last[name].type == "hardlink":
            move(last[name].link)
        if name not in first:
            first.append(name)

    for p in prioritize:
        move(p)
    return first


_NAMES = ["a", "b", "a/b", "a/c", "b/a", "a/b/c"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from(["reg", "dir", "hardlink"]),
                          st.sampled_from(_NAMES)), min_size=1, max_size=8),
       st.lists(st.sampled_from(_NAMES), min_size=1, max_size=3))
def test_order_matches_the_recursive_definition(
    spec: list[tuple[str, str, str]], prioritize: list[str],
) -> None:
    items = [Item(n, t, data=b"x" if t == "reg" else b"", link=ln if t == "hardlink" else "")
             for n, t, ln in spec]
    try:
        names = _names(items, prioritize)
    except BadTar:
        return  # a cycle, or a file where a directory must be (the tar is refused)
    want = _reference(items, prioritize)
    assert names[: len(want) + 1] == [*want, PREFETCH_LANDMARK], (spec, prioritize)
