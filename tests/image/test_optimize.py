"""``ipfsnap image optimize``: recording a workload's file accesses and rebuilding the layers
with those files before ``.prefetch.landmark``.

Pure tests (trace parsing, mapping paths to layers) run anywhere; the recording ones need
root, runc and strace (they FAIL without them) and share one optimized busybox image.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipfsnap.content import ImageStore
from ipfsnap.content.archive import import_image
from ipfsnap.content.sample import PASSWD, SampleImage
from ipfsnap.errors import UsageError
from ipfsnap.estargz import (
    PREFETCH_LANDMARK,
    TOC_DIGEST_ANNOTATION,
    FileRangeReader,
    open_layer,
    verify_blob,
)
from ipfsnap.image import record as record_module
from ipfsnap.image.convert import ConvertOptions
from ipfsnap.image.errors import RecordError
from ipfsnap.image.optimize import OptimizeResult, optimize_image
from ipfsnap.image.record import Workload, parse_command, parse_trace, resolve_files
from ipfsnap.image.snapshotters import SNAPSHOTS_DIR
from ipfsnap.ipfs.node import ManagedNode
from ipfsnap.oci import sha256_digest
from ipfsnap.oci.types import parse_config
from ipfsnap.runtime.containers import mountinfo_targets
from ipfsnap.runtime.errors import ImageConfigError
from tests.fs.layers import Blob
from tests.fs.mounts import labels_for, make_mounter, mounted
from tests.support import require_fuse, require_root, require_tool

#: the sample workload: a shell reading a file of each layer and listing a directory
SCRIPT = "cat /etc/passwd; ls /bin; cat /hello.txt"
#: what it must record, per layer: the shell (a symlink) and the binary it points to, then
#: the files read, each in the layer that provides it; directories (/bin) and paths outside
#: the image (/proc/self/exe, /dev/null) are not files of the image
EXPECTED = [["bin/sh", "bin/busybox", "etc/passwd"], ["hello.txt"]]
TIMEOUT = 180


# -- pure -------------------------------------------------------------------------------------

RUNC_TRACE = """\
100 execve("/usr/sbin/runc", ["/usr/sbin/runc", "--root", "/s/runc", "run", "x"], 0x1) = 0
100 openat(AT_FDCWD, "/s/containers/x/config.json", O_RDONLY|O_CLOEXEC) = 3
100 clone3({flags=CLONE_VM}, 88) = 101
101 clone(child_stack=NULL, flags=CLONE_VM|CLONE_VFORK|SIGCHLD <unfinished ...>
102 execve("/proc/self/exe", ["/usr/sbin/runc", "init"], 0x2 /* 7 vars */ <unfinished ...>
101 <... clone resumed>)              = 102
102 <... execve resumed>)             = 0
102 execveat(6, "", ["/usr/sbin/runc", "init"], 0x3 /* 8 vars */, AT_EMPTY_PATH) = 0
102 clone(child_stack=0x7, flags=CLONE_PARENT|SIGCHLD) = 103
103 openat(AT_FDCWD, "/proc/self/setgroups", O_RDWR) = 4
103 execve("/bin/sh", ["/bin/sh", "-c", "x"], 0x4 /* 2 vars */) = 0
103 openat(AT_FDCWD, "/etc/passwd", O_RDONLY) = 3
103 clone(child_stack=NULL, flags=SIGCHLD) = 2
104 openat(AT_FDCWD, "/missing", O_RDONLY) = -1 ENOENT (No such file or directory)
104 chdir("/usr") = 0
104 openat(AT_FDCWD, "lib/x", O_RDONLY <unfinished ...>
100 openat(AT_FDCWD, "/s/runc/x/state.json", O_RDONLY) = 5
104 <... openat resumed>) = 3
104 openat(3, "rel", O_RDONLY) = 4
104 open("/tmp/sp\\303\\251cial\\n", O_RDONLY) = 5
104 execve("/bin/cat", ["cat", "/etc/passwd"], 0x5 /* 2 vars */) = 0
104 +++ exited with 0 +++
100 openat(AT_FDCWD, "/s/runc", O_RDONLY) = 6
"""


def test_parse_trace_keeps_only_the_containers_successful_accesses() -> None:
    got = parse_trace(RUNC_TRACE.splitlines(keepends=True), cwd="/")
    # runc's own opens (before and after the container ran) are out; so are failed calls
    # and opens relative to a directory fd; a relative path follows the process's chdir;
    # repeated paths count once; strace's octal escapes are decoded (UTF-8 é, newline)
    assert got == ["/bin/sh", "/etc/passwd", "/usr/lib/x", "/tmp/spécial\n", "/bin/cat"]


def test_parse_command_json_or_shell() -> None:
    assert parse_command('["/bin/sh", "-c", "a b"]', "--args") == ("/bin/sh", "-c", "a b")
    assert parse_command("/bin/sh -c 'a b'", "--args") == ("/bin/sh", "-c", "a b")
    with pytest.raises(UsageError, match="--args"):
        parse_command('["x", 1]', "--args")
    with pytest.raises(UsageError, match="--args"):
        parse_command("'unterminated", "--args")


@pytest.mark.parametrize(("text", "why"), [
    # past the recursion limit (1000): json.loads raised RecursionError, a traceback
    ("[" * 4000, "not a JSON array: nested too deeply"),
    ("[" * 4000 + "]" * 4000, "not a JSON array: nested too deeply"),  # well-formed, as deep
    ('["x", ["y"]]', "must be a JSON array of strings"),
    ('["x"', "not a JSON array: "),
])
def test_parse_command_refuses_bad_json_arrays_with_a_usage_error(text: str, why: str) -> None:
    with pytest.raises(UsageError, match=r"^--entrypoint '\[") as info:
        parse_command(text, "--entrypoint")
    assert why in str(info.value)
    assert "\n" not in str(info.value)  # one line


@pytest.fixture
def busybox_store(state_dir: Path, busybox_image: SampleImage) -> tuple[ImageStore, str]:
    store = ImageStore(state_dir)
    records = import_image(store, busybox_image.layout)
    return store, records[0].name


def test_resolve_files_maps_paths_to_their_top_layer(
    busybox_store: tuple[ImageStore, str], busybox_image: SampleImage
) -> None:
    store, name = busybox_store
    layers = store.resolve(name).layers
    accessed = [
        "/bin/cat",  # symlink in layer 1 -> busybox
        "/hello-link.txt",  # hardlink in layer 2
        "/etc/removed.txt",  # whited out by layer 2: gone
        "/etc/../etc/passwd",
        "/bin",  # a directory
        "/nonexistent",
        "/bin/cat",  # again: counted once
        "/data/numbers.txt",
    ]
    files = resolve_files(store, layers, accessed)
    assert files.files == [
        ["bin/cat", "bin/busybox", "etc/passwd"],
        ["hello-link.txt", "data/numbers.txt"],
    ]


def test_recording_without_strace_names_the_image(
    busybox_store: tuple[ImageStore, str], state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, name = busybox_store
    monkeypatch.setattr(record_module.shutil, "which", lambda _name: None)
    with pytest.raises(RecordError, match=f"image {name}: .*strace is not installed"):
        record_module.record_workload(store, store.resolve(name), Workload(args=("true",)),
                                      state_dir=state_dir)


def test_recording_checks_the_image_config_first(
    busybox_store: tuple[ImageStore, str], state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile config field fails as it does for `run` (naming the image and the field)
    and before any layer is unpacked."""
    store, name = busybox_store
    image = store.resolve(name)
    raw = json.loads(image.config.to_bytes())
    raw.setdefault("config", {})["Env"] = ["PATH=/bin", "BROKEN"]
    hostile = dataclasses.replace(image, config=parse_config(json.dumps(raw).encode()))
    monkeypatch.setattr(record_module.shutil, "which", lambda _name: "/usr/bin/strace")
    with pytest.raises(ImageConfigError,
                       match=rf"image {re.escape(name)}: config.Env\[1\] 'BROKEN' has no '='"):
        record_module.record_workload(store, hostile, Workload(), state_dir=state_dir)
    assert not (state_dir / SNAPSHOTS_DIR).exists()


