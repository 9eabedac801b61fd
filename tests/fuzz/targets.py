"""Fuzz targets: one function per parser of hostile input, each taking raw bytes.

A target returns normally or raises an :class:`ipfsnap.errors.IpfsnapError` for input it
rejects; anything else it raises is a finding (see :func:`check`). Targets also assert
what a successful parse promises (round trips, bounds), so a wrong answer is a finding too.

The same functions run under atheris (``scripts/fuzz.py``, coverage guided) and in the
plain pytest run (``tests/fuzz/test_corpus.py`` replays every corpus file and reproducer).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import os
import shutil
import tempfile
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard

from ipfsnap.config import load_config
from ipfsnap.content import ImageStore, import_image
from ipfsnap.errors import IpfsnapError
from ipfsnap.estargz import (
    BuildOptions,
    BytesRangeReader,
    LayerReader,
    Limits,
    build,
    decompress_chunk,
    open_layer,
)
from ipfsnap.estargz.errors import BadFooter
from ipfsnap.estargz.footer import (
    GZIP_FOOTER_SIZE,
    LEGACY_FOOTER_SIZE,
    SKIPPABLE_HEADER_SIZE,
    ZSTD_FOOTER_SIZE,
    gzip_footer,
    parse_gzip_footer,
    parse_legacy_footer,
    parse_zstd_footer,
    skippable_frame,
    zstd_footer,
)
from ipfsnap.estargz.reader import LayerIndex
from ipfsnap.estargz.tario import END_OF_ARCHIVE, iter_headers, padding, ustar_header
from ipfsnap.estargz.toc import parse_toc_json
from ipfsnap.estargz.types import Chunk
from ipfsnap.ipfs.cid import cid_from_bytes, parse_cid
from ipfsnap.ipfs.multiaddr import discover_api, parse_api
from ipfsnap.ipfs.pnet import ENCODINGS, PSK_HEADER, read_swarm_key
from ipfsnap.oci import (
    Descriptor,
    canonical_json,
    load_json,
    parse_config,
    parse_document,
    parse_index,
    parse_manifest,
)
from ipfsnap.runtime import build_spec
from ipfsnap.runtime.elf import MAX_NEEDED, parse_elf
from ipfsnap.runtime.spec import image_container_config
from ipfsnap.snapshot.apply import ApplyLimits, apply_layer

HERE = Path(__file__).resolve().parent
#: seeds and the corpus kept from campaigns, one directory per target
CORPUS_DIR = HERE / "corpus"
#: reproducers of findings (fixed since), replayed by the normal test run
CRASHES_DIR = HERE / "crashes"
#: libFuzzer token dictionaries
DICTS_DIR = HERE / "dicts"

#: Bounds for the eStargz targets: small enough that no input can make a case cost more
#: than a few MiB or a few milliseconds, large enough for every code path (several
#: entries, chunked files, long names).
FUZZ_LIMITS = Limits(
    max_toc_size=1 << 20, max_entries=2000, max_name_length=1024, max_chunk_size=1 << 20
)
#: the unpacker's bounds: a bomb stops after 1 MiB of tar or file bytes
FUZZ_APPLY_LIMITS = ApplyLimits(max_size=1 << 20, max_entries=2000)


class OracleFailure(AssertionError):
    """A target's own check of a successful result failed (a wrong answer, not a crash)."""


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise OracleFailure(what)


# -- eStargz -----------------------------------------------------------------------------
def fuzz_footer(data: bytes) -> None:
    """The footer parser for the input's length (51: eStargz, 47: legacy stargz, 40:
    zstd:chunked); any other length goes to all three, which must refuse it."""
    if len(data) == ZSTD_FOOTER_SIZE:
        zf = parse_zstd_footer(data)
        expect(zf.toc_offset < 1 << 64 and zf.toc_size < 1 << 64, "zstd footer out of range")
        return
    parsers = {GZIP_FOOTER_SIZE: parse_gzip_footer, LEGACY_FOOTER_SIZE: parse_legacy_footer}
    parse = parsers.get(len(data))
    if parse is None:
        for p in (parse_gzip_footer, parse_legacy_footer, parse_zstd_footer):
            with contextlib.suppress(BadFooter):
                p(data)
                raise OracleFailure(f"{p.__name__} accepted {len(data)} bytes")
        raise BadFooter(f"fuzz: no footer is {len(data)} bytes")
    off = parse(data)
    expect(0 <= off < 1 << 64, f"footer offset {off} out of range")


