"""The files a program reads at its start, after the loader: its C library's and, for a
CPython interpreter, the interpreter's own.

The exec closure (runtime/warm.py: the executable, ld.so, its cache and the shared objects)
is not all a lazily pulled program waits for before its first line of output. What it reads
next comes one file at a time, each a round trip to IPFS on a cold layer. A trace of
``python3 -c 'print("Hello, World!")'`` in Debian's python 3.11 image (hello-bench,
docs/benchmarks.md) after the libraries: the locale's ``LC_CTYPE``, glibc's
``gconv-modules.cache``, ``/etc/localtime``, the ``encodings`` package's bytecode, the site
directories' ``.pth`` files, ``sitecustomize``: six serial fetches, ~0.5 s of a ~2 s run.

Which of those a program reads is knowable from the image alone, as far as this module goes:

- **glibc** (a program whose ``PT_INTERP`` is glibc's ld.so: ``ld-linux*``, ``ld64.so*``):
  ``setlocale(LC_CTYPE, "")`` (python, bash, coreutils, perl call it) loads the locale named by
  ``LC_ALL``, ``LC_CTYPE`` or ``LANG`` (the first set, glibc's order) from
  ``/usr/lib/locale/<name>/LC_CTYPE``, under the name as given or with its codeset normalized
  (``C.UTF-8`` -> ``C.utf8``), and for a locale other than C/POSIX sets up its converter
  through ``gconv-modules.cache`` and reads ``/usr/share/locale/locale.alias``. The first
  local-time call reads ``/etc/localtime`` (or the zone ``TZ`` names). Locales compiled into
  ``/usr/lib/locale/locale-archive`` are not followed: glibc maps that file and reads parts of
  it that only its own index says.
- **CPython 3** (the executable's real name is ``pythonX.Y``; its standard library found as
  the interpreter does, from ``PYTHONHOME`` (not with ``-E``/``-I``) or two levels above
  the executable, by the ``os.py`` landmark): the ``encodings`` package, its aliases and
  the UTF-8 codec (python's start-up imports them from disk in every version; 3.7+ runs a
  C locale in UTF-8); before
  3.11, also the modules 3.11 freezes into the interpreter (os, site, codecs, io and what
  they import); unless ``-S`` is given, ``sitecustomize`` and the ``.pth`` files of the site
  directories, which ``site`` reads in name order. What a ``.pth`` line then imports is not
  followed.

Each of these is a guess at what the program will do, bounded: a file the program does not
read costs one fetch (a few KiB, usually one 256 KiB IPFS block shared with its neighbours in
the layer), and only files that exist in the rootfs are named. The reference has no
counterpart; an image optimized with ``ipfsnap image optimize`` records what its command
actually reads instead.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Protocol

from ipfsnap.runtime.elf import ElfInfo
from ipfsnap.runtime.spec import Tree, env_value, resolve_links

#: what a container's start reads before its command runs: the runtime resolves the
#: process's user and groups from the image's user database (runtime/spec.py for
#: ``ipfsnap run``; containerd's CRI reads /etc/group for the additional groups). Two small
#: files, but each a round trip on a lazy layer; the warm-ups read them first, ahead of the
#: command's megabytes (an IPFS peer sends blocks in the order they were asked for; measured:
#: docs/benchmarks.md, sixth session)
RUNTIME_FILES = ("/etc/passwd", "/etc/group")
#: the basenames of glibc's program interpreters (x86-64, i386, arm, aarch64, riscv:
#: ``ld-linux*``; ppc64le and s390x: ``ld64.so.*``); musl's is ``ld-musl-*``
GLIBC_LOADERS = re.compile(r"^(ld-linux[-.\w]*|ld64)\.so\.\d+$")
#: where glibc looks for compiled locales (its ``LOCPATH`` default on Debian)
LOCALE_DIR = "/usr/lib/locale"
#: glibc's alias table, read when ``setlocale`` meets a name it has not loaded yet
LOCALE_ALIAS = "/usr/share/locale/locale.alias"
#: the zone file glibc reads when ``TZ`` is unset, and where named zones live
LOCALTIME = "/etc/localtime"
ZONEINFO = "/usr/share/zoneinfo"
#: the names of locales glibc serves from its own built-in tables
BUILTIN_LOCALES = frozenset({"", "C", "POSIX"})

#: an executable named so is taken for CPython X.Y (Debian's /usr/bin/python3.11, the
#: official images' /usr/local/bin/python3.11; ``python3`` is a symlink to it in both)
PYTHON_NAME = re.compile(r"^python(\d+)\.(\d+)$")
#: the modules python's start imports from the standard library in every version, as
#: (package directory or "", module name)
PYTHON_START = (("encodings", "__init__"), ("encodings", "aliases"), ("encodings", "utf_8"))
#: what python before 3.11 also imports from disk at start (3.11 freezes these into the
#: interpreter, ``-X frozen_modules=on`` being its default outside a source tree)
PYTHON_UNFROZEN = (("", "abc"), ("", "codecs"), ("", "io"), ("", "os"), ("", "stat"),
                   ("", "_collections_abc"), ("", "posixpath"), ("", "genericpath"),
                   ("", "_sitebuiltins"), ("", "site"))
#: ``.pth`` files read per site directory at most (a directory of hundreds is a crafted or
#: unusual image; site would read them all, the warm-up leaves the rest to it)
MAX_PTH = 32


class ListingTree(Tree, Protocol):
    """A rootfs whose directories can be listed (``spec.DirTree``, ``layers.LayeredTree``)."""

    def listdir(self, parts: Sequence[str]) -> list[str]:
        """The names in the directory at ``parts`` (no ``.``/``..``); empty if it is not
        one."""
        ...


class _Finder:
    """Existence checks in the rootfs: every path a list names exists there as a regular
    file once its symlinks are resolved inside the root."""

    def __init__(self, tree: ListingTree, what: str) -> None:
        self.tree = tree
        self.what = what
        self.found: list[str] = []

    def parts(self, path: str) -> list[str]:
        return resolve_links(self.tree, path, what=self.what)

    def is_file(self, path: str) -> bool:
        st = self.tree.lstat(self.parts(path))
        return st is not None and stat.S_ISREG(st.st_mode)

    def is_dir(self, path: str) -> bool:
        st = self.tree.lstat(self.parts(path))
        return st is not None and stat.S_ISDIR(st.st_mode)

    def add(self, path: str) -> bool:
        if path not in self.found and self.is_file(path):
            self.found.append(path)
            return True
        return False

    def add_first(self, candidates: Sequence[str]) -> None:
        for c in candidates:
            if self.add(c):
                return


def normalize_codeset(codeset: str) -> str:
    """glibc's ``_nl_normalize_codeset``: alphanumerics only, letters lowered, and ``iso``
    in front of an all-digit result (``UTF-8`` -> ``utf8``, ``8859-1`` -> ``iso88591``)."""
    out = "".join(c.lower() for c in codeset if c.isascii() and c.isalnum())
    return "iso" + out if out.isdigit() else out


def locale_names(name: str) -> list[str]:
    """The directory names below /usr/lib/locale glibc tries for the locale ``name``
    (``language[_territory][.codeset][@modifier]``): the normalized codeset first, then the
    name as given."""
    rest, at, modifier = name.partition("@")
    base, dot, codeset = rest.partition(".")
    names = []
    if dot:
        names.append(f"{base}.{normalize_codeset(codeset)}{at}{modifier}")
    names.append(name)
    return list(dict.fromkeys(names))


def _glibc(find: _Finder, env: Sequence[str], multiarch: Sequence[str]) -> None:
    locale = None
    for key in ("LC_ALL", "LC_CTYPE", "LANG"):
        value = env_value(env, key)
        if value:
            locale = value
            break
    # a name with a slash is a path to glibc (allowed only outside setuid programs); ".."
    # could climb out of the locale directory: neither is followed
    if locale is not None and locale not in BUILTIN_LOCALES and "/" not in locale \
            and ".." not in locale:
        find.add_first([f"{LOCALE_DIR}/{n}/LC_CTYPE" for n in locale_names(locale)])
        find.add(LOCALE_ALIAS)
        gconv = env_value(env, "GCONV_PATH")
        dirs = [d for d in (gconv or "").split(":") if d.startswith("/")]
        dirs += [f"/usr/lib/{t}/gconv" for t in multiarch]
        find.add_first([f"{d}/gconv-modules.cache" for d in dirs])
    tz = env_value(env, "TZ")
    if tz is None:
        find.add(LOCALTIME)
    else:
        tz = tz.removeprefix(":")
        # "" is UTC, "UTC0" or "EST5EDT,M3.2.0,M11.1.0" are rules: no file (glibc tries a
        # file for a bare name first; a rule string is simply not found here)
        if tz and ".." not in tz:
            find.add(tz if tz.startswith("/") else f"{ZONEINFO}/{tz}")


def _pyc(find: _Finder, stdlib: str, package: str, module: str, tag: str) -> None:
    d = f"{stdlib}/{package}" if package else stdlib
    find.add_first([f"{d}/__pycache__/{module}.{tag}.pyc", f"{d}/{module}.py"])


def _python(find: _Finder, program: str, args: Sequence[str], env: Sequence[str]) -> None:
    m = PYTHON_NAME.match(PurePosixPath(program).name)
    if m is None or m.group(1) != "3":
        return
    version = f"{m.group(1)}.{m.group(2)}"
    minor = int(m.group(2))
    tag = f"cpython-3{minor}"
    flags = python_flags(args)
    # -E and -I make python ignore PYTHON* variables
    home = "" if flags & {"E", "I"} else (env_value(env, "PYTHONHOME") or "").split(":")[0]
    if not home.startswith("/"):
        home = str(PurePosixPath(program).parent.parent)
    stdlib = f"{home.rstrip('/')}/lib/python{version}"
    if not (find.is_file(f"{stdlib}/os.py") or find.is_file(f"{stdlib}/os.pyc")):
        return  # not laid out as python finds its library: nothing is guessed
    for package, module in PYTHON_START + (PYTHON_UNFROZEN if minor < 11 else ()):
        _pyc(find, stdlib, package, module, tag)
    if "S" in flags:
        return
    prefix = home.rstrip("/")
    site_dirs = [f"{prefix}/lib/python{version}/site-packages",
                 f"{prefix}/local/lib/python{version}/dist-packages",
                 f"{prefix}/lib/python3/dist-packages",
                 f"{prefix}/lib/python{version}/dist-packages"]
    present = [d for d in site_dirs if find.is_dir(d)]
    for d in [stdlib, *present]:
        _pyc(find, d, "", "sitecustomize", tag)
    for d in present:
        names = sorted(n for n in find.tree.listdir(find.parts(d)) if n.endswith(".pth"))
        for name in names[:MAX_PTH]:
            find.add(f"{d}/{name}")


def python_flags(args: Sequence[str]) -> set[str]:
    """The one-letter options python's command line ``args`` gives before its script, ``-c``
    or ``-m`` (``-X``/``-W`` values and what follows ``-c``/``-m`` are not options)."""
    flags: set[str] = set()
    i = 1
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-") or arg in ("-", "--") or arg.startswith("--"):
            break
        for j, flag in enumerate(arg[1:], 1):
            if flag in "cm":
                return flags  # what follows is the command or module
            if flag in "XW":
                if j == len(arg) - 1:
                    i += 1  # the value is the next word
                break  # else the rest of this word is the value
            flags.add(flag)
        i += 1
    return flags


def start_files(tree: ListingTree, program: str, info: ElfInfo, args: Sequence[str],
                env: Sequence[str], multiarch: Sequence[str], *, what: str = "") -> list[str]:
    """Container paths of the files ``program`` (the real container path of an executable
    whose ELF headers are ``info``, run as ``args`` with ``env``) reads at its start after
    the loader's work, in the order it reads them; every one exists in ``tree`` as a regular
    file. ``multiarch``: Debian's library directory names for the program's machine."""
    find = _Finder(tree, what or program)
    if info.interpreter is not None and GLIBC_LOADERS.match(
            PurePosixPath(info.interpreter).name):
        _glibc(find, env, multiarch)
    _python(find, program, args, env)
    return find.found
