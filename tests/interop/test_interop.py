"""Interop with the reference eStargz library (stargz-snapshotter 0.12, Debian's Go source).

Both directions, on the fixtures of tests/interop/fixtures.py:

* blobs ipfsnap builds open and verify with the reference (``estargz.Open`` + ``VerifyTOC``
  with the TOC digest ipfsnap reported), and the reference reads every file byte-identical
  to the source tar, every chunk verified, metadata equal;
* blobs the reference builds (gzip eStargz, zstd:chunked, legacy stargz) are read by
  ipfsnap (``open_layer`` + every chunk of every file through ``decompress_chunk``, and the
  CLI), byte-identical, metadata equal;
* for the same input and chunk size, the two builders' TOCs are equal once the offsets
  (which depend on the compressor's bytes) are removed.

The source tar, parsed by Python's ``tarfile``, is the judge of content and metadata.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.interop import fixtures
from tests.interop.readers import (
    BuildInfo,
    compare,
    ipfsnap_build,
    ipfsnap_read,
    reference_build,
    reference_read,
    reference_toc,
    reference_verify,
    sha256_file,
    toc_without_offsets,
)
from tests.support import require

SMALL = fixtures.SMALL_CHUNK

Builder = Callable[..., tuple[Path, BuildInfo]]


@pytest.fixture(scope="session")
def blobs(interop_dir: Path) -> dict[str, tuple[Path, BuildInfo]]:
    """Session cache of built blobs, keyed by a description of the build."""
    return {}


@pytest.fixture(scope="session")
def ref_blob(
    go_checker: Path, interop_dir: Path, blobs: dict[str, tuple[Path, BuildInfo]]
) -> Builder:
    def make(tar: Path, **kw: object) -> tuple[Path, BuildInfo]:
        key = f"ref-{tar.stem}-" + "-".join(f"{k}={v}" for k, v in sorted(kw.items()))
        if key not in blobs:
            out = interop_dir / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".blob")
            blobs[key] = (out, reference_build(go_checker, tar, out, **kw))  # type: ignore[arg-type]
        return blobs[key]

    return make


@pytest.fixture(scope="session")
def ipfsnap_blob(interop_dir: Path, blobs: dict[str, tuple[Path, BuildInfo]]) -> Builder:
    def make(tar: Path, **kw: object) -> tuple[Path, BuildInfo]:
        key = f"ipfsnap-{tar.stem}-" + "-".join(f"{k}={v}" for k, v in sorted(kw.items()))
        if key not in blobs:
            out = interop_dir / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".blob")
            blobs[key] = (out, ipfsnap_build(tar, out, **kw))  # type: ignore[arg-type]
        return blobs[key]

    return make


def _no_problems(problems: list[str], what: str) -> None:
    assert not problems, f"{what}: {len(problems)} differences:\n" + "\n".join(problems[:40])


def _check_reported(info: BuildInfo, blob: Path) -> None:
    """What a builder reports about its blob must be true of the file it wrote."""
    assert info.blob_size == blob.stat().st_size
    assert info.blob_digest == sha256_file(blob)


# -- the oracle itself: the reference reads back what it builds ----------------------------
@pytest.mark.parametrize(
    "variant", ["gzip", "gzip-2-parts", "zstd", "legacy"], ids=lambda v: str(v)
)
def test_reference_reads_its_own_blobs(
    variant: str, go_checker: Path, feature_tar: Path, ref_blob: Builder
) -> None:
    """Sanity of the checker and of the expectations: reference build -> reference read
    equals the tar (group names aside: the reference reader fills an omitted groupName
    from its *user* name table, a bug of its own)."""
    kw: dict[str, object] = {"chunk_size": SMALL}
    if variant == "gzip-2-parts":
        kw["procs"] = 2
    elif variant != "gzip":
        kw[variant] = True
    blob, info = ref_blob(feature_tar, **kw)
    _check_reported(info, blob)
    got, summary = reference_read(go_checker, blob, info.toc_digest)
    _no_problems(
        compare(fixtures.expected_entries(feature_tar), got, check_gname=False),
        f"reference {variant} blob read by the reference",
    )
    assert summary.toc_digest == info.toc_digest
    assert summary.diff_id == info.diff_id
    assert summary.chunks_verified > 40  # the multi-chunk files are really chunked


def test_reference_rejects_wrong_toc_digest(go_checker: Path, feature_tar: Path,
                                            ref_blob: Builder) -> None:
    """The oracle does check the digest it is given (else direction A proves nothing)."""
    blob, info = ref_blob(feature_tar, chunk_size=SMALL)
    wrong = "sha256:" + ("0" * 64)
    with pytest.raises(AssertionError, match="invalid TOC JSON"):
        reference_read(go_checker, blob, wrong)
    with pytest.raises(AssertionError, match="invalid TOC JSON"):
        reference_verify(go_checker, blob, wrong)
    # verify (what the benchmark times) reads each file once, hardlinked or not
    got, _ = reference_read(go_checker, blob, info.toc_digest)
    expected = fixtures.expected_entries(feature_tar)
    files = [got[p].chunks for p, e in expected.items() if e.type == "reg"]  # no hardlinks
    assert reference_verify(go_checker, blob, info.toc_digest) == sum(files) + 1  # + landmark


# -- direction A: ipfsnap builds, the reference reads --------------------------------------
@pytest.mark.parametrize(
    ("tar_name", "compression", "workers"),
    [
        ("feature_tar", "gzip", 2),
        ("feature_tar", "gzip", 1),
        ("dotslash_tar", "gzip", 2),
        ("feature_tar", "zstd", 2),
    ],
)
def test_ipfsnap_blob_read_by_reference(
    tar_name: str, compression: str, workers: int, request: pytest.FixtureRequest,
    go_checker: Path, ipfsnap_blob: Builder,
) -> None:
    tar: Path = request.getfixturevalue(tar_name)
    blob, info = ipfsnap_blob(tar, chunk_size=SMALL, compression=compression, workers=workers)
    _check_reported(info, blob)
    got, summary = reference_read(go_checker, blob, info.toc_digest)
    _no_problems(
        compare(fixtures.expected_entries(tar), got, check_gname=False),
        f"ipfsnap {compression} blob ({tar.name}) read by the reference",
    )
    assert summary.toc_digest == info.toc_digest
    assert summary.diff_id == info.diff_id, "ipfsnap's diffID is not the blob's uncompressed sha256"
    assert summary.uncompressed_size == info.uncompressed_size


def test_ipfsnap_big_file_read_by_reference(
    go_checker: Path, big_tar: Path, ipfsnap_blob: Builder
) -> None:
    """The 50 MiB file, default 4 MiB chunks (13 chunks, the last one partial)."""
    blob, info = ipfsnap_blob(big_tar, workers=2)
    _check_reported(info, blob)
    got, summary = reference_read(go_checker, blob, info.toc_digest)
    _no_problems(compare(fixtures.expected_entries(big_tar), got, check_gname=False),
                 "ipfsnap big blob read by the reference")
    big = got[fixtures.BIG_FILE_NAME]
    assert big.size > fixtures.BIG_FILE_SIZE
    assert big.chunks == -(-big.size // (4 << 20))  # ceil: 4 MiB chunks, the last partial
    assert summary.diff_id == info.diff_id


def test_ipfsnap_prioritized_blob_read_by_reference(
    go_checker: Path, feature_tar: Path, ipfsnap_blob: Builder, ref_blob: Builder
) -> None:
    """Prioritized files (one behind a hardlink, one in a deep dir) come first with their
    parents and link targets, then ``.prefetch.landmark``; the reference reads the blob and
    the TOC order equals the reference's own for the same list."""
    prio = ["other/hard-to-hard", fixtures.LONG_NAME, "files/chunk-plus-1"]
    blob, info = ipfsnap_blob(feature_tar, chunk_size=SMALL, prioritize=tuple(prio))
    got, _ = reference_read(go_checker, blob, info.toc_digest)
    _no_problems(compare(fixtures.expected_entries(feature_tar), got, check_gname=False),
                 "ipfsnap prioritized blob read by the reference")
    # names cleaned: whether "dir/" keeps its slash is test_toc_equal_without_offsets' job
    def names(b: Path) -> list[str]:
        toc = toc_without_offsets(reference_toc(go_checker, b))
        return [fixtures.clean(e["name"]) for e in toc]

    ours = names(blob)
    ref, _ = ref_blob(feature_tar, chunk_size=SMALL, prioritize=tuple(prio))
    theirs = names(ref)
    assert ".prefetch.landmark" in ours and ".no.prefetch.landmark" not in ours
    assert ours == theirs