def _exercise_index(idx: LayerIndex, payload_end: int) -> None:
    """Every lookup of the stable interface on every path, with the invariants it promises."""
    walked = 0
    for path, e in idx.walk():
        walked += 1
        expect(idx.entry(path) is not None, f"walked path {path!r} has no entry")
        expect(idx.nlink(path) >= 1, f"{path!r}: nlink < 1")
        expect(e.type == "dir" or not idx.children(path), f"{path!r}: a {e.type} with children")
        if e.type == "reg":
            _expect_chunks(idx, path, e.size, payload_end)
    expect(walked >= 1, "walk yields no root")


def _expect_chunks(idx: LayerIndex, path: str, size: int, payload_end: int) -> None:
    pos = 0
    for c in idx.chunks(path):
        if c.chunk_offset != pos or c.chunk_size <= 0:
            raise OracleFailure(f"{path!r}: chunk at {c.chunk_offset} does not continue {pos}")
        if not 0 <= c.offset < payload_end or c.end > payload_end or c.end <= c.offset:
            raise OracleFailure(f"{path!r}: chunk extent {c.offset}..{c.end} outside payload")
        if c.inner_offset + c.chunk_size > FUZZ_LIMITS.max_chunk_size:
            raise OracleFailure(f"{path!r}: chunk inflates past max_chunk_size")
        pos += c.chunk_size
    if pos != size:
        raise OracleFailure(f"{path!r}: chunks cover {pos} of {size} bytes")


def fuzz_toc(data: bytes) -> None:
    """The TOC JSON parser and the index built from it (validation, tree, links, chunks)."""
    entries = parse_toc_json(data, "fuzz", FUZZ_LIMITS.max_entries)
    payload_end = 1 << 20
    idx = LayerIndex(
        compression="gzip",
        toc_digest="sha256:" + hashlib.sha256(data).hexdigest(),
        toc_offset=payload_end,
        blob_size=payload_end + 4096,
        payload_end=payload_end,
        toc_entries=entries,
        limits=FUZZ_LIMITS,
        name="fuzz",
    )
    _exercise_index(idx, payload_end)


def _read_all(idx: LayerIndex, blob: bytes) -> None:
    """Read every regular file through the chunk reader: the bytes served are exactly the
    declared size (each chunk was verified against its digest on the way)."""
    lr = LayerReader(idx, BytesRangeReader(blob))
    for path, e in idx.walk():
        if e.type == "reg":
            got = lr.read(path)
            expect(len(got) == e.size, f"{path!r}: read {len(got)} of {e.size} bytes")


def fuzz_open_layer(data: bytes) -> None:
    """A whole blob of any format: footer detection, TOC, index, then every chunk."""
    idx = open_layer(BytesRangeReader(data), len(data), limits=FUZZ_LIMITS, name="fuzz")
    _exercise_index(idx, idx.toc_offset)
    _read_all(idx, data)


@dataclass(frozen=True)
class _Payload:
    """A real layer's payload (compressed file data before the TOC) and its TOC JSON."""

    compression: str
    payload: bytes
    toc: bytes


def sample_tar() -> bytes:
    """A small layer with every entry type, a multi-chunk file and a prefetch landmark."""
    from tests.snapshot.tarbuild import E, make_tar

    return make_tar(
        [
            E("etc", "d"),
            E("etc/hosts", data=b"127.0.0.1 localhost\n"),
            E("bin", "d"),
            E("bin/tool", data=bytes(range(256)) * 3, mode=0o4755),
            E("bin/empty"),
            E("bin/link", "l", link="tool"),
            E("bin/hard", "h", link="bin/tool"),
            E("dev", "d"),
            E("dev/null", "c", dev=(1, 3)),
            E("dev/fifo", "p"),
            E("etc/.wh.gone"),
            E("var/.wh..wh..opq"),
            E("xattr", data=b"x", xattrs={"user.k": "v"}),
        ]
    )


def build_layer(tar: bytes, compression: str, prioritize: tuple[str, ...] = ()) -> bytes:
    """An eStargz (gzip) or zstd:chunked blob of ``tar``, 100-byte chunks so files split."""
    out = io.BytesIO()
    opts = BuildOptions(
        chunk_size=100, level=1, compression=compression, workers=1, prioritize=prioritize
    )
    build(io.BytesIO(tar), out, opts)
    return out.getvalue()


