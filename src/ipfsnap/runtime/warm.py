"""Warm a lazily mounted rootfs with the files the container's first exec will read.

On a lazily pulled rootfs every first read of a file waits for IPFS, and a program's start
reads its files one after the other: the kernel reads the executable's headers, then the
program interpreter (ld.so), which opens each shared object in turn. Each of those is a round
trip to the IPFS node (over bitswap to a remote peer: ~0.1 s for one 256 KiB block, while a
bigger read costs only ~26 ms more per block; docs/benchmarks.md), taken in series.

``run`` knows the command before runc starts it, so :class:`ExecWarmer` reads those files
itself, concurrently, while the bundle is written and runc creates the container: the
executable (found through the container's PATH, as runc does), a ``#!`` script's interpreter,
the ELF program interpreter and every ``DT_NEEDED`` shared object, recursively (runtime/elf.py).
Their data lands in the layer filesystem's chunk cache and the page cache, so the exec finds
it there. Then (``start_files``, ``[run] warm_start_files``) what the program's start reads
after the loader, as far as the image tells (runtime/startfiles.py: the C library's locale
and zone files, CPython's start-up modules and site files), asked for only once each of the
loader's files has asked for its first bytes, so they queue behind the libraries. The
reference has no counterpart (without a prefetch landmark in the image it fetches nothing
before the container reads it).

Bounds: at most ``budget`` bytes are read in all (``[run] warm_bytes``, a file's first bytes
first), at most :data:`MAX_FILES` files; the warm-up never fails a run (a file it cannot find,
open or parse is skipped, logged at debug level) and stops when the container exits.

Only regular files are opened, with ``O_PATH`` first (opening a device node of the image as
root could act on the host's device) and paths are resolved inside the rootfs
(spec.resolve_links). The container runs while the warm-up reads and could swap a directory
for a symlink between the lookup and the open: the worst it gets is this process reading (and
discarding) some host file's bytes, bounded by the budget.
"""

from __future__ import annotations

import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Protocol

from ipfsnap.errors import IpfsnapError
from ipfsnap.runtime.elf import ElfInfo, is_elf, parse_elf
from ipfsnap.runtime.spec import DirTree, env_value, resolve_links
from ipfsnap.runtime.startfiles import ListingTree, start_files

log = logging.getLogger(__name__)

#: runc's PATH when the container's environment has none (and docker's default)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: bytes one read task covers: a quarter of the usual 4 MiB eStargz chunk, so a big file's
#: chunks are requested concurrently (the layer filesystem merges reads of one chunk)
WINDOW = 1 << 20
#: reader threads: enough to ask for all of the executable's windows and the libraries at
#: once (python3.11: 7 windows, + ld.so + 4 libraries, ~16 MiB); a thread mostly waits on a
#: read. The layer filesystem bounds its own concurrency per layer (max_concurrency)
THREADS = 16
#: files looked at at most (a program with ~100 shared objects is big; a dependency loop or
#: a crafted image stops here)
MAX_FILES = 128
#: ``#!`` interpreters followed at most: the kernel's BINPRM_MAX_RECURSION
MAX_SCRIPT_DEPTH = 4
#: bytes of a ``#!`` line read (the kernel's BINPRM_BUF_SIZE)
SHEBANG_BYTES = 256
#: seconds :meth:`ExecWarmer.stop` waits for reads in flight before leaving them to their
#: (daemon) threads
STOP_TIMEOUT = 2.0

#: glibc's ld.so's cache of library paths (ldconfig writes it), read by every dynamic
#: program's start
LD_SO_CACHE = "/etc/ld.so.cache"

#: Debian's multiarch library directories by ELF machine (e_machine)
MULTIARCH: dict[int, tuple[str, ...]] = {
    62: ("x86_64-linux-gnu",),  # EM_X86_64
    183: ("aarch64-linux-gnu",),  # EM_AARCH64
    3: ("i386-linux-gnu",),  # EM_386
    40: ("arm-linux-gnueabihf", "arm-linux-gnueabi"),  # EM_ARM
    21: ("powerpc64le-linux-gnu",),  # EM_PPC64
    22: ("s390x-linux-gnu",),  # EM_S390
    243: ("riscv64-linux-gnu",),  # EM_RISCV
}


@dataclass
class WarmStats:
    """What a warm-up did."""

    files: int = 0
    bytes: int = 0
    #: files that were skipped: missing, not regular, unreadable or malformed
    skipped: int = 0
    seconds: float = 0.0
    #: container paths warmed, in the order they were first opened
    paths: tuple[str, ...] = ()


