"""One snapshotter, commands with different IPFS APIs: each command's lazy layers are
fetched from that command's API, not from the API the snapshotter was started with."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ipfsnap.fs import IPFS_API_LABEL
from ipfsnap.image.unpack import chain_ids
from ipfsnap.ipfs import IPFSClient, parse_api
from ipfsnap.service import SnapshotterClient
from ipfsnap.snapshot import REMOTE_LABEL
from tests.fs.layers import Item, make_tar
from tests.fs.proxy import StallingProxy
from tests.image.rpull_helpers import PushedImage, push
from tests.service.conftest import Svc
from tests.support import require_fuse


def _image(api: str, text: bytes) -> PushedImage:
    tar = make_tar([Item("data", "dir", mode=0o755), Item("data/file", "file", text)])
    with IPFSClient(api) as client:
        return push(client, [tar], [True])


def _wait_refused(port: int) -> None:
    """Until connects to ``port`` are refused (a closed listener can still take the
    connections its blocked accept() thread was waiting for)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.1)
    raise AssertionError(f"port {port} still accepts connections")


def _worker_apis(state: Path) -> dict[str, str]:
    """cid -> API of every layer worker's spec under ``state``."""
    out = {}
    for spec in (state / "fs" / "workers").glob("*/spec.json"):
        source = json.loads(spec.read_text(encoding="utf-8"))["source"]
        out[source["cid"]] = source["api"]
    return out


def test_each_request_uses_its_own_ipfs_api(
    make_svc: Callable[..., Svc], ipfs_node: Any, ipfs_node_factory: Any, tmp_path: Path
) -> None:
    require_fuse()
    # two nodes that cannot reach each other: content added to one exists only there
    node_a = ipfs_node
    node_b = ipfs_node_factory(offline=True)
    api_a, api_b = node_a.api_url, node_b.api_url
    image_a = _image(api_a, b"only on node A\n")
    image_b = _image(api_b, b"only on node B\n")
    svc = make_svc(config_text="prefetch_timeout_sec = 10\n[blob]\nfetching_timeout_sec = 10\n")

    # the snapshotter starts with node A's API ...
    assert "started snapshotter" in svc.cli("--ipfs-api", api_a, "snapshotter").stderr
    # ... and a command with node B's API gets its layer lazily from node B
    for api, image in ((api_b, image_b), (api_a, image_a)):
        res = svc.cli("--ipfs-api", api, "image", "rpull", "--ipfs", image.cid)
        assert res.returncode == 0, res.stderr
    with SnapshotterClient(svc.state) as client:
        for api, image in ((api_b, image_b), (api_a, image_a)):
            labels = client.stat(chain_ids(image.diff_ids)[-1]).labels
            assert REMOTE_LABEL in labels, "mounted lazily, not fetched whole"
            assert labels[IPFS_API_LABEL] == api
    layer_cids = {img.layers[0].urls[0].removeprefix("ipfs://"): api
                  for api, img in ((api_a, image_a), (api_b, image_b))}
    assert _worker_apis(svc.state) == layer_cids

    # the bytes come through the lazy layer from the node that has them
    for image, text in ((image_b, b"only on node B\n"), (image_a, b"only on node A\n")):
        target = tmp_path / f"mnt-{image.cid[-8:]}"
        target.mkdir()
        res = svc.cli("--ipfs-api", api_a, "image", "mount", image.cid, str(target))
        assert res.returncode == 0, res.stderr
        try:
            assert (target / "data" / "file").read_bytes() == text
        finally:
            svc.cli("image", "unmount", str(target))


def test_a_layer_whose_api_is_gone_is_restored_from_the_snapshotters_own(
    make_svc: Callable[..., Svc], ipfs_node: Any, tmp_path: Path
) -> None:
    """The request's API is kept with the snapshot; when nothing listens there any more
    (a managed node restarted on another port), a restart serves the layer from the
    snapshotter's own API instead of failing it."""
    require_fuse()
    image = _image(ipfs_node.api_url, b"served after the move\n")
    endpoint = parse_api(ipfs_node.api_url)
    proxy = StallingProxy((endpoint.host, endpoint.port))  # the node at another address
    svc = make_svc()
    try:
        svc.cli("--ipfs-api", ipfs_node.api_url, "snapshotter")
        res = svc.cli("--ipfs-api", proxy.url, "image", "rpull", "--ipfs", image.cid)
        assert res.returncode == 0, res.stderr
        chain = chain_ids(image.diff_ids)[-1]
        with SnapshotterClient(svc.state) as client:
            assert client.stat(chain).labels[IPFS_API_LABEL] == proxy.url
        assert set(_worker_apis(svc.state).values()) == {proxy.url}
        svc.cli("snapshotter", "stop")  # unmounts the layer
    finally:
        proxy.close()  # the address of the request is dead now
    _wait_refused(proxy.port)
    # restart: the remote snapshot is mounted again, from the snapshotter's own API
    svc.cli("--ipfs-api", ipfs_node.api_url, "snapshotter")
    assert set(_worker_apis(svc.state).values()) == {ipfs_node.api_url}
    target = tmp_path / "mnt"
    target.mkdir()
    res = svc.cli("image", "mount", image.cid, str(target))
    assert res.returncode == 0, res.stderr
    try:
        assert (target / "data" / "file").read_bytes() == b"served after the move\n"
    finally:
        svc.cli("image", "unmount", str(target))
