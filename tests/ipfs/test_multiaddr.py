"""API addresses: multiaddrs, URLs, api files and the discovery order."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipfsnap.config import load_config
from ipfsnap.ipfs.client import endpoint_from_config
from ipfsnap.ipfs.errors import APINotFound, BadMultiaddr
from ipfsnap.ipfs.multiaddr import Endpoint, discover_api, parse_api


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("/ip4/127.0.0.1/tcp/5001", "http://127.0.0.1:5001"),
        ("/ip4/127.0.0.1/tcp/5001/http", "http://127.0.0.1:5001"),
        ("/ip4/10.0.0.2/tcp/443/https", "https://10.0.0.2:443"),
        ("/ip6/::1/tcp/5002", "http://[::1]:5002"),
        ("/dns4/localhost/tcp/5003/http", "http://localhost:5003"),
        ("/dns6/ipfs.example/tcp/80", "http://ipfs.example:80"),
        ("/dns/ipfs.example/tcp/5001", "http://ipfs.example:5001"),
        ("http://127.0.0.1:5001", "http://127.0.0.1:5001"),
        ("http://127.0.0.1:5001/", "http://127.0.0.1:5001"),
        ("https://node.example", "https://node.example:443"),
        ("http://[::1]:9", "http://[::1]:9"),
        ("  /ip4/127.0.0.1/tcp/5001\n", "http://127.0.0.1:5001"),
    ],
)
def test_parse_good(text: str, url: str) -> None:
    assert parse_api(text).url == url


@pytest.mark.parametrize(
    "text",
    [
        "",
        "127.0.0.1:5001",
        "/ip4/127.0.0.1",
        "/ip4/300.0.0.1/tcp/5001",
        "/ip6/zz::1/tcp/5001",
        "/ip4/127.0.0.1/udp/5001",
        "/ip4/127.0.0.1/tcp/0",
        "/ip4/127.0.0.1/tcp/70000",
        "/ip4/127.0.0.1/tcp/port",
        "/ip4/127.0.0.1/tcp/5001/ws",
        "/unix/run/ipfs.sock",
        "/onion3/abc/tcp/1",
        "ftp://127.0.0.1:21",
        "http://127.0.0.1:5001/api/v0",
        "http://user:pw@127.0.0.1:5001",
        "http://127.0.0.1:99999",
    ],
)
def test_parse_bad(text: str) -> None:
    with pytest.raises(BadMultiaddr) as info:
        parse_api(text)
    assert "\n" not in str(info.value)


def test_auth_is_never_shown() -> None:
    ep = parse_api("/ip4/127.0.0.1/tcp/5001", auth="Bearer s3cret")
    assert ep.auth == "Bearer s3cret"
    assert "s3cret" not in repr(ep) and "s3cret" not in str(ep)


def _repo(tmp: Path, name: str, content: str) -> Path:
    repo = tmp / name
    repo.mkdir()
    (repo / "api").write_text(content)
    return repo


def test_discovery_order(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env_repo = _repo(tmp_path, "envrepo", "/ip4/127.0.0.1/tcp/1001")
    managed = _repo(tmp_path, "managed", "/ip4/127.0.0.1/tcp/1002/http")  # js-ipfs style
    (home / ".ipfs").mkdir()
    (home / ".ipfs" / "api").write_text("/ip4/127.0.0.1/tcp/1003\n")
    env = {"IPFS_PATH": str(env_repo), "HOME": str(home)}

    ep = discover_api("/ip4/127.0.0.1/tcp/1000", environ=env, repo_candidates=[managed])
    assert ep.port == 1000
    ep = discover_api(None, environ=env, repo_candidates=[managed])
    assert ep.port == 1001 and ep.source == str(env_repo / "api")
    ep = discover_api(None, environ={"HOME": str(home)}, repo_candidates=[managed])
    assert ep.port == 1002
    ep = discover_api(None, "Basic eDp5", environ={"HOME": str(home)})
    assert ep.port == 1003 and ep.auth == "Basic eDp5"
    # an IPFS_PATH without an api file is skipped
    empty = tmp_path / "empty"
    empty.mkdir()
    ep = discover_api(None, environ={"IPFS_PATH": str(empty), "HOME": str(home)})
    assert ep.port == 1003


def test_nothing_found_names_the_places(tmp_path: Path) -> None:
    with pytest.raises(APINotFound) as info:
        discover_api(None, environ={"HOME": str(tmp_path)}, repo_candidates=[tmp_path / "m"])
    msg = str(info.value)
    assert str(tmp_path / "m" / "api") in msg and str(tmp_path / ".ipfs" / "api") in msg


def test_bad_api_file(tmp_path: Path) -> None:
    repo = _repo(tmp_path, "r", "garbage")
    with pytest.raises(BadMultiaddr):
        discover_api(None, environ={"IPFS_PATH": str(repo), "HOME": str(tmp_path)})
    (repo / "api").write_bytes(b"/ip4/" + b"\xff" * 10)
    with pytest.raises(BadMultiaddr):
        discover_api(None, environ={"IPFS_PATH": str(repo), "HOME": str(tmp_path)})


def test_endpoint_from_config(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    _repo(state, "ipfs", "/ip4/127.0.0.1/tcp/1234/http")  # the managed node's repo
    env = {"IPFSNAP_STATE_DIR": str(state), "IPFSNAP_IPFS_AUTH": "Bearer t", "HOME": "/none"}
    toml = tmp_path / "config.toml"
    toml.write_text("")
    cfg = load_config(config_path=toml, environ=env)
    ep = endpoint_from_config(cfg, repo_candidates=[cfg.ipfs_repo, tmp_path / "nothing"])
    assert ep == Endpoint("127.0.0.1", 1234) and ep.auth == "Bearer t"
    cfg = load_config(config_path=toml, environ={**env, "IPFSNAP_IPFS_API": "http://h:1"})
    assert endpoint_from_config(cfg).url == "http://h:1"


@settings(max_examples=500, deadline=None)
@given(st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from(["", "ip4", "ip6", "dns4", "tcp", "http", "https", "127.0.0.1",
                              "::1", "5001", "0", "x", "unix"]), max_size=7).map("/".join),
))
def test_parser_only_ever_raises_badmultiaddr(text: str) -> None:
    try:
        ep = parse_api(text)
    except BadMultiaddr:
        return
    assert 0 < ep.port < 65536 and ep.scheme in ("http", "https") and ep.host
