"""The issue's example end to end: a Debian + python3 image converted and added to IPFS with
``ipfsnap image ipfs-push``, pulled into containerd with ``ipfsnap --containerd ... image
rpull --ipfs CID`` and run with ``ctr run --snapshotter ipfsnap CID id python3 -c ...``,
fetching only part of its layers (no prefetch, no background fetch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ipfsnap.content.sample import SampleImage
from ipfsnap.ipfs.node import ManagedNode
from tests.containerd.conftest import ContainerdFactory
from tests.support import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: read on demand only: what the run touches is all that is fetched
LAZY_ONLY = "noprefetch = true\nno_background_fetch = true\n"


def ipfs_push(state: Path, api: str, image: SampleImage) -> str:
    base = [sys.executable, "-m", "ipfsnap.cli.main", "--state-dir", str(state),
            "--ipfs-api", api]
    subprocess.run([*base, "image", "import", str(image.oci_archive)], check=True,
                   capture_output=True, cwd=ROOT, timeout=300)
    # gzip level 1: conversion speed matters here, not the compression ratio
    res = subprocess.run([*base, "image", "ipfs-push", "--level", "1", image.name],
                         check=True, capture_output=True, text=True, cwd=ROOT, timeout=600)
    return res.stdout.split()[-1]


def test_python_hello_lazily_through_containerd(
    containerd_env: ContainerdFactory, ipfs_node: ManagedNode, python_image: SampleImage,
    tmp_path: Path,
) -> None:
    cid = ipfs_push(tmp_path / "pusher", ipfs_node.api_url, python_image)
    env = containerd_env(ipfs_api=ipfs_node.api_url, config=LAZY_ONLY)
    pulled = env.ipfsnap("image", "rpull", "--ipfs", cid).stdout
    # only documents are fetched whole: every layer is eStargz, mounted lazily
    kinds = [line.rsplit(".", 2)[-2] for line in pulled.splitlines()]
    assert "config" in kinds and "manifest" in kinds
    assert set(kinds) <= {"index", "manifest", "config"}, pulled

    out = env.ctr("run", "--rm", "--snapshotter", "ipfsnap", cid, "hello",
                  "python3", "-c", 'print("Hello, World!")', timeout=300).stdout
    assert out == "Hello, World!\n"

    states = [json.loads(line) for line in
              env.ipfsnap("snapshot", "status", "--json").stdout.splitlines()]
    assert len(states) == len(python_image.layer_digests)
    size = sum(s["size"] for s in states)
    read = sum(s["read_bytes"] for s in states)
    print(f"python hello through containerd: read {read} of {size} layer bytes from IPFS")
    assert 0 < read < size // 2, (read, size)
