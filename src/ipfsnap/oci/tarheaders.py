"""Reading tar headers from hostile archives with Python's ``tarfile``, bounded.

tarfile trusts its input: it reads a PAX or GNU long-name header of any claimed size into
memory, follows chains of them recursively and, before Python 3.11.10 (CVE-2024-6232),
parses PAX records with regexes that backtrack. :class:`BoundedTarInfo` (pass it as
``tarfile.open(..., tarinfo=BoundedTarInfo)``) keeps tarfile's results for every archive
real writers produce and refuses, with ``tarfile.ReadError``, what would cost more than
the bounds below; :class:`EndGuard` stops tarfile's stream mode from reading past the end of
a stream forever. Used by the layer unpacker (``snapshot.apply``) and the image archive
importer (``content.archive``): both read tars an attacker may have written.
"""

from __future__ import annotations

import io
import tarfile
from typing import IO, Any, Protocol, cast

#: bytes of one special header (PAX extended header, GNU long name or link): 1 MiB, Go's
#: archive/tar limit (so containerd's). tarfile reads such a header into memory whole: a
#: 64 KiB gzip layer whose PAX header claimed 64 MiB took 23 s and 215 MB, one claiming
#: 1 GiB over 5 minutes (issue 8).
MAX_SPECIAL_HEADER = 1 << 20
SPECIAL_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                 tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_GNU_LONG = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
#: special headers in a row before one entry. Writers put at most three there (a global
#: PAX header, a PAX header, a GNU long name or link); tarfile reads such a chain one
#: recursive call per header, so a 2 KiB gzip layer of 500 of them ended in RecursionError
#: (found reading the code, issue 8).
MAX_SPECIAL_CHAIN = 32
#: decimal digits of a PAX record's length: a record lies inside a header of at most
#: MAX_SPECIAL_HEADER (1 MiB, 7 digits) bytes; leading zeros beyond this are refused too
_PAX_LENGTH_DIGITS = len(str(MAX_SPECIAL_HEADER))


#: reads past the end of a stream allowed before it is an error (:class:`EndGuard`). A
#: well-formed stream is read past its end a few times at most (tarfile's end-of-archive
#: check, a caller's final drain).
MAX_EMPTY_READS = 16