# -- recording and rebuilding (root, runc, strace) --------------------------------------------


@dataclass
class Optimized:
    state: Path
    store: ImageStore
    source: str
    result: OptimizeResult


@pytest.fixture(scope="module")
def optimized(tmp_path_factory: pytest.TempPathFactory, busybox_image: SampleImage) -> Optimized:
    require_root()
    require_tool("runc")
    require_tool("strace")
    state = tmp_path_factory.mktemp("optimize") / "state"
    state.mkdir()
    store = ImageStore(state)
    name = import_image(store, busybox_image.layout)[0].name
    workload = Workload(args=("/bin/sh", "-c", SCRIPT), period=60)
    with open(state / "workload.out", "wb") as out:
        result = optimize_image(store, name, "optimized:1", workload,
                                ConvertOptions(level=1), state_dir=state, output=out)
    return Optimized(state, store, name, result)


def no_mounts(state: Path) -> bool:
    return not [m for m in mountinfo_targets() if m.startswith(str(state) + "/")]


def test_recording_gives_the_ordered_files(optimized: Optimized) -> None:
    rec = optimized.result.recording
    assert rec.exit_code == 0 and not rec.timed_out
    assert optimized.result.files.files == EXPECTED
    # the workload really ran (its output went to the given file)
    out = (optimized.state / "workload.out").read_bytes()
    assert out.startswith(PASSWD) and out.endswith(b"Hello from layer 2\n")
    # nothing of the recording run is left mounted or as a container
    assert no_mounts(optimized.state)
    assert not [p for p in (optimized.state / "containers").iterdir()]


