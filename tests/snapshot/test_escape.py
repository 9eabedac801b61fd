"""Hostile layers (issue 8): every escape attempt is rejected, nothing is written outside
the snapshot directory (a canary directory next to it stays byte-for-byte the same), the
partial output is removed and the error names the layer and the entry."""

from __future__ import annotations

import gzip
import io
import os
import stat
from pathlib import Path

import pytest

from ipfsnap.errors import LimitExceeded, UnsafePathError
from ipfsnap.snapshot import ApplyLimits, apply_layer
from ipfsnap.snapshot.errors import LayerFormatError
from tests.snapshot.tarbuild import E, make_tar, raw_header
from tests.support import require_root


def _state(root: Path) -> dict[str, tuple[int, int, int, int, bytes | str | None, list[str]]]:
    """Everything observable about a tree: type/mode, owner, size, content, xattrs."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [".", *dirnames, *filenames]:
            p = Path(dirpath) / n
            st = os.lstat(p)
            content: bytes | str | None = None
            if stat.S_ISREG(st.st_mode):
                content = p.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            out[str(p.relative_to(root))] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                content,
                sorted(os.listxattr(p, follow_symlinks=False)),
            )
    return out


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, Path]:
    """(dest, canary): dest = tmp/box/fs; canary = tmp/canary with a secret and a dir."""
    box = tmp_path / "box"
    dest = box / "fs"
    dest.mkdir(parents=True)
    canary = tmp_path / "canary"
    (canary / "sub").mkdir(parents=True)
    (canary / "secret").write_bytes(b"secret")
    return dest, canary


def _cases(canary: Path) -> dict[str, tuple[list[E], str]]:
    """name -> (entries, the entry name the error must mention)."""
    c = str(canary)
    return {
        "dotdot": ([E("ok", data=b"1"), E("../canary/x", data=b"pwn")], "../canary/x"),
        "dotdot-deep": ([E("../../../../../../tmp/pwn", data=b"pwn")], "../../"),
        "absolute": ([E(f"{c}/abs", data=b"pwn")], f"{c}/abs"),
        "inner-dotdot": ([E("a", "d"), E("a/../../canary/x", data=b"pwn")], "a/../../canary/x"),
        "dotdot-dir": ([E("../canary/newdir", "d")], "../canary/newdir"),
        "symlink-abs-write-through": ([E("l", "l", link=c), E("l/x", data=b"pwn")], "l/x"),
        "symlink-rel-write-through": (
            [E("l", "l", link="../../canary"), E("l/secret", data=b"pwn")],
            "l/secret",
        ),
        "symlink-dir-through": ([E("l", "l", link=c), E("l/sub/x", data=b"pwn")], "l/sub/x"),
        "symlink-mkdir-through": ([E("l", "l", link=c), E("l/newdir", "d")], "l/newdir"),
        "symlink-nested": (
            [E("d", "d"), E("d/l", "l", link="../../../canary"), E("d/l/secret", data=b"x")],
            "d/l/secret",
        ),
        "symlink-whiteout-through": ([E("l", "l", link=c), E("l/.wh.secret")], "l/.wh.secret"),
        "symlink-opaque-through": (
            [E("l", "l", link=c), E("l/sub/.wh..wh..opq")],
            "l/sub/.wh..wh..opq",
        ),
        "symlink-device-through": ([E("l", "l", link=c), E("l/null", "c", dev=(1, 3))], "l/null"),
        "symlink-hardlink-through": (
            [E("f", data=b"f"), E("l", "l", link=c), E("l/h", "h", link="f")],
            "l/h",
        ),
        "hardlink-outside": ([E("h", "h", link="../canary/secret")], "h"),
        "hardlink-absolute": ([E("h", "h", link=f"{c}/secret")], "h"),
        "hardlink-via-symlink-dir": ([E("l", "l", link=c), E("h", "h", link="l/secret")], "h"),
        "hardlink-to-symlink-abs": ([E("s", "l", link=f"{c}/secret"), E("h", "h", link="s")], "h"),
        "hardlink-to-symlink-rel": (
            [E("d", "d"), E("d/s", "l", link="../../../canary/secret"), E("h", "h", link="d/s")],
            "h",
        ),
        "hardlink-missing": ([E("h", "h", link="nowhere")], "h"),
        "hardlink-to-dir": ([E("d", "d"), E("h", "h", link="d")], "h"),
        "whiteout-dotdot": (
            [
                E("a", "d"),
                E("a/.wh..."),
            ],
            "a/.wh...",
        ),
        "whiteout-dotdot-root": ([E(".wh...")], ".wh..."),
        "file-over-parent-file": ([E("f", data=b"f"), E("f/x", data=b"x")], "f/x"),
    }


CASE_NAMES = list(_cases(Path("/x")))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_escape_rejected(sandbox: tuple[Path, Path], case: str) -> None:
    require_root()
    dest, canary = sandbox
    entries, entry = _cases(canary)[case]
    before = _state(canary)
    before_box = os.listdir(dest.parent)
    with pytest.raises((UnsafePathError, LayerFormatError)) as ei:
        apply_layer(dest, io.BytesIO(make_tar(entries)), layer=f"hostile-{case}")
    msg = str(ei.value)
    assert f"hostile-{case}" in msg and entry in msg, msg
    assert "\n" not in msg
    assert _state(canary) == before  # nothing written, changed or whited-out outside
    assert os.listdir(dest.parent) == before_box
    assert os.listdir(dest) == []  # partial output removed
    assert not os.path.lexists("/tmp/pwn")


@pytest.mark.parametrize("case", CASE_NAMES)
def test_escape_rejected_gzip(sandbox: tuple[Path, Path], case: str) -> None:
    """The same through the compressed path: gzip does not change the decision."""
    require_root()
    dest, canary = sandbox
    entries, _ = _cases(canary)[case]
    before = _state(canary)
    with pytest.raises((UnsafePathError, LayerFormatError)):
        apply_layer(dest, io.BytesIO(gzip.compress(make_tar(entries))), layer=case)
    assert _state(canary) == before and os.listdir(dest) == []


def test_symlinks_pointing_outside_are_kept_but_never_followed(
    sandbox: tuple[Path, Path],
) -> None:
    """Symlinks are data: kept as text. Replacing one replaces the link, not its target."""
    require_root()
    dest, canary = sandbox
    before = _state(canary)
    raw = make_tar(
        [
            E("abs", "l", link=f"{canary}/secret"),
            E("rel", "l", link="../../canary/secret"),
            E("abs", data=b"overwrite?", mode=0o600),  # replaces the symlink itself
            E("rel", "d"),
            E("okdir", "d"),
            E("okdir/s", "l", link="../okdir"),
            E("h", "h", link="okdir/s"),  # hardlink to a symlink staying inside: fine
        ]
    )
    apply_layer(dest, io.BytesIO(raw))
    assert _state(canary) == before
    assert (dest / "abs").read_bytes() == b"overwrite?" and not (dest / "abs").is_symlink()
    assert (dest / "rel").is_dir() and not (dest / "rel").is_symlink()
    assert os.readlink(dest / "h") == "../okdir"


def test_huge_size_claim_rejected(sandbox: tuple[Path, Path]) -> None:
    dest, _ = sandbox
    # A header claiming a 1 TiB file, followed by a little data.
    blob = raw_header(E("huge"), 1 << 40) + b"\0" * 4096
    with pytest.raises(LimitExceeded, match=r"'huge'.*1099511627776"):
        apply_layer(dest, io.BytesIO(blob), layer="claim")
    assert os.listdir(dest) == []
    # a claim within the limit but beyond the data: a clean format error
    blob = raw_header(E("liar"), 1 << 20) + b"x" * 4096
    with pytest.raises(LayerFormatError, match="liar"):
        apply_layer(dest, io.BytesIO(blob), layer="short")
    assert os.listdir(dest) == []


def test_gzip_bomb_stops_at_the_limit(sandbox: tuple[Path, Path]) -> None:
    dest, _ = sandbox
    # 64 MiB of zeros compress to ~64 KiB: a 1000:1 bomb; the limit is 1 MiB.
    bomb = gzip.compress(make_tar([E("zeros", data=bytes(64 << 20))]), compresslevel=9)
    assert len(bomb) < 1 << 20
    with pytest.raises(LimitExceeded, match="layer bomb"):
        apply_layer(dest, io.BytesIO(bomb), layer="bomb", limits=ApplyLimits(max_size=1 << 20))
    assert os.listdir(dest) == []


def test_entry_count_and_name_limits(sandbox: tuple[Path, Path]) -> None:
    dest, _ = sandbox
    raw = make_tar([E(f"f{i}") for i in range(20)])
    with pytest.raises(LimitExceeded, match="10 entries"):
        apply_layer(dest, io.BytesIO(raw), limits=ApplyLimits(max_entries=10))
    assert os.listdir(dest) == []
    raw = make_tar([E("d/" * 30 + "f")])
    with pytest.raises(UnsafePathError, match="name too long"):
        apply_layer(dest, io.BytesIO(raw), limits=ApplyLimits(max_name_length=50))
    assert os.listdir(dest) == []
