"""Parsed-TOC cache (fs/tablecache.py): a warm-up's tables adopted by the layer's worker.

Real FUSE mounts (root, /dev/fuse) through LayerMounter; the refusal cases are also checked
directly on TableCache (fast), and two of them through a real mount."""

from __future__ import annotations

import json
import os
import select
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ipfsnap.config import Config
from ipfsnap.fs.mounter import (
    NEXT_LAYERS_LABEL,
    REFILL_NICE,
    WARM_SPARES_ENV,
    LayerMounter,
    pid_alive,
)
from ipfsnap.fs.spec import WorkerSpec
from ipfsnap.fs.tablecache import FORMAT_VERSION, MAX_HEADER, TableCache, TableKey
from ipfsnap.fs.worker import adopt_tables, load_tables, table_cache_of
from tests.fs.layers import Blob, Item, build_blob, every_type_items, expected_tree, snapshot_tree
from tests.fs.mounts import labels_for, make_mounter, mounted, wait_status
from tests.support import require_fuse


def tree_with_times(root: Path) -> dict[str, tuple[object, ...]]:
    """:func:`snapshot_tree` plus every entry's mtime and size."""
    out = snapshot_tree(root)
    for rel in [k for k in out if not k.endswith("#xattrs")]:
        st = os.lstat(root / rel if rel else root)
        out[rel + "#times"] = (st.st_mtime_ns, st.st_size)
    return out


def worker_log(m: LayerMounter, mp: Path) -> str:
    try:
        return (m.worker_dir(mp) / "worker.log").read_text()
    except FileNotFoundError:
        return ""


def plain_mounter(state: Path) -> LayerMounter:
    """A mounter for specs only (no spare worker)."""
    return LayerMounter(Config(state_dir=state), spare=False)


def spec_of(m: LayerMounter, blob: Blob, mp: Path) -> WorkerSpec:
    return m.spec_for(mp, labels_for(blob))


def other_blob(tmp_path: Path) -> Blob:
    return build_blob([Item("other", "file", b"another layer\n")], tmp_path / "other.blob")


def cache_of(m: LayerMounter, blob: Blob, mp: Path) -> tuple[WorkerSpec, TableCache, TableKey]:
    """The worker spec of ``blob`` at ``mp``, its parsed-TOC cache and key."""
    spec = spec_of(m, blob, mp)
    found = table_cache_of(spec)
    assert found is not None
    return spec, found[0], found[1]


def plant_other_tables(m: LayerMounter, tmp_path: Path, key: TableKey) -> None:
    """Valid tables of another layer and TOC, stored under ``key``'s file name."""
    ospec, cache, okey = cache_of(m, other_blob(tmp_path), tmp_path / "o")
    assert cache.store(okey, load_tables(ospec))
    cache.path(okey.layer, okey.toc_digest).rename(cache.path(key.layer, key.toc_digest))


def wait_warm_spare(m: LayerMounter) -> None:
    """Wait until the mounter's warm spare has its imports done (it says so on stdout)."""
    assert m._warm_spares
    spare = m._warm_spares[0]
    assert spare.stdout is not None
    assert select.select([spare.stdout], [], [], 120)[0]


def warm_next(m: LayerMounter, first: Blob, nxt: Blob, mp: Path) -> None:
    """Mount ``first`` with ``nxt`` as its next layer and wait for nxt's warm-up to be done."""
    labels = {**labels_for(first), NEXT_LAYERS_LABEL: json.dumps([labels_for(nxt)])}
    with mounted(m, mp, labels):
        assert m.tables.wait_warm(nxt.digest, 120)


