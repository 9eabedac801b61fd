"""Lazy (remote) snapshots through the daemon with the real LayerMounter and FUSE workers:
SnapshotExists from a remote prepare, restarts and crashes (mounts kept or restored, cache
reused), ``snapshotter stop`` unmounting everything, and ``snapshot status``."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ipfsnap.cli.main import main as cli_main
from ipfsnap.fs import LAYER_DIGEST_LABEL, TOC_DIGEST_LABEL, URLS_LABEL
from ipfsnap.fs.mounter import is_mountpoint
from ipfsnap.fs.spec import read_status
from ipfsnap.ipfs import IPFSClient
from ipfsnap.service import LayerState, SnapshotterClient, connect_or_start
from ipfsnap.service.errors import ProtocolError
from ipfsnap.snapshot import REMOTE_LABEL, TARGET_SNAPSHOT_LABEL, Kind, mount_all, unmount
from ipfsnap.snapshot.errors import SnapshotExists, SnapshotNotFound
from tests.fs.layers import CHUNK, Blob, expected_tree, snapshot_tree
from tests.fs.test_ipfs import extents
from tests.service.conftest import Svc, remote_labels
from tests.support import require_fuse

#: exactly the chunks read are fetched: no prefetch, no background fetch, no neighbours
NO_FETCH_AHEAD = "noprefetch = true\nno_background_fetch = true\n[blob]\nneighbour_span = 0\n"


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _remote_layer(client: SnapshotterClient, blob: Blob, name: str = "layer1") -> Path:
    """Prepare ``blob`` lazily as committed snapshot ``name``; return its mountpoint."""
    with pytest.raises(SnapshotExists) as err:
        client.prepare("extract-1", labels=remote_labels(blob, name))
    assert type(err.value) is SnapshotExists  # the very class SnapshotStore raises
    assert f"target snapshot {name!r} already exists" in str(err.value)
    info = client.stat(name)
    assert info.kind is Kind.COMMITTED and REMOTE_LABEL in info.labels
    mounts = client.view("probe-" + name, parent=name)
    client.remove("probe-" + name)
    assert len(mounts) == 1 and mounts[0].type == "bind"
    return Path(mounts[0].source)


def _status(client: SnapshotterClient, mp: Path) -> LayerState:
    states = [s for s in client.status() if s.mountpoint == str(mp)]
    assert len(states) == 1, client.status()
    return states[0]


def _wait_status(client: SnapshotterClient, mp: Path, pred: Callable[[LayerState], bool],
                 timeout: float = 60.0) -> LayerState:
    deadline = time.monotonic() + timeout
    st = _status(client, mp)
    while not pred(st):
        assert time.monotonic() < deadline, f"status never matched: {st}"
        time.sleep(0.1)
        st = _status(client, mp)
    return st


def _fresh_status(svc: Svc, client: SnapshotterClient, mp: Path) -> LayerState:
    """A status the worker wrote after now (it rewrites its file every second)."""
    now = time.time()
    deadline = time.monotonic() + 30
    while True:
        for f in (svc.state / "fs" / "workers").glob("*/status.json"):
            st = read_status(f) or {}
            if st.get("mountpoint") == str(mp) and st.get("updated", 0) > now + 0.01:
                return _status(client, mp)
        assert time.monotonic() < deadline, "worker status not refreshed"
        time.sleep(0.05)


def test_remote_prepare_mounts_lazily_and_the_rootfs_is_complete(
    make_svc: Callable[..., Svc], layer_blob: Blob, tmp_path: Path
) -> None:
    require_fuse()
    svc = make_svc()
    with connect_or_start(svc.config) as client:
        mp = _remote_layer(client, layer_blob)
        assert is_mountpoint(mp)
        assert snapshot_tree(mp) == expected_tree(layer_blob.items)
        # a container-style active snapshot on top: overlay with the lazy layer below
        mounts = client.prepare("container", parent="layer1")
        assert mounts[0].type == "overlay"
        target = tmp_path / "rootfs"
        target.mkdir()
        mount_all(mounts, target)
        try:
            assert (target / "etc/hostname").read_bytes() == b"lazy\n"
            (target / "etc/new").write_text("upper")
        finally:
            unmount(target)
        # a second prepare of the same layer: already there
        with pytest.raises(SnapshotExists):
            client.prepare("extract-2", labels=remote_labels(layer_blob, "layer1"))
        with pytest.raises(SnapshotExists):  # and the key itself is taken
            client.prepare("container")


def test_daemon_kill9_keeps_the_mount_and_its_worker(
    make_svc: Callable[..., Svc], layer_blob: Blob
) -> None:
    require_fuse()
    svc = make_svc(config_text=NO_FETCH_AHEAD)
    with connect_or_start(svc.config) as client:
        mp = _remote_layer(client, layer_blob)
        worker = _status(client, mp).pid
    svc.kill9()
    assert is_mountpoint(mp)
    assert (mp / "etc/hostname").read_bytes() == b"lazy\n"  # served with no daemon at all
    with connect_or_start(svc.config) as client:
        assert _status(client, mp).pid == worker  # checked, not remounted
        assert client.stat("layer1").kind is Kind.COMMITTED
        mounts = client.view("v", parent="layer1")
        assert Path(mounts[0].source) == mp
        data = {it.name: it.data for it in layer_blob.items if it.kind == "file"}
        assert (mp / "data/big").read_bytes() == data["data/big"]


def test_crash_of_daemon_and_worker_remounts_with_the_cache_reused(
    make_svc: Callable[..., Svc], layer_blob: Blob
) -> None:
    require_fuse()
    svc = make_svc(config_text=NO_FETCH_AHEAD)
    data = {it.name: it.data for it in layer_blob.items if it.kind == "file"}
    with connect_or_start(svc.config) as client:
        mp = _remote_layer(client, layer_blob)
        assert (mp / "data/big").read_bytes() == data["data/big"]
        before = _fresh_status(svc, client, mp)
        assert before.read_bytes > 0 and before.fetched > 0
        worker = before.pid
    svc.kill9()
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(OSError):  # the FUSE mount is dead: "transport endpoint not connected"
        os.listdir(mp)
    with connect_or_start(svc.config) as client:
        st = _status(client, mp)
        assert st.pid != worker and is_mountpoint(mp)
        assert st.fetched == before.fetched  # the verified chunks are still in the cache
        # the file read before the crash comes from the cache: nothing read from the source
        assert (mp / "data/big").read_bytes() == data["data/big"]
        after = _fresh_status(svc, client, mp)
        assert after.read_bytes == 0
        # control: a file never read before does go to the source
        assert (mp / "data/exact").read_bytes() == data["data/exact"]
        assert _fresh_status(svc, client, mp).read_bytes > 0
        log = (svc.state / "snapshotter.log").read_text()
        assert "restored remote snapshot 'layer1'" in log


def test_snapshotter_stop_unmounts_everything(
    make_svc: Callable[..., Svc], layer_blob: Blob
) -> None:
    require_fuse()
    svc = make_svc(config_text=NO_FETCH_AHEAD)
    with connect_or_start(svc.config) as client:
        mps = [_remote_layer(client, layer_blob, "layer1"),
               _remote_layer(client, layer_blob, "layer2")]
        # (same blob twice, two snapshots: two mounts, two workers)
        workers = [_status(client, mp).pid for mp in mps]
    assert all(is_mountpoint(mp) for mp in mps)
    res = svc.cli("snapshotter", "stop")
    assert "unmounted its layers and stopped" in res.stderr
    assert svc.pid() is None
    assert not any(is_mountpoint(mp) for mp in mps)
    for w in workers:
        assert _gone(w)
    # the snapshots themselves persist; the next start mounts them again
    with connect_or_start(svc.config) as client:
        assert all(is_mountpoint(mp) for mp in mps)
        assert (mps[1] / "etc/hostname").read_bytes() == b"lazy\n"


def test_snapshot_status_on_a_real_lazy_mount(
    make_svc: Callable[..., Svc], layer_blob: Blob, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_fuse()
    svc = make_svc()  # background fetch on
    with connect_or_start(svc.config) as client:
        mp = _remote_layer(client, layer_blob)
        st = _wait_status(client, mp, lambda s: s.state == "complete")
    assert st.percent == 100.0 and st.fetched == st.total > 0
    # piped: JSON lines
    lines = [json.loads(x) for x in svc.cli("snapshot", "status").stdout.splitlines()]
    assert len(lines) == 1
    row = lines[0]
    assert row["snapshot"] == "layer1"
    assert row["layer"] == layer_blob.digest
    assert row["size"] == layer_blob.size
    assert row["state"] == "complete" and row["percent"] == 100.0
    assert row["fetched"] == row["total"] and row["last_error"] == ""
    assert row["mountpoint"] == str(mp)
    # on a terminal: a table
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code = cli_main(["--state-dir", str(svc.state), "--config", str(svc.config.config_path),
                     "snapshot", "status"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].split() == ["SNAPSHOT", "LAYER", "SIZE", "FETCHED", "%", "STATE", "LAST",
                              "ERROR"]
    assert out[1].split()[0] == "layer1" and "complete" in out[1].split()
    assert "100.0" in out[1].split()


def test_status_shows_prefetch_free_ready_layers_and_a_dead_worker(
    make_svc: Callable[..., Svc], layer_blob: Blob
) -> None:
    require_fuse()
    svc = make_svc(config_text=NO_FETCH_AHEAD)
    with connect_or_start(svc.config) as client:
        mp = _remote_layer(client, layer_blob)
        st = _status(client, mp)
        assert st.state == "ready" and st.percent < 100.0  # nothing fetches ahead
        os.kill(st.pid, signal.SIGKILL)
        dead = _wait_status(client, mp, lambda s: s.state == "error")
        assert f"pid {st.pid}" in dead.last_error


def test_remote_layer_from_ipfs_through_the_daemon(
    make_svc: Callable[..., Svc], layer_blob: Blob, ipfs_node: Any
) -> None:
    """The daemon, started on demand, gets the IPFS API from the config file and serves a
    layer whose only source is an ipfs:// url; reads fetch exactly the file's chunks."""
    require_fuse()
    with IPFSClient(ipfs_node.api_url) as ipfs:
        cid = ipfs.add(layer_blob.path).cid
    svc = make_svc(config_text=f'ipfs_api = "{ipfs_node.api_url}"\n' + NO_FETCH_AHEAD)
    labels = {
        LAYER_DIGEST_LABEL: layer_blob.digest,
        TOC_DIGEST_LABEL: layer_blob.toc_digest,
        URLS_LABEL: f"ipfs://{cid}",
        TARGET_SNAPSHOT_LABEL: "from-ipfs",
    }
    with connect_or_start(svc.config) as client:
        with pytest.raises(SnapshotExists):
            client.prepare("extract", labels=labels)
        mounts = client.view("v", parent="from-ipfs")
        mp = Path(mounts[0].source)
        want = next(it.data for it in layer_blob.items if it.name == "data/exact")
        assert (mp / "data/exact").read_bytes() == want
        st = _fresh_status(svc, client, mp)
        assert st.read_bytes == extents(layer_blob, "data/exact")
        assert snapshot_tree(mp) == expected_tree(layer_blob.items)


