"""Plain data of the format: range readers, limits, TOC entries, chunks, constants."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Annotated, BinaryIO, Protocol

import msgspec

from ipfsnap.estargz.errors import TruncatedBlob

log = logging.getLogger(__name__)

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARKS = frozenset((PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK))
#: the one byte a landmark file holds
LANDMARK_CONTENTS = b"\x0f"

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
ZSTD_MANIFEST_CHECKSUM_ANNOTATION = "io.containers.zstd-chunked.manifest-checksum"
ZSTD_MANIFEST_POSITION_ANNOTATION = "io.containers.zstd-chunked.manifest-position"

DEFAULT_CHUNK_SIZE = 4 << 20

ENTRY_TYPES = frozenset(("dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"))


class RangeReader(Protocol):
    """Random access to a blob: a local file, an IPFS ``cat`` or an HTTP range request."""

    def read_at(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``, or raise."""
        ...


@dataclass(frozen=True)
class Limits:
    """Bounds against hostile blobs; every one is configurable."""

    #: compressed and uncompressed TOC bytes (the reference's own TOCs are a few MiB)
    max_toc_size: int = 64 << 20
    max_entries: int = 1_000_000
    #: PATH_MAX on Linux is 4096 bytes
    max_name_length: int = 4096
    #: uncompressed bytes one chunk may claim; bounds what one decompression inflates
    max_chunk_size: int = 1 << 30


DEFAULT_LIMITS = Limits()


#: the largest integer a TOC field may hold (Go's int64)
INT_MAX = (1 << 63) - 1
#: a TOC integer: non-negative int64 (enforced when decoding; see ``estargz.toc``)
_TOCInt = Annotated[int, msgspec.Meta(ge=0, le=INT_MAX)]


class TOCEntry(msgspec.Struct, rename="camel", gc=False, forbid_unknown_fields=True):
    """One TOC entry, field for field (snake_case of the JSON names).

    A ``msgspec.Struct`` (slotted, not tracked by the cyclic GC: an entry cannot be part of a
    cycle) so that ``estargz.toc`` decodes a whole TOC into entries in C: the JSON names
    are the camelCase of the field names, and the integer bounds below are checked while
    decoding. ``type`` and the digests are checked after decoding (``estargz.toc``). A
    100k-entry index holds 100k of these."""

    name: str
    type: str
    size: _TOCInt = 0
    modtime: str = ""
    link_name: str = ""
    mode: _TOCInt = 0
    uid: _TOCInt = 0
    gid: _TOCInt = 0
    user_name: str = ""
    group_name: str = ""
    dev_major: _TOCInt = 0
    dev_minor: _TOCInt = 0
    xattrs: dict[str, bytes] = msgspec.field(default_factory=dict)
    digest: str = ""
    offset: _TOCInt = 0
    chunk_offset: _TOCInt = 0
    chunk_size: _TOCInt = 0
    chunk_digest: str = ""
    inner_offset: _TOCInt = 0


class Chunk(msgspec.Struct, frozen=True, gc=False):
    """One chunk of a regular file, with its compressed extent in the blob.

    A frozen ``msgspec.Struct`` (hashable, compared by value like a frozen dataclass): made in
    C, about 10x faster than a frozen dataclass, and a big layer makes 100k of them."""

    offset: int
    end: int
    chunk_offset: int
    chunk_size: int
    chunk_digest: str
    inner_offset: int = 0


class FileRangeReader:
    """:class:`RangeReader` over a local file (``os.pread``, safe across threads)."""

    def __init__(self, f: BinaryIO, name: str = "") -> None:
        self._fd = f.fileno()
        self.name = name or getattr(f, "name", "<file>")

    def read_at(self, offset: int, length: int) -> bytes:
        out = bytearray()
        while len(out) < length:
            piece = os.pread(self._fd, length - len(out), offset + len(out))
            if not piece:
                raise TruncatedBlob(
                    f"{self.name}: wanted {length} bytes at offset {offset}, file ends "
                    f"after {len(out)}"
                )
            out += piece
        return bytes(out)


class BytesRangeReader:
    """:class:`RangeReader` over bytes in memory (tests, small blobs)."""

    def __init__(self, data: bytes, name: str = "<bytes>") -> None:
        self._data = data
        self.name = name

    def read_at(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > len(self._data):
            raise TruncatedBlob(
                f"{self.name}: wanted {length} bytes at offset {offset} of a "
                f"{len(self._data)}-byte blob"
            )
        return self._data[offset : offset + length]