@pytest.mark.parametrize("serve", [True, False], ids=["warm-up serves", "worker adopts"])
def test_warm_up_tables_are_adopted_and_give_the_parsed_tree(serve: bool, every_type_blob: Blob,
                                                             tmp_path: Path) -> None:
    """The layer's mount gets the tables its warm-up parsed: handed over in memory when the
    warm-up itself serves the layer, else adopted from the stored file by a spare worker."""
    require_fuse()
    # the reference: the same layer mounted from a fresh parse (cache off)
    ref_m = make_mounter(tmp_path / "ref-state", background=False, toc_cache="off")
    ref_mp = tmp_path / "ref"
    try:
        with mounted(ref_m, ref_mp, labels_for(every_type_blob)):
            fresh = tree_with_times(ref_mp)
        assert "adopted" not in worker_log(ref_m, ref_mp)
        assert not (ref_m.cache_root / ".tables").exists()  # off: nothing stored
    finally:
        ref_m.close()
    assert {k: v for k, v in fresh.items() if "#times" not in k} == \
        expected_tree(every_type_items())

    m = make_mounter(tmp_path / "state", background=False)
    if serve:
        wait_warm_spare(m)
    else:
        m.warm_serve = False
        m.close()  # no warm spare either
    try:
        warm_next(m, other_blob(tmp_path), every_type_blob, tmp_path / "first")
        warm_proc = m._warming[every_type_blob.digest]
        # serving: the first warm-up ran in the mounter's warm spare (imports done ahead)
        assert isinstance(warm_proc.args, list)
        assert ("--stdin" in warm_proc.args) == serve
        if serve:
            assert warm_proc.poll() is None  # done warming, it waits to serve its layer
        else:
            assert warm_proc.wait(60) == 0  # done warming, it exits
        path = m.tables.path(every_type_blob.digest, every_type_blob.toc_digest)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        # the unmount of the first layer removed its own tables (its worker stored them)
        assert [p.name for p in path.parent.glob("*.tables")] == [path.name]
        mp = tmp_path / "mp"
        with mounted(m, mp, labels_for(every_type_blob)):
            text = worker_log(m, mp)
            st = m.status(mp)
            assert st is not None
            if serve:
                assert st["pid"] == warm_proc.pid
                assert "handed over by its warm-up" in text
            else:
                assert st["pid"] != warm_proc.pid
                assert "adopted from the parsed-TOC cache" in text
            assert "opened and verified" not in text  # no parse in this worker
            assert tree_with_times(mp) == fresh
            assert path.exists()
        # removed with the layer's mount (and its lock file, no warm-up holds it)
        assert not path.exists()
        assert not m.tables.lock_path(every_type_blob.digest).exists()
    finally:
        m.close()


def test_adopted_tables_equal_a_fresh_parse(every_type_blob: Blob, tmp_path: Path) -> None:
    spec, cache, key = cache_of(plain_mounter(tmp_path / "state"), every_type_blob,
                                tmp_path / "mp")
    parsed = load_tables(spec)
    assert cache.store(key, parsed)
    adopted = adopt_tables(spec)
    assert adopted is not None and adopted is not parsed
    assert adopted.table.__getstate__() == parsed.table.__getstate__()
    assert list(adopted.chunk_table) == list(parsed.chunk_table)
    assert (adopted.compression, adopted.blob_size, adopted.prefetch_end) == \
        (parsed.compression, parsed.blob_size, parsed.prefetch_end)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-50] ^= 0x01
    path.write_bytes(bytes(data))


def _header(path: Path, **changes: object) -> None:
    data = path.read_bytes()
    nl = data.index(b"\n")
    header = json.loads(data[:nl])
    header.update(changes)
    path.write_bytes(json.dumps(header).encode() + data[nl:])


def _replace_header(path: Path, header: bytes) -> None:
    data = path.read_bytes()
    path.write_bytes(header + data[data.index(b"\n"):])


def _mode(path: Path) -> None:
    path.chmod(0o644)


