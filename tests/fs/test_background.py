"""Background fetch yields to foreground reads of any layer; split prefetch; neighbour chunks.

Unit tests drive :class:`BackgroundGate` with a fake clock and sleep (no real waiting); the
mount test runs two real layer workers and a reader.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from ipfsnap.config import load_config
from ipfsnap.errors import IntegrityError
from ipfsnap.estargz import Chunk, FileRangeReader, decompress_chunk, open_layer
from ipfsnap.fs.cache import ChunkCache
from ipfsnap.fs.fetcher import ActivityBoard, BackgroundGate, BackgroundPacing
from ipfsnap.fs.inodes import Inode
from ipfsnap.fs.layer import LazyLayer
from tests.fs.layers import CHUNK, Blob, CountingSource, Item, build_blob, pseudo_random
from tests.fs.mounts import labels_for, make_mounter, mounted, wait_status
from tests.support import require_fuse

if TYPE_CHECKING:
    import subprocess

    from ipfsnap.fs.mounter import LayerMounter


class FakeClock:
    """Wall-clock seconds that only move when the fake sleep says so."""

    def __init__(self) -> None:
        # starts at the real time: files the board creates get real mtimes
        self.now = time.time()
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def gate_for(tmp_path: Path, clock: FakeClock, silence: float = 5.0, period: float = 0.25,
             busy: list[bool] | None = None) -> BackgroundGate:
    board = ActivityBoard(tmp_path, clock=clock, mark_interval=0.0)
    flags = busy if busy is not None else [False]
    return BackgroundGate(board, BackgroundPacing(silence, period),
                          local_busy=lambda: flags[0], sleep=clock.sleep)


def test_gate_waits_for_the_silence_period_after_foreground_activity(tmp_path: Path) -> None:
    clock = FakeClock()
    gate = gate_for(tmp_path, clock)
    assert gate.delay() == 0.0  # nothing ever happened: go
    gate.board.mark()
    assert gate.delay() == pytest.approx(5.0)
    clock.now += 2.0
    assert gate.delay() == pytest.approx(3.0)

    async def one_turn() -> None:
        async with gate.turn():
            pass

    trio.run(one_turn)
    assert sum(clock.sleeps) == pytest.approx(3.0)  # waited exactly the rest of the silence
    assert gate.turns == 1


def test_gate_paces_background_requests_across_boards(tmp_path: Path) -> None:
    clock = FakeClock()
    a = gate_for(tmp_path, clock, silence=1.0, period=0.5)
    b = gate_for(tmp_path, clock, silence=1.0, period=0.5)  # another layer, same directory

    async def turns() -> None:
        async with a.turn():
            clock.now += 0.2  # the request takes 0.2 s
        # b (another worker) must wait the fetch period after a's request ended
        assert b.delay() == pytest.approx(0.5)
        async with b.turn():
            pass

    trio.run(turns)
    assert clock.sleeps == [pytest.approx(0.5)]


def test_one_background_slot_per_directory(tmp_path: Path) -> None:
    clock = FakeClock()
    a = ActivityBoard(tmp_path, clock=clock)
    b = ActivityBoard(tmp_path, clock=clock)
    other = ActivityBoard(tmp_path / "other", clock=clock)
    assert a.try_acquire()
    assert not b.try_acquire()  # flock: held by a's open file
    assert other.try_acquire()  # another state dir is independent
    a.release(None)
    assert b.try_acquire()
    b.release(clock())
    other.release(None)
    assert b.last_background() == pytest.approx(clock())


def test_gate_waits_while_this_layer_reads_and_on_new_activity(tmp_path: Path) -> None:
    clock = FakeClock()
    busy = [True]
    gate = gate_for(tmp_path, clock, silence=1.0, period=0.0, busy=busy)
    other = ActivityBoard(tmp_path, clock=clock, mark_interval=0.0)

    async def sleep(seconds: float) -> None:
        clock.sleeps.append(seconds)
        clock.now += seconds
        if len(clock.sleeps) == 2:
            busy[0] = False  # this layer's foreground read finished ...
            other.mark()  # ... while another layer's read starts

    gate._sleep = sleep

    async def one_turn() -> None:
        async with gate.turn():
            pass

    trio.run(one_turn)
    # waited while busy (2 sleeps), then a full silence period after the other layer's mark
    assert len(clock.sleeps) == 3
    assert clock.sleeps[2] == pytest.approx(1.0)


def test_mark_is_rate_limited(tmp_path: Path) -> None:
    clock = FakeClock()
    board = ActivityBoard(tmp_path, clock=clock, mark_interval=0.1)
    board.mark()
    first = board.last_foreground()
    clock.now += 0.05
    board.mark()
    assert board.last_foreground() == pytest.approx(first)
    clock.now += 0.1
    board.mark()
    assert board.last_foreground() == pytest.approx(clock.now)


def test_config_keys_reach_the_worker_spec(tmp_path: Path) -> None:
    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text("prefetch_concurrency = 3\n[blob]\nprefetch_chunk_size = 65536\n"
                        "neighbour_span = 262144\n[background_fetch]\nsilence_period_msec = "
                        "1500\nfetch_period_msec = 100\n")
    cfg = load_config(cfg_path, state_dir=tmp_path / "state")
    from ipfsnap.fs.mounter import LayerMounter

    blob_labels = {
        "containerd.io/snapshot/remote/stargz.digest": "sha256:" + "a" * 64,
        "containerd.io/snapshot/stargz/toc.digest": "sha256:" + "b" * 64,
        "ipfsnap.io/layer.path": "/nonexistent",
    }
    spec = LayerMounter(cfg).spec_for(tmp_path / "mp", blob_labels)
    assert (spec.prefetch_concurrency, spec.prefetch_span, spec.neighbour_span) == \
        (3, 65536, 262144)
    assert (spec.silence_period, spec.fetch_period) == (1.5, 0.1)


# -- layer behaviour over a local blob -----------------------------------------------------

SMALL = [Item(f"lib/m{i:02d}.py", "file", pseudo_random(700 + 13 * i, 100 + i))
         for i in range(40)]


@pytest.fixture(scope="module")
def small_files_blob(tmp_path_factory: pytest.TempPathFactory) -> Blob:
    d = Path(tmp_path_factory.mktemp("neighbours"))
    return build_blob([Item("lib", "dir", mode=0o755), *SMALL], d / "small.blob")


def node_of(layer: LazyLayer, path: str) -> Inode:
    node = layer.table.get(layer.table.by_path[path])
    assert node is not None
    return node


def open_layer_of(blob: Blob, cache: Path, source: CountingSource, **kw: object) -> LazyLayer:
    with open(blob.path, "rb") as f:
        index = open_layer(FileRangeReader(f), blob.size, toc_digest=blob.toc_digest)
    return LazyLayer(index, source, ChunkCache(cache), decompress=decompress_chunk,
                     **kw)  # type: ignore[arg-type]


def test_neighbours_ride_along_in_one_request(small_files_blob: Blob, tmp_path: Path) -> None:
    src = CountingSource(small_files_blob.path)
    layer = open_layer_of(small_files_blob, tmp_path / "c", src, neighbour_span=16384)
    want = {it.name: it.data for it in SMALL}

    async def main() -> None:
        node = node_of(layer, "lib/m10.py")
        own = layer.chunks_of(node)[0]
        assert await layer.read(node, 0, 1 << 20) == want["lib/m10.py"]
        assert len(src.calls) == 1
        (off, n), = src.calls
        assert n > own.end - own.offset  # more than the file's own chunk ...
        # ... but within the aligned 16 KiB windows that chunk touches
        assert off >= own.offset // 16384 * 16384
        assert off + n <= -(-own.end // 16384) * 16384
        assert layer.fetcher.stats.neighbour_chunks > 0
        # every neighbour read now comes from the cache: no new request
        fetched = [c for c in layer._chunks_in_blob_order() if c.chunk_digest in layer._have]
        names = [p for p in want if layer.chunks_of(node_of(layer, p))[0]
                 .chunk_digest in {c.chunk_digest for c in fetched}]
        assert len(names) == 1 + layer.fetcher.stats.neighbour_chunks
        for p in names:
            assert await layer.read(node_of(layer, p), 0, 1 << 20) == want[p]
        assert len(src.calls) == 1

    trio.run(main)


def test_no_neighbours_when_off(small_files_blob: Blob, tmp_path: Path) -> None:
    src = CountingSource(small_files_blob.path)
    layer = open_layer_of(small_files_blob, tmp_path / "c", src, neighbour_span=0)
    node = node_of(layer, "lib/m10.py")
    chunk = layer.chunks_of(node)[0]

    async def main() -> None:
        await layer.read(node, 0, 1 << 20)

    trio.run(main)
    assert src.calls == [(chunk.offset, chunk.end - chunk.offset)]


def test_a_bad_neighbour_never_fails_the_read(small_files_blob: Blob, tmp_path: Path) -> None:
    src = CountingSource(small_files_blob.path)
    target = "lib/m10.py"
    layer = open_layer_of(small_files_blob, tmp_path / "c", src, neighbour_span=1 << 20)
    own = layer.chunks_of(node_of(layer, target))[0].chunk_digest

    def flaky(compression: str, data: bytes, chunk: Chunk) -> bytes:
        if chunk.chunk_digest != own:
            raise IntegrityError(f"chunk {chunk.chunk_digest}: digest mismatch (test)")
        return decompress_chunk(compression, data, chunk)

    layer.fetcher._decompress = flaky

    async def main() -> None:
        data = await layer.read(node_of(layer, target), 0, 1 << 20)
        assert data == next(it.data for it in SMALL if it.name == target)

    trio.run(main)
    assert layer.fetcher.stats.neighbour_chunks == 0  # none verified, none counted
    assert layer._have == {own}


def test_prefetch_is_split_into_concurrent_requests(tmp_path: Path) -> None:
    files = [Item(f"p{i}", "file", pseudo_random(3 * CHUNK, 200 + i)) for i in range(6)]
    blob = build_blob([*files, Item("rest", "file", pseudo_random(CHUNK, 300))],
                      tmp_path / "pf.blob", prioritize=tuple(f.name for f in files))
    src = CountingSource(blob.path, delay=0.05)
    active = [0, 0]  # now, most at once
    lock = threading.Lock()
    plain = src.read_at

    def read_at(offset: int, length: int) -> bytes:
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        try:
            return plain(offset, length)
        finally:
            with lock:
                active[0] -= 1

    src.read_at = read_at  # type: ignore[method-assign]
    # half a chunk: runs of one chunk each, every chunk fetched as concurrent pieces
    span = CHUNK // 2
    layer = open_layer_of(blob, tmp_path / "c", src, prefetch_span=span,
                          prefetch_concurrency=3, max_concurrency=1)

    async def main() -> None:
        assert await layer.prefetch(layer.prefetch_end, 60.0)
        calls = len(src.calls)
        for f in files:  # every prioritized file is now served without a request
            assert await layer.read(node_of(layer, f.name), 0, 4 * CHUNK) == f.data
        assert len(src.calls) == calls

    trio.run(main)
    prioritized = layer._chunks_in_blob_order(layer.prefetch_end)
    assert {c.chunk_digest for c in prioritized} <= layer._have
    # 18 incompressible chunks of ~CHUNK bytes: at least 2 pieces each, none over the span
    assert len(src.calls) >= 2 * 18
    assert all(n <= span for _, n in src.calls)
    assert 1 < active[1] <= 3
    # reads get max_concurrency and whole-run requests back
    assert layer.fetcher._limiter.total_tokens == 1 and layer.fetcher.split_size == 0


# -- real mounts: background fetch of one layer waits while another layer is read ----------


def bg_blob(d: Path, seed: int) -> Blob:
    return build_blob([Item("big", "file", pseudo_random(12 * CHUNK, seed)),
                       Item("small", "file", b"small\n")], d / f"bg{seed}.blob")


def test_background_fetch_waits_for_foreground_reads_of_any_layer(tmp_path: Path) -> None:
    require_fuse()
    a_blob, b_blob = bg_blob(tmp_path, 41), bg_blob(tmp_path, 42)
    m = make_mounter(tmp_path / "state", background=True, direct_io=True,
                     silence_period=5.0, fetch_period=0.05, max_span=2 * CHUNK)
    mp_a, mp_b = tmp_path / "a", tmp_path / "b"
    stop = threading.Event()
    reads = [0]
    errors: list[BaseException] = []

    def reader() -> None:
        want = b"small\n"
        try:
            while not stop.is_set():
                # direct_io: every read reaches the worker, cached or not
                assert (mp_a / "small").read_bytes() == want
                reads[0] += 1
                time.sleep(0.05)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    with mounted(m, mp_a, labels_for(a_blob)):
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        try:
            with mounted(m, mp_b, labels_for(b_blob)):
                # while layer a is read, neither layer starts fetching in background: wait
                # until the reader made 2 silence periods' worth of reads (>= 200 reads at
                # most 20/s), then check
                deadline = time.monotonic() + 120
                while reads[0] < 200 and time.monotonic() < deadline and not errors:
                    time.sleep(0.1)
                assert reads[0] >= 200 and not errors
                for mp in (mp_a, mp_b):
                    st = wait_status(m, mp, lambda s: s["updated"] > time.time() - 0.5)
                    assert st["background_calls"] == 0, st
                    assert st["state"] == "ready"
                stop.set()
                t.join(30)
                assert not errors
                # after the reads stop, both complete (one paced request at a time)
                for mp in (mp_a, mp_b):
                    st = wait_status(m, mp, lambda s: s["state"] == "complete", timeout=120)
                    assert st["background_calls"] > 0
                    assert st["background_waited"] >= 5.0 - 0.5  # at least one silence wait
                assert (mp_b / "big").read_bytes() == b_blob.items[0].data
        finally:
            stop.set()
            t.join(30)


# -- the spare worker: started ahead, takes the next mount ----------------------------------


def refilled_spare(m: LayerMounter) -> subprocess.Popen[bytes] | None:
    """The spare, once replaced: not during a pull, after refill_quiet seconds without a
    mount (fs/mounter.py); the wait is a liveness bound."""
    deadline = time.monotonic() + 60
    while m._spare is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return m._spare


def test_spare_worker_serves_the_next_mount(tmp_path: Path) -> None:
    require_fuse()
    a_blob, b_blob = bg_blob(tmp_path, 51), bg_blob(tmp_path, 52)
    m = make_mounter(tmp_path / "state", background=False)
    try:
        spare = m._spare
        assert spare is not None and spare.poll() is None
        with mounted(m, tmp_path / "a", labels_for(a_blob)):
            st = m.status(tmp_path / "a")
            assert st is not None and st["pid"] == spare.pid  # the spare took the mount
            assert (tmp_path / "a" / "small").read_bytes() == b"small\n"
            log_text = (m.worker_dir(tmp_path / "a") / "worker.log").read_text()
            assert "mounted" in log_text  # its output went to the layer's log
            second = refilled_spare(m)
            assert second is not None and second.pid != spare.pid
            with mounted(m, tmp_path / "b", labels_for(b_blob)):
                assert (tmp_path / "b" / "big").read_bytes() == b_blob.items[0].data
        # a dead spare is replaced by a direct start
        dead = refilled_spare(m)
        assert dead is not None
        dead.kill()
        dead.wait()
        with mounted(m, tmp_path / "c", labels_for(a_blob)):
            st = m.status(tmp_path / "c")
            assert st is not None and st["pid"] != dead.pid
            assert (tmp_path / "c" / "small").read_bytes() == b"small\n"
    finally:
        last = m._spare
        m.close()
    assert last is None or last.poll() is not None  # close() ended the spare


# -- warm-up of the next layers of a pull ---------------------------------------------------


def test_mount_warms_the_next_layers_into_the_cache(tmp_path: Path) -> None:
    require_fuse()
    import json

    from ipfsnap.fs.mounter import NEXT_LAYERS_LABEL
    from ipfsnap.image import unpack as unpack_mod

    assert unpack_mod.NEXT_LAYERS_LABEL == NEXT_LAYERS_LABEL  # the two packages agree
    first = bg_blob(tmp_path, 61)
    files = [Item(f"hot{i}", "file", pseudo_random(2 * CHUNK, 70 + i)) for i in range(3)]
    nxt = build_blob([*files, Item("cold", "file", pseudo_random(4 * CHUNK, 80))],
                     tmp_path / "next.blob", prioritize=tuple(f.name for f in files))
    m = make_mounter(tmp_path / "state", background=False)
    labels = {**labels_for(first),
              NEXT_LAYERS_LABEL: json.dumps([labels_for(nxt), labels_for(nxt)])}
    try:
        with mounted(m, tmp_path / "a", labels):
            assert len(m._warming) == 1  # listed twice, warmed once
            proc = next(iter(m._warming.values()))
            # done warming (it releases the layer's warm-up lock), then it waits to serve
            assert m.tables.wait_warm(nxt.digest, 120)
            assert proc.poll() is None
            cache = m.cache_root / nxt.digest.partition(":")[2]
            cached = {p.name for p in cache.iterdir() if len(p.name) == 64}
            with open(nxt.path, "rb") as f:
                index = open_layer(FileRangeReader(f), nxt.size, toc_digest=nxt.toc_digest)
            hot = {c.chunk_digest.partition(":")[2] for f_ in files
                   for c in index.chunks(f_.name)}
            cold = {c.chunk_digest.partition(":")[2] for c in index.chunks("cold")}
            assert hot <= cached  # the prioritized range is local before the mount
            assert not cold & cached  # and nothing else
            with mounted(m, tmp_path / "b", labels_for(nxt)):
                st = wait_status(m, tmp_path / "b", lambda s: s["updated"] > 0)
                assert st["pid"] == proc.pid  # the warm-up took its layer's mount
                assert st["prefetch_bytes"] == 0  # its own prefetch found it all cached
                assert (tmp_path / "b" / "hot1").read_bytes() == files[1].data
        # a bad label never fails a mount
        with mounted(m, tmp_path / "c", {**labels_for(first), NEXT_LAYERS_LABEL: "{bad"}):
            assert (tmp_path / "c" / "small").read_bytes() == b"small\n"
    finally:
        m.close()


# a nesting depth far past the interpreter's recursion limit (1000): json.loads raises
# RecursionError, not ValueError, for it; containerd allows a label of 4096 bytes
DEEP = 4000


@pytest.mark.parametrize(("value", "why"), [
    ("[" * DEEP, "nested too deeply"),
    ("[" * DEEP + "]" * DEEP, "nested too deeply"),
    ("{bad", "not JSON"),
    ('{"containerd.io/snapshot/remote/stargz.digest": "sha256:00"}', "a JSON dict, not a list"),
    ("5", "a JSON int, not a list"),
])
def test_bad_next_layers_label_is_logged_and_gives_no_layers(
        value: str, why: str, caplog: pytest.LogCaptureFixture) -> None:
    """A bad label never fails the mount (``LayerMounter.warm`` warms what this gives)."""
    from ipfsnap.fs.mounter import NEXT_LAYERS_LABEL, next_layer_labels

    with caplog.at_level(logging.WARNING, logger="ipfsnap.fs.mounter"):
        assert next_layer_labels(value) == []
    assert f"ignoring label {NEXT_LAYERS_LABEL}: " in caplog.text
    assert why in caplog.text


def test_next_layers_label_keeps_the_good_entries_up_to_the_bound(
        caplog: pytest.LogCaptureFixture) -> None:
    import json

    from ipfsnap.fs.mounter import NEXT_LAYERS_MAX, next_layer_labels

    good = [{"k": f"v{i}"} for i in range(NEXT_LAYERS_MAX + 2)]
    # bad entries count towards the bound: they are dropped, not replaced by later ones
    value = json.dumps([good[0], 5, {"k": 1}, [[["x"]]], *good[1:]])
    with caplog.at_level(logging.WARNING, logger="ipfsnap.fs.mounter"):
        assert next_layer_labels(value) == good[:NEXT_LAYERS_MAX - 3]
    assert caplog.text.count("not an object of strings") == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ipfsnap.fs.mounter"):
        assert next_layer_labels("") == []  # no label: nothing to warm, nothing logged
    assert caplog.text == ""
    assert next_layer_labels(json.dumps(good)) == good[:NEXT_LAYERS_MAX]
