"""BlobStore: verified streaming ingest, atomicity under crashes, concurrent writers."""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipfsnap.content import BlobNotFound, BlobStore
from ipfsnap.content.blobs import TEMP_PREFIX
from ipfsnap.oci import DigestMismatch, InvalidDigest, sha256_digest
from tests.support import ROOT

# deterministic, so spawned processes (which re-import this module) see the same bytes
DATA = bytes(range(256)) * (12 << 10) + b"tail"
DIGEST = sha256_digest(DATA)


def _temps(store: BlobStore) -> list[str]:
    return [p.name for p in store.dir.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_ingest_and_read(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    assert not store.exists(DIGEST)
    assert store.ingest([DATA[:100], DATA[100:]], DIGEST, len(DATA)) is True
    assert store.ingest([b"ignored"], DIGEST, len(DATA)) is False  # present: not read
    assert store.exists(DIGEST) and store.size(DIGEST) == len(DATA)
    with store.open(DIGEST) as f:
        assert f.read() == DATA
    assert store.path(DIGEST).name == DIGEST[7:]
    assert list(store.list()) == [DIGEST]
    assert store.delete(DIGEST) and not store.delete(DIGEST)
    with pytest.raises(BlobNotFound, match=DIGEST):
        store.open(DIGEST)
    with pytest.raises(BlobNotFound, match=DIGEST):
        store.size(DIGEST)
    assert _temps(store) == []


def test_ingest_unknown_and_write(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    assert store.ingest_unknown([DATA]) == (DIGEST, len(DATA))
    assert store.write(b"x") == sha256_digest(b"x")
    assert store.read(sha256_digest(b"x")) == b"x"


@pytest.mark.parametrize(
    ("chunks", "size", "message"),
    [
        ([DATA[:-1] + b"X"], len(DATA), "hashes to"),
        ([DATA[:-1]], len(DATA), "truncated"),
        ([DATA, b"more"], len(DATA), "more than the expected"),
        ([DATA[:-1] + b"X"], None, "hashes to"),
    ],
)
def test_ingest_rejects_bad_content(
    tmp_path: Path, chunks: list[bytes], size: int | None, message: str
) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(DigestMismatch, match=message) as info:
        store.ingest(chunks, DIGEST, size, what="layer")
    assert DIGEST in str(info.value) and "\n" not in str(info.value)
    assert not store.exists(DIGEST)
    assert _temps(store) == []


def test_ingest_rejects_bad_digest(tmp_path: Path) -> None:
    with pytest.raises(InvalidDigest):
        BlobStore(tmp_path).ingest([b""], "md5:abc")


def test_source_error_mid_stream_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)

    def broken() -> Iterator[bytes]:
        yield DATA[:1000]
        raise ConnectionResetError("peer went away")

    with pytest.raises(ConnectionResetError):
        store.ingest(broken(), DIGEST, len(DATA))
    assert not store.exists(DIGEST)
    assert _temps(store) == []


CRASH_SCRIPT = """
import sys, time
from pathlib import Path
from ipfsnap.content import BlobStore
def slow():
    yield b"a" * 1000
    sys.stdout.write("writing\\n"); sys.stdout.flush()
    time.sleep(600)
    yield b"b"
BlobStore(Path(sys.argv[1])).ingest(slow(), sys.argv[2], 1001)
"""


def test_crash_mid_ingest_leaves_no_blob(tmp_path: Path) -> None:
    """A writer killed with SIGKILL mid-ingest: no blob under the digest, only a temp file
    that clean_temp removes."""
    data = b"a" * 1000 + b"b"
    digest = sha256_digest(data)
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_SCRIPT, str(tmp_path), digest],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"writing\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = BlobStore(tmp_path)
    assert not store.exists(digest)
    assert list(store.list()) == []
    assert len(_temps(store)) == 1
    assert store.clean_temp(older_than=3600) == 0  # young temp files are left alone
    assert store.clean_temp(older_than=0) == 1
    assert _temps(store) == []
    # the blob can still be stored afterwards
    assert store.ingest([data], digest, len(data))


def test_concurrent_threads_same_blob(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work() -> None:
        try:
            barrier.wait()
            chunks = [DATA[i : i + 65536] for i in range(0, len(DATA), 65536)]
            BlobStore(tmp_path).ingest(chunks, DIGEST, len(DATA))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.read(DIGEST) == DATA
    assert _temps(store) == []


def _proc_ingest(root: str, n: int) -> None:
    BlobStore(Path(root)).ingest(
        [DATA[i : i + n] for i in range(0, len(DATA), n)], DIGEST, len(DATA)
    )


def test_concurrent_processes_same_blob(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_proc_ingest, args=(str(tmp_path), 4096 * (i + 1))) for i in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    store = BlobStore(tmp_path)
    assert store.read(DIGEST) == DATA
    assert _temps(store) == []