def test_ipfsnap_gzip_input_read_by_reference(
    go_checker: Path, feature_tar: Path, interop_dir: Path
) -> None:
    """A gzip-compressed input tar gives the same TOC as the plain one."""
    import gzip

    gz = interop_dir / "features.tar.gz"
    gz.write_bytes(gzip.compress(feature_tar.read_bytes(), 1))
    blob = interop_dir / "from-gz.blob"
    info = ipfsnap_build(gz, blob, chunk_size=SMALL, level=1)
    got, _ = reference_read(go_checker, blob, info.toc_digest)
    _no_problems(compare(fixtures.expected_entries(feature_tar), got, check_gname=False),
                 "ipfsnap blob from a .tar.gz read by the reference")


# -- direction B: the reference builds, ipfsnap reads --------------------------------------
@pytest.mark.parametrize(
    ("tar_name", "variant"),
    [
        ("feature_tar", "gzip"),
        ("feature_tar", "gzip-2-parts"),
        ("dotslash_tar", "gzip"),
        ("feature_tar", "zstd"),
        ("feature_tar", "legacy"),
    ],
)
def test_reference_blob_read_by_ipfsnap(
    tar_name: str, variant: str, request: pytest.FixtureRequest, go_checker: Path,
    ref_blob: Builder,
) -> None:
    tar: Path = request.getfixturevalue(tar_name)
    kw: dict[str, object] = {"chunk_size": SMALL}
    if variant == "gzip-2-parts":
        kw["procs"] = 2
    elif variant != "gzip":
        kw[variant] = True
    blob, info = ref_blob(tar, **kw)
    got, _ = ipfsnap_read(blob, info.toc_digest)
    _no_problems(
        compare(fixtures.expected_entries(tar), got, check_uname=False, check_gname=False),
        f"reference {variant} blob ({tar.name}) read by ipfsnap",
    )
    ref, _ = reference_read(go_checker, blob, info.toc_digest)
    assert {p: o.chunks for p, o in got.items()} == {p: o.chunks for p, o in ref.items()}


