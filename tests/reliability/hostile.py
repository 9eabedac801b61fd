"""Hostile layers and images for the escape tests (issue 8), built for both paths.

The tar-level cases are the ones of ``tests/snapshot/test_escape.py`` (names with ``..``,
absolute names, symlinks and hardlinks pointing outside, writes through planted symlinks,
whiteouts of ``..``); here each becomes a real eStargz blob (the real builder keeps the
hostile names in both the tar stream and the TOC), so the very same blob goes through the
lazy FUSE mount and the full unpack. Cases the builder cannot express (a TOC declaring a
1 TiB file, a gzip bomb chunk, a TOC bomb) are crafted member by member.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

from ipfsnap.estargz import BuildOptions, build
from ipfsnap.estargz.footer import gzip_footer, parse_gzip_footer
from tests.estargz.helpers import with_toc
from tests.estargz.test_reader import _craft, sha
from tests.fs.layers import Blob
from tests.snapshot.tarbuild import E, make_tar
from tests.snapshot.test_escape import _cases

#: what the host canary file holds; no test may ever see it change or read it in a container
CANARY_SECRET = b"host canary secret\n"

#: lazy-path outcome of each tar-level case of ``tests/snapshot/test_escape.py``: the full
#: unpack rejects all of them; the lazy mount rejects all but these, which it neutralises
#: (a second name for a symlink is still only a symlink: FUSE never follows it, and in a
#: container it resolves inside the rootfs; a whiteout of ``..`` is dropped with a warning)
LAZY_NEUTRALISED = {
    "hardlink-to-symlink-abs": "served as a symlink (text kept, never followed)",
    "hardlink-to-symlink-rel": "served as a symlink (text kept, never followed)",
    "whiteout-dotdot": "dropped, warning logged",
    "whiteout-dotdot-root": "dropped, warning logged",
}


def make_canary(base: Path) -> Path:
    """``base/canary`` with a secret file and an empty sub-directory."""
    canary = base / "canary"
    (canary / "sub").mkdir(parents=True)
    (canary / "secret").write_bytes(CANARY_SECRET)
    return canary


def tar_cases(canary: Path) -> dict[str, tuple[list[E], str]]:
    """name -> (entries, the entry name an error must mention)."""
    return _cases(canary)


CASE_NAMES = list(tar_cases(Path("/x")))


def blob_from_tar(tar: bytes, path: Path, chunk_size: int = 64 * 1024) -> Blob:
    """An eStargz blob of ``tar`` built by the real builder, written to ``path``."""
    with open(path, "wb") as dst:
        res = build(io.BytesIO(tar), dst,
                    BuildOptions(chunk_size=chunk_size, level=1, workers=1))
    return Blob(path, res.toc_digest, res.blob_digest, res.blob_size, [])


def blob_of(entries: list[E], path: Path) -> Blob:
    return blob_from_tar(make_tar(entries), path)


def toc_digest_of(blob: bytes) -> str:
    """sha256 of the uncompressed TOC JSON of a gzip eStargz blob."""
    off = parse_gzip_footer(blob[-51:])
    plain = zlib.decompressobj(31).decompress(blob[off:-51])
    size = int(plain[124:136].rstrip(b"\x00 ") or b"0", 8)
    return "sha256:" + hashlib.sha256(plain[512 : 512 + size]).hexdigest()


def _as_blob(blob: bytes, path: Path) -> Blob:
    path.write_bytes(blob)
    return Blob(path, toc_digest_of(blob), sha(blob), len(blob), [])


def crafted_blob(members: list[bytes], entries: list[dict[str, Any]], path: Path) -> Blob:
    """A gzip eStargz blob made of explicit ``members`` and a TOC of ``entries`` whose
    ``member`` field (an index into ``members``) becomes the entry's ``offset``."""
    return _as_blob(_craft(members, entries), path)


