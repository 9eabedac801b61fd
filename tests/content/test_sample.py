"""Sample image builders: reproducible busybox image, overlay upperdir -> layer tar, the cached
Debian + python3 image."""

from __future__ import annotations

import errno
import gzip
import io
import os
import py_compile
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ipfsnap.content import ImageStore, import_image
from ipfsnap.content.sample import (
    BUSYBOX_APPLETS,
    REMOVED_FILE,
    SAMPLE_MTIME,
    SampleImage,
    build_busybox,
    chroot_mounts,
    pyc_source,
    tar_directory,
    upperdir_to_tar,
)
from ipfsnap.oci import digest_hex, parse_config, sha256_digest
from tests.support import require_root


def _members(tar_bytes: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_busybox_is_reproducible(tmp_path: Path, busybox_image: SampleImage) -> None:
    again = build_busybox(tmp_path / "again")
    assert again.target == busybox_image.target
    assert again.layer_digests == busybox_image.layer_digests
    assert again.oci_archive is not None and busybox_image.oci_archive is not None
    assert again.oci_archive.read_bytes() == busybox_image.oci_archive.read_bytes()
    assert again.docker_archive is not None and busybox_image.docker_archive is not None
    assert again.docker_archive.read_bytes() == busybox_image.docker_archive.read_bytes()


def test_busybox_layers(busybox_image: SampleImage) -> None:
    lower, upper = (_members(t) for t in busybox_image.layer_tars)
    assert lower["bin/busybox"].mode == 0o755 and lower["bin/busybox"].isfile()
    for applet in BUSYBOX_APPLETS:
        assert lower[f"bin/{applet}"].issym() and lower[f"bin/{applet}"].linkname == "busybox"
    assert REMOVED_FILE in lower and lower["tmp"].mode == 0o1777
    assert upper["etc/.wh.removed.txt"].isfile() and upper["etc/.wh.removed.txt"].size == 0
    assert upper["hello-link.txt"].islnk() and upper["hello-link.txt"].linkname == "hello.txt"
    assert {m.mtime for m in [*lower.values(), *upper.values()]} == {1_700_000_000}
    blobs = busybox_image.blobs
    for digest, diff_id, tar in zip(
        busybox_image.layer_digests, busybox_image.diff_ids, busybox_image.layer_tars, strict=True
    ):
        raw = (blobs / digest_hex(digest)).read_bytes()
        assert sha256_digest(raw) == digest
        assert gzip.decompress(raw) == tar and sha256_digest(tar) == diff_id
    config = parse_config((blobs / digest_hex(busybox_image.config_digest)).read_bytes())
    assert config.diff_ids == busybox_image.diff_ids and config.cmd == ["/bin/sh"]
    assert busybox_image.files["hello.txt"] == b"Hello from layer 2\n"


def test_upperdir_to_tar(tmp_path: Path) -> None:
    """A real overlay mount: deleted files become whiteouts, a replaced directory gets an
    opaque marker, a new directory (also marked opaque by overlay) does not."""
    require_root()
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    (lower / "keep.txt").write_text("keep")
    (lower / "gone.txt").write_text("gone")
    (lower / "dir").mkdir()
    (lower / "dir" / "old.txt").write_text("old")
    subprocess.run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={lower},upperdir={upper},workdir={work}",
            str(merged),
        ],
        check=True,
    )
    try:
        (merged / "gone.txt").unlink()
        (merged / "dir" / "old.txt").unlink()
        os.rmdir(merged / "dir")
        (merged / "dir").mkdir()
        (merged / "dir" / "new.txt").write_text("new")
        (merged / "fresh").mkdir()
        (merged / "fresh" / "f.txt").write_text("f")
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    out = tmp_path / "layer.tar"
    upperdir_to_tar(upper, lower, out)
    members = _members(out.read_bytes())
    assert ".wh.gone.txt" in members
    assert "dir/.wh..wh..opq" in members and "dir/new.txt" in members
    assert "fresh/f.txt" in members and "fresh/.wh..wh..opq" not in members
    assert "keep.txt" not in members


def test_python_image(python_image: SampleImage, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "state")
    assert python_image.oci_archive is not None
    (rec,) = import_image(store, python_image.oci_archive)
    res = store.resolve(rec.name)
    assert res.config.cmd == ["/usr/bin/python3"]
    assert len(res.layers) == 2
    with store.blobs.open(res.layers[1].digest) as f, tarfile.open(fileobj=f, mode="r:gz") as t:
        names = set(t.getnames())
    assert "usr/bin/python3" in names
    with store.blobs.open(res.layers[0].digest) as f, tarfile.open(fileobj=f, mode="r:gz") as t:
        lower = set(t.getnames())
    assert ("usr/bin/python3" not in lower and "bin/bash" in lower) or "usr/bin/bash" in lower
    assert not any(n.endswith(".deb") for n in lower)
    # the standard library's bytecode matches its sources in the image (Debian compiles it
    # at install; the archive's fixed mtimes must not make it stale)
    with store.blobs.open(res.layers[1].digest) as f, tarfile.open(fileobj=f, mode="r:gz") as t:
        stamps = [struct.unpack("<I", t.extractfile(m).read(16)[8:12])[0]  # type: ignore[union-attr]
                  for m in t.getmembers()
                  if m.name.startswith("usr/lib/python3.11/__pycache__/") and m.isfile()]
    assert len(stamps) > 10 and set(stamps) == {SAMPLE_MTIME}


