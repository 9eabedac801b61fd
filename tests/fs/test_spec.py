"""Worker specs from snapshot labels, spec parsing, status files (no mounts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ipfsnap.config import Config
from ipfsnap.fs import (
    LAYER_DIGEST_LABEL,
    LOCAL_PATH_LABEL,
    PREFETCH_SIZE_LABEL,
    SIZE_LABEL,
    TOC_DIGEST_LABEL,
    URLS_LABEL,
    LayerMounter,
    WorkerSpec,
    read_status,
)
from ipfsnap.fs.errors import WorkerSpecError
from ipfsnap.fs.spec import write_json_atomic

LAYER = "sha256:" + "ab" * 32
TOC = "sha256:" + "cd" * 32
CID = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"


def mounter(tmp_path: Path, **cfg: object) -> LayerMounter:
    c = Config(state_dir=tmp_path / "state", ipfs_api="/ip4/127.0.0.1/tcp/5001")
    for k, v in cfg.items():
        setattr(c, k, v)
    return LayerMounter(c)


def test_spec_from_reference_labels(tmp_path: Path) -> None:
    m = mounter(tmp_path, prefetch_size=1000, max_concurrency=3)
    labels = {
        LAYER_DIGEST_LABEL: LAYER, TOC_DIGEST_LABEL: TOC,
        URLS_LABEL: f"https://registry.example/blob,ipfs://{CID}",
        SIZE_LABEL: "12345",
    }
    spec = m.spec_for(tmp_path / "mp", labels)
    assert spec.source.kind == "ipfs" and spec.source.cid == CID
    assert spec.source.api == "/ip4/127.0.0.1/tcp/5001"
    assert spec.toc_digest == TOC and spec.layer == LAYER and spec.blob_size == 12345
    assert spec.prefetch_size == 1000 and spec.max_concurrency == 3
    assert spec.cache_dir == str(tmp_path / "state" / "fs" / "cache" / ("ab" * 32))
    labels[PREFETCH_SIZE_LABEL] = "77"
    assert m.spec_for(tmp_path / "mp", labels).prefetch_size == 77
    labels[LOCAL_PATH_LABEL] = "/some/blob"
    local = m.spec_for(tmp_path / "mp", labels).source
    assert (local.kind, local.path) == ("file", "/some/blob")


@pytest.mark.parametrize(
    ("drop", "change", "message"),
    [
        (TOC_DIGEST_LABEL, None, "unverifiable"),
        (LAYER_DIGEST_LABEL, None, "stargz.digest"),
        (URLS_LABEL, None, "no ipfs:// url"),
        (None, (URLS_LABEL, "https://x/y"), "no ipfs:// url"),
        (None, (TOC_DIGEST_LABEL, "md5:abc"), "unverifiable"),
        (None, (SIZE_LABEL, "big"), "not a number"),
    ],
)
def test_bad_labels(tmp_path: Path, drop: str | None, change: tuple[str, str] | None,
                    message: str) -> None:
    labels = {LAYER_DIGEST_LABEL: LAYER, TOC_DIGEST_LABEL: TOC, URLS_LABEL: f"ipfs://{CID}"}
    if drop:
        del labels[drop]
    if change:
        labels[change[0]] = change[1]
    with pytest.raises(WorkerSpecError, match=message):
        mounter(tmp_path).spec_for(tmp_path / "mp", labels)


def test_spec_json_roundtrip_and_rejects(tmp_path: Path) -> None:
    labels = {LAYER_DIGEST_LABEL: LAYER, TOC_DIGEST_LABEL: TOC, URLS_LABEL: f"ipfs://{CID}"}
    spec = mounter(tmp_path).spec_for(tmp_path / "mp", labels)
    assert WorkerSpec.from_json(spec.to_json()) == spec
    data = json.loads(spec.to_json())
    data["surprise"] = 1
    with pytest.raises(WorkerSpecError, match="unknown keys"):
        WorkerSpec.from_json(json.dumps(data))
    data = json.loads(spec.to_json())
    data["source"]["kind"] = "http"
    with pytest.raises(WorkerSpecError, match="source kind"):
        WorkerSpec.from_json(json.dumps(data))
    with pytest.raises(WorkerSpecError):
        WorkerSpec.from_json("[1, 2]")


def test_status_file_is_replaced_atomically(tmp_path: Path) -> None:
    p = tmp_path / "status.json"
    write_json_atomic(p, {"state": "ready", "percent": 1.5})
    write_json_atomic(p, {"state": "complete", "percent": 100.0})
    assert read_status(p) == {"state": "complete", "percent": 100.0}
    assert [x.name for x in tmp_path.iterdir()] == ["status.json"]
    p.write_text("{not json")
    assert read_status(p) is None
    assert read_status(tmp_path / "missing.json") is None
