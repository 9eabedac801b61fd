"""The two sides of the interop tests, seen the same way.

``reference_*`` drive the Go checker (the reference library); ``ipfsnap_*`` use ipfsnap's
public format API (``open_layer``, ``LayerIndex``, ``decompress_chunk``, ``build``). Both
readers are reduced to ``Observed`` records per path, compared with ``compare`` against the
``Expected`` records parsed from the source tar.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tests.interop.fixtures import Expected

log = logging.getLogger(__name__)

LANDMARKS = frozenset((".prefetch.landmark", ".no.prefetch.landmark"))


@dataclass(frozen=True)
class BuildInfo:
    """What a builder reports for a blob, in the reference's JSON names."""

    toc_digest: str
    diff_id: str
    blob_digest: str
    blob_size: int
    uncompressed_size: int = -1  # -1: the builder does not report it


@dataclass(frozen=True)
class Observed:
    """What a reader reports for one path (hardlinks resolved to their target)."""

    path: str
    type: str
    size: int
    mode: int
    uid: int
    gid: int
    uname: str
    gname: str
    link_name: str
    dev_major: int
    dev_minor: int
    xattrs: dict[str, bytes] = field(default_factory=dict)
    modtime: str = ""
    sha256: str = ""
    nlink: int = 0
    chunks: int = 0  # chunks read (each verified) for a regular file


@dataclass(frozen=True)
class ReadSummary:
    toc_digest: str
    chunks_verified: int
    diff_id: str
    uncompressed_size: int


def _run(cmd: Sequence[str], *, env: Mapping[str, str] | None = None) -> str:
    proc = subprocess.run(
        list(cmd), capture_output=True, text=True, check=False,
        env=None if env is None else {**os.environ, **env},
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-4000:]}"
        )
    return proc.stdout


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return "sha256:" + h.hexdigest()


# -- the reference (Go checker) ------------------------------------------------------------
def reference_build(
    checker: Path,
    tar: Path,
    out: Path,
    *,
    chunk_size: int = 0,
    level: int = 9,
    zstd: bool = False,
    legacy: bool = False,
    procs: int = 1,
    prioritize: Sequence[str] = (),
) -> BuildInfo:
    """Build with ``estargz.Build``. ``procs`` is GOMAXPROCS, i.e. how many parts the
    reference splits the tar into (1 gives a TOC comparable with a sequential builder)."""
    cmd = [str(checker), "build", "-in", str(tar), "-out", str(out), "-level", str(level)]
    cmd += ["-procs", str(procs)]
    if chunk_size:
        cmd += ["-chunk-size", str(chunk_size)]
    if zstd:
        cmd.append("-zstd")
    if legacy:
        cmd.append("-legacy")
    for p in prioritize:
        cmd += ["-prioritize", p]
    d = json.loads(_run(cmd))
    return BuildInfo(d["tocDigest"], d["diffID"], d["blobDigest"], int(d["blobSize"]))


def reference_read(
    checker: Path, blob: Path, toc_digest: str | None
) -> tuple[dict[str, Observed], ReadSummary]:
    """Open + VerifyTOC + read every file chunk by chunk (each chunk verified) with the
    reference; landmarks are dropped, as a mounted layer hides them."""
    cmd = [str(checker), "read", "-blob", str(blob)]
    if toc_digest is not None:
        cmd += ["-toc-digest", toc_digest]
    out: dict[str, Observed] = {}
    summary: ReadSummary | None = None
    for line in _run(cmd).splitlines():
        d: dict[str, Any] = json.loads(line)
        if d.get("summary"):
            summary = ReadSummary(
                d["tocDigest"], d["chunksVerified"], d["diffID"], d["uncompressedSize"]
            )
            continue
        if d["path"] in ("", *LANDMARKS):
            continue
        out[d["path"]] = Observed(
            path=d["path"],
            type=d["type"],
            size=d["size"],
            mode=d["mode"] & 0o7777,
            uid=d["uid"],
            gid=d["gid"],
            uname=d["userName"],
            gname=d["groupName"],
            link_name=d["linkName"],
            dev_major=d["devMajor"],
            dev_minor=d["devMinor"],
            xattrs={k: base64.b64decode(v) for k, v in (d["xattrs"] or {}).items()},
            modtime=d["modtime"],
            sha256=d.get("contentSha256", ""),
            nlink=d["numLink"],
            chunks=d["chunks"],
        )
    assert summary is not None, f"checker read {blob}: no summary line"
    return out, summary


