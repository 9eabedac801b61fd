"""Small ELF files for the tests of runtime/elf.py and runtime/warm.py.

Laid out as a linker does (ELF header, program headers, then the PT_INTERP string, the
dynamic string table and the dynamic section, all in one PT_LOAD segment), with fields a test
can break on purpose.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ipfsnap.runtime.elf import (
    DT_NEEDED,
    DT_NULL,
    DT_RPATH,
    DT_RUNPATH,
    DT_STRSZ,
    DT_STRTAB,
    ELFCLASS64,
    ELFDATA2LSB,
    PT_DYNAMIC,
    PT_INTERP,
    PT_LOAD,
)

EM_X86_64 = 62
EM_AARCH64 = 183
#: where the segment is loaded: a typical non-PIE base
BASE = 0x400000


@dataclass
class ElfSpec:
    elf_class: int = ELFCLASS64
    byte_order: int = ELFDATA2LSB
    machine: int = EM_X86_64
    interpreter: str | None = None
    needed: tuple[str, ...] = ()
    runpath: str | None = None
    rpath: str | None = None
    #: bytes appended after the headers (a program's code), so files can span many chunks
    body: bytes = b""
    #: overrides of header fields, for hostile files
    phoff: int | None = None
    phnum: int | None = None
    phentsize: int | None = None
    strtab_addr: int | None = None
    strsz: int | None = None


def build_elf(spec: ElfSpec) -> bytes:
    is64 = spec.elf_class == ELFCLASS64
    bo = "<" if spec.byte_order == ELFDATA2LSB else ">"
    ehsize, phsize = (64, 56) if is64 else (52, 32)
    nph = 1 + (spec.interpreter is not None) + 1
    interp = (spec.interpreter or "").encode() + b"\0" if spec.interpreter is not None else b""
    strtab = bytearray(b"\0")
    dyn: list[tuple[int, int]] = []

    def add(text: str) -> int:
        at = len(strtab)
        strtab.extend(text.encode() + b"\0")
        return at

    for name in spec.needed:
        dyn.append((DT_NEEDED, add(name)))
    if spec.runpath is not None:
        dyn.append((DT_RUNPATH, add(spec.runpath)))
    if spec.rpath is not None:
        dyn.append((DT_RPATH, add(spec.rpath)))
    interp_off = ehsize + nph * phsize
    str_off = interp_off + len(interp)
    dyn_off = str_off + len(strtab)
    dyn += [(DT_STRTAB, spec.strtab_addr if spec.strtab_addr is not None else BASE + str_off),
            (DT_STRSZ, spec.strsz if spec.strsz is not None else len(strtab)), (DT_NULL, 0)]
    dyn_fmt = bo + ("qQ" if is64 else "iI")
    dynamic = b"".join(struct.pack(dyn_fmt, t, v) for t, v in dyn)
    total = dyn_off + len(dynamic) + len(spec.body)

    def phdr(p_type: int, offset: int, size: int) -> bytes:
        if is64:
            return struct.pack(bo + "IIQQQQQQ", p_type, 4, offset, BASE + offset, BASE + offset,
                               size, size, 8)
        return struct.pack(bo + "IIIIIIII", p_type, offset, BASE + offset, BASE + offset, size,
                           size, 4, 4)

    phdrs = phdr(PT_LOAD, 0, total)
    if spec.interpreter is not None:
        phdrs += phdr(PT_INTERP, interp_off, len(interp))
    phdrs += phdr(PT_DYNAMIC, dyn_off, len(dynamic))
    ident = b"\x7fELF" + bytes([spec.elf_class, spec.byte_order, 1]) + bytes(9)
    fields = (
        2,  # ET_EXEC
        spec.machine,
        1,
        BASE,
        spec.phoff if spec.phoff is not None else ehsize,
        0,
        0,
        ehsize,
        spec.phentsize if spec.phentsize is not None else phsize,
        spec.phnum if spec.phnum is not None else nph,
    )
    ehdr = ident + struct.pack(bo + ("HHIQQQIHHH" if is64 else "HHIIIIIHHH"), *fields)
    ehdr += bytes(ehsize - len(ehdr))  # e_shentsize, e_shnum, e_shstrndx: no sections
    return ehdr + phdrs + interp + bytes(strtab) + dynamic + spec.body