def one_tib_file_blob(path: Path) -> tuple[Blob, int]:
    """A blob whose TOC declares a 1 TiB file of zeros: 16384 chunks of 64 MiB that all
    name the same ~64 KiB gzip member (a 1000:1 bomb) and the same digest. Returns the blob
    and the compressed size of that member."""
    chunk = 64 << 20
    count = (1 << 40) // chunk
    member = gzip.compress(bytes(chunk), compresslevel=9)
    digest = sha(bytes(chunk))
    entries: list[dict[str, Any]] = [
        {"name": "huge", "type": "reg", "size": 1 << 40, "mode": 0o644, "member": 1,
         "chunkSize": chunk, "chunkDigest": digest, "digest": digest},
    ]
    entries += [{"name": "huge", "type": "chunk", "member": 1, "chunkOffset": i * chunk,
                 "chunkSize": chunk, "chunkDigest": digest} for i in range(1, count)]
    return crafted_blob([gzip.compress(b"hdr"), member], entries, path), len(member)


def gzip_bomb_blob(path: Path, inflated: int, claimed: int) -> Blob:
    """A file ``f`` whose one chunk claims ``claimed`` zero bytes, stored as a gzip member
    that inflates to ``inflated`` zero bytes."""
    bomb = gzip.compress(bytes(inflated), compresslevel=1)  # ~200:1, 2.6x faster than 9
    digest = sha(bytes(claimed))
    entries: list[dict[str, Any]] = [
        {"name": "f", "type": "reg", "size": claimed, "mode": 0o644, "member": 1,
         "digest": digest, "chunkDigest": digest},
    ]
    return crafted_blob([gzip.compress(b"hdr"), bomb], entries, path)


def toc_bomb_blob(path: Path, toc_bytes: int) -> Blob:
    """A blob whose TOC JSON is ``toc_bytes`` long (whitespace padding) but compresses to
    about a thousandth of that."""
    head = b'{"version": 1, "entries": [{"name": "d", "type": "dir"}]'
    doc = head + b" " * (toc_bytes - len(head) - 1) + b"}"
    payload = gzip.compress(b"hdr")
    return _as_blob(with_toc(payload + gzip_footer(len(payload)), doc), path)


def sparse_tar(name: str, apparent: int, data: bytes) -> bytes:
    """A PAX (GNU sparse 0.1) tar member ``name`` of ``apparent`` bytes whose only data is
    ``data`` at offset 0: a few KiB that describe a file of any size."""
    ti = tarfile.TarInfo(f"GNUSparseFile.0/{name}")
    ti.size = len(data)
    ti.mtime = 1_600_000_000
    ti.pax_headers = {"GNU.sparse.map": f"0,{len(data)}", "GNU.sparse.size": str(apparent),
                      "GNU.sparse.name": name, "GNU.sparse.numblocks": "1"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def euid_elf(setuid_first: bool = False) -> bytes:
    """A static x86-64 ELF of ~150 bytes that exits with its effective uid (mod 256): a
    setuid-root copy run by uid 1000 exits 0 if it gained root, 232 (1000 % 256) if not.
    ``setuid_first``: it calls setuid(0) first, which succeeds only with CAP_SETUID (a
    file capability, :data:`CAP_SETUID_XATTR`, grants it on exec unless something stops it)."""
    code = bytes.fromhex(
        ("31ff" "b869000000" "0f05" if setuid_first else "")  # xor edi,edi; setuid(0)
        + "b86b000000"  # mov eax, 107 (geteuid)
        "0f05"  # syscall
        "89c7"  # mov edi, eax
        "b83c000000"  # mov eax, 60 (exit)
        "0f05"  # syscall
    )
    base, ehdr_size, phdr_size = 0x400000, 64, 56
    entry = base + ehdr_size + phdr_size
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, entry, ehdr_size, 0, 0, ehdr_size, phdr_size, 1, 0, 0, 0
    )
    total = ehdr_size + phdr_size + len(code)
    # one PT_LOAD (1) segment, readable and executable (4 | 1), page aligned
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, total, total, 0x1000)
    return ehdr + phdr + code


