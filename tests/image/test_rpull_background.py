"""rpull's critical path: the snapshotter is opened in the background while the documents
are resolved, and used only once they are all fetched and verified.

The CLI hands :func:`ipfsnap.image.rpull.rpull` a factory (``EnteredInBackground.get``)
instead of a snapshotter; these tests check both halves: the background helper (runs at
once, in another thread, hands over its value or its error, exits once) and rpull's use of
a factory (called once, after resolution; never when resolution fails).
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
from ipfsnap.image.errors import RemoteImageFormatError
from ipfsnap.image.rpull import rpull
from ipfsnap.image.unpack import chain_ids
from ipfsnap.ipfs import IPFSClient
from ipfsnap.snapshot import Kind, SnapshotStore
from tests.fs.layers import Item, make_tar
from tests.image.rpull_helpers import push
from tests.support import require_root

#: bound on waiting for the background thread in the tests (a liveness bound, not a timing)
WAIT = 60.0


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
