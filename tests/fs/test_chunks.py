"""The compact chunk table gives back exactly the chunks put in (per file and in order)."""

from __future__ import annotations

import hashlib

from ipfsnap.estargz.types import Chunk
from ipfsnap.fs.chunks import ChunkTable, digest_key


def chunk(i: int, digest: str | None = None) -> Chunk:
    return Chunk(offset=1000 * i, end=1000 * i + 700 + i, chunk_offset=4096 * (i % 3),
                 chunk_size=4096, inner_offset=i % 2,
                 chunk_digest=digest or "sha256:" + hashlib.sha256(str(i).encode()).hexdigest())


def test_round_trip_per_file_and_in_order() -> None:
    files = {
        2: [chunk(0), chunk(1), chunk(2)],
        5: [chunk(3, "sha512:not-a-sha256")],  # kept as text: verification will fail it
        3: [chunk(4), chunk(5, "sha256:XYZ")],
        9: [],
    }
    table = ChunkTable()
    for ino, chunks in files.items():
        table.add(ino, chunks)
    for ino, chunks in files.items():
        assert list(table.of(ino)) == chunks
    assert list(table.of(1)) == [] and list(table.of(100)) == []
    everything = [c for chunks in files.values() for c in chunks]
    assert list(table) == everything
    assert len(table) == len(everything)


def _files() -> dict[int, list[Chunk]]:
    return {
        2: [chunk(0), chunk(1), chunk(2)],
        5: [chunk(3, "sha512:not-a-sha256")],
        3: [chunk(4), chunk(5, "sha256:XYZ")],
        4: [chunk(6, "sha256:" + "AB" * 32)],  # upper case: stored as bytes, as add() does
        7: [chunk(0)],  # a chunk shared with another file (same digest and extent)
        9: [],
    }


def test_from_files_equals_adding_one_file_at_a_time() -> None:
    files = _files()
    one_by_one = ChunkTable()
    for ino, chunks in files.items():
        one_by_one.add(ino, chunks)
    at_once = ChunkTable.from_files(files.items())
    assert list(at_once) == list(one_by_one)
    for ino in range(12):
        assert list(at_once.of(ino)) == list(one_by_one.of(ino))
    assert list(ChunkTable.from_files([])) == []
    # a digest with whitespace must not shift the others (bytes.fromhex skips it)
    spaced = chunk(8, "sha256:" + "a " * 32)
    table = ChunkTable.from_files([(1, [spaced, chunk(9)])])
    assert [c.chunk_digest for c in table] == ["sha256:" + "a " * 32, chunk(9).chunk_digest]


def test_distinct_chunks_in_blob_order() -> None:
    table = ChunkTable.from_files(_files().items())
    rows, firsts = table.distinct()
    everything = list(table)
    # naive: the first row of each digest (as the table gives them back), by (offset, end)
    seen: dict[str, int] = {}
    for i, c in enumerate(everything):
        seen.setdefault(c.chunk_digest, i)
    want = sorted(seen.values(), key=lambda i: (everything[i].offset, everything[i].end, i))
    assert list(rows) == want
    assert [table.chunk(r) for r in rows] == [everything[i] for i in want]
    assert table.offsets_of(rows).tolist() == [everything[i].offset for i in want]
    assert table.extents(rows) == sum(everything[i].end - everything[i].offset for i in want)
    for d, i in seen.items():
        assert firsts[digest_key(d)] == i
        assert table.extent(i) == everything[i].end - everything[i].offset
    # a digest the table does not hold, or a non-canonical spelling of one it does
    assert digest_key("sha256:" + "AB" * 32) not in firsts
    assert digest_key("sha256:" + "ab" * 32) in firsts
