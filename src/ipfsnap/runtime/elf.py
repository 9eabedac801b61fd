"""What the dynamic loader reads first from an ELF executable or shared object.

``run`` warms a lazily pulled rootfs with the files a container's first exec needs (see
runtime/warm.py): the executable, its program interpreter (``PT_INTERP``, e.g.
/lib64/ld-linux-x86-64.so.2) and the shared objects it names (``DT_NEEDED``), looked up in
``DT_RUNPATH``/``DT_RPATH`` and the usual directories. This module reads those fields, and
only those, from the program headers and the dynamic section (the section headers are not
used: the loader does not use them either, and stripped files may lack them).

Input is hostile (any image's file): every offset and size is checked against the file and
against small bounds before anything is read, so a crafted file costs a few bounded reads.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ipfsnap.runtime.errors import ElfFormatError

MAGIC = b"\x7fELF"
#: e_ident[EI_CLASS]
ELFCLASS32, ELFCLASS64 = 1, 2
#: e_ident[EI_DATA]
ELFDATA2LSB, ELFDATA2MSB = 1, 2
#: program header types
PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
#: dynamic tags
DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_RPATH, DT_RUNPATH = 0, 1, 5, 10, 15, 29
#: e_phnum of this value means the real count is in section header 0 (only for files with
#: over 65534 program headers, which no loader-friendly file has): refused
PN_XNUM = 0xFFFF

#: bytes of the ELF header: 52 (32-bit) or 64 (64-bit); 64 covers both
HEADER_SIZE = 64
#: program header table read at most: 1024 entries of 56 bytes (64-bit); real files have ~13
MAX_PHDR_BYTES = 1024 * 56
#: dynamic section read at most: 4096 entries of 16 bytes; real files have ~30-60 entries
MAX_DYNAMIC_BYTES = 4096 * 16
#: dynamic string table read at most; python3.11's is ~25 KiB, libc's ~20 KiB
MAX_STRTAB_BYTES = 1 << 20
#: PT_INTERP read at most (a path; the kernel itself refuses interpreters over PATH_MAX)
MAX_INTERP_BYTES = 4096
#: DT_NEEDED names kept at most (python3.11 has 6, big C++ programs ~60)
MAX_NEEDED = 256

#: (ELF header, program header, dynamic entry) layouts by class, without the byte order
_LAYOUTS = {
    # e_type e_machine e_version e_entry e_phoff e_shoff e_flags e_ehsize e_phentsize e_phnum
    ELFCLASS32: ("HHIIIIIHHH", "IIIIIIII", "iI"),
    ELFCLASS64: ("HHIQQQIHHH", "IIQQQQQQ", "qQ"),
}


@dataclass(frozen=True)
class ElfInfo:
    """The loader-relevant fields of one ELF file."""

    elf_class: int
    byte_order: int
    machine: int
    #: PT_INTERP's path, None for static executables and shared objects
    interpreter: str | None
    #: DT_NEEDED names, in file order
    needed: tuple[str, ...]
    #: DT_RUNPATH entries, or DT_RPATH's when there is no DT_RUNPATH (as ld.so)
    search_path: tuple[str, ...]

    def same_kind(self, other: ElfInfo) -> bool:
        """Whether a shared object ``other`` can be loaded into this program."""
        return (self.elf_class, self.byte_order, self.machine) == (
            other.elf_class, other.byte_order, other.machine)


@dataclass(frozen=True)
class _Segment:
    offset: int
    vaddr: int
    filesz: int


def is_elf(head: bytes) -> bool:
    return head[:4] == MAGIC


def parse_elf(read: Callable[[int, int], bytes], size: int, name: str) -> ElfInfo:
    """Parse the file of ``size`` bytes read through ``read(offset, length)``.

    ``name`` is for messages. Raises :class:`ElfFormatError` when the file is not an ELF file
    or its headers point outside it.
    """
    head = read(0, HEADER_SIZE)
    if not is_elf(head):
        raise ElfFormatError(name, "not an ELF file")
    if len(head) < 52:
        raise ElfFormatError(name, "truncated ELF header")
    elf_class, order = head[4], head[5]
    if elf_class not in _LAYOUTS:
        raise ElfFormatError(name, f"unknown ELF class {elf_class}")
    if order not in (ELFDATA2LSB, ELFDATA2MSB):
        raise ElfFormatError(name, f"unknown ELF byte order {order}")
    bo = "<" if order == ELFDATA2LSB else ">"
    ehdr_fmt, phdr_fmt, dyn_fmt = (bo + f for f in _LAYOUTS[elf_class])
    ehdr_size = struct.calcsize(ehdr_fmt)
    if len(head) < 16 + ehdr_size:
        raise ElfFormatError(name, "truncated ELF header")
    (_type, machine, _version, _entry, phoff, _shoff, _flags, _ehsize, phentsize,
     phnum) = struct.unpack_from(ehdr_fmt, head, 16)
    phdr_size = struct.calcsize(phdr_fmt)
    if phnum == PN_XNUM:
        raise ElfFormatError(name, "over 65534 program headers")
    if phnum and phentsize < phdr_size:
        raise ElfFormatError(name, f"program header entry size {phentsize} < {phdr_size}")
    table = _span(name, "program header table", phoff, phnum * phentsize, size, MAX_PHDR_BYTES)
    raw = read(phoff, table) if table else b""
    if len(raw) < table:
        raise ElfFormatError(name, "program header table past the end of the file")

    loads: list[_Segment] = []
    interp: tuple[int, int] | None = None
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        fields = struct.unpack_from(phdr_fmt, raw, i * phentsize)
        if elf_class == ELFCLASS64:
            p_type, _pf, p_offset, p_vaddr, _pa, p_filesz = fields[:6]
        else:
            p_type, p_offset, p_vaddr, _pa, p_filesz = fields[:5]
        if p_type == PT_LOAD:
            loads.append(_Segment(p_offset, p_vaddr, p_filesz))
        elif p_type == PT_INTERP and interp is None:
            interp = (p_offset, p_filesz)
        elif p_type == PT_DYNAMIC and dynamic is None:
            dynamic = (p_offset, p_filesz)

    interpreter = None
    if interp is not None:
        n = _span(name, "PT_INTERP", interp[0], interp[1], size, MAX_INTERP_BYTES)
        interpreter = _c_string(read(interp[0], n)) or None

    needed: list[str] = []
    search_path: tuple[str, ...] = ()
    if dynamic is not None:
        needed, search_path = _dynamic(read, size, name, dynamic, dyn_fmt, loads)
    return ElfInfo(elf_class, order, machine, interpreter, tuple(needed), search_path)


def _dynamic(read: Callable[[int, int], bytes], size: int, name: str, where: tuple[int, int],
             dyn_fmt: str, loads: list[_Segment]) -> tuple[list[str], tuple[str, ...]]:
    n = _span(name, "dynamic section", where[0], where[1], size, MAX_DYNAMIC_BYTES)
    raw = read(where[0], n)
    entry = struct.calcsize(dyn_fmt)
    needed_at: list[int] = []
    strtab = strsz = rpath = runpath = None
    for off in range(0, len(raw) - entry + 1, entry):
        tag, val = struct.unpack_from(dyn_fmt, raw, off)
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED and len(needed_at) < MAX_NEEDED:
            needed_at.append(val)
        elif tag == DT_STRTAB:
            strtab = val
        elif tag == DT_STRSZ:
            strsz = val
        elif tag == DT_RPATH:
            rpath = val
        elif tag == DT_RUNPATH:
            runpath = val
    if not needed_at and rpath is None and runpath is None:
        return [], ()
    if strtab is None or strsz is None:
        raise ElfFormatError(name, "dynamic section names libraries but has no string table")
    # DT_STRTAB is an address in memory: the loader finds it through the PT_LOAD segments
    for seg in loads:
        if seg.vaddr <= strtab < seg.vaddr + seg.filesz:
            str_off = seg.offset + (strtab - seg.vaddr)
            break
    else:
        raise ElfFormatError(name, f"string table address {strtab:#x} is in no loaded segment")
    n = _span(name, "dynamic string table", str_off, strsz, size, MAX_STRTAB_BYTES)
    table = read(str_off, n)

    def string(at: int) -> str:
        if at >= len(table):
            raise ElfFormatError(name, f"string offset {at} past the string table ({len(table)})")
        return _c_string(table[at:])

    needed = [s for s in (string(at) for at in needed_at) if s]
    chosen = runpath if runpath is not None else rpath
    search = tuple(p for p in string(chosen).split(":") if p) if chosen is not None else ()
    return needed, search


def _span(name: str, what: str, offset: int, length: int, size: int, bound: int) -> int:
    """``length`` once checked to lie in the file and to be at most ``bound`` bytes."""
    if length > bound:
        raise ElfFormatError(name, f"{what} of {length} bytes (over {bound})")
    if offset > size or length > size - offset:
        raise ElfFormatError(name, f"{what} at {offset}+{length} past the end ({size} bytes)")
    return length


def _c_string(data: bytes) -> str:
    """The NUL-terminated string at the start of ``data``, decoded as the OS does paths."""
    end = data.find(b"\0")
    return os.fsdecode(data if end < 0 else data[:end])