def reference_verify(checker: Path, blob: Path, toc_digest: str) -> int:
    """Open + VerifyTOC + every chunk read and verified once; returns the chunk count."""
    out = _run([str(checker), "verify", "-blob", str(blob), "-toc-digest", toc_digest])
    return int(json.loads(out)["chunksVerified"])


def reference_toc(checker: Path, blob: Path) -> bytes:
    """The blob's TOC JSON bytes, as the reference decompresses them."""
    proc = subprocess.run(
        [str(checker), "toc", "-blob", str(blob)], capture_output=True, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(f"checker toc {blob}: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


# -- ipfsnap ---------------------------------------------------------------------------
def ipfsnap_build(
    tar: Path,
    out: Path,
    *,
    chunk_size: int | None = None,
    level: int | None = 9,
    compression: str = "gzip",
    workers: int | None = None,
    prioritize: Sequence[str] = (),
) -> BuildInfo:
    """Build with ``ipfsnap.estargz.build``."""
    from ipfsnap.estargz import BuildOptions, build

    kw: dict[str, Any] = {"compression": compression}
    if level is not None:
        kw["level"] = level
    if chunk_size is not None:
        kw["chunk_size"] = chunk_size
    if workers is not None:
        kw["workers"] = workers
    if prioritize:
        kw["prioritize"] = list(prioritize)
    with tar.open("rb") as src, out.open("wb") as dst:
        res = build(src, dst, BuildOptions(**kw))
    return BuildInfo(
        res.toc_digest, res.diff_id, res.blob_digest, res.blob_size, res.uncompressed_size
    )


def ipfsnap_read(blob: Path, toc_digest: str | None) -> tuple[dict[str, Observed], int]:
    """Open with ``open_layer`` (TOC digest checked), walk every path and read every
    regular file through its chunks (``decompress_chunk`` verifies each); returns the
    observations and the number of chunks read."""
    from ipfsnap.estargz import FileRangeReader, decompress_chunk, open_layer

    out: dict[str, Observed] = {}
    nchunks = 0
    with blob.open("rb") as f:
        rr = FileRangeReader(f, str(blob))
        index = open_layer(rr, blob.stat().st_size, toc_digest=toc_digest)
        if toc_digest is not None:
            assert index.toc_digest == toc_digest
        for path, e in index.walk():
            if path == "":
                continue
            digest = ""
            nfile = 0
            if e.type == "reg":
                h = hashlib.sha256()
                pos = 0
                for c in index.chunks(path):
                    assert c.chunk_offset == pos, f"{path}: chunk at {c.chunk_offset}, want {pos}"
                    data = decompress_chunk(
                        index.compression, rr.read_at(c.offset, c.end - c.offset), c
                    )
                    assert len(data) == c.chunk_size
                    h.update(data)
                    pos += c.chunk_size
                    nfile += 1
                assert pos == e.size, f"{path}: chunks cover {pos} of {e.size} bytes"
                digest = h.hexdigest()
            out[path] = Observed(
                path=path,
                type=e.type,
                size=e.size,
                mode=e.mode & 0o7777,
                uid=e.uid,
                gid=e.gid,
                uname=e.user_name,
                gname=e.group_name,
                link_name=e.link_name,
                dev_major=e.dev_major,
                dev_minor=e.dev_minor,
                xattrs=dict(e.xattrs),
                modtime=e.modtime,
                sha256=digest,
                nlink=index.nlink(path),
                chunks=nfile,
            )
            nchunks += nfile
    return out, nchunks


# -- comparison --------------------------------------------------------------------------
def resolve_expected(expected: Mapping[str, Expected]) -> dict[str, Expected]:
    """Expected records as a reader shows them: a hardlink shows its final target's
    metadata and content (its own path kept)."""
    out: dict[str, Expected] = {}
    for path, e in expected.items():
        t = e
        seen = {path}
        while t.type == "hardlink":
            target = t.link_name.removeprefix("./")
            assert target not in seen, f"hardlink loop at {path}"
            seen.add(target)
            t = expected[target]
        out[path] = t if t is e else Expected(**{**_asdict(t), "path": path})
    return out


def _asdict(e: Expected) -> dict[str, Any]:
    return {f.name: getattr(e, f.name) for f in fields(e)}


def expected_nlink(expected: Mapping[str, Expected]) -> dict[str, int]:
    """Link count of every non-dir path: 1 + the hardlinks that resolve to its target."""
    resolved_target: dict[str, str] = {}
    for path, _e in expected.items():
        t = path
        while expected[t].type == "hardlink":
            t = expected[t].link_name.removeprefix("./")
        resolved_target[path] = t
    counts: dict[str, int] = {}
    for t in resolved_target.values():
        counts[t] = counts.get(t, 0) + 1
    return {p: counts[t] for p, t in resolved_target.items() if expected[p].type != "dir"}


def compare(
    expected: Mapping[str, Expected],
    got: Mapping[str, Observed],
    *,
    check_gname: bool = True,
    check_uname: bool = True,
    check_nlink: bool = True,
) -> list[str]:
    """Every difference between what the tar holds and what a reader shows, one line each."""
    problems: list[str] = []
    exp = resolve_expected(expected)
    nlinks = expected_nlink(expected)
    for path in sorted(set(exp) - set(got)):
        problems.append(f"{path!r}: missing from the reader")
    for path in sorted(set(got) - set(exp)):
        problems.append(f"{path!r}: not in the tar but shown by the reader")
    for path in sorted(set(exp) & set(got)):
        e, g = exp[path], got[path]
        pairs: list[tuple[str, object, object]] = [
            ("type", e.type, g.type),
            ("mode", oct(e.mode), oct(g.mode)),
            ("uid", e.uid, g.uid),
            ("gid", e.gid, g.gid),
            ("xattrs", e.xattrs, g.xattrs),
            ("modtime", e.modtime, g.modtime),
        ]
        if check_uname:
            pairs.append(("userName", e.uname, g.uname))
        if check_gname:
            pairs.append(("groupName", e.gname, g.gname))
        if e.type in ("reg",):
            pairs += [("size", e.size, g.size), ("content sha256", e.sha256, g.sha256)]
        if e.type == "symlink":
            pairs.append(("linkName", e.link_name, g.link_name))
        if e.type in ("char", "block"):
            pairs.append(("devMajor", e.dev_major, g.dev_major))
            pairs.append(("devMinor", e.dev_minor, g.dev_minor))
        if check_nlink and path in nlinks:
            pairs.append(("nlink", nlinks[path], g.nlink))
        for what, want, have in pairs:
            if want != have:
                problems.append(f"{path!r}: {what} is {have!r}, the tar says {want!r}")
    return problems


def toc_without_offsets(toc_json: bytes) -> list[dict[str, Any]]:
    """TOC entries with the fields that depend on the compressed layout removed (offsets);
    everything else (names, types, sizes, modes, owners, digests, chunk layout) stays."""
    doc = json.loads(toc_json)
    assert doc.get("version") == 1, f"TOC version {doc.get('version')!r}"
    return [
        {k: v for k, v in e.items() if k not in ("offset", "innerOffset")}
        for e in doc["entries"]
    ]
