"""runtime/startfiles.py: the files a program's start reads after the loader, guessed from
the image alone: glibc's locale, converter and zone files under the process's environment,
and CPython's start-up modules and site files; only files inside the rootfs that exist."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ipfsnap.runtime import startfiles
from ipfsnap.runtime.elf import ElfInfo
from ipfsnap.runtime.spec import DirTree
from ipfsnap.runtime.startfiles import (
    locale_names,
    normalize_codeset,
    python_flags,
    start_files,
)

MULTIARCH = ("x86_64-linux-gnu",)
GLIBC = ElfInfo(elf_class=2, byte_order=1, machine=62,
                interpreter="/lib64/ld-linux-x86-64.so.2", needed=("libc.so.6",),
                search_path=())
MUSL = ElfInfo(elf_class=2, byte_order=1, machine=62, interpreter="/lib/ld-musl-x86_64.so.1",
               needed=("libc.musl-x86_64.so.1",), search_path=())
STATIC = ElfInfo(elf_class=2, byte_order=1, machine=62, interpreter=None, needed=(),
                 search_path=())

PY = "/usr/bin/python3.11"
STDLIB = "/usr/lib/python3.11"
#: python 3.11's start, as Debian's python3 reads it (strace of ``python3 -c pass``)
PY_START = [f"{STDLIB}/encodings/__pycache__/__init__.cpython-311.pyc",
            f"{STDLIB}/encodings/__pycache__/aliases.cpython-311.pyc",
            f"{STDLIB}/encodings/utf_8.py"]  # no bytecode: the source
PY_SITE = [f"{STDLIB}/__pycache__/sitecustomize.cpython-311.pyc",
           "/usr/lib/python3/dist-packages/a.pth", "/usr/lib/python3/dist-packages/b.pth"]
LOCALE = ["/usr/lib/locale/C.utf8/LC_CTYPE", "/usr/share/locale/locale.alias",
          "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache"]


def _put(root: Path, rel: str, data: bytes = b"x") -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Debian's python3.11 image, as far as its start goes."""
    r = tmp_path / "root"
    for rel in ("usr/bin/python3.11", "usr/lib/python3.11/os.py",
                "usr/lib/python3.11/encodings/__init__.py",
                "usr/lib/python3.11/encodings/__pycache__/__init__.cpython-311.pyc",
                "usr/lib/python3.11/encodings/aliases.py",
                "usr/lib/python3.11/encodings/__pycache__/aliases.cpython-311.pyc",
                "usr/lib/python3.11/encodings/utf_8.py",
                "usr/lib/python3.11/encodings/__pycache__/latin_1.cpython-311.pyc",
                "usr/lib/python3.11/__pycache__/site.cpython-311.pyc",  # frozen in 3.11
                "usr/lib/python3.11/__pycache__/sitecustomize.cpython-311.pyc",
                "usr/lib/python3/dist-packages/b.pth", "usr/lib/python3/dist-packages/a.pth",
                "usr/lib/python3/dist-packages/README.txt",
                "usr/lib/locale/C.utf8/LC_CTYPE", "usr/lib/locale/C.utf8/LC_NUMERIC",
                "usr/share/locale/locale.alias",
                "usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
                "usr/share/zoneinfo/Etc/UTC", "usr/share/zoneinfo/Europe/Paris"):
        _put(r, rel)
    (r / "usr/local/lib/python3.11/dist-packages").mkdir(parents=True)
    os.symlink("python3.11", r / "usr/bin/python3")
    (r / "etc").mkdir()
    os.symlink("/usr/share/zoneinfo/Etc/UTC", r / "etc/localtime")
    return r


def files(root: Path, env: list[str], args: list[str] | None = None, *,
          info: ElfInfo = GLIBC, program: str = PY) -> list[str]:
    return start_files(DirTree(root), program, info, args or ["python3", "-c", "pass"], env,
                       MULTIARCH)


def test_a_python_start_in_a_utf8_locale(root: Path) -> None:
    got = files(root, ["PATH=/usr/bin", "LANG=C.UTF-8"])
    assert got == [*LOCALE, "/etc/localtime", *PY_START, *PY_SITE]