@functools.cache
def sample_payload(compression: str) -> _Payload:
    blob = build_layer(sample_tar(), compression, prioritize=("etc/hosts",))
    if compression == "gzip":
        off = parse_gzip_footer(blob[-51:])
        plain = zlib.decompressobj(31).decompress(blob[off:-51])
        size = int(plain[124:136].rstrip(b"\x00 ") or b"0", 8)
        return _Payload("gzip", blob[:off], plain[512 : 512 + size])
    zf = parse_zstd_footer(blob[-40:])
    toc = zstandard.ZstdDecompressor().decompress(
        blob[zf.toc_offset : zf.toc_offset + zf.toc_compressed_size]
    )
    return _Payload("zstd", blob[: zf.toc_offset - SKIPPABLE_HEADER_SIZE], toc)


def layer_with_toc(payload: _Payload, toc: bytes) -> bytes:
    """``payload`` followed by ``toc`` as its TOC, wrapped as the format demands."""
    off = len(payload.payload)
    if payload.compression == "gzip":
        member = gzip.compress(
            ustar_header("stargz.index.json", len(toc)) + toc + bytes(padding(len(toc)))
            + END_OF_ARCHIVE,
            compresslevel=1,
            mtime=0,
        )
        return payload.payload + member + gzip_footer(off)
    ctoc = zstandard.ZstdCompressor(level=1).compress(toc)
    toc_off = off + SKIPPABLE_HEADER_SIZE
    return (
        payload.payload
        + skippable_frame(ctoc)
        + skippable_frame(zstd_footer(toc_off, len(ctoc), len(toc)))
    )


def _fuzz_layer_toc(compression: str, data: bytes) -> None:
    p = sample_payload(compression)
    blob = layer_with_toc(p, data)
    idx = open_layer(BytesRangeReader(blob), len(blob), limits=FUZZ_LIMITS, name="fuzz")
    _exercise_index(idx, len(p.payload))
    _read_all(idx, blob)


def fuzz_layer_gzip(data: bytes) -> None:
    """open_layer + chunk reads of a real eStargz payload under a fuzzed TOC: offsets,
    sizes, digests and inner offsets point at real compressed members."""
    _fuzz_layer_toc("gzip", data)


def fuzz_layer_zstd(data: bytes) -> None:
    """The same for zstd:chunked."""
    _fuzz_layer_toc("zstd", data)


def _u32(data: bytes, pos: int) -> int:
    return int.from_bytes(data[pos : pos + 4].ljust(4, b"\0"), "little")


#: the chunk header of :func:`fuzz_chunk` inputs: mode byte, inner offset, size, digest
CHUNK_HEADER = 1 + 4 + 4 + 32


def fuzz_chunk(data: bytes) -> None:
    """decompress_chunk on arbitrary compressed bytes. Input: a mode byte (compression,
    low bit), a little-endian u32 inner offset and chunk size (bounded by the limit, as the
    index bounds them), the 32-byte digest, then the compressed data."""
    compression = ("gzip", "zstd")[data[0] & 1] if data else "gzip"
    inner = _u32(data, 1) % (FUZZ_LIMITS.max_chunk_size + 1)
    size = _u32(data, 5) % (FUZZ_LIMITS.max_chunk_size + 1 - inner) or 1
    digest = "sha256:" + data[9:41].ljust(32, b"\0").hex()
    body = data[CHUNK_HEADER:]
    chunk = Chunk(1, 1 + len(body), 0, size, digest, inner)
    out = decompress_chunk(compression, body, chunk, name="fuzz")
    expect(len(out) == size, f"chunk of {len(out)} bytes, want {size}")
    expect("sha256:" + hashlib.sha256(out).hexdigest() == digest, "chunk digest not checked")


def fuzz_tar(data: bytes) -> None:
    """The eStargz tar header reader, consuming each entry's payload as a builder does."""
    src = io.BytesIO(data)
    for hdr in iter_headers(src, "fuzz"):
        expect(hdr.size >= 0 and hdr.uid >= 0 and hdr.gid >= 0, "negative tar field")
        src.read(hdr.size + padding(hdr.size))