def test_reference_blob_owner_names_by_ipfsnap(feature_tar: Path, ref_blob: Builder) -> None:
    """The reference writes userName/groupName only when they change for an id, and its
    reader fills the omitted ones in from the last entry with the same id: a reader must
    show the name the tar had."""
    blob, info = ref_blob(feature_tar, chunk_size=SMALL)
    got, _ = ipfsnap_read(blob, info.toc_digest)
    problems = compare(fixtures.expected_entries(feature_tar), got)
    _no_problems([p for p in problems if "Name is" in p], "owner names")


def test_reference_big_blob_read_by_ipfsnap(big_tar: Path, ref_blob: Builder) -> None:
    blob, info = ref_blob(big_tar, procs=2)
    got, _ = ipfsnap_read(blob, info.toc_digest)
    _no_problems(
        compare(fixtures.expected_entries(big_tar), got, check_uname=False, check_gname=False),
        "reference big blob read by ipfsnap",
    )
    big = got[fixtures.BIG_FILE_NAME]
    assert big.chunks == -(-big.size // (4 << 20))


def test_reference_blob_wrong_toc_digest_rejected_by_ipfsnap(
    feature_tar: Path, ref_blob: Builder
) -> None:
    from ipfsnap.estargz import TOCDigestMismatch

    blob, _info = ref_blob(feature_tar, chunk_size=SMALL)
    with pytest.raises(TOCDigestMismatch):
        ipfsnap_read(blob, "sha256:" + "1" * 64)


# -- the CLI on reference blobs ----------------------------------------------------------
def _ipfsnap(*args: str) -> subprocess.CompletedProcess[bytes]:
    exe = Path(sys.executable).with_name("ipfsnap")
    require(exe.exists(), f"{exe} (the venv's ipfsnap console script)")
    return subprocess.run([str(exe), *args], capture_output=True, check=False, timeout=300)


@pytest.mark.parametrize("variant", ["gzip", "zstd", "legacy"])
def test_cli_verify_ls_cat_reference_blob(
    variant: str, feature_tar: Path, ref_blob: Builder
) -> None:
    kw: dict[str, object] = {"chunk_size": SMALL}
    if variant != "gzip":
        kw[variant] = True
    blob, info = ref_blob(feature_tar, **kw)

    ok = _ipfsnap("estargz", "verify", str(blob), "--toc-digest", info.toc_digest)
    assert ok.returncode == 0, ok.stderr.decode()
    assert info.toc_digest in ok.stdout.decode()
    bad = _ipfsnap("estargz", "verify", str(blob), "--toc-digest", "sha256:" + "2" * 64)
    assert bad.returncode != 0
    assert bad.stderr.strip(), "a failed verify must say why"

    ls = _ipfsnap("estargz", "ls", str(blob))
    assert ls.returncode == 0, ls.stderr.decode()
    names = {fixtures.clean(json.loads(line)["name"]) for line in ls.stdout.splitlines()}
    expected = fixtures.expected_entries(feature_tar)
    explicit = {p for p, e in expected.items() if not p.startswith("implicit")}
    assert explicit <= names, f"ls misses {sorted(explicit - names)[:10]}"

    contents = {fixtures.clean(ti.name): ti for ti, _ in fixtures.iter_tar(feature_tar)}
    import tarfile

    with tarfile.open(feature_tar) as tf:
        for path in ("files/3-chunks-plus-1", "unicode/日本語/файл-é.txt", fixtures.LONG_NAME,
                     "files/hard-same-dir"):
            ti = contents[path]
            if ti.islnk():
                ti = contents[ti.linkname]
            f = tf.extractfile(ti)
            assert f is not None
            want = f.read()
            whole = _ipfsnap("estargz", "cat", str(blob), path)
            assert whole.returncode == 0, whole.stderr.decode()
            assert whole.stdout == want, f"cat {path}: content differs"
            # a range across a chunk boundary
            off, length = SMALL - 10, 25
            part = _ipfsnap("estargz", "cat", str(blob), path, "--offset", str(off),
                            "--length", str(length))
            assert part.returncode == 0, part.stderr.decode()
            assert part.stdout == want[off : off + length], f"cat {path} range differs"


# -- the two builders agree ------------------------------------------------------------
@pytest.mark.parametrize("normalize_names", [False, True], ids=["names-as-in-tar", "clean-names"])
@pytest.mark.parametrize(
    ("tar_name", "compression"),
    [("feature_tar", "gzip"), ("dotslash_tar", "gzip"), ("feature_tar", "zstd")],
)
def test_toc_equal_without_offsets(
    tar_name: str, compression: str, normalize_names: bool, request: pytest.FixtureRequest,
    go_checker: Path, ipfsnap_blob: Builder, ref_blob: Builder,
) -> None:
    """Same input and chunk size: the TOCs differ only in offsets. The reference runs as
    one part (GOMAXPROCS=1): with more it restarts its userName/groupName dedup per part,
    so its own TOC depends on the CPU count.

    The reference writes each name as the tar has it (``dir/``, ``./x``); "clean-names"
    compares the rest of the TOC with names cleaned on both sides."""
    tar: Path = request.getfixturevalue(tar_name)
    ours, _ = ipfsnap_blob(tar, chunk_size=SMALL, compression=compression, workers=2)
    kw: dict[str, object] = {"chunk_size": SMALL, "procs": 1}
    if compression == "zstd":
        kw["zstd"] = True
    theirs, _ = ref_blob(tar, **kw)
    a = toc_without_offsets(reference_toc(go_checker, ours))
    b = toc_without_offsets(reference_toc(go_checker, theirs))
    if normalize_names:
        for e in a + b:
            e["name"] = fixtures.clean(e["name"])
    diffs = [
        f"entry {i}: ipfsnap {x!r}\n          reference {y!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=False))
        if x != y
    ]
    if len(a) != len(b):
        diffs.append(f"ipfsnap has {len(a)} entries, the reference {len(b)}")
    _no_problems(diffs, f"{tar.name} {compression} TOC (offsets removed)")


@pytest.mark.parametrize("tar_name", ["feature_tar", "big_tar"])
def test_file_and_chunk_digests_equal(
    tar_name: str, request: pytest.FixtureRequest, go_checker: Path,
    ipfsnap_blob: Builder, ref_blob: Builder,
) -> None:
    """Chunk layout and digests (what lazy pulling verifies) are the same for both."""
    tar: Path = request.getfixturevalue(tar_name)
    kw: dict[str, object] = {} if tar_name == "big_tar" else {"chunk_size": SMALL}
    ours, _ = ipfsnap_blob(tar, workers=2, **kw)
    theirs, _ = ref_blob(tar, procs=2, **kw)

    def digests(blob: Path) -> set[tuple[str, int, str, str]]:
        out = set()
        name = ""
        for e in toc_without_offsets(reference_toc(go_checker, blob)):
            if e["type"] == "reg":
                name = fixtures.clean(e["name"])
            nonempty_reg = e["type"] == "reg" and e.get("size", 0) > 0
            if nonempty_reg or e["type"] == "chunk":
                # the chunk digest pins the chunk's size, whether chunkSize is written or not
                out.add((name, e.get("chunkOffset", 0), e.get("chunkDigest", ""),
                         e.get("digest", "")))
        return out

    a, b = digests(ours), digests(theirs)
    _no_problems(
        [f"only ipfsnap: {x}" for x in sorted(a - b)]
        + [f"only reference: {x}" for x in sorted(b - a)],
        f"{tar.name} file/chunk digests",
    )


def test_ipfsnap_same_bytes_whatever_workers(feature_tar: Path, ipfsnap_blob: Builder) -> None:
    """ipfsnap's output does not depend on its worker count (the reference's does)."""
    _, one = ipfsnap_blob(feature_tar, chunk_size=SMALL, compression="gzip", workers=1)
    _, two = ipfsnap_blob(feature_tar, chunk_size=SMALL, compression="gzip", workers=2)
    assert one.blob_digest == two.blob_digest
    assert one.toc_digest == two.toc_digest


@pytest.mark.parametrize("prioritized", [True, False], ids=["prioritized", "no-prefetch"])
def test_reference_prefetch_landmark_seen_by_ipfsnap(
    prioritized: bool, go_checker: Path, feature_tar: Path, ref_blob: Builder
) -> None:
    """The reference snapshotter prefetches the blob up to the offset of
    ``.prefetch.landmark``; ipfsnap's ``prefetch_end`` must be that offset (0 with
    ``.no.prefetch.landmark``), and every chunk of a prioritized file must lie before it."""
    from ipfsnap.estargz import FileRangeReader, open_layer

    prio = ("files/3-chunks-plus-1", "unicode/日本語/файл-é.txt") if prioritized else ()
    blob, info = ref_blob(feature_tar, chunk_size=SMALL, prioritize=prio)
    toc = json.loads(reference_toc(go_checker, blob))["entries"]
    marks = {e["name"]: e.get("offset", 0) for e in toc if "landmark" in e["name"]}
    with blob.open("rb") as f:
        index = open_layer(FileRangeReader(f), blob.stat().st_size, toc_digest=info.toc_digest)
        if prioritized:
            assert set(marks) == {".prefetch.landmark"}
            assert index.prefetch_end == marks[".prefetch.landmark"] > 0
            for path in prio:
                assert all(c.end <= index.prefetch_end for c in index.chunks(path)), path
        else:
            assert set(marks) == {".no.prefetch.landmark"}
            assert index.prefetch_end == 0


def test_corrupted_reference_blob_never_read_wrong(
    go_checker: Path, feature_tar: Path, ref_blob: Builder, tmp_path: Path
) -> None:
    """A byte flipped anywhere in the payload of a reference blob: ipfsnap either raises
    one of its errors or returns exactly the tar's content (a flip in tar header bytes,
    which no digest covers and no reader needs, may go unnoticed)."""
    from ipfsnap.errors import IpfsnapError

    blob, info = ref_blob(feature_tar, chunk_size=SMALL)
    data = blob.read_bytes()
    entries = json.loads(reference_toc(go_checker, blob))["entries"]
    last_data = max(e.get("offset", 0) for e in entries)  # the last member with file data
    expected = fixtures.expected_entries(feature_tar)
    raised = 0
    positions = [i * last_data // 23 + 11 for i in range(23)]
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        path = tmp_path / f"flip-{pos}.blob"
        path.write_bytes(bytes(bad))
        try:
            got, _ = ipfsnap_read(path, info.toc_digest)
        except IpfsnapError:
            raised += 1
            continue
        problems = compare(expected, got, check_uname=False, check_gname=False)
        assert not problems, f"byte {pos} flipped: wrong data returned: {problems[:5]}"
    assert raised > len(positions) // 2, f"only {raised} of {len(positions)} flips detected"


def test_duplicate_names_last_wins_both_ways(
    go_checker: Path, interop_dir: Path, ipfsnap_blob: Builder, ref_blob: Builder
) -> None:
    """A name given twice in the tar: every reader shows the last one. (The reference's
    builder also drops the earlier entry from the TOC; the TOC need not match for this.)"""
    tar = fixtures.write_duplicates_tar(interop_dir / "duplicates.tar")
    expected = fixtures.expected_entries(tar)
    assert expected["a/f"].uid == 7
    ours, oinfo = ipfsnap_blob(tar, chunk_size=SMALL)
    got, _ = reference_read(go_checker, ours, oinfo.toc_digest)
    _no_problems(compare(expected, got, check_gname=False), "ipfsnap blob, reference reader")
    theirs, tinfo = ref_blob(tar, chunk_size=SMALL)
    got2, _ = ipfsnap_read(theirs, tinfo.toc_digest)
    _no_problems(compare(expected, got2, check_uname=False, check_gname=False),
                 "reference blob, ipfsnap reader")
    got3, _ = ipfsnap_read(ours, oinfo.toc_digest)
    _no_problems(compare(expected, got3, check_uname=False, check_gname=False),
                 "ipfsnap blob, ipfsnap reader")