#: ``security.capability`` as ``setcap cap_setuid+ep`` writes it: struct vfs_cap_data,
#: revision 2 (0x02000000) with the effective flag (1), permitted CAP_SETUID (bit 7)
CAP_SETUID_XATTR = struct.pack("<5I", 0x02000001, 1 << 7, 0, 0, 0)


#: uid the container tests run unprivileged commands as, and what euid_elf exits with then
USER_UID = 1000
UNPRIVILEGED_EXIT = USER_UID % 256


def rootfs_tar(root: Path) -> bytes:
    """The tree at ``root`` as an uncompressed tar (names relative, symlinks kept)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for p in sorted(root.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(root)), recursive=False)
    return buf.getvalue()


def hostile_image_layer(canary: Path, host_disk: tuple[int, int]) -> list[E]:
    """The layer of the container tests: everything in it passes both unpackers, and
    every entry tries to reach the host from inside a container."""
    secret = canary / "secret"
    up = "../" * 12
    return [
        E("etc", "d"),
        E("etc/shadow", data=b"image shadow\n", mode=0o640),
        E("shadow-abs", "l", link="/etc/shadow"),
        E("shadow-rel", "l", link=up + "etc/shadow"),
        E("canary-abs", "l", link=str(secret)),
        E("canary-rel", "l", link=up + str(secret).lstrip("/")),
        E("canary-dir", "l", link=str(canary)),
        E("rootlink", "l", link="/"),
        E("mem", "c", dev=(1, 1), mode=0o666),  # /dev/mem: all physical memory
        E("kmsg", "c", dev=(1, 11), mode=0o666),
        E("disk", "b", dev=host_disk, mode=0o666),  # the host's root filesystem device
        E("euid-suid", data=euid_elf(), mode=0o4755),
        E("euid-plain", data=euid_elf(), mode=0o755),
        E("euid-cap", data=euid_elf(setuid_first=True), mode=0o755,
          xattrs={"security.capability": CAP_SETUID_XATTR.decode("utf-8", "surrogateescape")}),
    ]


def pax_header_bomb(claimed: int) -> bytes:
    """A gzip layer whose first member is a PAX extended header claiming ``claimed`` bytes
    (zeros follow, compressing ~1000:1), then an ordinary file ``f``."""
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type = tarfile.XHDTYPE
    pax.size = claimed
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [co.compress(pax.tobuf(format=tarfile.USTAR_FORMAT))]
    step = 1 << 24
    for i in range(0, claimed, step):
        out.append(co.compress(bytes(min(step, claimed - i))))
    out.append(co.compress(bytes(-claimed % 512) + make_tar([E("f", data=b"f")])))
    out.append(co.flush())
    return b"".join(out)


def gnu_sparse_chain(blocks: int) -> bytes:
    """A gzip layer holding one old-GNU sparse member ``s`` whose header chains ``blocks``
    extension blocks of 21 extents each (all alike: they compress ~1000:1)."""
    ti = tarfile.TarInfo("s")
    hdr = bytearray(ti.tobuf(format=tarfile.GNU_FORMAT)[:512])
    hdr[156:157] = tarfile.GNUTYPE_SPARSE
    hdr[482] = 1  # isextended
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    ext = bytearray(512)
    for i in range(21):  # extents of one byte every 4 KiB
        ext[i * 24 : i * 24 + 24] = b"%011o\0%011o\0" % (i * 4096, 1)
    ext[504] = 1
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [co.compress(bytes(hdr))]
    out += [co.compress(bytes(ext)) for _ in range(blocks - 1)]
    ext[504] = 0
    out += [co.compress(bytes(ext) + bytes(1024)), co.flush()]
    return b"".join(out)
