"""runtime/warm.py: which files a command's exec reads, found as runc and ld.so would, read
inside the rootfs only; then on a real lazy layer mount: exactly those files' chunks fetched."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from ipfsnap.estargz import FileRangeReader, open_layer
from ipfsnap.runtime import warm
from ipfsnap.runtime.elf import ELFCLASS32
from ipfsnap.runtime.layers import LayeredTree
from ipfsnap.runtime.warm import ExecWarmer, WarmStats, library_dirs
from tests.fs.layers import Blob, Item, build_blob, pseudo_random
from tests.fs.mounts import fresh_status, labels_for, make_mounter, mounted
from tests.runtime.elfs import EM_AARCH64, ElfSpec, build_elf
from tests.support import require_fuse, require_root

MULTIARCH = "/usr/lib/x86_64-linux-gnu"
LD = "ld-linux-x86-64.so.2"


def program_files(body: int = 0) -> dict[str, bytes]:
    """A dynamically linked program as Debian lays it out (paths -> contents)."""
    return {
        "usr/bin/prog": build_elf(ElfSpec(interpreter=f"/lib64/{LD}",
                                          needed=("libfoo.so.1", "libc.so.6"),
                                          runpath="$ORIGIN/../lib/prog",
                                          body=pseudo_random(body, 1))),
        "usr/lib/prog/libfoo.so.1": build_elf(ElfSpec(needed=("libbar.so", "libc.so.6"))),
        f"{MULTIARCH[1:]}/libbar.so": build_elf(ElfSpec(needed=("libc.so.6",))),
        f"{MULTIARCH[1:]}/libc.so.6": build_elf(ElfSpec(needed=(LD,))),
        f"{MULTIARCH[1:]}/{LD}": build_elf(ElfSpec()),
        "etc/ld.so.cache": b"glibc-ld.so.cache1.1" + bytes(300),
        "usr/share/unrelated": pseudo_random(4096, 2),
    }


#: what warming ``prog`` must open, in container paths (ld.so reads its cache first)
PROG_CLOSURE = {"/usr/bin/prog", "/usr/lib/prog/libfoo.so.1", f"{MULTIARCH}/libbar.so",
                f"{MULTIARCH}/libc.so.6", f"{MULTIARCH}/{LD}", "/etc/ld.so.cache"}


def python_files(body: int = 0) -> dict[str, bytes]:
    """``program_files`` with the program named as CPython 3.11, and what its start reads
    after the loader under ``LANG=C.UTF-8`` (runtime/startfiles.py)."""
    files = program_files(body)
    files["usr/bin/python3.11"] = files.pop("usr/bin/prog")
    files.update({
        "usr/lib/python3.11/os.py": b"# the landmark\n",
        "usr/lib/python3.11/encodings/__init__.py": pseudo_random(3000, 4),
        "usr/lib/python3.11/encodings/utf_8.py": pseudo_random(900, 5),
        "usr/lib/python3/dist-packages/x.pth": b"import site\n",
        "usr/lib/locale/C.utf8/LC_CTYPE": pseudo_random(40 << 10, 6),
        "usr/lib/python3.11/encodings/cp1252.py": pseudo_random(1000, 7),  # not read
    })
    return files


#: what warming ``python3.11`` must open besides its exec closure
PY_START = {"/usr/lib/locale/C.utf8/LC_CTYPE", "/usr/lib/python3.11/encodings/__init__.py",
            "/usr/lib/python3.11/encodings/utf_8.py", "/usr/lib/python3/dist-packages/x.pth"}
PY_CLOSURE = PROG_CLOSURE - {"/usr/bin/prog"} | {"/usr/bin/python3.11"}
PY_ENV = ["PATH=/usr/bin", "LANG=C.UTF-8"]


def make_rootfs(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(0o755)
    # Debian's merged /usr: /lib64 is an absolute-looking way to the multiarch directory
    if not (root / "lib64").exists():
        os.symlink(MULTIARCH, root / "lib64")
    return root


def warm_in(root: Path, args: list[str], env: list[str] | None = None, cwd: str = "/",
            budget: int = 64 << 20, start_files: bool = True) -> WarmStats:
    w = ExecWarmer(root, budget, start_files=start_files)
    w.start(args, env if env is not None else ["PATH=/usr/local/bin:/usr/bin:/bin"], cwd)
    assert w.wait(30), "the warm-up did not finish"
    return w.stop()


def test_program_interpreter_and_libraries_found_as_the_loader_does(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root", program_files())
    st = warm_in(root, ["prog", "--flag"])
    assert set(st.paths) == PROG_CLOSURE and st.skipped == 0
    assert st.paths[0] == "/usr/bin/prog"  # the executable first: the exec reads it first
    assert st.bytes == sum(len(d) for r, d in program_files().items() if "unrelated" not in r)


def test_then_what_the_programs_start_reads(tmp_path: Path) -> None:
    """After the exec's files, the C library's and python's start files (not other ones of
    the standard library); none with ``start_files`` off, nor for a script's arguments."""
    root = make_rootfs(tmp_path / "root", python_files())
    st = warm_in(root, ["python3.11", "-c", "pass"], PY_ENV)
    assert set(st.paths) == PY_CLOSURE | PY_START and st.skipped == 0
    assert set(warm_in(root, ["python3.11", "-S"], PY_ENV).paths) == (
        PY_CLOSURE | PY_START) - {"/usr/lib/python3/dist-packages/x.pth"}
    assert set(warm_in(root, ["python3.11"], PY_ENV, start_files=False).paths) == PY_CLOSURE
    # through a #! script: the interpreter's start files, its options not taken from the
    # script's arguments
    (root / "usr/bin/tool").write_bytes(b"#!/usr/bin/python3.11\nprint(1)\n")
    (root / "usr/bin/tool").chmod(0o755)
    st = warm_in(root, ["tool", "-S"], PY_ENV)
    assert set(st.paths) == PY_CLOSURE | PY_START | {"/usr/bin/tool"}