def _toc_order(store: ImageStore, digest: str, size: int, toc: str) -> list[str]:
    with store.blobs.open(digest) as f:
        index = open_layer(FileRangeReader(f, digest), size, toc_digest=toc)
        return [e.name for e in index.toc_entries if e.type != "chunk"]


def test_optimized_layers_put_exactly_the_recorded_files_first(optimized: Optimized) -> None:
    store = optimized.store
    image = store.resolve(optimized.result.name)
    source = store.resolve(optimized.source)
    assert len(image.layers) == len(source.layers) == len(EXPECTED)
    for layer, files in zip(image.layers, EXPECTED, strict=True):
        toc = layer.annotations[TOC_DIGEST_ANNOTATION]
        names = _toc_order(store, layer.digest, layer.size, toc)
        head = names[: names.index(PREFETCH_LANDMARK)]
        # the recorded files, in access order, each after the parent dirs it needs
        assert [n for n in head if not n.endswith("/")] == files
        parents = {f.rpartition("/")[0] + "/" for f in files if "/" in f}
        assert {n for n in head if n.endswith("/")} == parents
        with store.blobs.open(layer.digest) as f:
            verify_blob(FileRangeReader(f, layer.digest), layer.size, toc_digest=toc)
    # the config names the new layers' diffIDs (the rebuilt blobs differ from the source's)
    for layer, diff_id in zip(image.layers, image.config.diff_ids, strict=True):
        with store.blobs.open(layer.digest) as f:
            assert sha256_digest(gzip.decompress(f.read())) == diff_id
    assert image.config.diff_ids != source.config.diff_ids


def test_optimized_image_runs(optimized: Optimized) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "ipfsnap.cli.main", "--state-dir", str(optimized.state), "run",
         "--rm", optimized.result.name, "opt-run", "cat", "/hello.txt", "/etc/passwd"],
        capture_output=True, timeout=TIMEOUT, check=False,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == b"Hello from layer 2\n" + PASSWD
    assert no_mounts(optimized.state)