@pytest.mark.parametrize("env", [[], ["LANG=C"], ["LANG=POSIX"], ["LANG="],
                                 ["LANG=C.UTF-8", "LC_ALL=C"],
                                 ["LANG=../../etc/x"], ["LANG=/usr/lib/locale/C.utf8"]])
def test_no_locale_files_for_the_builtin_locales_or_a_path(root: Path, env: list[str]) -> None:
    got = files(root, env)
    assert not set(got) & set(LOCALE) and "/etc/localtime" in got


def test_the_locale_variables_in_glibcs_order(root: Path) -> None:
    # LC_ALL over LC_CTYPE over LANG; the last assignment of a name is the one seen
    assert files(root, ["LANG=C", "LC_CTYPE=C.UTF-8"])[:3] == LOCALE
    assert files(root, ["LC_ALL=C.UTF-8", "LC_CTYPE=C"])[:3] == LOCALE
    assert files(root, ["LANG=C.UTF-8", "LANG=C"])[0] == "/etc/localtime"
    # a locale not compiled in the image: no LC_CTYPE, the alias table and converter still
    assert files(root, ["LANG=de_DE.UTF-8"])[:2] == LOCALE[1:]
    # the name as given, when the normalized one is absent
    _put(root, "usr/lib/locale/xx_YY.UTF-8/LC_CTYPE")
    assert files(root, ["LANG=xx_YY.UTF-8"])[0] == "/usr/lib/locale/xx_YY.UTF-8/LC_CTYPE"
    # GCONV_PATH first
    _put(root, "opt/gconv/gconv-modules.cache")
    got = files(root, ["LANG=C.UTF-8", "GCONV_PATH=/opt/gconv:relative"])
    assert got[2] == "/opt/gconv/gconv-modules.cache"


@pytest.mark.parametrize(("tz", "want"), [
    ("Europe/Paris", "/usr/share/zoneinfo/Europe/Paris"),
    (":Europe/Paris", "/usr/share/zoneinfo/Europe/Paris"),
    ("/usr/share/zoneinfo/Europe/Paris", "/usr/share/zoneinfo/Europe/Paris"),
    ("", None), ("UTC0", None), ("EST5EDT,M3.2.0,M11.1.0", None), ("../../../etc/x", None),
])
def test_the_zone_file_follows_tz(root: Path, tz: str, want: str | None) -> None:
    got = [p for p in files(root, [f"TZ={tz}"]) if "zoneinfo" in p or "localtime" in p]
    assert got == ([want] if want else [])


def test_only_glibc_programs_get_the_c_library_files(root: Path) -> None:
    for info in (MUSL, STATIC):
        assert files(root, ["LANG=C.UTF-8"], info=info) == PY_START + PY_SITE
    # a glibc program that is no python: the C library's files only
    _put(root, "usr/bin/bash")
    assert files(root, ["LANG=C.UTF-8"], program="/usr/bin/bash") == [*LOCALE, "/etc/localtime"]
    # nor python 2, nor a name that only looks like it
    for name in ("python2.7", "python3", "python3.11-config", "mypython3.11"):
        _put(root, f"usr/bin/{name}")
        assert files(root, [], program=f"/usr/bin/{name}") == ["/etc/localtime"], name


@pytest.mark.parametrize(("args", "site"), [
    (["python3", "-S", "-c", "pass"], False),
    (["python3", "-IS"], False),
    (["python3", "-X", "dev", "-S"], False),
    (["python3", "-Xdev", "-S", "x.py"], False),
    (["python3", "-W", "S", "x.py"], True),  # S is -W's value
    (["python3", "-c", "-S"], True),  # the command, then its own arguments
    (["python3", "-m", "mod", "-S"], True),
    (["python3", "script.py", "-S"], True),
    (["python3", "--", "-S"], True),
    (["python3", "-I", "-c", "pass"], True),
])
def test_dash_s_skips_the_site_files(root: Path, args: list[str], site: bool) -> None:
    got = files(root, [], args)
    assert got == ["/etc/localtime"] + PY_START + (PY_SITE if site else [])


