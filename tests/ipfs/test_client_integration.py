"""The client against real daemons (the managed node fixtures: js-ipfs here, Kubo if on PATH).

Proves every call works on a real node, that ``compute_cid`` equals what the daemon computes
with the same parameters (raw leaves, 256 KiB chunks, balanced layout, 174 links), and that
range reads cross bitswap byte-exact, on both faces.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from ipfsnap.ipfs import (
    AsyncIPFSClient,
    IPFSClient,
    IPFSNotFound,
    IPFSTimeout,
    RetryPolicy,
    ShortRead,
    compute_cid,
    compute_dag,
    discover_api,
    normalize_cid,
    raw_cid,
)
from ipfsnap.ipfs.node import ManagedNode
from ipfsnap.ipfs.unixfs import CHUNK_SIZE, MAX_LINKS

pytestmark = pytest.mark.integration

RNG = random.Random(20261128)
SIZES = [0, 1, CHUNK_SIZE, CHUNK_SIZE + 1, 5 * CHUNK_SIZE - 7,
         RNG.randrange(1, 4 << 20), RNG.randrange(1, 4 << 20)]


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture(scope="module")
def client(ipfs_node: ManagedNode) -> Any:
    c = IPFSClient(ipfs_node.api_multiaddr)
    yield c
    c.close()


def test_id_and_version(client: IPFSClient, ipfs_node: ManagedNode) -> None:
    info = client.id()
    assert info["ID"] == ipfs_node.peer_id
    assert isinstance(client.version()["Version"], str)


@pytest.mark.parametrize("size", SIZES)
def test_add_matches_compute_cid(client: IPFSClient, size: int, tmp_path: Path) -> None:
    data = blob(size, size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    result = client.add(path)
    info = compute_dag(path)
    assert result.cid == info.cid
    assert result.size == size
    assert result.dag_size == info.dag_size
    if size <= CHUNK_SIZE:
        assert result.cid == raw_cid(data)


@pytest.mark.slow
def test_add_matches_compute_cid_across_a_tree_level(client: IPFSClient, tmp_path: Path) -> None:
    # 174 full chunks fill one node; one more byte needs a second level
    size = MAX_LINKS * CHUNK_SIZE + 1
    path = tmp_path / "big"
    with open(path, "wb") as f:
        rng = random.Random(size)
        for _ in range(MAX_LINKS):
            f.write(rng.randbytes(CHUNK_SIZE))
        f.write(b"!")
    result = client.add(path)
    assert result.cid == compute_cid(path)
    assert client.file_size(result.cid) == size
    # files/stat's Blocks counts the root's links: a full 174-leaf node and a 1-leaf node
    assert client.files_stat(result.cid).blocks == 2
    assert compute_dag(path).blocks == (MAX_LINKS + 1) + 2 + 1  # leaves, level 1, root
    with open(path, "rb") as f:
        f.seek(MAX_LINKS * CHUNK_SIZE - 10)
        assert client.cat(result.cid, MAX_LINKS * CHUNK_SIZE - 10, 11) == f.read(11)


def test_cat_ranges(client: IPFSClient) -> None:
    data = blob(3 * CHUNK_SIZE + 1234, 7)
    cid = client.add(data).cid
    for off, n in [(0, 1), (0, len(data)), (CHUNK_SIZE - 5, 10), (2 * CHUNK_SIZE, CHUNK_SIZE),
                   (len(data) - 1, 1), (12345, 700000)]:
        assert client.cat(cid, off, n) == data[off:off + n]
    assert client.cat(cid) == data
    assert client.cat(cid, 100) == data[100:]
    assert client.cat(cid, 5, 0) == b""
    pieces: list[bytes] = []
    assert client.cat_into(cid, 10, 500000, pieces.append) == 500000
    assert b"".join(pieces) == data[10:500010]
    # into a caller's buffer, reused: a range across a block boundary, then the whole blob
    buf = bytearray(len(data))
    assert client.cat_into(cid, CHUNK_SIZE - 7, 100000, buf) == 100000
    assert buf[:100000] == data[CHUNK_SIZE - 7:CHUNK_SIZE + 99993]
    assert client.cat_into(cid, 0, None, buf) == len(data) and buf == data
    with pytest.raises(ShortRead):
        client.cat_into(cid, 1, None, buf)  # one byte beyond the end
    with pytest.raises(ShortRead):
        client.cat(cid, len(data) - 10, 20)
    with pytest.raises(ShortRead):
        client.cat(cid, len(data) + 10, 20)
    with pytest.raises(ShortRead):
        client.cat(cid, 12345, 1 << 20)


def test_stat_block_and_pin(client: IPFSClient) -> None:
    data = blob(2 * CHUNK_SIZE + 3, 11)
    cid = client.add(data, pin=False).cid
    st = client.files_stat(cid)
    assert st.cid == cid and st.size == len(data) and st.type == "file"
    assert client.file_size(cid) == len(data)
    leaf = data[:CHUNK_SIZE]
    leaf_cid = raw_cid(leaf)
    assert client.block_stat(leaf_cid).size == CHUNK_SIZE
    assert client.block_stat(leaf_cid).cid == leaf_cid
    assert client.block_get(leaf_cid) == leaf
    assert cid in client.pin_add(cid)


def test_missing_content_times_out_with_a_clear_error(ipfs_node: ManagedNode) -> None:
    c = IPFSClient(ipfs_node.api_multiaddr, timeout=3, retry=RetryPolicy(max_retries=0))
    missing = raw_cid(b"nobody has added this %f" % time.time())
    with pytest.raises((IPFSTimeout, IPFSNotFound)) as info:
        c.cat(missing, 0, 10)
    assert missing in str(info.value)
    with pytest.raises((IPFSTimeout, IPFSNotFound)):
        c.block_stat(missing)
    c.close()


def test_async_face(ipfs_node: ManagedNode) -> None:
    data = blob(CHUNK_SIZE * 2 + 99, 13)

    async def main() -> None:
        async with AsyncIPFSClient(ipfs_node.api_multiaddr) as c:
            result = await c.add(data)
            assert result.cid == compute_cid(data)
            assert (await c.id())["ID"] == ipfs_node.peer_id
            assert await c.file_size(result.cid) == len(data)
            # concurrent range reads share the pool
            got: dict[int, bytes] = {}

            async def read(off: int) -> None:
                got[off] = await c.cat(result.cid, off, 70000)

            async with trio.open_nursery() as nursery:
                for off in range(0, len(data) - 70000, 70000):
                    nursery.start_soon(read, off)
            for off, chunk in got.items():
                assert chunk == data[off:off + 70000]
            leaf = raw_cid(data[:CHUNK_SIZE])
            assert await c.block_get(leaf) == data[:CHUNK_SIZE]
            assert (await c.block_stat(leaf)).size == CHUNK_SIZE
            assert (await c.files_stat(result.cid)).size == len(data)
            assert result.cid in await c.pin_add(result.cid)
            assert isinstance((await c.version())["Version"], str)
            assert isinstance(await c.swarm_peers(), list)
            assert isinstance(await c.bootstrap_list(), list)
            buf = bytearray(len(data))
            assert await c.cat_into(result.cid, 0, None, buf) == len(data) and buf == data
            with pytest.raises(ShortRead):
                await c.cat(result.cid, len(data) - 5, 10)

    trio.run(main)


def test_discovery_finds_the_managed_repo(ipfs_node: ManagedNode, tmp_path: Path) -> None:
    ep = discover_api(None, repo_candidates=[ipfs_node.repo], environ={"HOME": str(tmp_path)})
    with IPFSClient(ep) as c:
        assert c.id()["ID"] == ipfs_node.peer_id


def test_bitswap_range_reads_between_two_nodes(ipfs_pair: Any) -> None:
    a = IPFSClient(ipfs_pair.a.api_multiaddr)
    b = IPFSClient(ipfs_pair.b.api_multiaddr)
    try:
        ipfs_pair.connect()
        assert ipfs_pair.a.peer_id in {p.peer_id for p in b.swarm_peers()}
        data = blob(6 * CHUNK_SIZE + 77, 17)
        cid = a.add(data).cid
        off = 3 * CHUNK_SIZE - 100
        assert b.cat(cid, off, 1000) == data[off:off + 1000]

        async def main() -> bytes:
            async with AsyncIPFSClient(ipfs_pair.b.api_multiaddr) as c:
                return await c.cat(cid, 5 * CHUNK_SIZE, CHUNK_SIZE + 77)

        assert trio.run(main) == data[5 * CHUNK_SIZE:]
        assert b.cat(cid) == data
    finally:
        a.close()
        b.close()


def test_swarm_connect_and_bootstrap(ipfs_pair: Any) -> None:
    with IPFSClient(ipfs_pair.b.api_multiaddr) as b:
        addr = ipfs_pair.a.swarm_addrs[0]
        b.swarm_connect(addr)
        assert ipfs_pair.a.peer_id in {p.peer_id for p in b.swarm_peers()}
        before = b.bootstrap_list()
        added = b.bootstrap_add(addr)
        assert any(ipfs_pair.a.peer_id in p for p in added)
        assert any(ipfs_pair.a.peer_id in p for p in b.bootstrap_list())
        b.bootstrap_rm_all()
        assert b.bootstrap_list() == []
        for p in before:
            b.bootstrap_add(p)


def test_shutdown(ipfs_node_factory: Any) -> None:
    node = ipfs_node_factory(offline=True)
    with IPFSClient(node.api_multiaddr) as c:
        c.shutdown()
    deadline = time.monotonic() + 60
    while node.running and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not node.running


def test_cli_add_and_cid_agree(ipfs_node: ManagedNode, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(blob(CHUNK_SIZE * 3 + 5, 23))
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    base = [sys.executable, "-m", "ipfsnap.cli.main", "--config", str(cfg), "--state-dir",
            str(tmp_path / "state"), "--ipfs-api", ipfs_node.api_multiaddr, "ipfs"]
    added = json.loads(subprocess.run([*base, "add", str(path)], capture_output=True,
                                      check=True).stdout)
    offline = subprocess.run([*base, "cid", str(path)], capture_output=True, check=True)
    assert added["cid"] == offline.stdout.decode().strip() == normalize_cid(added["cid"])
    out = subprocess.run([*base, "cat", added["cid"], "--offset", "3", "--length", "9"],
                         capture_output=True, check=True).stdout
    assert out == path.read_bytes()[3:12]
