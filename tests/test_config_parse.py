"""config.toml that does not parse ends as one ConfigError line naming the file, whatever
way it fails (the parser itself: ipfsnap.docparse, tests/test_docparse.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ipfsnap.config import load_config
from ipfsnap.errors import ConfigError


@pytest.mark.parametrize("content, reason", [
    (b"a = " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested too deeply"),
    (b"[blob]\nchunk_size = " + b"9" * (sys.get_int_max_str_digits() + 1) + b"\n",
     "integer string conversion"),
    (b"[blob\n", "Expected ']'"),
])
def test_unparsable_config_is_invalid_toml(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path, state_dir=tmp_path)
    message = str(info.value)
    assert message.startswith(f"config {path}: invalid TOML: ") and reason in message
    assert "\n" not in message


def test_config_not_utf8_cannot_be_read(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'[blob]\n# \xff\n')
    with pytest.raises(ConfigError, match=r"config .*: cannot read: 'utf-8' codec"):
        load_config(path, state_dir=tmp_path)


def test_valid_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[blob]\nchunk_size = 12345\n")
    assert load_config(path, state_dir=tmp_path).blob.chunk_size == 12345


def test_run_table(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    # no file at the default path (the environment names none): the default
    assert load_config(state_dir=tmp_path, environ={}).run.warm_bytes == 32 << 20
    path.write_text("[run]\nwarm_bytes = 0\n")
    assert load_config(path, state_dir=tmp_path).run.warm_bytes == 0
    for bad, problem in (("warm_bytes = -1", "must not be negative"),
                         ("warm_bytes = 'x'", "must be int"), ("warm = 1", "unknown key")):
        path.write_text(f"[run]\n{bad}\n")
        with pytest.raises(ConfigError, match=problem):
            load_config(path, state_dir=tmp_path)
