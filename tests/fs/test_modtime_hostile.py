"""A TOC modtime with a fraction of any length is read in one pass (issue 8: the fraction
was cut a character at a time, each cut copying the rest, quadratic in its length)."""

from __future__ import annotations

from ipfsnap.fs.inodes import parse_modtime

BASE_NS = 1_600_000_000 * 10**9  # 2020-09-13T12:26:40Z


def test_long_fraction_keeps_nanoseconds_and_ignores_the_rest() -> None:
    # 2 million digits: ~7 minutes of copying before (80,000 took 0.66 s)
    text = "2020-09-13T12:26:40." + "123456789" + "7" * 2_000_000 + "Z"
    assert parse_modtime(text) == BASE_NS + 123_456_789


def test_fraction_forms() -> None:
    assert parse_modtime("2020-09-13T12:26:40.5Z") == BASE_NS + 500_000_000
    assert parse_modtime("2020-09-13T12:26:40.000000001+00:00") == BASE_NS + 1
    assert parse_modtime("2020-09-13T12:26:40.\u00b2Z") == 0  # a superscript is no digit
