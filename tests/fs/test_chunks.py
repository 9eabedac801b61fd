"""The compact chunk table gives back exactly the chunks put in (per file and in order)."""

from __future__ import annotations

import hashlib

from ipfsnap.estargz.types import Chunk
from ipfsnap.fs.chunks import ChunkTable


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
