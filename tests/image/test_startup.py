"""image/startup.py: ipfs-push's start-up layout. The files the image's own command reads at
its start are found in the layers without running anything (the exec warm-up's rules over
the merged layer tars: PATH, symlinks, ld.so, DT_NEEDED, whiteouts, opaque directories, a
hardlinked library, python's start files) and the conversion puts them before each layer's
prefetch landmark; ``--layout=plain`` keeps the layers' own order. The real Debian python
image goes through the same in tests/e2e/test_seed_workflow.py."""

from __future__ import annotations

import logging
import re
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from ipfsnap.cli.main import main
from ipfsnap.content import ImageStore
from ipfsnap.estargz import open_layer
from ipfsnap.estargz.types import BytesRangeReader
from ipfsnap.image.convert import ConvertOptions, state_paths
from ipfsnap.image.record import MergedTree
from ipfsnap.image.startup import ImageTree, push_layout, startup_files, startup_layout
from ipfsnap.ipfs.node import ManagedNode
from ipfsnap.oci import Descriptor, Index, host_platform, mediatypes, parse_platform
from tests.fs.layers import Item, make_tar, pseudo_random
from tests.image.test_convert import CHUNK, Layer, convert, gzip_layer, make_image
from tests.runtime.elfs import EM_AARCH64, ElfSpec, build_elf

LIBDIR = "usr/lib/x86_64-linux-gnu"
SITE = "usr/lib/python3/dist-packages"
STDLIB = "usr/lib/python3.11"
LOADER = f"{LIBDIR}/ld-linux-x86-64.so.2"


def _tars() -> list[bytes]:
    """Three layers: base (loader, libc, user database, zone), python (a PT_INTERP/DT_NEEDED
    executable, a hardlinked library, the standard library's landmark and encodings), top (a
    new /etc/passwd, a whited-out library, an opaque site directory)."""
    python = build_elf(ElfSpec(interpreter="/lib64/ld-linux-x86-64.so.2",
                               needed=("libc.so.6", "libfoo.so.1", "libgone.so.1"),
                               body=pseudo_random(3 * CHUNK + 5, 1)))
    return [
        make_tar([
            Item("etc", "dir", mode=0o755),
            Item("etc/passwd", "file", b"root:x:0:0::/:/bin/sh\n"),
            Item("etc/group", "file", b"root:x:0:\n"),
            Item("etc/localtime", "symlink", link="/usr/share/zoneinfo/Etc/UTC"),
            Item(LOADER, "file", build_elf(ElfSpec(body=pseudo_random(CHUNK, 2))), 0o755),
            Item("lib64", "dir", mode=0o755),
            Item("lib64/ld-linux-x86-64.so.2", "symlink", link=f"/{LOADER}"),
            Item(f"{LIBDIR}/libc.so.6", "file", build_elf(ElfSpec(body=pseudo_random(CHUNK, 3)))),
            Item(f"{LIBDIR}/libgone.so.1", "file", build_elf(ElfSpec())),
            Item("usr/share/zoneinfo/Etc/UTC", "file", b"TZif2" + bytes(100)),
            Item("usr/bin/unrelated", "file", pseudo_random(2 * CHUNK, 4), 0o755),
            Item(f"{SITE}/old.pth", "file", b"import old\n"),
        ]),
        make_tar([
            Item("usr/bin/python3.11", "file", python, 0o755),
            Item("usr/bin/python3", "symlink", link="python3.11"),
            Item(f"{LIBDIR}/libfoo-real.so", "file",
                 build_elf(ElfSpec(needed=("libc.so.6",), body=pseudo_random(CHUNK, 5)))),
            Item(f"{LIBDIR}/libfoo.so.1", "hardlink", link=f"{LIBDIR}/libfoo-real.so"),
            Item(f"{STDLIB}/os.py", "file", pseudo_random(CHUNK, 6)),
            Item(f"{STDLIB}/encodings/__init__.py", "file", b"# codecs\n"),
            Item(f"{STDLIB}/encodings/unrelated.py", "file", pseudo_random(CHUNK, 7)),
        ]),
        make_tar([
            Item("etc/passwd", "file", b"root:x:0:0::/root:/bin/sh\n"),
            Item(f"{LIBDIR}/.wh.libgone.so.1", "file"),
            Item(f"{SITE}/.wh..wh..opq", "file"),
            Item(f"{SITE}/new.pth", "file", b"import new\n"),
        ]),
    ]


#: what the image's command (python3 -c pass) reads at its start, per layer
EXPECTED = [
    ["etc/group", LOADER, f"{LIBDIR}/libc.so.6", "usr/share/zoneinfo/Etc/UTC"],
    ["usr/bin/python3.11", f"{STDLIB}/encodings/__init__.py", f"{LIBDIR}/libfoo.so.1"],
    ["etc/passwd", f"{SITE}/new.pth"],
]


PROCESS: dict[str, object] = {
    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["python3", "-c", "pass"]}


@pytest.fixture
def python_like(image_store: ImageStore) -> Descriptor:
    return make_image(image_store, "test/startup:1", [gzip_layer(t) for t in _tars()],
                      process=PROCESS)