def fuzz_build(data: bytes) -> None:
    """The eStargz builder on a hostile input tar, then the blob it wrote opened back."""
    out = io.BytesIO()
    res = build(
        io.BytesIO(data), out, BuildOptions(chunk_size=100, level=1, workers=1, max_pending=2)
    )
    blob = out.getvalue()
    idx = open_layer(BytesRangeReader(blob), len(blob), toc_digest=res.toc_digest, name="fuzz")
    _read_all(idx, blob)


# -- the snapshot unpacker ---------------------------------------------------------------
#: environment variable naming the directory the file-writing targets work in
SANDBOX_ENV = "IPFSNAP_FUZZ_SANDBOX"


def default_sandbox_parent() -> str | None:
    """/dev/shm (tmpfs) when writable, else the system temp dir (None)."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


@functools.cache
def _sandbox() -> Path:
    """A private directory: ``apply/box/fs`` is the unpack root and ``apply/canary`` must
    never change (``snapshot_apply``); ``files/`` holds the file targets' inputs."""
    # scripts/fuzz.py gives each process a directory it removes after the process ends
    # (also after libFuzzer killed it on a hang); else tmpfs when there is one: a case
    # creates and removes files, ~20x faster than on disk
    where = os.environ.get(SANDBOX_ENV) or default_sandbox_parent()
    base = Path(tempfile.mkdtemp(prefix="ipfsnap-fuzz-", dir=where))
    (base / "apply" / "canary" / "sub").mkdir(parents=True)
    (base / "apply" / "canary" / "secret").write_bytes(b"secret")
    return base


def remove_sandbox() -> None:
    if _sandbox.cache_info().currsize:
        shutil.rmtree(_sandbox(), ignore_errors=True)
        _sandbox.cache_clear()
    _spec_rootfs.cache_clear()  # it lived in the sandbox


def fuzz_apply(data: bytes) -> None:
    """apply_layer (the full-fetch unpacker, as root) on a hostile layer: it unpacks or
    raises an ipfsnap error, leaves nothing behind on error, writes nothing outside."""
    base = _sandbox() / "apply"
    dest = base / "box" / "fs"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    try:
        apply_layer(dest, io.BytesIO(data), layer="fuzz", limits=FUZZ_APPLY_LIMITS)
    except IpfsnapError:
        expect(os.listdir(dest) == [], "partial output left after an error")
        raise
    finally:
        expect(sorted(os.listdir(base)) == ["box", "canary"], "wrote beside the root")
        expect(os.listdir(base / "box") == ["fs"], "wrote beside the root")
        expect(sorted(os.listdir(base / "canary")) == ["secret", "sub"], "canary changed")
        expect((base / "canary" / "secret").read_bytes() == b"secret", "canary changed")


# -- OCI ---------------------------------------------------------------------------------
def fuzz_oci_descriptor(data: bytes) -> None:
    d = Descriptor.from_dict(load_json(data, "fuzz"), "fuzz")
    # written back as ipfsnap writes documents (canonical JSON), then read again
    again = Descriptor.from_dict(load_json(canonical_json(d.to_dict()), "fuzz"), "fuzz")
    expect(again == d, "descriptor does not round-trip")


def fuzz_oci_manifest(data: bytes) -> None:
    m = parse_manifest(data, "fuzz")
    expect(parse_manifest(m.to_bytes(), "fuzz") == m, "manifest does not round-trip")


def fuzz_oci_index(data: bytes) -> None:
    i = parse_index(data, "fuzz")
    expect(parse_index(i.to_bytes(), "fuzz") == i, "index does not round-trip")


def fuzz_oci_config(data: bytes) -> None:
    c = parse_config(data, "fuzz")
    expect(parse_config(c.to_bytes(), "fuzz").raw == c.raw, "config does not round-trip")
    # the properties the runtime reads must not fail on a config that parsed
    _ = (c.entrypoint, c.cmd, c.env, c.working_dir, c.user, c.labels, c.diff_ids, c.platform)


#: the image's /etc/passwd and /etc/group in the spec target's rootfs
SPEC_PASSWD = "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n"
SPEC_GROUP = "root:x:0:\nstaff:x:50:alice\nalice:x:1000:\n"


