"""Offline CIDs of files, as ``ipfs add --cid-version=1`` computes them (Kubo's defaults).

Kubo with CIDv1 uses raw leaves, fixed 262144-byte chunks and the *balanced* layout with at
most 174 links per node. The balanced builder fills the first node with up to 174 leaves, then
repeatedly puts the current root under a new root and fills the new root's remaining slots with
full subtrees of the same depth. That is the same tree as grouping, level by level from the
leaves, every run of 174 nodes under a parent (the last group may be short), until one node is
left, a single leaf staying a bare raw block. So we build it bottom-up, streaming: each level
keeps its pending links and emits a parent as soon as it holds 174 of them, and the whole
file is never in memory (at most 174 links per level, ~6 KiB each).

Internal nodes are dag-pb (``PBNode``) whose ``Data`` is a UnixFS ``File`` message, encoded
with the field order Kubo writes: ``PBNode`` = Links (field 2) repeated, then Data (field 1);
``PBLink`` = Hash (1), Name (2, empty string, present), Tsize (3); UnixFS ``Data`` = Type (1)
= File (2), filesize (3), blocksizes (4, one unpacked varint per child).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ipfsnap.ipfs.cid import CID, DAG_PB, RAW, SHA2_256, encode_varint

log = logging.getLogger(__name__)

#: Kubo's default chunker: ``size-262144`` (256 KiB)
CHUNK_SIZE = 262144
#: Kubo's default maximum links per node in the balanced layout (go-unixfs helpers)
MAX_LINKS = 174
#: UnixFS Data.DataType File
UNIXFS_FILE = 2


@dataclass(frozen=True)
class Link:
    cid: bytes  # binary CIDv1
    tsize: int  # cumulative size of the child's DAG (encoded nodes and leaf bytes)
    file_size: int  # file bytes below the child


@dataclass(frozen=True)
class DagInfo:
    cid: str
    #: file bytes
    size: int
    #: cumulative DAG size, what Kubo's ``add`` reports as ``Size``
    dag_size: int
    #: blocks (leaves and nodes)
    blocks: int


def _key(field: int, wire: int) -> bytes:
    return encode_varint(field << 3 | wire)


def _bytes_field(field: int, value: bytes) -> bytes:
    return _key(field, 2) + encode_varint(len(value)) + value


def _mh(data: bytes) -> bytes:
    return bytes([SHA2_256, 32]) + hashlib.sha256(data).digest()


def leaf_link(chunk: bytes) -> Link:
    cid = CID(1, RAW, _mh(chunk)).to_bytes()
    return Link(cid, len(chunk), len(chunk))


def encode_file_node(links: list[Link]) -> bytes:
    """The dag-pb bytes of a UnixFS file node over ``links`` (no inline data)."""
    out = bytearray()
    for link in links:
        body = (
            _bytes_field(1, link.cid)
            + _bytes_field(2, b"")
            + _key(3, 0)
            + encode_varint(link.tsize)
        )
        out += _bytes_field(2, body)
    unixfs = bytearray(_key(1, 0) + encode_varint(UNIXFS_FILE))
    unixfs += _key(3, 0) + encode_varint(sum(link.file_size for link in links))
    for link in links:
        unixfs += _key(4, 0) + encode_varint(link.file_size)
    out += _bytes_field(1, bytes(unixfs))
    return bytes(out)


def node_link(links: list[Link]) -> Link:
    node = encode_file_node(links)
    cid = CID(1, DAG_PB, _mh(node)).to_bytes()
    return Link(cid, len(node) + sum(link.tsize for link in links),
                sum(link.file_size for link in links))


class DagBuilder:
    """Feed bytes with :meth:`write`, get the root with :meth:`finish`."""

    def __init__(self, chunk_size: int = CHUNK_SIZE, max_links: int = MAX_LINKS) -> None:
        if chunk_size <= 0 or max_links < 2:
            raise ValueError("chunk_size must be positive and max_links at least 2")
        self.chunk_size = chunk_size
        self.max_links = max_links
        self._buf = bytearray()
        self._levels: list[list[Link]] = [[]]
        self._size = 0
        self._blocks = 0

    def write(self, data: bytes) -> None:
        self._size += len(data)
        self._buf += data
        while len(self._buf) >= self.chunk_size:
            self._leaf(bytes(self._buf[: self.chunk_size]))
            del self._buf[: self.chunk_size]

    def _leaf(self, chunk: bytes) -> None:
        self._blocks += 1
        self._push(0, leaf_link(chunk))

    def _push(self, level: int, link: Link) -> None:
        if level == len(self._levels):
            self._levels.append([])
        links = self._levels[level]
        links.append(link)
        if len(links) == self.max_links:
            self._levels[level] = []
            self._blocks += 1
            self._push(level + 1, node_link(links))

    def finish(self) -> DagInfo:
        # the last partial chunk; an empty file is one empty raw leaf (Kubo does the same)
        if self._buf or self._blocks == 0:
            self._leaf(bytes(self._buf))
            self._buf.clear()
        level = 0
        while True:
            links = self._levels[level]
            higher = any(self._levels[level + 1:])
            if not higher and len(links) == 1:
                root = links[0]
                break
            if links:
                self._levels[level] = []
                self._blocks += 1
                self._push(level + 1, node_link(links))
            level += 1
        cid = CID(1, RAW if root.cid[1] == RAW else DAG_PB, root.cid[2:]).v1_base32()
        return DagInfo(cid, self._size, root.tsize, self._blocks)


def compute_dag(source: str | os.PathLike[str] | IO[bytes] | bytes | Iterable[bytes]) -> DagInfo:
    """:class:`DagInfo` of ``source`` (a path, a binary file object, bytes or byte pieces)."""
    builder = DagBuilder()
    if isinstance(source, (bytes, bytearray, memoryview)):
        builder.write(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        with open(Path(source), "rb") as f:
            while piece := f.read(1 << 20):
                builder.write(piece)
    elif hasattr(source, "read"):
        while piece := source.read(1 << 20):
            builder.write(piece)
    else:
        for piece in source:
            builder.write(piece)
    return builder.finish()


def compute_cid(source: str | os.PathLike[str] | IO[bytes] | bytes | Iterable[bytes]) -> str:
    """The CIDv1 base32 ``ipfs add --cid-version=1`` gives ``source``, computed offline."""
    return compute_dag(source).cid
