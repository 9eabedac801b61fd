"""Property tests: random small trees survive build -> open -> read, in both formats."""

from __future__ import annotations

import gzip
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipfsnap.estargz import BytesRangeReader, LayerReader, verify_blob
from tests.estargz.helpers import Item, build_bytes, make_tar, open_bytes, tar_names

NAME = st.text(alphabet="abcxyz_-.é文", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..") and not s.startswith(".wh")
)


@st.composite
def trees(draw: Any) -> list[Item]:
    dirs = draw(st.lists(st.lists(NAME, min_size=1, max_size=3), max_size=4))
    dir_paths = sorted({"/".join(d[: i + 1]) for d in dirs for i in range(len(d))})
    items = [Item(p, "dir", mode=0o755) for p in dir_paths]
    files = draw(
        st.dictionaries(
            st.tuples(st.sampled_from(["", *dir_paths]), NAME),
            st.binary(max_size=300),
            max_size=8,
        )
    )
    used = set(dir_paths)
    for (parent, base), data in files.items():
        path = f"{parent}/{base}" if parent else base
        if path in used:
            continue
        used.add(path)
        items.append(Item(path, data=data, mode=draw(st.sampled_from([0o644, 0o4755]))))
    regs = [i for i in items if i.type == "reg"]
    if regs and draw(st.booleans()):
        target = draw(st.sampled_from(regs))
        if "hl" not in used:
            items.append(Item("hl", "hardlink", link=target.name))
    if draw(st.booleans()) and "sl" not in used:
        items.append(Item("sl", "symlink", link=draw(NAME)))
    return items


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=trees(),
    chunk=st.sampled_from([1, 7, 64, 4096]),
    compression=st.sampled_from(["gzip", "zstd"]),
)
def test_round_trip(items: list[Item], chunk: int, compression: str) -> None:
    blob, res = build_bytes(make_tar(items), chunk_size=chunk, compression=compression)
    idx = open_bytes(blob, toc_digest=res.toc_digest)
    lr = LayerReader(idx, BytesRangeReader(blob))
    by_name = {i.name: i for i in items}
    for it in items:
        e = idx.entry(it.name)
        assert e is not None
        if it.type == "reg":
            assert e.type == "reg" and e.size == len(it.data) and e.mode == it.mode
            assert lr.read(it.name) == it.data
            if it.data:
                mid = len(it.data) // 2
                assert lr.read(it.name, mid, 5) == it.data[mid : mid + 5]
        elif it.type == "hardlink":
            assert lr.read(it.name) == by_name[it.link].data
            assert idx.nlink(it.link) == 2
        else:
            assert e.type == it.type
    walked = [p for p, _ in idx.walk()]
    assert sorted(walked) == sorted({"", *by_name, *(p.rpartition("/")[0] for p in by_name)})
    assert verify_blob(BytesRangeReader(blob), len(blob)).toc_digest == res.toc_digest
    if compression == "gzip":
        names = tar_names(gzip.decompress(blob))
        assert names == [".no.prefetch.landmark", *[i.name for i in items], "stargz.index.json"]
