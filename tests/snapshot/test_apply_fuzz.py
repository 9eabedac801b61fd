"""Property test: whatever a layer contains (names with '..', absolute names, symlinks,
hardlinks, whiteouts in any order), apply_layer either succeeds or raises an ipfsnap error,
and never changes anything outside the snapshot directory."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipfsnap.errors import IpfsnapError
from ipfsnap.snapshot import apply_layer
from tests.snapshot.tarbuild import E, make_tar
from tests.snapshot.test_escape import _state
from tests.support import require_root

# The sandbox must be known when the strategies are built (link targets name it), so it
# is a fixed path, private to this process; the test removes it.
BASE = Path(f"/tmp/ipfsnap-snapshot-fuzz-{os.getpid()}")
CANARY = BASE / "canary"

COMPONENTS = ["a", "b", "l", "..", ".", "", ".wh.a", ".wh..wh..opq", ".wh...", ".wh.l"]
LINKS = [
    "a",
    "b",
    "l",
    "a/b",
    "..",
    "../canary",
    "../../canary",
    str(CANARY),
    f"{CANARY}/secret",
    "/",
    "l/secret",
    ".",
]

names = st.builds(
    lambda lead, parts: lead + "/".join(parts),
    st.sampled_from(["", "", "", "/", "./"]),
    st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=3),
)
entries = st.lists(
    st.builds(
        E,
        name=names,
        kind=st.sampled_from(["f", "d", "l", "h", "p", "c"]),
        data=st.sampled_from([b"", b"data"]),
        link=st.sampled_from(LINKS),
    ),
    min_size=1,
    max_size=8,
)


def _fresh() -> Path:
    dest = BASE / "box" / "fs"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    return dest


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer=entries)
def _nothing_escapes(layer: list[E]) -> None:
    if not CANARY.exists():
        (CANARY / "sub").mkdir(parents=True)
        (CANARY / "secret").write_bytes(b"secret")
    before = _state(CANARY)
    dest = _fresh()
    for e in layer:
        if e.kind != "f":
            e.data = b""
    try:
        apply_layer(dest, io.BytesIO(make_tar(layer)), layer="fuzz")
        OUTCOMES["ok"] += 1
    except IpfsnapError as exc:
        OUTCOMES["rejected"] += 1
        assert os.listdir(dest) == [], "partial output left after an error"
        assert "layer fuzz" in str(exc)
    assert _state(CANARY) == before
    assert sorted(os.listdir(BASE)) == ["box", "canary"]
    assert os.listdir(BASE / "box") == ["fs"]


OUTCOMES = {"ok": 0, "rejected": 0}


def test_nothing_escapes() -> None:
    require_root()
    try:
        _nothing_escapes()
    finally:
        shutil.rmtree(BASE, ignore_errors=True)
    # the generator exercises both paths, not only rejections
    assert OUTCOMES["ok"] > 20 and OUTCOMES["rejected"] > 20, OUTCOMES