class RootTree(ListingTree, Protocol):
    """A rootfs the warm-up reads: a ``spec.Tree`` that lists directories and says which
    host file holds an entry (``spec.DirTree``: a mounted rootfs; ``layers.LayeredTree``: a
    pulled image's layers before any container exists)."""

    def host_path(self, parts: Sequence[str]) -> Path | None: ...


def library_dirs(info: ElfInfo, origin: str, env: Sequence[str]) -> list[str]:
    """Directories searched for ``info``'s DT_NEEDED names, in the loader's order.

    ``origin`` is the container directory of the object (``$ORIGIN``). Search-path entries
    with other dynamic string tokens ($LIB, $PLATFORM) are left out: they name
    per-machine directories this process cannot expand for certain.
    """
    dirs: list[str] = []
    for entry in info.search_path:
        entry = entry.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)
        if "$" not in entry:
            dirs.append(entry)
    dirs.extend(p for p in (env_value(env, "LD_LIBRARY_PATH") or "").split(":") if p)
    for triplet in MULTIARCH.get(info.machine, ()):
        dirs += [f"/lib/{triplet}", f"/usr/lib/{triplet}"]
    if info.elf_class == 2:
        dirs += ["/lib64", "/usr/lib64"]
    dirs += ["/lib", "/usr/lib", "/usr/local/lib"]
    return [d for d in dirs if d.startswith("/")]


