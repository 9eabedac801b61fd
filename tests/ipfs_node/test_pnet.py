"""Swarm keys: the Kubo format, generation and validation (no daemon needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ipfsnap.cli.main import main
from ipfsnap.ipfs.pnet import (
    SwarmKey,
    SwarmKeyError,
    force_pnet,
    generate_swarm_key,
    parse_swarm_key,
    read_swarm_key,
    repo_swarm_key,
    write_swarm_key,
)

KUBO_FORMAT = re.compile(r"\A/key/swarm/psk/1\.0\.0/\n/base16/\n[0-9a-f]{64}\n\Z")


def test_swarm_key_gen_prints_kubo_format(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ipfs", "swarm-key-gen"]) == 0
    first = capsys.readouterr().out
    assert KUBO_FORMAT.match(first), first
    assert main(["ipfs", "swarm-key-gen"]) == 0
    second = capsys.readouterr().out
    assert KUBO_FORMAT.match(second)
    assert first != second  # fresh random bytes each time
    assert parse_swarm_key(first).key == bytes.fromhex(first.split("\n")[2])


def test_round_trip_and_secret_not_in_repr(tmp_path: Path) -> None:
    key = generate_swarm_key()
    path = write_swarm_key(tmp_path / "repo", key)
    assert path == tmp_path / "repo" / "swarm.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_swarm_key(path) == key
    assert repo_swarm_key(tmp_path / "repo") == key
    assert repo_swarm_key(tmp_path) is None
    assert key.key.hex() not in repr(key)
    assert key.key.hex() not in key.fingerprint()


def test_parse_accepts_kubo_variants() -> None:
    raw = bytes(range(32))
    assert parse_swarm_key(f"/key/swarm/psk/1.0.0/\r\n/base16/\r\n{raw.hex().upper()}").key == raw
    import base64

    b64 = base64.b64encode(raw).decode()
    assert parse_swarm_key(f"/key/swarm/psk/1.0.0/\n/base64/\n{b64}\n").key == raw


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "expected 3 lines"),
        ("/key/swarm/psk/2.0.0/\n/base16/\n" + "00" * 32, "first line"),
        ("/key/swarm/psk/1.0.0/\n/base32/\n" + "00" * 32, "unknown encoding"),
        ("/key/swarm/psk/1.0.0/\n/base16/\n" + "00" * 31, "64 hex digits"),
        ("/key/swarm/psk/1.0.0/\n/base16/\n" + "zz" * 32, "not hexadecimal"),
        ("/key/swarm/psk/1.0.0/\n/base64/\nAAAA\n", "32 bytes"),
    ],
)
def test_malformed_keys_name_the_file(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "swarm.key"
    path.write_text(text)
    with pytest.raises(SwarmKeyError) as err:
        read_swarm_key(path)
    message = str(err.value)
    assert str(path) in message and problem in message
    assert "\n" not in message


def test_malformed_key_message_never_contains_the_key(tmp_path: Path) -> None:
    secret = "ab" * 33  # one byte too long
    path = tmp_path / "swarm.key"
    path.write_text(f"/key/swarm/psk/1.0.0/\n/base16/\n{secret}\n")
    with pytest.raises(SwarmKeyError) as err:
        read_swarm_key(path)
    assert secret not in str(err.value)


def test_key_length_enforced() -> None:
    with pytest.raises(SwarmKeyError):
        SwarmKey(b"short")


def test_force_pnet_env() -> None:
    assert force_pnet({"LIBP2P_FORCE_PNET": "1"})
    assert not force_pnet({"LIBP2P_FORCE_PNET": "0"})
    assert not force_pnet({})
