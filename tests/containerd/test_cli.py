"""``ipfsnap --containerd`` error paths that need no containerd: one line naming the
problem, the exit code of its error family; containerd's names of snapshots in the proxy."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipfsnap.cli.containerd import backend_key
from ipfsnap.cli.main import main

CID = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"


def test_missing_containerd_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = tmp_path / "nope.sock"
    code = main(["--state-dir", str(tmp_path / "s"), "--containerd", str(sock),
                 "image", "rpull", "--ipfs", CID])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.count("\n") == 0 and str(sock) in err and "does not exist" in err


def test_bad_cid_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--state-dir", str(tmp_path / "s"), "--containerd", str(tmp_path / "c.sock"),
                 "image", "rpull", "--ipfs", "not-a-cid"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not-a-cid" in err and err.count("\n") == 0


def test_grpc_address_needs_foreground(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--state-dir", str(tmp_path / "s"), "snapshotter", "--grpc-address",
                 str(tmp_path / "g.sock")])
    assert code == 2 and "--foreground" in capsys.readouterr().err
    assert not (tmp_path / "g.sock").exists()


def test_containerds_names_of_a_chain_in_the_proxy_snapshotter() -> None:
    chain = "sha256:" + "ab" * 32
    assert backend_key(f"default/12/{chain}", "default", chain)
    assert not backend_key(f"other/12/{chain}", "default", chain)
    assert not backend_key(f"default/x/{chain}", "default", chain)
    assert not backend_key(f"default/12/{chain}x", "default", chain)
    assert not backend_key(chain, "default", chain)
    assert not backend_key(f"default/{chain}", "default", chain)