class ExecWarmer:
    """Reads, concurrently, the files the exec of a command in ``root`` needs.

    ``start`` returns at once; ``stop`` ends it (call it when the container has exited, or
    once the warm-up is no longer useful); ``wait`` is for tests and benchmarks.
    """

    def __init__(self, root: Path | RootTree, budget: int, *, threads: int = THREADS,
                 window: int = WINDOW, name: str = "", start_files: bool = True) -> None:
        #: the rootfs: a mounted directory, or layers read as one (runtime/layers.py)
        self.tree: RootTree = DirTree(root) if isinstance(root, Path) else root
        self.name = name or str(root)
        self._budget = budget
        self._window = window
        #: also read what the program's start reads after the loader (runtime/startfiles.py)
        self._start_files_too = start_files
        self._threads = [threading.Thread(target=self._work, name=f"warm-{i}", daemon=True)
                         for i in range(max(1, threads))]
        self._tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._pending = 0
        self._stopping = threading.Event()
        self._seen: set[Path] = set()
        self._paths: list[str] = []
        self._bytes = 0
        self._skipped = 0
        self._started = 0.0
        self._ended: float | None = None
        #: the process's arguments and environment (PATH, LD_LIBRARY_PATH, the locale),
        #: set by :meth:`start`
        self._args: Sequence[str] = ()
        self._env: Sequence[str] = ()

    # -- public -----------------------------------------------------------------------------

    def start(self, args: Sequence[str], env: Sequence[str], cwd: str = "/", *,
              first: Sequence[str] = ()) -> None:
        """Begin warming for the process ``args`` with environment ``env`` in ``cwd``;
        the files at the container paths ``first`` are asked for before the command's."""
        self._started = time.monotonic()
        self._args = args
        self._env = env
        if not args or self._budget <= 0 or self._stopping.is_set():
            self._ended = self._started
            return
        for path in first:
            # data files (at the depth limit: a #! line in them is not followed)
            self._submit(partial(self._visit, path, depth=MAX_SCRIPT_DEPTH, program=None))
        self._submit(lambda: self._command(args[0], cwd))
        for t in self._threads:
            t.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether every read finished within ``timeout`` seconds."""
        with self._done:
            return self._done.wait_for(lambda: self._pending == 0, timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> WarmStats:
        """Drop the reads not begun, wait up to ``timeout`` s for those in flight."""
        self._stopping.set()
        for t in self._threads:
            if t.is_alive():
                self._tasks.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))
        stats = self.stats()
        log.info("%s: warmed %d files of the command (%d bytes, %d skipped) in %.2f s",
                 self.name, stats.files, stats.bytes, stats.skipped, stats.seconds)
        return stats

    def stats(self) -> WarmStats:
        with self._lock:
            end = self._ended if self._ended is not None else time.monotonic()
            return WarmStats(files=len(self._paths), bytes=self._bytes, skipped=self._skipped,
                             seconds=end - self._started, paths=tuple(self._paths))

    # -- the task queue ---------------------------------------------------------------------

    def _submit(self, task: Callable[[], None]) -> None:
        if self._stopping.is_set():
            return
        with self._lock:
            self._pending += 1
        self._tasks.put(task)

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            try:
                if not self._stopping.is_set():
                    task()
            except (OSError, IpfsnapError) as exc:
                # best effort: a file that cannot be read is read by the container itself
                # (which then gets the error, if any, itself)
                log.debug("%s: warm-up step skipped: %s", self.name, exc)
                with self._lock:
                    self._skipped += 1
            except Exception:  # a warm-up must never end the run
                log.exception("%s: warm-up step failed", self.name)
            finally:
                with self._done:
                    self._pending -= 1
                    if self._pending == 0:
                        self._ended = time.monotonic()
                        self._done.notify_all()

    # -- steps --------------------------------------------------------------------------------

    def _command(self, argv0: str, cwd: str) -> None:
        if "/" in argv0:
            self._visit(str(PurePosixPath(cwd, argv0)), depth=0, program=None)
            return
        for d in (env_value(self._env, "PATH") or DEFAULT_PATH).split(":"):
            # runc's lookup: a relative PATH entry is relative to the working directory
            candidate = str(PurePosixPath(cwd, d or ".", argv0))
            st = self.tree.lstat(resolve_links(self.tree, candidate, what=self.name))
            if st is not None and stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
                self._visit(candidate, depth=0, program=None)
                return
        self._skip(f"{argv0}: not found in the container's PATH")

    def _lib(self, name: str, dirs: Sequence[str], program: ElfInfo,
             ticket: _Ticket | None = None) -> None:
        try:
            self._find_lib(name, dirs, program, ticket)
        finally:
            if ticket is not None:
                ticket.punch()

    def _find_lib(self, name: str, dirs: Sequence[str], program: ElfInfo,
                  ticket: _Ticket | None) -> None:
        for d in dirs:
            path = str(PurePosixPath(d, name))
            fd = self._open(self._locate(path)[1])
            if fd is None:
                continue
            try:
                size = os.fstat(fd).st_size
                if ticket is not None:
                    ticket.punch()  # its first read follows
                info = parse_elf(_reader(fd), size, path)
            except IpfsnapError:
                continue  # not a loadable object here: ld.so goes on to the next directory
            finally:
                os.close(fd)
            if program.same_kind(info):
                self._visit(path, depth=0, program=program)
                return
        self._skip(f"shared object {name}: not found")

    def _visit(self, path: str, *, depth: int, program: ElfInfo | None,
               ticket: _Ticket | None = None) -> None:
        """Open the file at container ``path``, queue what it needs, then its reads;
        ``ticket`` is punched once its first read is about to be asked for (or it is
        skipped)."""
        try:
            self._visit_file(path, depth=depth, program=program, ticket=ticket)
        finally:
            if ticket is not None:
                ticket.punch()

    def _visit_file(self, path: str, *, depth: int, program: ElfInfo | None,
                    ticket: _Ticket | None) -> None:
        # here: the container path of the file itself, for $ORIGIN and messages
        here, real = self._locate(path)
        if real is None:
            self._skip(f"{path}: not found")
            return
        with self._lock:
            if real in self._seen or len(self._seen) >= MAX_FILES:
                return
            self._seen.add(real)
        fd = self._open(real)
        if fd is None:
            self._skip(f"{path}: not a regular file")
            return
        try:
            size = os.fstat(fd).st_size
            with self._lock:
                self._paths.append(here)
            # every part of the file is asked for before its headers are parsed: the
            # headers' chunk is one of many the exec needs, and the parse waits for it
            self._queue_reads(real, size)
            if ticket is not None:
                ticket.punch()
            head = os.pread(fd, SHEBANG_BYTES, 0)
            if head.startswith(b"#!") and depth < MAX_SCRIPT_DEPTH:
                interp = _shebang(head)
                if interp:
                    self._submit(lambda: self._visit(interp, depth=depth + 1, program=None))
            elif is_elf(head):
                info = parse_elf(_reader(fd), size, here)
                gate = None
                if program is None and self._start_files_too:
                    # the executable itself: after the loader's files, what its start reads
                    # (its options only when it is the command, not a #! line's
                    # interpreter). Asked for once each of the loader's files for it (ld.so,
                    # its cache, the DT_NEEDED libraries; not theirs, found only once their
                    # headers are in) has asked for its first bytes: a layer serves
                    # max_concurrency fetches at once, node A sends blocks in the order they
                    # were wanted, and the exec needs every library before the program
                    # reads any of these
                    args = self._args if depth == 0 else (here,)
                    gate = _Gate(partial(self._submit, partial(self._start_files, here, info,
                                                               args)))
                self._dependencies(info, here, program or info, gate)
                if gate is not None:
                    gate.close()
        finally:
            os.close(fd)

    def _dependencies(self, info: ElfInfo, here: str, program: ElfInfo,
                      gate: _Gate | None = None) -> None:
        """Queue the loader's files for ``info``; each task holds a ticket of ``gate``."""
        def ticket() -> _Ticket | None:
            return gate.ticket() if gate is not None else None

        if info.interpreter:
            self._submit(partial(self._visit, info.interpreter, depth=0, program=program,
                                 ticket=ticket()))
            # glibc's ld.so reads its cache before it looks for a library in the directories
            # (musl's has none: then a file not found, skipped)
            self._submit(partial(self._visit, LD_SO_CACHE, depth=0, program=program,
                                 ticket=ticket()))
        if info.needed:
            dirs = library_dirs(info, str(PurePosixPath(here).parent), self._env)
            for name in info.needed:
                if "/" in name:  # a path, loaded as given
                    self._submit(partial(self._visit, name, depth=0, program=program,
                                         ticket=ticket()))
                else:
                    self._submit(partial(self._lib, name, dirs, program, ticket()))

    def _start_files(self, here: str, info: ElfInfo, args: Sequence[str]) -> None:
        paths = start_files(self.tree, here, info, args, self._env,
                            MULTIARCH.get(info.machine, ()), what=self.name)
        for path in paths:
            # data files: at the depth limit a #! line in them is not followed, and as
            # program-less visits an ELF among them would not start another round
            self._submit(partial(self._visit, path, depth=MAX_SCRIPT_DEPTH, program=info))

    def _queue_reads(self, real: Path, size: int) -> None:
        with self._lock:
            take = min(size, self._budget - self._bytes)
            if take <= 0:
                return
            self._bytes += take
        for offset in range(0, take, self._window):
            length = min(self._window, take - offset)
            self._submit(partial(self._read, real, offset, length))

    def _read(self, real: Path, offset: int, length: int) -> None:
        fd = self._open(real)
        if fd is None:
            return
        try:
            end = offset + length
            while offset < end and not self._stopping.is_set():
                got = len(os.pread(fd, min(end - offset, self._window), offset))
                if not got:
                    break
                offset += got
        finally:
            os.close(fd)

    def _locate(self, path: str) -> tuple[str, Path | None]:
        """The container path ``path`` names once symlinks are resolved, and the host path
        of its file (None: there is none)."""
        parts = resolve_links(self.tree, path, what=self.name)
        return "/" + "/".join(parts), self.tree.host_path(parts)

    def _open(self, real: Path | None) -> int | None:
        """A read-only descriptor of ``real`` if it is a regular file, else None.

        Opened as ``O_PATH`` first and checked: opening a device node or fifo for reading
        could act on the host's device or block.
        """
        if real is None:
            return None
        try:
            pfd = os.open(real, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(pfd).st_mode):
                return None
            return os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(pfd)

    def _skip(self, why: str) -> None:
        log.debug("%s: warm-up: %s", self.name, why)
        with self._lock:
            self._skipped += 1


