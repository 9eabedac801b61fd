"""rpull's critical path: the snapshotter is opened in the background while the documents
are resolved, and used only once they are all fetched and verified; the lazy layers' TOCs
are fetched ahead as soon as the manifest is known (the first lazy layer's by default,
``IPFSNAP_TOC_AHEAD``).

The CLI hands :func:`ipfsnap.image.rpull.rpull` a factory (``EnteredInBackground.get``)
instead of a snapshotter; these tests check both halves: the background helper (runs at
once, in another thread, hands over its value or its error, exits once) and rpull's use of
a factory (called once, after resolution; never when resolution fails). Then
:func:`warm_tocs`: it reads exactly each eStargz layer's footer and TOC (nothing of other
layers), never fails the pull, and ``resolve_remote`` hands it the manifest before it
fetches the config.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipfsnap.cli.rpull import EnteredInBackground
from ipfsnap.content import ImageStore
from ipfsnap.estargz import TOC_DIGEST_ANNOTATION, BuildOptions, build, open_layer
from ipfsnap.estargz.footer import TAIL_READ_SIZE
from ipfsnap.fs.source import TailReader
from ipfsnap.image.errors import RemoteImageFormatError
from ipfsnap.image.resolve import BlobFetcher, resolve_remote
from ipfsnap.image.rpull import DEFAULT_TOC_AHEAD, rpull, toc_ahead_layers, warm_tocs
from ipfsnap.image.unpack import chain_ids
from ipfsnap.ipfs import IPFSClient
from ipfsnap.oci import Descriptor, Manifest, mediatypes, sha256_digest
from ipfsnap.snapshot import Kind, SnapshotStore
from tests.fs.layers import CountingSource, Item, make_tar
from tests.image.rpull_helpers import CHUNK, push
from tests.support import require_root

#: bound on waiting for the background thread in the tests (a liveness bound, not a timing)
WAIT = 60.0
#: a valid CID nothing serves (the API that would be asked is unreachable anyway)
NO_SUCH_CID = "bafkreiad25a7t6nopm6k366c7xfu5r3ygalkhynqcg5r2divmretwoiiee"


class Recorder:
    """A context manager that records where and how often it is entered and exited."""

    def __init__(self, value: object = "value", error: BaseException | None = None) -> None:
        self.value = value
        self.error = error
        self.entered = threading.Event()
        self.release = threading.Event()
        self.thread: int | None = None
        self.exits = 0

    @contextlib.contextmanager
    def cm(self) -> Iterator[object]:
        self.thread = threading.get_ident()
        self.entered.set()
        assert self.release.wait(WAIT)
        if self.error is not None:
            raise self.error
        try:
            yield self.value
        finally:
            self.exits += 1


# -- no daemon needed --------------------------------------------------------------------------

def test_background_starts_at_once_in_another_thread_and_hands_over_its_value() -> None:
    rec = Recorder(value={"snapshotter": 1})
    opening = EnteredInBackground(rec.cm(), "test")
    # entered before anyone asks for the value: the work overlaps the caller's
    assert rec.entered.wait(WAIT)
    assert rec.thread is not None and rec.thread != threading.get_ident()
    rec.release.set()
    assert opening.get() == {"snapshotter": 1}
    assert opening.get() is opening.get()  # the same value, entered once
    assert rec.exits == 0
    opening.close()
    opening.close()  # idempotent: exited once
    assert rec.exits == 1


def test_background_error_is_raised_by_get_and_nothing_is_exited() -> None:
    rec = Recorder(error=OSError("snapshotter socket: cannot connect"))
    rec.release.set()
    opening = EnteredInBackground(rec.cm(), "test")
    with pytest.raises(OSError, match="cannot connect"):
        opening.get()
    opening.close()
    assert rec.exits == 0


def test_background_close_without_get_waits_and_exits() -> None:
    """A command that fails before it needs the snapshotter still closes it."""
    rec = Recorder()
    opening = EnteredInBackground(rec.cm(), "test")
    assert rec.entered.wait(WAIT)
    rec.release.set()
    opening.close()
    assert rec.exits == 1


# -- with IPFS ---------------------------------------------------------------------------------

def _tars() -> list[bytes]:
    return [
        make_tar([Item("etc", "dir", mode=0o755), Item("etc/one", "file", b"one\n")]),
        make_tar([Item("etc", "dir", mode=0o755), Item("etc/two", "file", b"two\n")]),
    ]


@pytest.mark.integration
def test_rpull_calls_the_snapshotter_factory_once_after_resolution(
    ipfs_node: Any, tmp_path: Path
) -> None:
    require_root()
    state = tmp_path / "state"
    images = ImageStore(state)
    store = SnapshotStore(tmp_path / "snapshots", restore=False)
    seen: list[tuple[bool, bool]] = []
    with IPFSClient(ipfs_node.api_url) as client:
        image = push(client, _tars(), [False, False])

        def factory() -> SnapshotStore:
            # every document is fetched, verified and stored before the snapshotter is used
            seen.append((images.blobs.exists(image.manifest.digest),
                         images.blobs.exists(image.config.digest)))
            return store

        try:
            pulled = rpull(image.cid, factory, client=client, images=images, lazy=False)
            assert seen == [(True, True)]
            assert pulled.unpacked is not None
            assert [r.how for r in pulled.unpacked.layers] == ["full", "full"]
            top = chain_ids(image.diff_ids)[-1]
            assert store.stat(top).kind == Kind.COMMITTED
        finally:
            store.close()


@pytest.mark.integration
def test_rpull_never_calls_the_factory_when_resolution_fails(
    ipfs_node: Any, tmp_path: Path
) -> None:
    calls: list[int] = []

    def factory() -> SnapshotStore:
        calls.append(1)
        raise AssertionError("the snapshotter must not be used")

    with IPFSClient(ipfs_node.api_url) as client:
        # a CID that names JSON but not an image descriptor
        cid = client.add(io.BytesIO(json.dumps({"mediaType": "text/plain"}).encode())).cid
        with pytest.raises(RemoteImageFormatError):
            rpull(cid, factory, client=client, images=ImageStore(tmp_path / "state"),
                  lazy=False)
    assert calls == []


class RecordingClient(IPFSClient):
    """An IPFS client that records the ranges read (cid, offset, length)."""

    def __init__(self, api: str) -> None:
        super().__init__(api)
        self.reads: list[tuple[str, int, int | None]] = []
        self._lock = threading.Lock()

    def _record(self, cid: str, offset: int, length: int | None) -> None:
        with self._lock:
            self.reads.append((cid, offset, length))

    def cat(self, cid: str, offset: int = 0, length: int | None = None, *,
            timeout: float | None = None) -> bytes:
        self._record(cid, offset, length)
        return super().cat(cid, offset, length, timeout=timeout)

    def cat_into(self, cid: str, offset: int, length: int | None, sink: Any, *,
                 timeout: float | None = None) -> int:
        self._record(cid, offset, length)
        return super().cat_into(cid, offset, length, sink, timeout=timeout)


@pytest.mark.integration
def test_warm_tocs_reads_each_estargz_footer_and_toc_only(
    ipfs_node: Any, tmp_path: Path
) -> None:
    with IPFSClient(ipfs_node.api_url) as client:
        image = push(client, [*_tars(), _tars()[0]], [True, False, True])
    rec = RecordingClient(ipfs_node.api_url)
    with rec:
        fetcher = BlobFetcher(rec, ImageStore(tmp_path / "state").blobs)
        for t in warm_tocs(fetcher, image.layers):
            t.join(WAIT)
            assert not t.is_alive()
    # one read per eStargz layer: the blob's end, exactly as the layer worker reads it
    # (fs.source.TailReader), so the node fetches the blocks the worker asks for next
    want = set()
    for i in (0, 2):
        layer = image.layers[i]
        cid = layer.urls[0].removeprefix("ipfs://")
        blob = image.blobs[layer.digest]
        (tmp_path / "blob").write_bytes(blob)
        src = CountingSource(tmp_path / "blob")
        open_layer(TailReader(src, len(blob)), len(blob))
        assert len(src.calls) == 1
        want |= {(cid, *src.calls[0])}
    assert set(rec.reads) == want and len(rec.reads) == 2


def test_toc_ahead_layers_by_mode() -> None:
    def layer(n: int, estargz: bool, urls: bool = True) -> Descriptor:
        ann = {TOC_DIGEST_ANNOTATION: sha256_digest(b"toc%d" % n)} if estargz else {}
        return Descriptor(mediatypes.OCI_LAYER_GZIP, sha256_digest(b"%d" % n), 100 + n,
                          urls=(f"ipfs://{NO_SUCH_CID}",) if urls else (), annotations=ann)

    layers = [layer(0, False), layer(1, True, urls=False), layer(2, True), layer(3, True)]
    assert toc_ahead_layers(layers, "first") == [layers[2]]
    assert toc_ahead_layers(layers, "1") == toc_ahead_layers(layers, "all") == layers[2:]
    assert toc_ahead_layers(layers, "0") == toc_ahead_layers(layers, "no") == []
    assert toc_ahead_layers(layers, DEFAULT_TOC_AHEAD) == [layers[2]]


def test_warm_tocs_never_fails_the_pull(tmp_path: Path) -> None:
    """An unreachable IPFS API: the threads end quietly (the worker reports real errors)."""
    out = io.BytesIO()
    res = build(io.BytesIO(_tars()[0]), out, BuildOptions(chunk_size=CHUNK, level=1, workers=1))
    blob = out.getvalue()
    layer = Descriptor(mediatypes.OCI_LAYER_GZIP, sha256_digest(blob), len(blob),
                       urls=(f"ipfs://{NO_SUCH_CID}",), annotations=res.annotations())
    escaped: list[BaseException | None] = []
    hook = threading.excepthook
    threading.excepthook = lambda args: escaped.append(args.exc_value)
    try:
        with IPFSClient("http://127.0.0.1:1") as dead:
            threads = warm_tocs(BlobFetcher(dead, ImageStore(tmp_path / "s").blobs), [layer])
            assert len(threads) == 1
            for t in threads:
                t.join(WAIT)
                assert not t.is_alive()
    finally:
        threading.excepthook = hook
    assert escaped == []


class _TailClient:
    """Records the range each ``cat`` asks for; answers zeros (no footer: the warm-up stops
    there, quietly)."""

    def __init__(self) -> None:
        self.reads: list[tuple[str, int, int]] = []

    def cat(self, cid: str, offset: int, length: int) -> bytes:
        self.reads.append((cid, offset, length))
        return bytes(length)


@pytest.mark.parametrize("value, span", [
    ("", TAIL_READ_SIZE), ("junk", TAIL_READ_SIZE), ("0", 0), ("1048576", 1 << 20),
])
def test_warm_tocs_reads_the_tail_the_worker_reads(monkeypatch: pytest.MonkeyPatch,
                                                  value: str, span: int) -> None:
    """The range follows IPFSNAP_TOC_TAIL as the layer workers' spec does (one parser:
    estargz.footer.tail_read_size), so the blocks fetched ahead are the ones asked next."""
    from ipfsnap.estargz.footer import tail_start
    from ipfsnap.ipfs.unixfs import CHUNK_SIZE

    monkeypatch.setenv("IPFSNAP_TOC_TAIL", value)
    size = 40 * CHUNK_SIZE + 1234
    layer = Descriptor(mediatypes.OCI_LAYER_GZIP, sha256_digest(b"layer"), size,
                       urls=(f"ipfs://{NO_SUCH_CID}",),
                       annotations={TOC_DIGEST_ANNOTATION: sha256_digest(b"toc")})
    client = _TailClient()
    fetcher: Any = type("Fetcher", (), {"client": client})()
    for t in warm_tocs(fetcher, [layer]):
        t.join(WAIT)
        assert not t.is_alive()
    start = tail_start(size, span, CHUNK_SIZE)
    assert client.reads == [(NO_SUCH_CID, start, size - start)]


@pytest.mark.integration
def test_resolve_hands_the_manifest_over_before_the_config(
    ipfs_node: Any, tmp_path: Path
) -> None:
    images = ImageStore(tmp_path / "state")
    seen: list[tuple[Manifest, bool]] = []
    with IPFSClient(ipfs_node.api_url) as client:
        image = push(client, _tars(), [True, False])
        remote = resolve_remote(
            BlobFetcher(client, images.blobs), image.cid,
            on_manifest=lambda m: seen.append((m, images.blobs.exists(image.config.digest))))
    assert seen == [(remote.manifest, False)]
    assert images.blobs.exists(image.config.digest)