def test_python_home_the_landmark_and_older_versions(root: Path) -> None:
    # PYTHONHOME names the prefix; without the os.py landmark there, nothing of python
    assert files(root, ["PYTHONHOME=/opt/py"]) == ["/etc/localtime"]
    for rel in ("opt/py/lib/python3.11/os.py", "opt/py/lib/python3.11/encodings/__init__.py",
                "opt/py/lib/python3.11/site-packages/z.pth"):
        _put(root, rel)
    assert files(root, ["PYTHONHOME=/opt/py:/opt/exec"]) == [
        "/etc/localtime", "/opt/py/lib/python3.11/encodings/__init__.py",
        "/opt/py/lib/python3.11/site-packages/z.pth"]
    # -E and -I: python ignores PYTHONHOME
    for flag in ("-E", "-I", "-BE"):
        assert files(root, ["PYTHONHOME=/opt/py"], ["python3", flag, "-c", "pass"]) == [
            "/etc/localtime", *PY_START, *PY_SITE], flag
    # the official images' layout: /usr/local, site-packages
    for rel in ("usr/local/bin/python3.9", "usr/local/lib/python3.9/os.py",
                "usr/local/lib/python3.9/__pycache__/site.cpython-39.pyc",
                "usr/local/lib/python3.9/__pycache__/io.cpython-39.pyc",
                "usr/local/lib/python3.9/encodings/__pycache__/utf_8.cpython-39.pyc",
                "usr/local/lib/python3.9/site-packages/distutils-precedence.pth"):
        _put(root, rel)
    # before 3.11 the modules 3.11 freezes are read from disk too
    assert files(root, [], program="/usr/local/bin/python3.9") == [
        "/etc/localtime", "/usr/local/lib/python3.9/encodings/__pycache__/utf_8.cpython-39.pyc",
        "/usr/local/lib/python3.9/__pycache__/io.cpython-39.pyc",
        "/usr/local/lib/python3.9/os.py",
        "/usr/local/lib/python3.9/__pycache__/site.cpython-39.pyc",
        "/usr/local/lib/python3.9/site-packages/distutils-precedence.pth"]


def test_nothing_outside_the_root_nor_not_a_file(root: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    outside = tmp_path / "host.pth"
    outside.write_text("import os\n")
    site = root / "usr/lib/python3/dist-packages"
    # an absolute symlink resolves inside the root, where there is nothing
    os.symlink(str(outside), site / "c.pth")
    os.symlink("../../../../../../" + str(outside), site / "d.pth")
    (site / "e.pth").mkdir()  # not a file
    os.symlink("/nope", root / "usr/share/locale/locale.alias.new")
    got = files(root, [])
    assert got == ["/etc/localtime", *PY_START, *PY_SITE]
    # the .pth files read per directory are bounded
    monkeypatch.setattr(startfiles, "MAX_PTH", 1)
    assert files(root, [])[-1] == "/usr/lib/python3/dist-packages/a.pth"


def test_locale_name_rules() -> None:
    assert normalize_codeset("UTF-8") == "utf8"
    assert normalize_codeset("ISO-8859-15") == "iso885915"
    assert normalize_codeset("8859-1") == "iso88591"
    assert locale_names("en_US.UTF-8@euro") == ["en_US.utf8@euro", "en_US.UTF-8@euro"]
    assert locale_names("C.utf8") == ["C.utf8"]
    assert locale_names("de_DE") == ["de_DE"]


def test_python_flags_end_where_python_stops_reading_options() -> None:
    assert python_flags(["python3", "-B", "-SE", "-c", "-I"]) == {"B", "S", "E"}
    assert python_flags(["python3", "-cS"]) == set()
    assert python_flags(["python3", "-X", "S", "-W", "I", "-O", "x.py", "-E"]) == {"O"}
    assert python_flags(["python3", "-Xfrozen_modules=off", "-I"]) == {"I"}
    assert python_flags(["python3", "--version", "-S"]) == set()
    assert python_flags(["python3"]) == set()
