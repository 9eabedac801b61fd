"""runtime/elf.py: the loader's fields of ELF files, real and crafted, and hostile headers."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from ipfsnap.errors import FormatError
from ipfsnap.runtime.elf import (
    ELFCLASS32,
    ELFDATA2MSB,
    MAX_DYNAMIC_BYTES,
    MAX_PHDR_BYTES,
    PN_XNUM,
    ElfInfo,
    parse_elf,
)
from ipfsnap.runtime.errors import ElfFormatError
from tests.runtime.elfs import BASE, EM_AARCH64, ElfSpec, build_elf
from tests.support import require_tool


def parse_bytes(data: bytes, name: str = "f") -> ElfInfo:
    return parse_elf(lambda at, n: data[at:at + n], len(data), name)


def readelf(path: Path) -> tuple[str | None, list[str], list[str]]:
    """(interpreter, needed, runpath-or-rpath) as binutils' readelf prints them."""
    require_tool("readelf")
    out = subprocess.run(["readelf", "-ldW", str(path)], capture_output=True, text=True,
                         check=True).stdout
    interp = re.search(r"Requesting program interpreter: ([^\]]+)\]", out)
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    runpath = re.findall(r"\(RUNPATH\)\s+Library runpath: \[([^\]]+)\]", out)
    rpath = re.findall(r"\(RPATH\)\s+Library rpath: \[([^\]]+)\]", out)
    search = (runpath or rpath or [""])[0]
    return (interp.group(1) if interp else None, needed, [p for p in search.split(":") if p])


@pytest.mark.parametrize("path", ["/usr/bin/python3.11", "/usr/sbin/runc",
                                  "/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/bin/ls",
                                  "/usr/lib/x86_64-linux-gnu/libm.so.6"])
def test_real_files_match_readelf(path: str) -> None:
    p = Path(path)
    assert p.exists(), f"{path} is part of the test machine's packages (scripts/setup.sh)"
    data = p.read_bytes()
    info = parse_bytes(data, path)
    interp, needed, search = readelf(p)
    assert info.interpreter == interp
    assert list(info.needed) == needed
    assert list(info.search_path) == search
    assert info.machine == 62 and info.elf_class == 2


@pytest.mark.parametrize("elf_class", [1, 2])
@pytest.mark.parametrize("order", [1, 2])
def test_crafted_files_every_class_and_byte_order(elf_class: int, order: int) -> None:
    spec = ElfSpec(elf_class=elf_class, byte_order=order, machine=EM_AARCH64,
                   interpreter="/lib/ld-linux-aarch64.so.1", needed=("libfoo.so.1", "libc.so.6"),
                   runpath="$ORIGIN/../lib:/opt/x", rpath="/ignored")
    info = parse_bytes(build_elf(spec))
    assert info == ElfInfo(elf_class, order, EM_AARCH64, "/lib/ld-linux-aarch64.so.1",
                           ("libfoo.so.1", "libc.so.6"), ("$ORIGIN/../lib", "/opt/x"))


def test_rpath_is_used_without_runpath_and_static_files_have_nothing() -> None:
    info = parse_bytes(build_elf(ElfSpec(needed=("a.so",), rpath="/r1:/r2")))
    assert info.search_path == ("/r1", "/r2") and info.interpreter is None
    static = parse_bytes(build_elf(ElfSpec()))
    assert static.needed == () and static.search_path == () and static.interpreter is None


def test_same_kind_compares_class_order_and_machine() -> None:
    a = parse_bytes(build_elf(ElfSpec()))
    assert a.same_kind(parse_bytes(build_elf(ElfSpec(needed=("x.so",)))))
    assert not a.same_kind(parse_bytes(build_elf(ElfSpec(machine=EM_AARCH64))))
    assert not a.same_kind(parse_bytes(build_elf(ElfSpec(elf_class=ELFCLASS32))))
    assert not a.same_kind(parse_bytes(build_elf(ElfSpec(byte_order=ELFDATA2MSB))))


HOSTILE: dict[str, tuple[bytes, str]] = {
    "not elf": (b"#!/bin/sh\necho hi\n", "not an ELF file"),
    "truncated header": (build_elf(ElfSpec())[:40], "truncated ELF header"),
    "bad class": (build_elf(ElfSpec())[:4] + b"\x07" + build_elf(ElfSpec())[5:],
                  "unknown ELF class 7"),
    "bad byte order": (build_elf(ElfSpec())[:5] + b"\x09" + build_elf(ElfSpec())[6:],
                       "unknown ELF byte order 9"),
    "program headers past the end": (build_elf(ElfSpec(phoff=1 << 40)), "past the end"),
    "too many program headers": (build_elf(ElfSpec(phnum=MAX_PHDR_BYTES // 56 + 1)),
                                 f"over {MAX_PHDR_BYTES}"),
    "PN_XNUM": (build_elf(ElfSpec(phnum=PN_XNUM)), "over 65534 program headers"),
    "entry size too small": (build_elf(ElfSpec(phentsize=8)), "entry size 8 < 56"),
    "string table not loaded": (build_elf(ElfSpec(needed=("a.so",), strtab_addr=BASE * 4)),
                                "in no loaded segment"),
    "string table past the end": (build_elf(ElfSpec(needed=("a.so",), strsz=1 << 19)),
                                  "past the end"),
    "string table too big": (build_elf(ElfSpec(needed=("a.so",), strsz=1 << 30)),
                             "over 1048576"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_are_one_clear_error(case: str) -> None:
    data, problem = HOSTILE[case]
    with pytest.raises(ElfFormatError) as err:
        parse_bytes(data, "/img/usr/bin/prog")
    msg = str(err.value)
    assert msg.startswith("/img/usr/bin/prog: ") and problem in msg and "\n" not in msg
    assert isinstance(err.value, FormatError)


def test_string_offset_past_the_table() -> None:
    data = bytearray(build_elf(ElfSpec(needed=("libfoo.so",))))
    # the DT_NEEDED entry is the dynamic section's first: point its name past the table
    good = parse_bytes(bytes(data))
    assert good.needed == ("libfoo.so",)
    at = bytes(data).index((1).to_bytes(8, "little") + (1).to_bytes(8, "little"))
    data[at + 8:at + 16] = (10_000).to_bytes(8, "little")
    with pytest.raises(ElfFormatError, match="string offset 10000 past the string table"):
        parse_bytes(bytes(data))


def test_reads_are_bounded_whatever_the_file_claims() -> None:
    """A crafted file makes the parser read a few bounded pieces, never the whole file."""
    body = bytes(64 << 20)
    data = build_elf(ElfSpec(needed=("a.so",) * 10, interpreter="/ld.so", body=body))
    reads: list[int] = []

    def read(at: int, n: int) -> bytes:
        reads.append(n)
        return data[at:at + n]

    parse_elf(read, len(data), "big")
    assert len(reads) <= 5 and max(reads) <= max(MAX_DYNAMIC_BYTES, MAX_PHDR_BYTES)