@functools.cache
def _spec_rootfs() -> Path:
    """A small image rootfs for the spec builder: accounts, a program, and symlinks an
    image could plant to lead its WorkingDir or User lookups out (``work`` into /proc,
    ``escape`` above the root, ``etc/shadow`` absolute)."""
    r = _sandbox() / "rootfs"
    for d in ("bin", "etc", "proc", "dev", "sys", "tmp", "home/alice", "app"):
        (r / d).mkdir(parents=True)
    (r / "bin" / "sh").write_bytes(b"\x7fELF")
    (r / "bin" / "sh").chmod(0o755)
    (r / "etc" / "passwd").write_text(SPEC_PASSWD)
    (r / "etc" / "group").write_text(SPEC_GROUP)
    os.symlink("/proc/self/fd/7", r / "work")
    os.symlink("../../../../..", r / "escape")
    os.symlink("/etc/shadow", r / "etc" / "shadow")
    return r


def _under(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree + "/")


def fuzz_oci_config_spec(data: bytes) -> None:
    """A hostile image config through the parser, the container config it gives and the
    runtime spec built from it against a rootfs (User, WorkingDir, Env, Entrypoint, Cmd
    resolved as ``ipfsnap run`` does): a safe spec or one clean error."""
    root = _spec_rootfs()
    cfg = image_container_config("ipfs://fuzz", parse_config(data, "fuzz"))
    spec = build_spec(cfg, container_id="c1", rootfs=root, etc_files={}, cgroups_path="/x/c1")
    proc = spec["process"]
    cwd = proc["cwd"]
    expect(cwd.startswith("/") and ".." not in cwd.split("/"), f"cwd {cwd!r} not clean")
    expect(not _under(cwd, "/proc") and not _under(cwd, "/dev"), f"cwd {cwd!r} in /proc or /dev")
    expect(all("\x00" not in s for s in proc["env"] + proc["args"]), "NUL in env or args")
    expect(bool(proc["args"]), "no program to run")
    uid, gid = proc["user"]["uid"], proc["user"]["gid"]
    expect(0 <= uid <= 0xFFFFFFFE and 0 <= gid <= 0xFFFFFFFE, f"uid/gid {uid}/{gid} out of range")
    for m in spec["mounts"]:
        dest = m["destination"]
        expect(dest.startswith("/") and ".." not in dest.split("/"), f"mount at {dest!r}")


def fuzz_runtime_elf(data: bytes) -> None:
    """An image's executable or shared object as ``run``'s warm-up parses it (program
    headers, PT_INTERP, the dynamic section and its strings): its fields, or one clean
    error, from a few bounded reads."""
    reads: list[int] = []

    def read(at: int, n: int) -> bytes:
        reads.append(n)
        return data[at:at + n]

    info = parse_elf(read, len(data), "fuzz")
    names = [*info.needed, *info.search_path, info.interpreter or ""]
    expect(all("\x00" not in n for n in names), "NUL in a name")
    expect(len(info.needed) <= MAX_NEEDED, f"{len(info.needed)} DT_NEEDED names kept")
    expect(len(reads) <= 5, f"{len(reads)} reads")


def fuzz_oci_document(data: bytes) -> None:
    parse_document(data, "fuzz")


def fuzz_content_archive(data: bytes) -> None:
    """``image import`` of an archive file (oci-archive or docker-archive, any compression):
    the tar headers (the same bounded reader as the unpacker), index/manifest/config JSON,
    digests. Imports, or refuses with one clean error leaving no name and no blob."""
    d = _sandbox() / "archive"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    path = d / "image.tar"
    path.write_bytes(data)
    store = ImageStore(d / "state")
    try:
        records = import_image(store, path)
    except IpfsnapError:
        expect(store.list() == [] and not list(store.blobs.list()), "refusal left names or blobs")
        raise
    expect(bool(records) and all(store.get(r.name) for r in records), "import named nothing")


# -- IPFS --------------------------------------------------------------------------------
def fuzz_cid(data: bytes) -> None:
    """Text CIDs (as the daemon and users write them) and binary CIDs."""
    failures: list[IpfsnapError] = []
    try:
        c = parse_cid(data.decode("utf-8", "surrogateescape"))
        s = str(c)
        again = parse_cid(s)
        expect(str(again) == s and again.multihash == c.multihash, f"{s}: no round trip")
        expect(s == s.lower() and s.startswith("b"), f"{s}: not CIDv1 base32")
        if c.version == 0:
            expect(parse_cid(c.v0()).multihash == c.multihash, "CIDv0 does not round-trip")
    except IpfsnapError as exc:
        failures.append(exc)
    try:
        b = cid_from_bytes(data)
        expect(cid_from_bytes(b.to_bytes()).multihash == b.multihash, "binary CID round trip")
    except IpfsnapError as exc:
        failures.append(exc)
    if len(failures) == 2:  # as text and as binary
        raise failures[0]