class _Gate:
    """Runs ``then`` once it is closed and every ticket it gave out has been punched."""

    def __init__(self, then: Callable[[], None]) -> None:
        self._then = then
        self._lock = threading.Lock()
        self._open_tickets = 0
        self._closed = False
        self._fired = False

    def ticket(self) -> _Ticket:
        with self._lock:
            self._open_tickets += 1
        return _Ticket(self)

    def close(self) -> None:
        """No more tickets: fire once the ones given out are punched."""
        with self._lock:
            self._closed = True
        self._maybe_fire()

    def _punched(self) -> None:
        with self._lock:
            self._open_tickets -= 1
        self._maybe_fire()

    def _maybe_fire(self) -> None:
        with self._lock:
            if self._fired or not self._closed or self._open_tickets:
                return
            self._fired = True
        self._then()


class _Ticket:
    """One task's part of a :class:`_Gate`; punching it again does nothing."""

    def __init__(self, gate: _Gate) -> None:
        self._gate: _Gate | None = gate

    def punch(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate._punched()


def _reader(fd: int) -> Callable[[int, int], bytes]:
    return lambda offset, length: os.pread(fd, length, offset)


def _shebang(head: bytes) -> str | None:
    """The interpreter path of a ``#!`` line (the kernel's rules: first word, after blanks)."""
    line = head[2:].split(b"\n", 1)[0]
    words = line.replace(b"\t", b" ").split()
    if not words or not words[0].startswith(b"/"):
        return None
    return os.fsdecode(words[0])
