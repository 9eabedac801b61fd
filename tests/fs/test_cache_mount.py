"""Real FUSE mounts (root, /dev/fuse) with a bounded or full chunk cache."""

from __future__ import annotations

import contextlib
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipfsnap.fs.mounter import LayerMounter
from tests.fs.layers import CHUNK, Blob, Item, build_blob, pseudo_random
from tests.fs.mounts import fresh_status, labels_for, make_mounter, mounted, wait_status
from tests.support import require_fuse, require_tool

#: the file spans 24 chunks; every limit below is a few chunks
BIG = 24 * CHUNK + 77


def big_blob(d: Path, seed: int) -> Blob:
    return build_blob([Item("big", "file", pseudo_random(BIG, seed)),
                       Item("small", "file", b"small\n")], d / f"big{seed}.blob")


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Blob, Blob]:
    d = Path(tmp_path_factory.mktemp("cachemount"))
    return big_blob(d, 11), big_blob(d, 12)


def data_of(blob: Blob) -> bytes:
    return next(it.data for it in blob.items if it.name == "big")


def disk_total(root: Path) -> int:
    return sum(f.stat().st_size for d in root.iterdir()
               if d.is_dir() and not d.name.startswith(".")
               for f in d.iterdir() if len(f.name) == 64)


def read_in_pieces(path: Path, piece: int = 100_000) -> bytes:
    out = bytearray()
    with open(path, "rb") as f:
        while chunk := f.read(piece):
            out += chunk
    return bytes(out)


def limited_mounter(state: Path, limit: int, *, background: bool) -> LayerMounter:
    # direct_io: every read reaches the worker (no page cache), so a second pass really
    # reads the cache again; max_span two chunks so background requests fit a small cache
    m = make_mounter(state, background=background, direct_io=True, max_span=2 * CHUNK)
    m.config.cache_size_limit = limit
    return m


def test_file_larger_than_the_cache_limit_reads_correctly(
    blobs: tuple[Blob, Blob], tmp_path: Path
) -> None:
    require_fuse()
    blob = blobs[0]
    want = data_of(blob)
    limit = 6 * CHUNK  # a quarter of the file
    m = limited_mounter(tmp_path / "state", limit, background=False)
    mp = tmp_path / "mp"
    with mounted(m, mp, labels_for(blob)):
        assert read_in_pieces(mp / "big") == want
        assert disk_total(m.cache_root) <= limit
        # second pass: the first chunks were evicted and are fetched again, still exact
        assert read_in_pieces(mp / "big", 131072) == want
        rnd = random.Random(5)
        with open(mp / "big", "rb") as f:
            for _ in range(50):
                off = rnd.randrange(BIG)
                n = rnd.randrange(1, 3 * CHUNK)
                f.seek(off)
                assert f.read(n) == want[off : off + n]
        st = wait_status(m, mp, lambda s: s["cache_evicted"] > 0)
        assert st["fetched_bytes"] > blob.size  # evicted chunks were fetched again
        assert st["cache_write_failures"] == 0
    assert 0 < disk_total(m.cache_root) <= limit


def test_two_layers_share_the_limit_and_background_fetch_stops(
    blobs: tuple[Blob, Blob], tmp_path: Path
) -> None:
    require_fuse()
    limit = 10 * CHUNK  # both layers together need 48 chunks
    m = limited_mounter(tmp_path / "state", limit, background=True)
    mps = [tmp_path / "mp1", tmp_path / "mp2"]
    with mounted(m, mps[0], labels_for(blobs[0])), mounted(m, mps[1], labels_for(blobs[1])):
        sts = [wait_status(m, mp, lambda s: "background fetch paused" in s["last_error"])
               for mp in mps]
        # background stops near the limit (no eviction needed, nothing fetched twice)
        for st, blob in zip(sts, blobs, strict=True):
            assert st["state"] == "ready" and st["fetched_bytes"] <= blob.size
            assert st["cache_write_failures"] == 0
        # foreground reads of both still work, evicting each other's chunks
        for mp, blob in zip(mps, blobs, strict=True):
            assert read_in_pieces(mp / "big") == data_of(blob)
            assert (mp / "small").read_bytes() == b"small\n"
        # a status written after the reads (the workers rewrite it every 0.1 s)
        assert sum(fresh_status(m, mp)["cache_evicted"] for mp in mps) > 0
    assert 0 < disk_total(m.cache_root) <= limit
    # one chunk directory per layer; dot-names are not layers (the parsed-TOC cache,
    # fs/tablecache.py, which drops a layer's tables when it is unmounted)
    assert {d.name for d in m.cache_root.iterdir()
            if d.is_dir() and not d.name.startswith(".")} == {b.digest[7:] for b in blobs}
    assert not list((m.cache_root / ".tables").glob("*.tables"))


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    require_tool("mount")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_full_cache_disk_still_serves_correct_bytes(blobs: tuple[Blob, Blob],
                                                    tmp_path: Path) -> None:
    require_fuse()
    blob = blobs[0]
    want = data_of(blob)
    m = make_mounter(tmp_path / "state", background=True, direct_io=True, max_span=2 * CHUNK)
    mp = tmp_path / "mp"
    # 256 KiB hold 4 of the file's 24 chunks
    with tmpfs(m.cache_root, "256k"), mounted(m, mp, labels_for(blob)):
        st = wait_status(m, mp, lambda s: s["cache_write_failures"] > 0
                         and "background fetch paused" in s["last_error"])
        assert "No space left on device" in st["last_error"]
        for _ in range(2):
            assert read_in_pieces(mp / "big") == want
        rnd = random.Random(9)
        with open(mp / "big", "rb") as f:
            for _ in range(30):
                off = rnd.randrange(BIG)
                f.seek(off)
                assert f.read(5000) == want[off : off + 5000]
        st = wait_status(m, mp, lambda s: s["cache_write_failures"] >= 20)
        log = (m.worker_dir(mp) / "worker.log").read_text()
        warnings = [ln for ln in log.splitlines() if "WARNING" in ln and "cannot write" in ln]
        # rate limited (one per minute): far fewer warnings than failed writes
        assert 1 <= len(warnings) <= 3 < st["cache_write_failures"]
        assert "disk full or failing" in warnings[0]
        assert not [f for d in m.cache_root.iterdir() if d.is_dir() for f in d.iterdir()
                    if f.name.endswith(".tmp")]