def _pyc_state(root: Path, module: str) -> str:
    """What Python says of ``module``'s cached bytecode under ``root`` ("valid"/"stale")."""
    proc = subprocess.run([sys.executable, "-v", "-B", "-c", f"import {module}"], cwd=root,
                          capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(root)})
    if f"matches {root}" in proc.stderr:
        return "valid"
    if "bytecode is stale" in proc.stderr:
        return "stale"
    raise AssertionError(proc.stderr[-2000:])


def _compile(src: Path, *, checked_hash: bool = False) -> Path:
    mode = (py_compile.PycInvalidationMode.CHECKED_HASH if checked_hash
            else py_compile.PycInvalidationMode.TIMESTAMP)
    return Path(py_compile.compile(str(src), doraise=True, invalidation_mode=mode))


def test_pyc_source_names() -> None:
    assert pyc_source(Path("/a/__pycache__/m.cpython-311.pyc")) == Path("/a/m.py")
    assert pyc_source(Path("/a/__pycache__/m.cpython-311.opt-2.pyc")) == Path("/a/m.py")
    assert pyc_source(Path("/a/m.pyc")) == Path("/a/m.py")
    assert pyc_source(Path("/a/m.py")) is None


def test_archives_keep_valid_pyc_files_valid(tmp_path: Path) -> None:
    """Every mtime becomes SAMPLE_MTIME in an archive; a .pyc that matched its source still
    matches it there (else Python reads and compiles the source at every start); a stale or
    hash-based one is left as it is."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("good", "stale", "hashed"):
        (src / f"{name}.py").write_text(f"NAME = {name!r}\n")
        os.utime(src / f"{name}.py", (1_750_000_000, 1_750_000_000))
    pycs = {"good": _compile(src / "good.py"), "stale": _compile(src / "stale.py"),
            "hashed": _compile(src / "hashed.py", checked_hash=True)}
    (src / "stale.py").write_text("NAME = 'edited after compiling'\n")
    # sources that are symlinks (Debian's sitecustomize.py -> /etc/python3.11/...): Python
    # checks the file they lead to, inside the image
    (src / "impl.py").write_text("NAME = 'impl'\n")
    os.utime(src / "impl.py", (1_750_000_000, 1_750_000_000))
    os.symlink("impl.py", src / "linked.py")
    os.symlink("/impl.py", src / "abslinked.py")
    pycs["linked"] = _compile(src / "linked.py")
    # what compiling abslinked.py inside the image gives: impl.py's stamp (same file)
    pycs["abslinked"] = pycs["linked"].with_name(
        pycs["linked"].name.replace("linked", "abslinked", 1))
    shutil.copy(pycs["linked"], pycs["abslinked"])
    hashed_before = pycs["hashed"].read_bytes()
    assert _pyc_state(src, "good") == "valid"  # the oracle: Python's own check

    out = tmp_path / "layer.tar"
    tar_directory(src, out)
    extracted = tmp_path / "x"
    with tarfile.open(out) as tar:
        tar.extractall(extracted, filter="fully_trusted")
    assert os.stat(extracted / "good.py").st_mtime == SAMPLE_MTIME
    assert _pyc_state(extracted, "good") == "valid"
    assert _pyc_state(extracted, "stale") == "stale"
    assert _pyc_state(extracted, "linked") == "valid"
    for name in ("linked", "abslinked"):
        stamp = (extracted / pycs[name].relative_to(src)).read_bytes()[8:12]
        assert struct.unpack("<I", stamp)[0] == SAMPLE_MTIME, name
    rel = pycs["hashed"].relative_to(src)
    assert (extracted / rel).read_bytes() == hashed_before
    header = (extracted / pycs["good"].relative_to(src)).read_bytes()[8:12]
    assert struct.unpack("<I", header)[0] == SAMPLE_MTIME


def test_upperdir_pyc_of_a_source_below(tmp_path: Path) -> None:
    """A layer's .pyc compiled for a source of a lower layer matches it in the image."""
    require_root()
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    (lower / "mod.py").write_text("X = 1\n")
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)],
                   check=True)
    try:
        _compile(merged / "mod.py")
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    out = tmp_path / "layer.tar"
    upperdir_to_tar(upper, lower, out)
    with tarfile.open(out) as tar:
        member = tar.extractfile("__pycache__/mod." + sys.implementation.cache_tag + ".pyc")
        assert member is not None
        assert struct.unpack("<I", member.read()[8:12])[0] == SAMPLE_MTIME


def test_chroot_mounts_keep_the_host_out_of_reach(tmp_path: Path) -> None:
    """A package script in the chroot may chmod /dev/null or write /proc/sys: neither
    reaches the host (a bind-mounted host /dev once left the machine's /dev/null 0644)."""
    require_root()
    root = tmp_path / "root"
    root.mkdir()
    host_null = os.stat("/dev/null")
    with chroot_mounts(root):
        null = root / "dev" / "null"
        st = os.stat(null)
        assert stat.S_ISCHR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666
        assert os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
        assert os.stat(root / "dev" / "zero").st_rdev == os.makedev(1, 5)
        os.chmod(null, 0o600)
        assert stat.S_IMODE(os.stat("/dev/null").st_mode) == stat.S_IMODE(host_null.st_mode)
        with pytest.raises(OSError) as err:
            (root / "proc/sys/kernel/hostname").write_text("changed-by-a-package\n")
        assert err.value.errno == errno.EROFS
        assert (root / "proc/self/status").read_text()  # readable
        assert os.readlink(root / "dev" / "fd") == "/proc/self/fd"
    mounts = Path("/proc/self/mounts").read_text()
    assert str(root) not in mounts
    assert os.stat("/dev/null").st_mode == host_null.st_mode
