"""CIDs: parse, validate and normalise to CIDv1 base32 (what ipfs:// urls carry).

A CIDv0 is a base58btc sha2-256 multihash (``Qm...``, always dag-pb). A CIDv1 is a multibase
string of ``varint(1) varint(codec) multihash``. We accept base32 (``b``), base58btc (``z``) and
base36 (``k``) CIDv1 and write base32, lower case, no padding (``bafy...``/``bafk...``).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from ipfsnap.ipfs.errors import BadCID

#: multicodec codes of the content types we accept
RAW = 0x55
DAG_PB = 0x70
DAG_CBOR = 0x71
DAG_JSON = 0x0129
LIBP2P_KEY = 0x72
CODECS = {RAW: "raw", DAG_PB: "dag-pb", DAG_CBOR: "dag-cbor", DAG_JSON: "dag-json",
          LIBP2P_KEY: "libp2p-key"}

#: multihash function code -> digest length
SHA2_256 = 0x12
HASHES = {0x00: None, SHA2_256: 32, 0x13: 64, 0xB220: 32}  # identity, sha2-256/512, blake2b-256
#: identity multihashes inline their data; Kubo caps inlined data far lower than this
MAX_IDENTITY = 128
#: a CID string longer than this is not something a sane daemon produced
MAX_CID_TEXT = 512

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position); at most 9 bytes (multiformats' unsigned-varint limit)."""
    value = 0
    for i in range(9):
        if pos + i >= len(data):
            raise ValueError("truncated varint")
        b = data[pos + i]
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            if b == 0 and i > 0:
                raise ValueError("non-minimal varint")
            return value, pos + i + 1
    raise ValueError("varint too long")


def b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        try:
            n = n * 58 + _B58_INDEX[c]
        except KeyError:
            raise ValueError(f"bad base58 character {c!r}") from None
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    zeros = len(text) - len(text.lstrip("1"))
    return b"\0" * zeros + body


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * zeros + "".join(reversed(out))


def b32encode(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def b32decode(text: str) -> bytes:
    if text != text.lower() and text != text.upper():
        raise ValueError("mixed-case base32")
    pad = "=" * (-len(text) % 8)
    return base64.b32decode(text.upper() + pad)


def b36decode(text: str) -> bytes:
    text = text.lower()
    n = 0
    for c in text:
        i = _B36.find(c)
        if i < 0:
            raise ValueError(f"bad base36 character {c!r}")
        n = n * 36 + i
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    zeros = len(text) - len(text.lstrip("0"))
    return b"\0" * zeros + body


@dataclass(frozen=True)
class CID:
    """A parsed CID. ``str(cid)`` is the CIDv1 base32 form (a CIDv0 is upgraded)."""

    version: int
    codec: int
    multihash: bytes

    @property
    def hash_code(self) -> int:
        return decode_varint(self.multihash, 0)[0]

    @property
    def digest(self) -> bytes:
        _, pos = decode_varint(self.multihash, 0)
        _, pos = decode_varint(self.multihash, pos)
        return self.multihash[pos:]

    def to_bytes(self) -> bytes:
        """Binary CIDv1 (a CIDv0 is written as v1 dag-pb, the same content)."""
        return encode_varint(1) + encode_varint(self.codec) + self.multihash

    def v1_base32(self) -> str:
        return "b" + b32encode(self.to_bytes())

    def v0(self) -> str:
        if self.codec != DAG_PB or self.hash_code != SHA2_256:
            raise BadCID(f"CID {self}: only dag-pb sha2-256 CIDs have a CIDv0 form")
        return b58encode(self.multihash)

    def __str__(self) -> str:
        return self.v1_base32()


def _check_multihash(mh: bytes, text: str) -> None:
    try:
        code, pos = decode_varint(mh, 0)
        length, pos = decode_varint(mh, pos)
    except ValueError as exc:
        raise BadCID(f"CID {text!r}: bad multihash ({exc})") from None
    if code not in HASHES:
        raise BadCID(f"CID {text!r}: unsupported hash function 0x{code:x}")
    want = HASHES[code]
    if want is None:
        if length > MAX_IDENTITY:
            raise BadCID(f"CID {text!r}: identity hash too long ({length} bytes)")
    elif length != want:
        raise BadCID(f"CID {text!r}: hash 0x{code:x} must be {want} bytes, not {length}")
    if len(mh) - pos != length:
        raise BadCID(f"CID {text!r}: multihash says {length} bytes, has {len(mh) - pos}")


def cid_from_bytes(raw: bytes, text: str = "") -> CID:
    """Binary CIDv1 (or a bare CIDv0 multihash) -> :class:`CID`."""
    label = text or raw.hex()
    if len(raw) == 34 and raw[:2] == b"\x12\x20":
        return CID(0, DAG_PB, raw)
    try:
        version, pos = decode_varint(raw, 0)
        codec, pos = decode_varint(raw, pos)
    except ValueError as exc:
        raise BadCID(f"CID {label!r}: {exc}") from None
    if version != 1:
        raise BadCID(f"CID {label!r}: unsupported CID version {version}")
    if codec not in CODECS:
        raise BadCID(f"CID {label!r}: unsupported codec 0x{codec:x}")
    mh = raw[pos:]
    _check_multihash(mh, label)
    return CID(1, codec, mh)


def parse_cid(text: str) -> CID:
    """Parse a CID: v0 ``Qm...``; v1 base32 ``b...``, base58btc ``z...`` or base36 ``k...``."""
    if not isinstance(text, str):
        raise BadCID(f"CID {text!r}: not a string")
    s = text.strip()
    if not s:
        raise BadCID("CID '': empty")
    if len(s) > MAX_CID_TEXT:
        raise BadCID(f"CID {s[:20]!r}...: too long ({len(s)} characters)")
    if len(s) == 46 and s.startswith("Qm"):
        try:
            mh = b58decode(s)
        except ValueError as exc:
            raise BadCID(f"CID {s!r}: {exc}") from None
        if len(mh) != 34 or mh[:2] != b"\x12\x20":
            raise BadCID(f"CID {s!r}: not a sha2-256 CIDv0")
        return CID(0, DAG_PB, mh)
    prefix, body = s[0], s[1:]
    try:
        if prefix in "bB":
            raw = b32decode(body)
        elif prefix == "z":
            raw = b58decode(body)
        elif prefix in "kK":
            raw = b36decode(body)
        else:
            raise BadCID(f"CID {s!r}: unsupported multibase prefix {prefix!r}")
    except ValueError as exc:
        raise BadCID(f"CID {s!r}: bad encoding ({exc})") from None
    if raw[:1] == b"\x12":
        raise BadCID(f"CID {s!r}: a CIDv0 multihash must be written in plain base58btc")
    return cid_from_bytes(raw, s)


def normalize_cid(text: str) -> str:
    """The CIDv1 base32 form of any CID string; raises :class:`BadCID`."""
    return parse_cid(text).v1_base32()


def raw_cid(data: bytes) -> str:
    """CIDv1 raw sha2-256 of ``data`` (what Kubo gives a blob of at most one chunk)."""
    mh = bytes([SHA2_256, 32]) + hashlib.sha256(data).digest()
    return CID(1, RAW, mh).v1_base32()