def test_cli_optimize_with_period_kills_a_long_workload(
    busybox_store: tuple[ImageStore, str], state_dir: Path
) -> None:
    require_root()
    require_tool("runc")
    require_tool("strace")
    store, name = busybox_store
    p = subprocess.run(
        [sys.executable, "-m", "ipfsnap.cli.main", "--state-dir", str(state_dir), "image",
         "optimize", "--entrypoint", '["/bin/sh", "-c"]',
         "--args", '["cat /hello.txt; sleep 600; cat /etc/group"]', "--period", "3",
         name, "opt:period"],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == "docker.io/library/opt:period\n"
    image = store.resolve("opt:period")
    names = [
        _toc_order(store, layer.digest, layer.size, layer.annotations[TOC_DIGEST_ANNOTATION])
        for layer in image.layers
    ]
    # killed during the sleep (a busybox built-in: no exec): /etc/group was never read, so
    # nothing of layer 1 but the shell; hello.txt in layer 2
    bottom = names[0][: names[0].index(PREFETCH_LANDMARK)]
    assert [n for n in bottom if not n.endswith("/")] == ["bin/sh", "bin/busybox"]
    top = names[1][: names[1].index(PREFETCH_LANDMARK)]
    assert top == ["hello.txt"]
    assert no_mounts(state_dir)


def test_cli_optimize_missing_image_fails_cleanly(state_dir: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "ipfsnap.cli.main", "--state-dir", str(state_dir), "image",
         "optimize", "nosuch:1", "new:1"],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )
    assert p.returncode != 0
    assert "nosuch" in p.stderr and p.stderr.count("\n") == 1


def _prioritized_chunk_bytes(store: ImageStore, digest: str, size: int, files: list[str]) -> int:
    """Compressed bytes of the distinct chunks of the regular files among ``files``."""
    with store.blobs.open(digest) as f:
        index = open_layer(FileRangeReader(f, digest), size)
        extents = {c.chunk_digest: c.end - c.offset for p in files for c in index.chunks(p)}
    return sum(extents.values())


def test_lazy_mount_prefetches_the_prioritized_files_before_any_read(
    optimized: Optimized, tmp_path: Path
) -> None:
    require_fuse()
    store = optimized.store
    image = store.resolve(optimized.result.name)
    m = make_mounter(tmp_path / "fsstate", background=False)
    for i, (layer, files) in enumerate(zip(image.layers, EXPECTED, strict=True)):
        blob = Blob(store.blobs.path(layer.digest), layer.annotations[TOC_DIGEST_ANNOTATION],
                    layer.digest, layer.size, [])
        mp = tmp_path / f"mp{i}"
        with mounted(m, mp, labels_for(blob)):
            st = m.status(mp)
            assert st is not None
            want = _prioritized_chunk_bytes(store, layer.digest, layer.size, files)
            assert want > 0
            # ready means prefetched: exactly the recorded files' chunks, nothing else
            assert st["cached_bytes"] == want
            assert st["fetched_bytes"] == want
            if i == 0:
                assert want < st["chunk_bytes"]  # the layer holds more than the recorded files


def test_ipfs_push_optimize(
    busybox_store: tuple[ImageStore, str], state_dir: Path, ipfs_node: ManagedNode
) -> None:
    require_root()
    require_tool("runc")
    require_tool("strace")
    store, name = busybox_store
    p = subprocess.run(
        [sys.executable, "-m", "ipfsnap.cli.main", "--state-dir", str(state_dir),
         "--ipfs-api", ipfs_node.api_multiaddr, "image", "ipfs-push", "--level", "1",
         "--optimize", "--args", json.dumps(["/bin/sh", "-c", SCRIPT]), name],
        capture_output=True, timeout=TIMEOUT, check=False,
    )
    assert p.returncode == 0, p.stderr
    cid = p.stdout.decode().strip()
    assert re.fullmatch(r"baf[a-z2-7]+", cid), p.stdout
    # the workload's output went to stderr, not into the CID line
    assert b"Hello from layer 2" in p.stderr
    image = store.resolve(f"ipfs://{cid}")
    for layer, files in zip(image.layers, EXPECTED, strict=True):
        assert layer.urls and layer.urls[0].startswith("ipfs://")
        names = _toc_order(store, layer.digest, layer.size,
                           layer.annotations[TOC_DIGEST_ANNOTATION])
        head = names[: names.index(PREFETCH_LANDMARK)]
        assert [n for n in head if not n.endswith("/")] == files
    assert no_mounts(state_dir)