CORRUPTIONS = {
    "truncated": (_truncate, "truncated"),
    "flipped byte": (_flip, "does not match its sha256"),
    "wrong version": (lambda p: _header(p, version=FORMAT_VERSION + 1), "version"),
    "other code": (lambda p: _header(p, code="0" * 16), "code"),
    "other limits": (lambda p: _header(p, limits="1/2/3/4"), "limits"),
    "not ours": (_mode, "not ours and 0600"),
    "garbage": (lambda p: p.write_bytes(b"\x80\x04garbage"), "no header line"),
    # nested past the recursion limit (1000) within MAX_HEADER: json.loads raised
    # RecursionError, which load() let escape
    "deep header": (lambda p: _replace_header(p, b"[" * (MAX_HEADER - 1)), "nested too deeply"),
    "header not JSON": (lambda p: _replace_header(p, b"{bad"), "header is not JSON"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_bad_tables_files_are_refused(kind: str, every_type_blob: Blob, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    spec, cache, key = cache_of(plain_mounter(tmp_path / "state"), every_type_blob,
                                tmp_path / "mp")
    assert cache.store(key, load_tables(spec))
    path = cache.path(key.layer, key.toc_digest)
    corrupt, why = CORRUPTIONS[kind]
    corrupt(path)
    caplog.set_level("WARNING", logger="ipfsnap.fs.tablecache")
    assert adopt_tables(spec) is None
    assert why in caplog.text and "refused" in caplog.text
    assert not path.exists()  # dropped: the next store writes a good one


def test_tables_of_another_toc_are_never_used(every_type_blob: Blob, tmp_path: Path) -> None:
    m = plain_mounter(tmp_path / "state")
    spec, cache, key = cache_of(m, every_type_blob, tmp_path / "mp")
    plant_other_tables(m, tmp_path, key)
    assert adopt_tables(spec) is None
    # the same layer digest with another TOC digest: another file name, not found
    assert cache.store(key, load_tables(spec))
    moved = TableKey(key.layer, "sha256:" + "1" * 64, key.limits)
    assert cache.load(moved) is None
    assert cache.load(key) is not None


@pytest.mark.parametrize("kind", ["flipped byte", "other toc"])
def test_layer_mounts_from_a_fresh_parse_after_a_refused_file(
        kind: str, every_type_blob: Blob, tmp_path: Path) -> None:
    require_fuse()
    m = make_mounter(tmp_path / "state", background=False)
    try:
        spec, cache, key = cache_of(m, every_type_blob, tmp_path / "mp")
        path = cache.path(key.layer, key.toc_digest)
        if kind == "other toc":
            plant_other_tables(m, tmp_path, key)
        else:
            assert cache.store(key, load_tables(spec))
            _flip(path)
        mp = tmp_path / "mp"
        with mounted(m, mp, labels_for(every_type_blob)):
            text = worker_log(m, mp)
            assert "refused" in text and "opened and verified" in text
            assert snapshot_tree(mp) == expected_tree(every_type_items())
            # the worker's own parse stored good tables in its place
            assert cache.load(key) is not None
    finally:
        m.close()


def test_worker_waits_for_a_running_warm_up(every_type_blob: Blob, tmp_path: Path) -> None:
    require_fuse()
    m = make_mounter(tmp_path / "state", background=False)
    try:
        spec, cache, key = cache_of(m, every_type_blob, tmp_path / "mp")
        # this test plays the warm-up: it holds the lock while it parses
        lock = cache.lock_warm(key.layer)
        assert lock is not None
        assert cache.lock_warm(key.layer) is None  # a second warm-up is refused
        mp = tmp_path / "mp"
        errors: list[BaseException] = []

        def mount() -> None:
            try:
                m.mount(mp, labels_for(every_type_blob))
            except BaseException as exc:  # reported by the test thread
                errors.append(exc)

        t = threading.Thread(target=mount, daemon=True)
        t.start()
        try:
            # the worker saw the warm-up and waits (no parse of its own meanwhile)
            wait_status(m, mp, lambda s: "its warm-up is running" in worker_log(m, mp),
                        timeout=60)
            assert "opened and verified" not in worker_log(m, mp)
            assert t.is_alive()
            assert cache.store(key, load_tables(spec))
        finally:
            os.close(lock)  # the warm-up ends
        t.join(60)
        assert not errors and not t.is_alive()
        try:
            text = worker_log(m, mp)
            assert "adopted from the parsed-TOC cache" in text
            assert "opened and verified" not in text
            assert snapshot_tree(mp) == expected_tree(every_type_items())
        finally:
            m.unmount(mp)
    finally:
        m.close()


def test_tables_are_bounded(every_type_blob: Blob, tmp_path: Path) -> None:
    tables = load_tables(spec_of(plain_mounter(tmp_path / "state"), every_type_blob,
                                 tmp_path / "mp"))
    cache = TableCache(tmp_path / "cache", max_files=3)
    keys = [TableKey("sha256:" + f"{i:064x}", every_type_blob.toc_digest, "l")
            for i in range(5)]
    for i, key in enumerate(keys):
        assert cache.store(key, tables)
        os.utime(cache.path(key.layer, key.toc_digest), (1000.0 + i, 1000.0 + i))
    kept = sorted(p.name for p in cache.dir.glob("*.tables"))
    # the newest three stay
    assert kept == sorted(cache.path(k.layer, k.toc_digest).name for k in keys[2:])
    size = cache.path(keys[4].layer, keys[4].toc_digest).stat().st_size
    small = TableCache(tmp_path / "small", max_bytes=size + size // 2)
    assert small.store(keys[0], tables) and small.store(keys[1], tables)
    assert [p.name for p in small.dir.glob("*.tables")] == \
        [small.path(keys[1].layer, keys[1].toc_digest).name]
    tiny = TableCache(tmp_path / "tiny", max_bytes=size // 2)
    assert not tiny.store(keys[0], tables)  # bigger than the bound: not stored at all


def _wait_for(pred: Callable[[], bool], what: str, bound: float = 120.0) -> None:
    """Poll ``pred`` (a liveness bound, not a timing)."""
    deadline = time.monotonic() + bound
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {bound:g} s")
        time.sleep(0.05)


def test_used_spares_are_refilled_after_the_pull_niced_then_woken(
        every_type_blob: Blob, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pull's mount takes the spare and its warm-up the warm spares; once no request came
    for refill_quiet seconds the pool is full again, with processes that never exit on idle
    (``--idle 0``), niced until one is handed a request, then back at the mounter's
    priority. close() ends them all."""
    require_fuse()
    monkeypatch.setenv(WARM_SPARES_ENV, "2")
    m = make_mounter(tmp_path / "state", background=False)
    m.refill_quiet = 0.5
    base = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        assert m.warm_spares == 2 and len(m._warm_spares) == 2
        first_spares = {p.pid for p in m._warm_spares}
        plain = m._spare
        assert plain is not None
        wait_warm_spare(m)
        warm_next(m, other_blob(tmp_path), every_type_blob, tmp_path / "first")
        assert m._spare is None or m._spare.pid != plain.pid
        _wait_for(lambda: m._spare is not None and len(m._warm_spares) == 2, "refill")
        spare = m._spare
        assert spare is not None
        refilled = [p for p in m._warm_spares if p.pid not in first_spares]
        assert len(refilled) == 1  # one warm spare was used, one replaced
        for p in (spare, *refilled):
            assert p.poll() is None and isinstance(p.args, list)
            assert p.args[-3:] == ["--stdin", "--idle", "0"]
            assert os.getpriority(os.PRIO_PROCESS, p.pid) == min(19, base + REFILL_NICE)
        # the next mount is handed to the refilled spare, at the mounter's priority again
        out = refilled[0].stdout
        assert out is not None
        _wait_for(lambda: bool(select.select([out], [], [], 0)[0]), "imports")
        third = build_blob([Item("third", "file", b"3\n")], tmp_path / "third.blob")
        mp = tmp_path / "third"
        with mounted(m, mp, labels_for(third)):
            st = m.status(mp)
            assert st is not None and st["pid"] == spare.pid
            assert os.getpriority(os.PRIO_PROCESS, spare.pid) == base
            assert (mp / "third").read_bytes() == b"3\n"
        alive = [p for p in m._warm_spares] + ([m._spare] if m._spare else [])
    finally:
        m.close()
    for p in alive:
        assert p.wait(30) is not None  # EOF on stdin: the pool's spares exit


def test_pool_spares_exit_when_the_mounter_dies(tmp_path: Path) -> None:
    """Spares wait without an idle timeout (``--idle 0``), so they must end with the
    snapshotter that holds their stdin: killed with SIGKILL, its spares read EOF and exit."""
    import signal
    import subprocess
    import sys

    code = ("import sys, time\n"
            "from pathlib import Path\n"
            "from ipfsnap.config import Config\n"
            "from ipfsnap.fs.mounter import LayerMounter\n"
            "m = LayerMounter(Config(state_dir=Path(sys.argv[1])))\n"
            "pids = [p.pid for p in m._warm_spares] + [m._spare.pid]\n"
            "print(' '.join(map(str, pids)), flush=True)\n"
            "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "state")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 4  # the spare and three warm spares, by default
        assert all(pid_alive(p) for p in pids)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _wait_for(lambda: not any(pid_alive(p) for p in pids), "spares exiting")