def test_warm_request_reads_the_command_in_a_lazy_layer_then_removal_works(
    make_svc: Callable[..., Svc], layer_blob: Blob
) -> None:
    """The ``warm`` request rpull sends (service/warmups.py): exactly the command's chunks
    fetched by the daemon with no container; bad requests named; the layer still removable."""
    require_fuse()
    svc = make_svc(config_text=NO_FETCH_AHEAD)
    with connect_or_start(svc.config) as client:
        mp = _remote_layer(client, layer_blob)
        assert _status(client, mp).fetched == 0
        assert client.warm("layer1", ["/data/big", "--flag"], ["PATH=/bin"])
        want = extents(layer_blob, "data/big")
        st = _wait_status(client, mp, lambda s: s.fetched >= want)
        assert st.fetched == want  # nothing else: the start files are not in this layer
        log = svc.state / "snapshotter.log"
        deadline = time.monotonic() + 30
        while "pull of layer1: warmed" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert (f"pull of layer1: warmed 1 files of the command ({5 * CHUNK + 123} bytes, "
                "2 skipped)") in log.read_text()

        client.prepare("active", parent="layer1")
        with pytest.raises(ProtocolError, match="warm 'active': not a committed snapshot"):
            client.warm("active", ["/data/big"])
        with pytest.raises(SnapshotNotFound):
            client.warm("ghost", ["/data/big"])
        with pytest.raises(ProtocolError, match="'args' must be a list of strings"):
            client.call("warm", {"key": "layer1", "args": "/data/big"})
        assert not client.warm("layer1", [])  # no command: nothing to do
        client.remove("active")
        client.remove("layer1")
        assert not is_mountpoint(mp)