def test_absolute_and_relative_commands(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root", program_files())
    assert set(warm_in(root, ["/usr/bin/prog"]).paths) == PROG_CLOSURE
    assert set(warm_in(root, ["./prog"], cwd="/usr/bin").paths) == PROG_CLOSURE
    # PATH from the container's environment (the last entry wins, as the process sees it)
    st = warm_in(root, ["prog"], env=["PATH=/usr/bin", "PATH=/nowhere"])
    assert st.files == 0 and st.skipped == 1


def test_wrong_machine_candidate_is_passed_over(tmp_path: Path) -> None:
    files = program_files()
    files["opt/arm/libc.so.6"] = build_elf(ElfSpec(machine=EM_AARCH64))
    files["opt/arm32/libbar.so"] = build_elf(ElfSpec(elf_class=ELFCLASS32))
    root = make_rootfs(tmp_path / "root", files)
    st = warm_in(root, ["prog"], env=["PATH=/usr/bin", "LD_LIBRARY_PATH=/opt/arm:/opt/arm32"])
    assert set(st.paths) == PROG_CLOSURE


def test_scripts_lead_to_their_interpreter_with_the_kernels_depth_limit(tmp_path: Path) -> None:
    files = program_files()
    files["usr/bin/s0"] = b"#!/usr/bin/prog -x\necho\n"
    for i in range(1, 7):  # s6 -> s5 -> ... -> s0 -> prog: deeper than the kernel follows
        files[f"usr/bin/s{i}"] = f"#! /usr/bin/s{i - 1}\n".encode()
    root = make_rootfs(tmp_path / "root", files)
    assert set(warm_in(root, ["s0"]).paths) == {"/usr/bin/s0"} | PROG_CLOSURE
    deep = warm_in(root, ["s6"]).paths
    assert deep == ("/usr/bin/s6", "/usr/bin/s5", "/usr/bin/s4", "/usr/bin/s3", "/usr/bin/s2")


def test_nothing_outside_the_root_and_no_special_file_is_opened(tmp_path: Path) -> None:
    outside = tmp_path / "host-secret.so"
    outside.write_bytes(build_elf(ElfSpec()))
    files = program_files()
    del files[f"{MULTIARCH[1:]}/libbar.so"]
    root = make_rootfs(tmp_path / "root", files)
    # libbar.so: a symlink climbing out, then a fifo (opening it to read would block forever)
    os.symlink("../../../../../../../../" + str(outside)[1:], root / MULTIARCH[1:] / "libbar.so")
    os.mkfifo(root / "usr/lib/prog/libbar.so")
    os.symlink(str(outside), root / "usr/bin/abs")  # absolute: resolved inside the root
    st = warm_in(root, ["prog"])
    assert set(st.paths) == PROG_CLOSURE - {f"{MULTIARCH}/libbar.so"}
    assert st.skipped == 1  # libbar.so: not found (inside the root)
    assert warm_in(root, ["abs"]).paths == ()
    assert stat.S_ISFIFO(os.stat(root / "usr/lib/prog/libbar.so").st_mode)


def test_budget_and_file_count_bound_the_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    root = make_rootfs(tmp_path / "root", program_files(body=3 << 20))
    st = warm_in(root, ["prog"], budget=1 << 20)
    assert st.bytes == 1 << 20 and "/usr/bin/prog" in st.paths
    monkeypatch.setattr(warm, "MAX_FILES", 2)
    assert warm_in(root, ["prog"]).files == 2


def test_nothing_to_do(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root", program_files())
    assert warm_in(root, ["prog"], budget=0) == WarmStats(seconds=0.0)
    assert warm_in(root, []).files == 0
    assert warm_in(root, ["usr"]).skipped == 1  # a directory, not a program


def test_library_dirs_order_and_tokens() -> None:
    from ipfsnap.runtime.elf import ElfInfo

    info = ElfInfo(2, 1, 62, None, ("x",), ("$ORIGIN/../lib", "${ORIGIN}", "/a/$LIB", "rel"))
    dirs = library_dirs(info, "/opt/app/bin", ["LD_LIBRARY_PATH=/ld1::/ld2"])
    assert dirs[:4] == ["/opt/app/bin/../lib", "/opt/app/bin", "/ld1", "/ld2"]
    assert dirs[4:6] == ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"]
    assert dirs[-3:] == ["/lib", "/usr/lib", "/usr/local/lib"]


def test_stop_ends_every_thread(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root", program_files(body=8 << 20))
    w = ExecWarmer(root, 64 << 20, window=4096)
    w.start(["prog"], ["PATH=/usr/bin"])
    w.stop()
    deadline = time.monotonic() + 5
    while any(t.is_alive() for t in w._threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.is_alive() for t in w._threads)
    assert w.stats().bytes <= 64 << 20


def test_warming_the_layers_of_an_image_before_any_container(tmp_path: Path) -> None:
    """What the snapshotter does after a pull: the same closure found through the layers as
    overlayfs would merge them; a whiteout in an upper layer hides a library (and what only
    it needs)."""
    require_root()  # a whiteout is a device node
    files = program_files()
    upper = {r: d for r, d in files.items() if r.startswith("usr/bin/")}
    top = make_rootfs(tmp_path / "top", upper)
    low = make_rootfs(tmp_path / "low", {r: d for r, d in files.items() if r not in upper})
    os.unlink(top / "lib64")  # one layer has it: the lower one's
    layered = LayeredTree([top, low])
    w = ExecWarmer(layered, 64 << 20)
    w.start(["prog"], ["PATH=/usr/bin"])
    assert w.wait(30)
    st = w.stop()
    assert set(st.paths) == PROG_CLOSURE and st.skipped == 0
    assert st.bytes == sum(len(d) for r, d in files.items() if "unrelated" not in r)

    (top / "usr/lib/prog").mkdir(parents=True)
    os.mknod(top / "usr/lib/prog/libfoo.so.1", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    w = ExecWarmer(LayeredTree([top, low]), 64 << 20)
    w.start(["prog"], ["PATH=/usr/bin"])
    assert w.wait(30)
    st = w.stop()
    assert set(st.paths) == PROG_CLOSURE - {"/usr/lib/prog/libfoo.so.1", f"{MULTIARCH}/libbar.so"}
    assert st.skipped == 1  # libfoo.so.1: not found


# -- a real lazy layer ------------------------------------------------------------------------


def extents(blob: Blob, paths: set[str]) -> int:
    with open(blob.path, "rb") as f:
        index = open_layer(FileRangeReader(f), blob.size)
        return sum(c.end - c.offset for p in paths for c in index.chunks(p))


def test_on_a_lazy_mount_exactly_the_execs_chunks_are_fetched(tmp_path: Path) -> None:
    """The warm-up fetches every chunk of the program's files and nothing else, and the
    program's own reads afterwards need no fetch."""
    require_fuse()
    files = program_files(body=300 << 10)  # several of the tests' 64 KiB chunks
    files["usr/share/unrelated"] = pseudo_random(400 << 10, 3)
    items = [Item(d, "dir", mode=0o755) for d in
             ("etc", "usr", "usr/bin", "usr/lib", "usr/lib/prog", "usr/lib/x86_64-linux-gnu",
              "usr/share")]
    items += [Item(rel, "file", data, mode=0o755) for rel, data in files.items()]
    items.append(Item("lib64", "symlink", link=MULTIARCH, mode=0o777))
    blob = build_blob(items, tmp_path / "layer.blob")
    m = make_mounter(tmp_path / "state", background=False)
    with mounted(m, tmp_path / "mp", labels_for(blob)) as mp:
        assert fresh_status(m, mp)["fetched_bytes"] == 0
        st = warm_in(mp, ["prog"])
        assert set(st.paths) == PROG_CLOSURE
        want = extents(blob, {p.lstrip("/") for p in PROG_CLOSURE})
        assert fresh_status(m, mp)["fetched_bytes"] == want
        for rel, data in files.items():
            if "unrelated" not in rel:
                assert (mp / rel).read_bytes() == data
        assert fresh_status(m, mp)["fetched_bytes"] == want


def test_on_a_lazy_mount_the_start_files_are_fetched_too(tmp_path: Path) -> None:
    """With a python program: the exec's and the start's chunks, and not the chunks of the
    library's other files."""
    require_fuse()
    files = python_files(body=300 << 10)
    dirs = sorted({str(Path(rel).parents[i]) for rel in files
                   for i in range(len(Path(rel).parts) - 1)})
    items = [Item(d, "dir", mode=0o755) for d in dirs]
    items += [Item(rel, "file", data, mode=0o755) for rel, data in files.items()]
    items.append(Item("lib64", "symlink", link=MULTIARCH, mode=0o777))
    blob = build_blob(items, tmp_path / "layer.blob")
    m = make_mounter(tmp_path / "state", background=False)
    with mounted(m, tmp_path / "mp", labels_for(blob)) as mp:
        st = warm_in(mp, ["python3.11", "-c", "pass"], PY_ENV)
        assert set(st.paths) == PY_CLOSURE | PY_START
        want = extents(blob, {p.lstrip("/") for p in PY_CLOSURE | PY_START})
        assert want < extents(blob, set(files)) and fresh_status(m, mp)["fetched_bytes"] == want


def test_the_start_files_wait_until_each_library_asked_for_its_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer serves a few fetches at once: a start file must not take a library's place.
    While the open of one library the program needs hangs, no start file is opened; then
    all of them are."""
    root = make_rootfs(tmp_path / "root", python_files())
    release = threading.Event()
    real_open = ExecWarmer._open

    def slow_open(self: ExecWarmer, real: Path | None) -> int | None:
        if real is not None and real.name == "libfoo.so.1":
            release.wait(30)
        return real_open(self, real)

    monkeypatch.setattr(ExecWarmer, "_open", slow_open)
    w = ExecWarmer(root, 64 << 20)
    w.start(["python3.11", "-c", "pass"], PY_ENV)
    deadline = time.monotonic() + 30
    while not {f"{MULTIARCH}/libc.so.6", "/etc/ld.so.cache"} <= set(w.stats().paths):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)
    assert not set(w.stats().paths) & PY_START
    release.set()
    assert w.wait(30)
    assert set(w.stop().paths) == PY_CLOSURE | PY_START


def test_gate_fires_once_after_close_and_every_ticket() -> None:
    fired: list[int] = []
    gate = warm._Gate(lambda: fired.append(1))
    a, b = gate.ticket(), gate.ticket()
    a.punch()
    a.punch()  # once per ticket
    gate.close()
    assert fired == []
    b.punch()
    assert fired == [1]
    b.punch()
    gate.close()
    assert fired == [1]
    empty = warm._Gate(lambda: fired.append(2))
    empty.close()
    assert fired == [1, 2]