def fuzz_multiaddr(data: bytes) -> None:
    """API addresses as given on the command line or in config (multiaddr or URL)."""
    e = parse_api(data.decode("utf-8", "surrogateescape"))
    expect(0 < e.port < 65536 and e.scheme in ("http", "https") and bool(e.host), str(e))


def _file_input(name: str, data: bytes) -> Path:
    d = _sandbox() / "files"
    d.mkdir(exist_ok=True)
    path = d / name
    path.write_bytes(data)
    return path


def fuzz_api_file(data: bytes) -> None:
    """discover_api reading ``$IPFS_PATH/api`` written by whatever daemon ran there."""
    path = _file_input("api", data)
    e = discover_api(environ={"IPFS_PATH": str(path.parent)}, home=path.parent / "nohome")
    expect(0 < e.port < 65536, f"api file gave port {e.port}")


def fuzz_swarm_key(data: bytes) -> None:
    """A repo's swarm.key. The key is a secret: no error message may contain it."""
    path = _file_input("swarm.key", data)
    try:
        key = read_swarm_key(path)
    except IpfsnapError as exc:
        # split as the parser splits (only "\n"): splitlines() also splits at "\x0b",
        # which made "/swarm/psk/1.0.0/", a piece of the header line the message quotes,
        # look like a key (a false finding of a 300,000-case run)
        text = data.decode("utf-8", "replace").replace("\r\n", "\n")
        lines = [line.strip() for line in text.split("\n")]
        # the key line of a file that has the header and an encoding line (the message
        # may quote those two, they are not secret)
        looks_like_key = len(lines) >= 3 and lines[0] == PSK_HEADER and lines[1] in ENCODINGS
        secret = lines[2] if looks_like_key else ""
        expect(len(secret) < 8 or secret not in str(exc), "swarm key error shows the key")
        raise
    expect(len(key.key) == 32, "swarm key is not 32 bytes")
    expect(key.key.hex() not in repr(key), "swarm key repr shows the key")


