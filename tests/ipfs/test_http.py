"""The sans-IO HTTP core: the fast chunked decoder against every way a stream can be split."""

from __future__ import annotations

import random

import pytest

from ipfsnap.ipfs.http import ChunkedDecoder


def encode(pieces: list[bytes], trailers: list[tuple[str, str]]) -> bytes:
    out = b""
    for p in pieces:
        out += f"{len(p):X};ext=1\r\n".encode() + p + b"\r\n"
    out += b"0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in trailers) + b"\r\n"
    return out


@pytest.mark.parametrize("seed", range(30))
def test_any_split_decodes_the_same(seed: int) -> None:
    rng = random.Random(seed)
    pieces = [rng.randbytes(rng.choice([1, 2, 17, 4096, 70000])) for _ in range(rng.randrange(8))]
    raw = encode(pieces, [("X-Stream-Error", "boom: it broke")]) + b"EXTRA"
    dec = ChunkedDecoder()
    got = b""
    pos = 0
    while not dec.done:
        assert pos < len(raw), "decoder not done after the whole stream"
        step = rng.choice([1, 2, 3, 5, 100, 65536, len(raw)])
        got += b"".join(dec.feed(raw[pos:pos + step]))
        pos += step
    assert got == b"".join(pieces)
    assert dec.trailers == {"x-stream-error": "boom: it broke"}
    rest = dec.extra + raw[pos:]
    assert rest == b"EXTRA"


@pytest.mark.parametrize(
    "raw",
    [b"zz\r\n", b"5\r\nabcdeXX", b"-1\r\n", b"1" * 5000, b"0\r\nno colon\r\n",
     b"11111111111111111\r\n"],
)
def test_malformed_framing(raw: bytes) -> None:
    with pytest.raises(ValueError):
        ChunkedDecoder().feed(raw)
