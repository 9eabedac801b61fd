"""Compact storage of every file's chunks, so the parsed TOC can be dropped after mounting.

A ``Chunk`` object costs a few hundred bytes; a 100k-file layer has 100k+ of them. Here each
chunk is 5 int64 columns plus its 32-byte sha256, ~72 bytes, and ``Chunk`` objects are made
only for the files being read.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence

from ipfsnap.estargz.types import Chunk

_PREFIX = "sha256:"


class ChunkTable:
    def __init__(self) -> None:
        self._offset = array("q")
        self._end = array("q")
        self._coff = array("q")
        self._size = array("q")
        self._inner = array("q")
        self._digest = bytearray()
        #: digests that are not plain sha256 (kept as text; the read will fail verification)
        self._odd: dict[int, str] = {}
        #: per inode number: index of its first chunk and chunk count (0 = no chunks)
        self._first = array("q")
        self._count = array("q")

    def __len__(self) -> int:
        return len(self._offset)

    def add(self, ino: int, chunks: Iterable[Chunk]) -> None:
        first = len(self._offset)
        for c in chunks:
            i = len(self._offset)
            self._offset.append(c.offset)
            self._end.append(c.end)
            self._coff.append(c.chunk_offset)
            self._size.append(c.chunk_size)
            self._inner.append(c.inner_offset)
            raw: bytes | None = None
            if c.chunk_digest.startswith(_PREFIX) and len(c.chunk_digest) == 71:
                try:
                    raw = bytes.fromhex(c.chunk_digest[7:])
                except ValueError:
                    raw = None
            if raw is None:
                self._odd[i] = c.chunk_digest
                raw = bytes(32)
            self._digest += raw
        count = len(self._offset) - first
        if count:
            if ino >= len(self._first):
                grow = ino + 1 - len(self._first)
                self._first.extend([0] * grow)
                self._count.extend([0] * grow)
            self._first[ino] = first
            self._count[ino] = count

    def _chunk(self, i: int) -> Chunk:
        digest = self._odd.get(i) or _PREFIX + self._digest[32 * i : 32 * i + 32].hex()
        return Chunk(offset=self._offset[i], end=self._end[i], chunk_offset=self._coff[i],
                     chunk_size=self._size[i], chunk_digest=digest, inner_offset=self._inner[i])

    def of(self, ino: int) -> Sequence[Chunk]:
        """The chunks of a file, sorted by ``chunk_offset``."""
        if not 0 <= ino < len(self._first) or not self._count[ino]:
            return ()
        first, count = self._first[ino], self._count[ino]
        return [self._chunk(i) for i in range(first, first + count)]

    def __iter__(self) -> Iterator[Chunk]:
        # one hex conversion and zipped columns instead of per-row indexing: ~25% faster
        # over the 100k chunks a big layer's start-up walks
        hexes = self._digest.hex()
        odd = self._odd
        rows = zip(self._offset, self._end, self._coff, self._size, self._inner, strict=True)
        for i, (offset, end, coff, size, inner) in enumerate(rows):
            digest = odd.get(i) or _PREFIX + hexes[64 * i : 64 * i + 64]
            yield Chunk(offset=offset, end=end, chunk_offset=coff, chunk_size=size,
                        chunk_digest=digest, inner_offset=inner)