def test_the_commands_start_up_files_are_found_per_layer(
    image_store: ImageStore, state_dir: Path, python_like: Descriptor
) -> None:
    image = image_store.resolve("test/startup:1")
    found = startup_files(image_store, image, tmp_dir=state_dir / "tmp")
    assert found is not None
    assert [sorted(f) for f in found.files.files] == [sorted(f) for f in EXPECTED]
    # the user database first, then the executable (through its symlink), the loader
    assert found.paths[:3] == ("/etc/passwd", "/etc/group", "/usr/bin/python3.11")
    # nothing is left behind in the temp dir (spools, copies)
    assert list((state_dir / "tmp").iterdir()) == []


def test_the_layout_puts_them_before_the_landmark(
    image_store: ImageStore, state_dir: Path, python_like: Descriptor
) -> None:
    image = image_store.resolve("test/startup:1")
    tmp = state_paths(state_dir)[1]
    per_layer = startup_layout(image_store, image, tmp_dir=tmp)
    # the same lists every time (the conversion's input: same image, same bytes and CIDs)
    assert per_layer == startup_layout(image_store, image, tmp_dir=tmp)
    assert [d for d, _ in per_layer] == [x.digest for x in image.layers]
    opts = ConvertOptions(chunk_size=CHUNK, level=1, prioritize_per_layer=per_layer,
                          rebuild_prioritized=False)
    result = convert(image_store, python_like, state_dir, opts)
    man = image_store.read_manifest(result.target)
    for desc, files in zip(man.layers, EXPECTED, strict=True):
        blob = image_store.blobs.read(desc.digest)
        index = open_layer(BytesRangeReader(blob), len(blob))
        assert index.prefetch_end > 0
        for path in files:
            entry = index.entry(path)
            assert entry is not None, path
            # a hardlink's bytes are its target's, which comes first
            data = index.entry(entry.link_name) if entry.type == "hardlink" else entry
            assert data is not None and data.offset < index.prefetch_end, path
        for path in ("usr/bin/unrelated", f"{STDLIB}/encodings/unrelated.py"):
            entry = index.entry(path)
            assert entry is None or entry.offset > index.prefetch_end, path


def test_a_layer_that_is_estargz_already_is_kept(
    image_store: ImageStore, state_dir: Path, python_like: Descriptor
) -> None:
    plain = convert(image_store, python_like, state_dir,
                    ConvertOptions(chunk_size=CHUNK, level=1))
    image_store.put("test/startup:estargz", plain.target)
    image = image_store.resolve("test/startup:estargz")
    per_layer = startup_layout(image_store, image, tmp_dir=state_dir / "tmp")
    assert len(per_layer) == 3  # found in the eStargz layers too
    again = convert(image_store, plain.target, state_dir / "2",
                    ConvertOptions(chunk_size=CHUNK, level=1, prioritize_per_layer=per_layer,
                                   rebuild_prioritized=False))
    assert again.target == plain.target and again.built == 0