class _Reader(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class EndGuard(io.RawIOBase):
    """``inner`` for ``tarfile.open(fileobj=..., mode="r|")``, refusing to be read on and on
    past its end.

    tarfile's stream mode skips an entry's data block by block (an entry of a type it does
    not know, or one nobody reads) and does not stop at the end of the stream: an entry
    claiming 1 TiB in a 1.5 KiB layer spun through ~10^8 empty reads (the CI fuzz
    campaign's hang, 2026-11-28). After :data:`MAX_EMPTY_READS` reads that found the end,
    the next one raises ``EOFError``.
    """

    def __init__(self, inner: _Reader) -> None:
        self.inner = inner
        #: bytes read so far
        self.count = 0
        self._empty = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        if not data and n:
            self._empty += 1
            if self._empty > MAX_EMPTY_READS:
                raise EOFError(f"the tar stream ended {self.count} bytes in, inside an entry")
        self.count += len(data)
        return data

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized special headers before tarfile reads them."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type not in SPECIAL_TYPES:
            return super()._proc_member(tarfile_)  # type: ignore[misc, no-any-return]
        if self.size > MAX_SPECIAL_HEADER:
            kind = "GNU long name" if self.type in _GNU_LONG else "PAX"
            raise tarfile.ReadError(
                f"{kind} header of {self.size} bytes, over the {MAX_SPECIAL_HEADER}-byte limit"
            )
        # the chain's length so far: the headers before this one are still on the stack
        tf: Any = tarfile_  # the count is ours, not a TarFile field
        depth: int = getattr(tf, "_ipfsnap_chain", 0)
        if depth >= MAX_SPECIAL_CHAIN:
            raise tarfile.ReadError(
                f"more than {MAX_SPECIAL_CHAIN} PAX or GNU long-name headers in a row"
            )
        tf._ipfsnap_chain = depth + 1
        try:
            return super()._proc_member(tarfile_)  # type: ignore[misc, no-any-return]
        finally:
            tf._ipfsnap_chain = depth

    def _proc_pax(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        """A PAX header, its records parsed in one linear pass.

        tarfile's own parser (Python before 3.11.10, CVE-2024-6232) matches regexes that
        backtrack over the rest of the header from every record, and searches the whole
        header for ``hdrcharset`` from every digit: a 1 KiB gzip layer holding a 64 KiB
        header of ``2 2 2 ...=`` took 3.2 s, one of 1 MiB ~14 minutes; a run of 64 Ki
        digits anywhere in a header took 11 s (found reading the code, issue 8). The rest
        is what tarfile does with the records: the same fields, sparse maps and offsets
        (a global header aside, below).
        """
        # tarfile's private helpers (stable since Python 3.2), hence the Any views
        tf: Any = tarfile_
        me: Any = self
        buf: bytes = tf.fileobj.read(me._block(self.size))
        records = _pax_records(buf[: self.size])
        if self.type == tarfile.XGLTYPE:
            # A global header is ignored, as containerd's unpacker (and docker load) do:
            # tarfile merged its records into every later member, so a 1 MiB one (~40,000
            # records) cost that much per member: 37 s for 1000 members, hours for a real
            # layer's million (found reading the code, issue 8). git archive's commit id
            # comment is the one global header seen in practice.
            return self._next(tarfile_)
        pax: dict[str, str] = dict(tf.pax_headers)
        errors = tf.errors
        for key, value in records:
            if key == b"hdrcharset":
                pax["hdrcharset"] = me._decode_pax_field(value, "utf-8", "utf-8", errors)
        encoding = tf.encoding if pax.get("hdrcharset") == "BINARY" else "utf-8"
        for key, value in records:
            name: str = me._decode_pax_field(key, "utf-8", "utf-8", errors)
            if name in tarfile.PAX_NAME_FIELDS:
                pax[name] = me._decode_pax_field(value, encoding, tf.encoding, errors)
            else:
                pax[name] = me._decode_pax_field(value, "utf-8", "utf-8", errors)
        member: Any = self._next(tarfile_)
        try:
            _sparse_map(me, member, pax, records, tf)
        except ValueError as exc:  # int() of a map entry that is not a number
            raise tarfile.ReadError(f"GNU sparse map of {member.name!r}: {exc}") from None
        member._apply_pax_info(pax, tf.encoding, errors)
        member.offset = self.offset
        if "size" in pax:  # the data ends where the PAX size says
            end = member.offset_data
            if member.isreg() or member.type not in tarfile.SUPPORTED_TYPES:
                end += member._block(member.size)
            tf.offset = end
        return cast(tarfile.TarInfo, member)

    def _next(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        """The member this header describes: the next one in the archive."""
        try:
            return self.fromtarfile(tarfile_)
        except tarfile.HeaderError as exc:
            # what TarFile.next() makes of it (tarfile.SubsequentHeaderError)
            raise tarfile.ReadError(str(exc)) from None

    def _proc_sparse(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        # An old-GNU sparse member chains extension blocks of 21 extents each, as many as
        # it likes: a 447 KB gzip layer of them took 98 s and 1.4 GB here (issue 8). The
        # chain is read through a reader that stops at the special-header bound.
        inner = tarfile_.fileobj
        tarfile_.fileobj = _HeaderBudget(  # type: ignore[assignment]
            cast(IO[bytes], inner), MAX_SPECIAL_HEADER
        )
        try:
            return super()._proc_sparse(tarfile_)  # type: ignore[misc, no-any-return]
        finally:
            tarfile_.fileobj = inner


def _sparse_map(me: Any, member: Any, pax: dict[str, str],
                records: list[tuple[bytes, bytes]], tf: Any) -> None:
    """The sparse map a PAX header gives ``member``, in any of GNU tar's three formats."""
    if "GNU.sparse.map" in pax:  # GNU sparse 0.1: "offset,size,offset,size..."
        me._proc_gnusparse_01(member, pax)
    elif "GNU.sparse.size" in pax:  # GNU sparse 0.0: one record per offset and size
        offsets = [int(v) for k, v in records if k == b"GNU.sparse.offset"]
        sizes = [int(v) for k, v in records if k == b"GNU.sparse.numbytes"]
        member.sparse = list(zip(offsets, sizes, strict=False))
    elif pax.get("GNU.sparse.major") == "1" and pax.get("GNU.sparse.minor") == "0":
        # GNU sparse 1.0: the map is text lines ahead of the data, as many as the first
        # line says; read through the special-header budget like the old format's chain
        inner = tf.fileobj
        tf.fileobj = _HeaderBudget(inner, MAX_SPECIAL_HEADER)
        try:
            me._proc_gnusparse_10(member, pax, tf)
        finally:
            tf.fileobj = inner


def _pax_records(buf: bytes) -> list[tuple[bytes, bytes]]:
    """The ``(key, value)`` records of a PAX header, each ``"%d %s=%s\\n"`` of exactly its
    stated length, as Go's archive/tar (so containerd) demands; a NUL where a record would
    start ends them (the padding some writers leave), as tarfile and our builder accept."""
    out = []
    pos = 0
    while pos < len(buf) and buf[pos] != 0:
        sp = buf.find(b" ", pos, pos + _PAX_LENGTH_DIGITS + 1)
        digits = buf[pos:sp] if sp > pos else b""
        # bytes.isdigit: ASCII digits only; the find's bound bounds the text int() sees.
        # A record ends past its length's space, so each step moves on (fuzzing found the
        # loop that did not when a record after the first had no space)
        end = pos + int(digits) if digits.isdigit() else -1
        if end <= sp + 1 or end > len(buf) or buf[end - 1] != 0x0A:
            raise tarfile.ReadError(f"malformed PAX record at byte {pos} of the header")
        key, eq, value = buf[sp + 1 : end - 1].partition(b"=")
        if not key or not eq:
            raise tarfile.ReadError(f"PAX record at byte {pos} has no key=value")
        out.append((key, value))
        pos = end
    return out


class _HeaderBudget:
    """``read``/``tell`` of a tar stream, refusing to read more than ``budget`` bytes."""

    def __init__(self, inner: IO[bytes], budget: int) -> None:
        self.inner = inner
        self.left = budget

    def read(self, n: int) -> bytes:
        self.left -= n
        if self.left < 0:
            raise tarfile.ReadError(
                f"GNU sparse extension headers over the {MAX_SPECIAL_HEADER}-byte limit"
            )
        return self.inner.read(n)

    def tell(self) -> int:
        return self.inner.tell()


