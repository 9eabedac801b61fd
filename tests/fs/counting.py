"""A fake BlobSource that counts its requests (tests of request patterns)."""

from __future__ import annotations


class CountingSource:
    """A BlobSource over bytes that records every request (offset, length)."""

    def __init__(self, data: bytes, name: str = "fake-blob") -> None:
        self.data = data
        self.name = name
        self.calls: list[tuple[int, int]] = []

    def read_at(self, offset: int, length: int) -> bytes:
        self.calls.append((offset, length))
        if offset < 0 or length < 0 or offset + length > len(self.data):
            raise AssertionError(f"source read outside the blob: {offset}+{length}")
        return self.data[offset:offset + length]

    def size(self) -> int:
        return len(self.data)

    def close(self) -> None:
        pass