def test_no_command_or_an_unreadable_layer_gives_the_plain_layout(
    image_store: ImageStore, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tars = _tars()
    make_image(image_store, "test/nocmd:1", [gzip_layer(t) for t in tars], process={})
    image = image_store.resolve("test/nocmd:1")
    assert startup_layout(image_store, image, tmp_dir=state_dir / "tmp") == ()
    broken = gzip_layer(tars[1])
    broken = Layer(broken.blob[: len(broken.blob) // 2], broken.media_type, broken.tar)
    make_image(image_store, "test/broken:1", [gzip_layer(tars[0]), broken], process=PROCESS)
    image = image_store.resolve("test/broken:1")
    with caplog.at_level(logging.INFO, logger="ipfsnap.image.startup"):
        assert startup_layout(image_store, image, tmp_dir=state_dir / "tmp") == ()
    assert re.search(r"image docker.io/test/broken:1: start-up files not found \(layer "
                     rf"{image.layers[1].digest}: .*corrupt gzip stream.*\): plain layout",
                     caplog.text), caplog.text
    assert list((state_dir / "tmp").iterdir()) == []


def test_image_tree_reads_as_overlayfs(tmp_path: Path) -> None:
    """lstat/readlink/listdir/host_path of the merged tars (whiteouts and opaque directories
    hide lower entries, a hardlink reads its target's bytes)."""
    import io
    import tarfile

    spools = []
    tree = MergedTree()
    for i, tar in enumerate(_tars()):
        f = tmp_path / f"l{i}"
        f.write_bytes(tar)
        spools.append(f.open("rb"))
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            tree.merge_layer(i, tf.getmembers())
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    t = ImageTree(tree, spools, scratch)
    try:
        assert sorted(t.listdir(SITE.split("/"))) == ["new.pth"]
        assert "libgone.so.1" not in t.listdir(LIBDIR.split("/"))
        assert t.lstat([*LIBDIR.split("/"), "libgone.so.1"]) is None
        st = t.lstat(["usr", "bin", "python3"])
        assert st is not None and stat.S_ISLNK(st.st_mode)
        assert t.readlink(["usr", "bin", "python3"]) == "python3.11"
        with pytest.raises(OSError):
            t.readlink(["etc", "passwd"])
        st = t.lstat([*LIBDIR.split("/"), "libfoo.so.1"])
        assert st is not None and stat.S_ISREG(st.st_mode)
        copy = t.host_path([*LIBDIR.split("/"), "libfoo.so.1"])
        real = t.host_path([*LIBDIR.split("/"), "libfoo-real.so"])
        assert copy is not None and real is not None
        assert copy.read_bytes() == real.read_bytes() and copy.read_bytes()[:4] == b"\x7fELF"
        host = t.host_path(["etc", "passwd"])
        assert host is not None and host.read_bytes() == b"root:x:0:0::/root:/bin/sh\n"
        assert t.host_path(["etc"]) is None and t.host_path(["nothing"]) is None
        assert t.listdir(["etc", "passwd"]) == []
        st = t.lstat([])
        assert st is not None and stat.S_ISDIR(st.st_mode)
    finally:
        for s in spools:
            s.close()


def _prefetch_has(store: ImageStore, ref: str, layer: int, path: str) -> bool:
    man = store.read_manifest(store.get(ref).target)
    blob = store.blobs.read(man.layers[layer].digest)
    index = open_layer(BytesRangeReader(blob), len(blob))
    entry = index.entry(path)
    assert entry is not None
    return index.prefetch_end > entry.offset


def test_ipfs_push_uses_it_unless_told_plain(
    image_store: ImageStore, state_dir: Path, python_like: Descriptor, ipfs_node: ManagedNode,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--state-dir", str(state_dir), "--ipfs-api", ipfs_node.api_multiaddr,
            "image", "ipfs-push", "--level", "1"]
    assert main([*argv, "test/startup:1"]) == 0
    cid = capsys.readouterr().out.strip()
    assert _prefetch_has(image_store, f"ipfs://{cid}", 1, "usr/bin/python3.11")
    assert not _prefetch_has(image_store, f"ipfs://{cid}", 0, "usr/bin/unrelated")
    assert main([*argv, "--layout=plain", "test/startup:1"]) == 0
    plain = capsys.readouterr().out.strip()
    assert plain != cid
    assert not _prefetch_has(image_store, f"ipfs://{plain}", 1, "usr/bin/python3.11")
    # --prioritize replaces it
    assert main([*argv, "--prioritize", "usr/bin/unrelated", "test/startup:1"]) == 0
    chosen = capsys.readouterr().out.strip()
    assert _prefetch_has(image_store, f"ipfs://{chosen}", 0, "usr/bin/unrelated")
    assert not _prefetch_has(image_store, f"ipfs://{chosen}", 1, "usr/bin/python3.11")


def test_every_platform_the_push_keeps_gets_its_files(
    image_store: ImageStore, state_dir: Path
) -> None:
    """An index of two platforms sharing the base layer: with --all-platforms each
    platform's own layer gets its command's files and the shared base gets both lists;
    without, only this machine's platform is looked up (as the conversion selects)."""
    tars = _tars()
    arm_tool = make_tar([Item("usr/bin/tool", "file", build_elf(ElfSpec(
        machine=EM_AARCH64, interpreter="/lib/ld-linux-aarch64.so.1",
        needed=("libc.so.6",))), 0o755),
        Item("lib/ld-linux-aarch64.so.1", "file", build_elf(ElfSpec(machine=EM_AARCH64))),
        Item("lib/aarch64-linux-gnu/libc.so.6", "file",
             build_elf(ElfSpec(machine=EM_AARCH64)))])
    amd = make_image(image_store, "test/amd:1", [gzip_layer(t) for t in tars],
                     process=PROCESS)
    arm = make_image(image_store, "test/arm:1", [gzip_layer(tars[0]), gzip_layer(arm_tool)],
                     process={"Cmd": ["/usr/bin/tool"]})
    host = host_platform()
    other = parse_platform("linux/arm64" if str(host) != "linux/arm64" else "linux/amd64")
    index = Index(mediatypes.OCI_INDEX, (replace(amd, platform=host),
                                         replace(arm, platform=other)))
    data = index.to_bytes()
    image_store.put("test/multi:1", Descriptor(mediatypes.OCI_INDEX,
                                               image_store.blobs.write(data), len(data)))
    base = image_store.resolve("test/amd:1").layers[0].digest
    tool = image_store.resolve("test/arm:1").layers[1].digest
    tmp = state_dir / "tmp"

    every = dict(push_layout(image_store, "test/multi:1", all_platforms=True, tmp_dir=tmp))
    assert every[tool] == ("lib/aarch64-linux-gnu/libc.so.6", "lib/ld-linux-aarch64.so.1",
                           "usr/bin/tool")
    assert set(every[base]) == set(EXPECTED[0]) | {"etc/passwd"}  # the arm image's user db
    assert len(every) == 4

    mine = dict(push_layout(image_store, "test/multi:1", tmp_dir=tmp))
    assert tool not in mine and set(mine[base]) == set(EXPECTED[0])
    only = dict(push_layout(image_store, "test/multi:1", platforms=(other,), tmp_dir=tmp))
    assert set(only) == {base, tool}
