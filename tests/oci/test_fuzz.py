"""Property tests: parsers raise only ipfsnap errors on arbitrary input; references
normalise idempotently."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ipfsnap.errors import IpfsnapError
from ipfsnap.oci import (
    parse_config,
    parse_document,
    parse_index,
    parse_manifest,
    parse_platform,
    parse_reference,
)

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=20)
    | st.sampled_from(["sha256:" + "a" * 64, "application/vnd.oci.image.manifest.v1+json"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "schemaVersion",
                    "mediaType",
                    "config",
                    "layers",
                    "manifests",
                    "digest",
                    "size",
                    "urls",
                    "annotations",
                    "platform",
                    "os",
                    "architecture",
                    "rootfs",
                    "diff_ids",
                    "type",
                    "Cmd",
                    "Env",
                    "x",
                ]
            ),
            children,
            max_size=6,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_document_parsers_only_raise_ipfsnap_errors(value: Any) -> None:
    data = json.dumps(value).encode()
    for parse in (parse_manifest, parse_index, parse_config):
        try:
            parse(data)
        except IpfsnapError as exc:
            assert "\n" not in str(exc)
    with contextlib.suppress(IpfsnapError):
        parse_document(data, "doc")


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_parsers_on_bytes(data: bytes) -> None:
    for parse in (parse_manifest, parse_index, parse_config):
        with contextlib.suppress(IpfsnapError):
            parse(data)


component = st.from_regex(r"[a-z0-9]+([._-][a-z0-9]+)?", fullmatch=True)
tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
domain = st.sampled_from(["", "localhost:5000/", "ghcr.io/", "127.0.0.1:1234/", "docker.io/"])


@settings(max_examples=150, deadline=None)
@given(domain, st.lists(component, min_size=1, max_size=3), st.none() | tag)
def test_reference_normalisation_is_idempotent(dom: str, parts: list[str], t: str | None) -> None:
    text = dom + "/".join(parts) + (f":{t}" if t else "")
    ref = parse_reference(text)
    assert parse_reference(ref.name) == ref
    assert ref.tag == (t or "latest")
    assert ref.name.endswith("/".join(parts) + ":" + ref.tag)


@given(st.text(max_size=30))
def test_reference_and_platform_garbage(text: str) -> None:
    for parse in (parse_reference, parse_platform):
        try:
            parse(text)
        except IpfsnapError as exc:
            assert "\n" not in str(exc) or "\n" in text
