"""Building: layout, chunking, metadata, landmarks, prioritization, determinism, memory."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import tracemalloc
import zlib
from typing import Any

import pytest
import zstandard

from ipfsnap.estargz import (
    BadCompression,
    BadTar,
    BuildOptions,
    BytesRangeReader,
    LayerReader,
    PrioritizedFileNotFound,
    build,
    verify_blob,
)
from ipfsnap.estargz.builder import format_modtime
from tests.estargz.helpers import (
    Item,
    build_bytes,
    make_tar,
    open_bytes,
    tar_members,
    tar_names,
    toc_of,
)

C = 1024  # small chunk size keeps fixtures tiny


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def payload(n: int, seed: int = 0) -> bytes:
    # incompressible-ish but deterministic
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


@pytest.mark.parametrize("size", [0, 1, C - 1, C, 3 * C, 3 * C + 1])
def test_chunking_edge_cases(size: int) -> None:
    data = payload(size)
    blob, res = build_bytes(make_tar([Item("f", data=data)]), chunk_size=C)
    entries = [e for e in toc_of(blob)["entries"] if e["name"] == "f"]
    n_chunks = max(1, -(-size // C))
    assert len(entries) == n_chunks
    assert entries[0]["type"] == "reg" and entries[0].get("size", 0) == size
    assert entries[0]["digest"] == sha(data)
    assert all(e["type"] == "chunk" for e in entries[1:])
    if size == 0:
        assert "offset" not in entries[0] and "chunkDigest" not in entries[0]
    for k, e in enumerate(entries if size else []):
        piece = data[k * C : (k + 1) * C]
        assert e.get("chunkOffset", 0) == k * C
        # chunkSize is written for full chunks only, as the reference does
        assert e.get("chunkSize", 0) == (C if len(piece) == C else 0)
        assert e["chunkDigest"] == sha(piece)
        # every chunk starts its own gzip member at its offset
        assert zlib.decompressobj(31).decompress(blob[e["offset"] :], len(piece)) == piece
    idx = open_bytes(blob, toc_digest=res.toc_digest)
    assert [c.chunk_size for c in idx.chunks("f")] == [
        len(data[i : i + C]) for i in range(0, size, C)
    ]
    lr = LayerReader(idx, BytesRangeReader(blob))
    assert lr.read("f") == data
    assert lr.read("f", max(0, size - 3), 10) == data[max(0, size - 3) :]
    if size > C:
        assert lr.read("f", C - 1, 2) == data[C - 1 : C + 1]


def every_type_items() -> list[Item]:
    return [
        Item("d", "dir", mode=0o755, uname="root", gname="root"),
        Item(
            "d/file", data=b"hello", mode=0o4755, uid=70000, gid=70001, uname="big", gname="biggrp"
        ),
        Item("d/again", data=b"x", uid=70000, gid=70001, uname="big", gname="biggrp"),
        Item("d/sym", "symlink", link="/etc/passwd", mode=0o777),
        Item("other/hard", "hardlink", link="d/file"),
        Item("dev/char", "char", devmajor=1, devminor=3, mode=0o666),
        Item("dev/block", "block", devmajor=8, devminor=1, mode=0o660),
        Item("fifo", "fifo", mode=0o600),
        Item("xattr", data=b"x", xattrs={"user.k": "v\u00e9", "security.capability": "c"}),
        Item("long/" + "n" * 180, data=b"long"),
        Item("ünïcødé/文件", data=b"utf8"),
        Item(".wh.gone", data=b""),
        Item("d/.wh..wh..opq", data=b""),
        Item("epoch", data=b"", mtime=0),
    ]


def test_every_entry_type_metadata() -> None:
    blob, res = build_bytes(make_tar(every_type_items()), chunk_size=C)
    toc = {e["name"].rstrip("/"): e for e in toc_of(blob)["entries"]}
    # names are kept as written in the tar: tarfile writes directories with a slash
    assert any(e["name"] == "d/" for e in toc_of(blob)["entries"])
    assert toc["d"]["type"] == "dir" and toc["d"]["mode"] == 0o755
    assert toc["d"]["modtime"] == "2020-09-13T12:26:40Z"
    f = toc["d/file"]
    assert (f["mode"], f["uid"], f["gid"], f["userName"], f["groupName"]) == (
        0o4755,
        70000,
        70001,
        "big",
        "biggrp",
    )
    # names are written only when they change for an id (the reference's compaction)
    assert "userName" not in toc["d/again"] and toc["d/again"]["uid"] == 70000
    assert toc["d/sym"]["linkName"] == "/etc/passwd" and toc["d/sym"]["type"] == "symlink"
    assert toc["other/hard"]["type"] == "hardlink"
    assert toc["other/hard"]["linkName"] == "d/file"
    assert (toc["dev/char"]["devMajor"], toc["dev/char"]["devMinor"]) == (1, 3)
    assert toc["dev/block"]["type"] == "block" and toc["fifo"]["type"] == "fifo"
    assert toc["xattr"]["xattrs"] == {"user.k": "dsOp", "security.capability": "Yw=="}
    assert "long/" + "n" * 180 in toc and "ünïcødé/文件" in toc
    assert "modtime" not in toc["epoch"]

    idx = open_bytes(blob, toc_digest=res.toc_digest)
    lr = LayerReader(idx, BytesRangeReader(blob))
    hard = idx.entry("other/hard")
    assert hard is idx.entry("d/file") and hard is not None and hard.type == "reg"
    assert idx.nlink("d/file") == 2 and idx.nlink("other/hard") == 2
    assert lr.read("other/hard") == b"hello"
    again = idx.entry("d/again")
    assert again is not None and (again.user_name, again.group_name) == ("big", "biggrp")
    assert idx.entry("xattr") is not None
    assert idx.entry("xattr").xattrs == {"user.k": "vé".encode(), "security.capability": b"c"}  # type: ignore[union-attr]
    assert lr.read("ünïcødé/文件") == b"utf8"
    # implicit parents exist
    assert idx.entry("other") is not None and idx.entry("other").type == "dir"  # type: ignore[union-attr]
    assert set(idx.children("dev")) == {"char", "block"}
    assert idx.nlink("") == 2 + len([k for k, v in idx.children("").items() if v.type == "dir"])


def test_decompressed_blob_is_the_input_tar_plus_landmark_and_toc() -> None:
    items = every_type_items()
    tar = make_tar(items)
    blob, res = build_bytes(tar, chunk_size=C)
    plain = gzip.decompress(blob)
    assert res.diff_id == sha(plain) and res.uncompressed_size == len(plain)
    names = tar_names(plain)
    assert names == [".no.prefetch.landmark", *[i.name for i in items], "stargz.index.json"]
    src = tar_members(tar)
    out = tar_members(plain)
    for name, (a, adata) in src.items():
        b, bdata = out[name]
        assert (a.type, a.mode, a.uid, a.linkname, a.pax_headers) == (
            b.type,
            b.mode,
            b.uid,
            b.linkname,
            b.pax_headers,
        )
        assert adata == bdata
    assert out[".no.prefetch.landmark"][1] == b"\x0f"
    assert res.blob_size == len(blob) and res.blob_digest == sha(blob)


def test_landmark_hidden_and_no_prefetch() -> None:
    blob, _ = build_bytes(make_tar([Item("a", data=b"1")]))
    assert toc_of(blob)["entries"][0]["name"] == ".no.prefetch.landmark"
    idx = open_bytes(blob)
    assert idx.prefetch_end == 0
    assert idx.entry(".no.prefetch.landmark") is None
    assert [p for p, _ in idx.walk()] == ["", "a"]


def prio_items() -> list[Item]:
    return [
        Item("z", data=b"first in tar"),
        Item("a", "dir"),
        Item("a/b", "dir"),
        Item("a/b/f", data=b"prio"),
        Item("x", "dir"),
        Item("x/y", data=b"target"),
        Item("h", "hardlink", link="x/y"),
        Item("q", data=b"rest"),
    ]


def test_prioritized_files_with_parents_and_link_targets_come_first() -> None:
    blob, res = build_bytes(make_tar(prio_items()), prioritize=["./a/b/f", "h"])
    names = [e["name"] for e in toc_of(blob)["entries"]]
    assert names == ["a/", "a/b/", "a/b/f", "x/", "x/y", "h", ".prefetch.landmark", "z", "q"]
    idx = open_bytes(blob, toc_digest=res.toc_digest)
    lm = next(e for e in toc_of(blob)["entries"] if e["name"] == ".prefetch.landmark")
    assert idx.prefetch_end == lm["offset"] > 0
    assert all(c.offset < idx.prefetch_end for c in idx.chunks("a/b/f"))
    assert all(c.offset > idx.prefetch_end for c in idx.chunks("q"))
    assert idx.entry(".prefetch.landmark") is None
    names = tar_names(gzip.decompress(blob))
    assert names.count(".prefetch.landmark") == 1 and ".no.prefetch.landmark" not in names


def test_prioritize_missing() -> None:
    tar = make_tar(prio_items())
    with pytest.raises(PrioritizedFileNotFound, match="nope"):
        build_bytes(tar, prioritize=["nope"])
    blob, res = build_bytes(tar, prioritize=["nope", "q"], allow_missing_prioritized=True)
    assert res.missing_prioritized == ("nope",)
    assert [e["name"] for e in toc_of(blob)["entries"]][:2] == ["q", ".prefetch.landmark"]


def test_same_bytes_whatever_the_worker_count() -> None:
    items = [Item(f"f{i}", data=payload(i * 700, i)) for i in range(40)]
    tar = make_tar(items)
    outs = {
        (w, p): build_bytes(tar, chunk_size=C, workers=w, max_pending=p, level=6)[0]
        for w, p in [(1, 0), (2, 1), (2, 0), (4, 3), (8, 64)]
    }
    assert len(set(outs.values())) == 1


def test_compressed_inputs_give_the_same_blob() -> None:
    tar = make_tar(every_type_items())
    plain, _ = build_bytes(tar)
    assert build_bytes(gzip.compress(tar))[0] == plain
    assert build_bytes(zstandard.ZstdCompressor().compress(tar))[0] == plain
    # a tar without the end-of-archive blocks is accepted too
    assert build_bytes(make_tar(every_type_items(), end_marker=False))[0] == plain


def test_existing_toc_and_landmarks_in_the_input_are_dropped() -> None:
    blob, _ = build_bytes(make_tar([Item("a", data=b"1")]))
    again, _ = build_bytes(gzip.decompress(blob))
    assert again == blob


def test_bad_inputs() -> None:
    with pytest.raises(BadTar):
        build_bytes(b"\x01" * 1024)
    tar = make_tar([Item("a", data=b"x" * 5000)])
    with pytest.raises(BadTar):
        build_bytes(tar[:1500])  # ends inside the payload
    gz = gzip.compress(tar)
    with pytest.raises(BadCompression):
        build_bytes(gz[: len(gz) // 2])
    zs = zstandard.ZstdCompressor().compress(tar)
    with pytest.raises(BadCompression):
        build_bytes(zs[:4] + b"\xff" * 20)
    with pytest.raises(BadTar):
        build_bytes(make_tar([Item("a", data=b"1")])[:512] + b"\x00" * 100)


class LazyTar(io.RawIOBase):
    """A tar of ``count`` files of ``size`` bytes each, produced on the fly."""

    def __init__(self, count: int, size: int) -> None:
        self._gen = self._blocks(count, size)
        self._buf = b""

    def _blocks(self, count: int, size: int) -> Any:
        for i in range(count):
            ti = tarfile.TarInfo(f"file{i}")
            ti.size = size
            yield ti.tobuf(tarfile.USTAR_FORMAT)
            block = payload(1 << 16, i)
            for off in range(0, size, len(block)):
                yield block[: min(len(block), size - off)]
            yield bytes(-size % 512)
        yield bytes(1024)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while len(self._buf) < n or n < 0:
            nxt = next(self._gen, None)
            if nxt is None:
                break
            self._buf += nxt
        out, self._buf = (self._buf, b"") if n < 0 else (self._buf[:n], self._buf[n:])
        return out


class HashSink(io.RawIOBase):
    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.h.update(b)
        self.n += len(b)
        return len(b)


def test_streaming_uses_bounded_memory() -> None:
    count, size, chunk = 24, 2 << 20, 256 << 10  # 48 MiB through a few 256 KiB members
    sink = HashSink()
    tracemalloc.start()
    try:
        res = build(
            LazyTar(count, size),  # type: ignore[arg-type]
            sink,  # type: ignore[arg-type]
            BuildOptions(chunk_size=chunk, level=1, workers=2, max_pending=2),
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.uncompressed_size > count * size
    assert sink.n == res.blob_size
    # pending members + the one being filled + the TOC, far below the 48 MiB streamed
    assert peak < 12 << 20, peak


def test_zstd_chunked_round_trip() -> None:
    items = [*every_type_items(), Item("big", data=payload(5 * C + 7))]
    blob, res = build_bytes(make_tar(items), chunk_size=C, compression="zstd")
    assert blob.endswith(b"GnUlInUx")
    idx = open_bytes(blob, toc_digest=res.toc_digest)
    assert idx.compression == "zstd"
    lr = LayerReader(idx, BytesRangeReader(blob))
    assert lr.read("big") == payload(5 * C + 7)
    assert lr.read("d/file") == b"hello"
    assert len(idx.chunks("big")) == 6
    v = verify_blob(BytesRangeReader(blob), len(blob), toc_digest=res.toc_digest)
    assert v.compression == "zstd" and v.toc_digest == res.toc_digest
    ann = res.annotations()
    off, clen, rlen, kind = (
        int(x) for x in ann["io.containers.zstd-chunked.manifest-position"].split(":")
    )
    assert (
        kind == 1
        and sha(blob[off : off + clen]) == (ann["io.containers.zstd-chunked.manifest-checksum"])
    )
    assert len(zstandard.ZstdDecompressor().decompress(blob[off : off + clen])) == rlen
    plain = (
        zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
    )
    assert sha(plain) == res.diff_id and len(plain) == res.uncompressed_size
    assert tar_names(plain)[0] == ".no.prefetch.landmark"


def test_default_level_and_annotations() -> None:
    blob, res = build_bytes(make_tar([Item("a", data=b"a" * 100)]), level=None)
    assert blob[8] == 2  # gzip XFL=2: the member was deflated at level 9
    assert res.annotations() == {
        "containerd.io/snapshot/stargz/toc.digest": res.toc_digest,
        "io.containers.estargz.uncompressed-size": str(res.uncompressed_size),
    }


@pytest.mark.parametrize(
    "mtime, text",
    [
        (0, ""),
        (0.4, ""),
        (1, "1970-01-01T00:00:01Z"),
        (1600000000.5, "2020-09-13T12:26:41Z"),
        (1600000000.49, "2020-09-13T12:26:40Z"),
        (-1, "1969-12-31T23:59:59Z"),
    ],
)
def test_modtime_format(mtime: float, text: str) -> None:
    assert format_modtime(mtime) == text


def test_build_to_file_is_readable_with_file_reader(tmp_path: Any) -> None:
    from ipfsnap.estargz import FileRangeReader, open_layer

    p = tmp_path / "b"
    with open(p, "wb") as f:
        res = build(io.BytesIO(make_tar([Item("a", data=b"abc")])), f)
    with open(p, "rb") as f:
        idx = open_layer(FileRangeReader(f), os.path.getsize(p), toc_digest=res.toc_digest)
        assert LayerReader(idx, FileRangeReader(f)).read("a") == b"abc"


def test_gnu_long_names_and_links() -> None:
    long_dir = "g" * 120
    items = [
        Item(long_dir, "dir"),
        Item(f"{long_dir}/{'f' * 150}", data=b"gnu"),
        Item("l", "symlink", link="t" * 200),
        Item("h", "hardlink", link=f"{long_dir}/{'f' * 150}"),
    ]
    tar = make_tar(items, fmt=tarfile.GNU_FORMAT)
    assert b"././@LongLink" in tar
    blob, res = build_bytes(tar)
    idx = open_bytes(blob, toc_digest=res.toc_digest)
    assert LayerReader(idx, BytesRangeReader(blob)).read("h") == b"gnu"
    assert idx.entry("l").link_name == "t" * 200  # type: ignore[union-attr]
    assert tar_names(gzip.decompress(blob))[1:-1] == [i.name for i in items]


def test_global_pax_header_is_kept_but_not_applied() -> None:
    # as Go's archive/tar reader (so containerd's unpacker and ours) reads it: a global
    # header is an entry of its own, not merged into later ones (merging made a 1 MiB one
    # cost ~40,000 records per entry: 21 s for 1000 entries; issue 8)
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"uname": "globaluser"}
    ) as tf:
        ti = tarfile.TarInfo("f")
        ti.size = 1
        ti.uname = ""
        tf.addfile(ti, io.BytesIO(b"1"))
    raw = buf.getvalue()
    blob, _ = build_bytes(raw)
    e = next(e for e in toc_of(blob)["entries"] if e["name"] == "f")
    assert "userName" not in e
    assert gzip.decompress(blob).count(b"uname=globaluser") == 1  # the global header is kept