def fuzz_config(data: bytes) -> None:
    """config.toml as an administrator (or an attacker with write access) may write it."""
    path = _file_input("config.toml", data)
    cfg = load_config(path, environ={})
    for v in (cfg.prefetch_size, cfg.max_concurrency, cfg.blob.chunk_size, cfg.fuse.attr_timeout):
        expect(v >= 0, f"config accepted a negative or NaN value {v!r}")


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    #: largest input libFuzzer generates (the corpus may hold larger seeds)
    max_len: int
    #: inputs run in CI (tests/fuzz/test_campaign.py): the full campaign's 100,000 for every
    #: target (the whole campaign takes ~4-5 minutes on an idle 2-core machine)
    ci_cases: int = 100_000
    #: libFuzzer token dictionary (``tests/fuzz/dicts/<name>.dict``), if any
    tokens: str | None = None
    #: writes device nodes and chowns: root only
    needs_root: bool = False
    #: seconds per 100,000 inputs on an idle core (the full campaign's table in
    #: docs/reliability.md): scripts/fuzz.py starts the longest first, so parallel jobs
    #: end together
    idle_seconds: float = 10.0


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("estargz_footer", fuzz_footer, 64, idle_seconds=6),
        Target("estargz_toc", fuzz_toc, 8192, tokens="toc", idle_seconds=10),
        Target("estargz_chunk", fuzz_chunk, 4096, idle_seconds=9),
        Target("estargz_layer_gzip", fuzz_layer_gzip, 8192, tokens="toc", idle_seconds=58),
        Target("estargz_layer_zstd", fuzz_layer_zstd, 8192, tokens="toc", idle_seconds=30),
        Target("estargz_open_layer", fuzz_open_layer, 16384, idle_seconds=17),
        Target("estargz_tar", fuzz_tar, 8192, tokens="tar", idle_seconds=12),
        Target("estargz_build", fuzz_build, 8192, tokens="tar", idle_seconds=63),
        Target("snapshot_apply", fuzz_apply, 8192, tokens="tar", needs_root=True, idle_seconds=93),
        Target("oci_descriptor", fuzz_oci_descriptor, 2048, tokens="oci", idle_seconds=4),
        Target("oci_manifest", fuzz_oci_manifest, 4096, tokens="oci", idle_seconds=6),
        Target("oci_index", fuzz_oci_index, 4096, tokens="oci", idle_seconds=7),
        Target("oci_config", fuzz_oci_config, 4096, tokens="oci", idle_seconds=14),
        Target("oci_document", fuzz_oci_document, 4096, tokens="oci", idle_seconds=6),
        # the spec builder stats and reads files of the rootfs per input: ~3x the cost of
        # oci_config per case, so a third of its inputs in CI (the whole CI campaign stays
        # near its ~220 s idle)
        Target("oci_config_spec", fuzz_oci_config_spec, 4096, ci_cases=30_000, tokens="spec",
               idle_seconds=21),
        # an import writes an archive and a store per input (~2 ms, loaded: 10,000 took
        # 26 s): 5,000 in CI (coverage grew from 393 to 396 lines between 4,096 and 8,192)
        Target("runtime_elf", fuzz_runtime_elf, 4096, idle_seconds=10),
        Target("content_archive", fuzz_content_archive, 20480, ci_cases=5_000, tokens="tar",
               idle_seconds=180),
        Target("ipfs_cid", fuzz_cid, 256, idle_seconds=14),
        Target("ipfs_multiaddr", fuzz_multiaddr, 256, tokens="addr", idle_seconds=3),
        Target("ipfs_api_file", fuzz_api_file, 512, tokens="addr", idle_seconds=31),
        Target("ipfs_swarm_key", fuzz_swarm_key, 512, idle_seconds=17),
        Target("config_toml", fuzz_config, 2048, tokens="toml", idle_seconds=24),
    )
}


@dataclass(frozen=True)
class Finding:
    """An input a target mishandled: an exception other than a clean ipfsnap error, an
    ipfsnap error whose message is not one line, or a failed result check."""

    target: str
    kind: str  # "exception" | "oracle" | "message" | "slow"
    exc_type: str
    message: str
    #: innermost frame in ipfsnap (or the target), ``file:line``: the dedup key's anchor
    where: str

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.exc_type}@{self.where}"


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    pick = frames[-1] if frames else None
    for fr in reversed(frames):
        if "/ipfsnap/" in fr.filename or "/tests/fuzz/" in fr.filename:
            pick = fr
            break
    if pick is None:
        return "?"
    name = pick.filename.split("/src/")[-1].split("/tests/")[-1]
    return f"{name}:{pick.lineno}"


def check(target: Target, data: bytes) -> Finding | None:
    """Run ``target`` on ``data``; None when it behaved."""
    try:
        target.run(data)
    except IpfsnapError as exc:
        msg = str(exc)
        if not msg or "\n" in msg or "\r" in msg:
            return Finding(target.name, "message", type(exc).__name__, msg[:300], _where(exc))
        return None
    except OracleFailure as exc:
        return Finding(target.name, "oracle", "OracleFailure", str(exc)[:300], _where(exc))
    except Exception as exc:  # every other exception is what fuzzing looks for
        return Finding(target.name, "exception", type(exc).__name__, str(exc)[:300], _where(exc))
    return None


def slow_finding(target: Target, data: bytes, cpu_seconds: float) -> Finding:
    """An input that was handled correctly but took ``cpu_seconds`` of CPU: every target
    handles its inputs (at most 16 KiB) in milliseconds, so seconds mean work that grows
    faster than the input (a huge integer, a backtracking regex, a quadratic loop)."""
    return Finding(target.name, "slow", "SlowInput",
                   f"{cpu_seconds:.1f} s of CPU for one {len(data)}-byte input", "input")


def corpus_files(name: str) -> list[Path]:
    """Every committed input of a target: seeds, kept corpus and crash reproducers."""
    out: list[Path] = []
    for d in (CORPUS_DIR / name, CRASHES_DIR / name):
        if d.is_dir():
            out.extend(sorted(p for p in d.iterdir() if p.is_file()))
    return out
