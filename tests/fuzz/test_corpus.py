"""Replay every committed fuzz input (seeds, the kept corpus, reproducers of fixed crashes)
through its target: each must pass or be rejected with a clean one-line ipfsnap error."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fuzz.targets import CRASHES_DIR, TARGETS, check, corpus_files, remove_sandbox
from tests.support import require_root


@pytest.fixture(autouse=True)
def _sandbox() -> Iterator[None]:
    yield
    remove_sandbox()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_corpus_replays_clean(name: str) -> None:
    target = TARGETS[name]
    if target.needs_root:
        require_root()
    files = corpus_files(name)
    assert len(files) >= 2, f"{name}: no seeds (run python -m tests.fuzz.make_seeds)"
    findings = [(f.name, check(target, f.read_bytes())) for f in files]
    bad = [(n, f) for n, f in findings if f is not None]
    assert not bad, f"{name}: {len(bad)} of {len(files)} inputs mishandled: {bad[:5]}"


def test_reproducers_belong_to_a_target() -> None:
    """A reproducer under a misspelt directory would silently never run."""
    if CRASHES_DIR.is_dir():
        assert {d.name for d in CRASHES_DIR.iterdir()} <= set(TARGETS)


def test_seeds_reach_success() -> None:
    """Targets are not vacuous: a valid seed of each parses (no ipfsnap error), so the
    fuzzer mutates inputs that get past the first check."""
    import os

    failing = []
    for name, target in TARGETS.items():
        if target.needs_root and os.geteuid() != 0:
            continue
        seeds = [f for f in corpus_files(name) if f.name.startswith("seed-")]
        accepted = 0
        for f in seeds:
            try:
                target.run(f.read_bytes())
                accepted += 1
            except Exception:  # rejections are checked above; here only count successes
                continue
        if not accepted:
            failing.append(name)
    remove_sandbox()
    assert not failing, f"no seed is accepted by: {failing}"
