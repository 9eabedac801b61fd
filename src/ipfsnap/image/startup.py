"""``ipfs-push``'s default layout: the files the image's own command reads at its start go
first in each eStargz layer, before ``.prefetch.landmark``.

A lazy start of an image waits, after the pull, for its command's files to cross the
network: the executable, ld.so and its cache, the shared objects, the C library's locale and
zone files, python's start-up modules (runtime/warm.py, runtime/startfiles.py). Pulled with
the plain layout, those files are scattered through the layers: each costs its own IPFS
blocks (shared with unrelated neighbours) and the loader's chain (the executable's headers,
then its libraries, then what they need) costs round trips one after the other. An
optimized image (``image optimize``) puts what a recorded run read first, so the mount
prefetches it as one range per layer: measured 13.5x against 10.2x for a full pull
(docs/benchmarks.md). Running the workload needs runc, root and strace; this module gets
most of the same list without running anything: the exec warm-up's own rules, applied to
the image's layers at push time.

How: every layer's tar is decompressed once into a spool file in the state dir's temp
directory (the uncompressed tar, so a member's bytes are a range of it), the layers are
merged as overlayfs would show them (image/record.MergedTree: whiteouts, opaque
directories), and :class:`runtime.warm.ExecWarmer` runs its lookup over that tree for the
image's Entrypoint + Cmd, Env and WorkingDir, the user database first (what a runtime reads
before the command). The warm-up opens real files: the few it asks for (the executable, the
loader's files, the ELF objects it parses) are copied out of the spool into a scratch
directory. The paths it visited, with the symlinks on their way, are given to the layer
that provides each (image/record.assign_files) and the conversion builds every layer with its
own list first, as ``image optimize`` does.

Every platform the push keeps is looked up (``--all-platforms``, ``--platform``; by default
this machine's); a layer two platforms share gets both lists.

Best effort: an image without a command, a layer that cannot be read here: the push goes
on with the plain layout (logged; a broken layer then fails the conversion, with its own
error). Layers that already are eStargz are kept as they are (not rebuilt for this).
``ipfs-push --layout=plain`` turns it off; ``--prioritize``/``--optimize`` replace it.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tarfile
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ipfsnap.content import ImageStore, ResolvedImage
from ipfsnap.errors import IpfsnapError
from ipfsnap.estargz.builder import open_tar_stream
from ipfsnap.image.errors import UnpackError
from ipfsnap.image.record import LayerFiles, MergedTree, Node, assign_files
from ipfsnap.oci import Descriptor, Platform, mediatypes
from ipfsnap.oci.tarheaders import BoundedTarInfo
from ipfsnap.runtime import image_args
from ipfsnap.runtime.startfiles import RUNTIME_FILES
from ipfsnap.runtime.warm import ExecWarmer

log = logging.getLogger(__name__)

#: seconds the lookup may take: it reads local files only (a python image: ~0.1 s); a
#: bound for a crafted image, after which the push goes on with what was found
LOOKUP_TIMEOUT = 60.0
#: the lookup reads at most one byte of the files it finds: it needs their names and ELF
#: headers, not their data (ExecWarmer's budget bounds its reads, not its lookups)
LOOKUP_BUDGET = 1
#: bytes copied at once from a spool
_COPY = 1 << 20
#: node kinds a spool holds the bytes of
_DATA_KINDS = ("reg", "hardlink")
#: S_IFMT of each node kind ("other": devices, fifos; never opened, so any non-regular type)
_TYPE_BITS = {"reg": stat.S_IFREG, "hardlink": stat.S_IFREG, "dir": stat.S_IFDIR,
              "symlink": stat.S_IFLNK, "other": stat.S_IFIFO}


@dataclass(frozen=True)
class StartupFiles:
    """What the lookup found for an image's command."""

    #: per layer (bottom first): the files of that layer to put first
    files: LayerFiles
    #: container paths the command's start reads, in the order found
    paths: tuple[str, ...]
    seconds: float


class ImageTree:
    """An image's layers merged (``tree``) as a ``runtime.warm.RootTree``: the files' bytes
    are in ``spools`` (one uncompressed tar per layer) and copied to ``scratch`` when the
    warm-up opens one."""

    def __init__(self, tree: MergedTree, spools: Sequence[IO[bytes]], scratch: Path) -> None:
        self._nodes = tree.nodes
        self._tree = tree
        self._spools = spools
        self._scratch = scratch
        self._copied: dict[str, Path] = {}
        #: paths without a node: whether entries below make them a directory
        self._implied: dict[str, bool] = {}
        self._lock = threading.Lock()

    def _node(self, parts: Sequence[str]) -> Node | None:
        return self._nodes.get("/".join(parts))

    def lstat(self, parts: Sequence[str]) -> os.stat_result | None:
        if not parts:
            return _stat("dir", 0o755, 0)
        node = self._node(parts)
        if node is not None:
            return _stat(node.kind, node.mode, node.size)
        # a tar need not hold its files' parent directories: one with entries below it is
        # there all the same (as the unpacker and the builder make it)
        path = "/".join(parts)
        with self._lock:
            implied = self._implied.get(path)
            if implied is None:
                implied = self._implied[path] = self._tree.has_below(path)
        return _stat("dir", 0o755, 0) if implied else None

    def readlink(self, parts: Sequence[str]) -> str:
        node = self._node(parts)
        if node is None or node.kind != "symlink":
            raise OSError(f"{'/'.join(parts)}: not a symlink")
        return node.link

    def listdir(self, parts: Sequence[str]) -> list[str]:
        path = "/".join(parts)
        if path and (node := self._nodes.get(path)) is not None and node.kind != "dir":
            return []
        return [p.rpartition("/")[2] for p in self._tree.children(path) if p in self._nodes]

    def host_path(self, parts: Sequence[str]) -> Path | None:
        """A scratch copy of the regular file at ``parts`` (None: it is not one)."""
        path = "/".join(parts)
        node = self._nodes.get(path)
        if node is None or node.kind not in _DATA_KINDS or node.offset < 0:
            return None
        with self._lock:
            copy = self._copied.get(path)
            if copy is None:
                copy = self._scratch / str(len(self._copied))
                _copy_range(self._spools[node.layer], node.offset, node.size, copy)
                self._copied[path] = copy
        return copy


def _stat(kind: str, mode: int, size: int) -> os.stat_result:
    return os.stat_result((_TYPE_BITS[kind] | (mode & 0o7777), 0, 0, 1, 0, 0, size, 0, 0, 0))


def _copy_range(src: IO[bytes], offset: int, size: int, dest: Path) -> None:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        done = 0
        while done < size:
            data = os.pread(src.fileno(), min(_COPY, size - done), offset + done)
            if not data:
                raise IpfsnapError(f"spool of a layer ends inside a file at {offset + done}")
            os.write(fd, data)
            done += len(data)
    finally:
        os.close(fd)


def _spool_layer(images: ImageStore, desc: Descriptor, spool: IO[bytes]
                 ) -> list[tarfile.TarInfo]:
    """Decompress layer ``desc`` into ``spool``, then list its members (their
    ``offset_data`` are offsets in the spool; special headers bounded as the unpacker's)."""
    try:
        with images.blobs.open(desc.digest) as raw:
            shutil.copyfileobj(open_tar_stream(raw), spool, _COPY)
        spool.flush()
        spool.seek(0)
        with tarfile.open(fileobj=spool, mode="r:", tarinfo=BoundedTarInfo) as tar:
            return tar.getmembers()
    except (OSError, EOFError, tarfile.TarError, IpfsnapError) as exc:
        raise UnpackError(f"layer {desc.digest}: {exc}") from exc


def startup_files(images: ImageStore, image: ResolvedImage, *, tmp_dir: Path,
                  timeout: float = LOOKUP_TIMEOUT) -> StartupFiles | None:
    """The files ``image``'s own command reads at its start, per layer; None when it has no
    command. Raises what reading a layer raises (the caller falls back to the plain
    layout)."""
    cfg = image.config
    args = image_args(cfg.entrypoint, cfg.cmd, ())
    name = image.record.name
    if not args:
        log.info("image %s: no Entrypoint/Cmd: plain layout", name)
        return None
    t0 = time.monotonic()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="startup-") as scratch:
        spools = [tempfile.TemporaryFile(dir=scratch, prefix="layer-")  # noqa: SIM115
                  for _ in image.layers]
        try:
            # decompression releases the GIL: the layers spool side by side
            cores = len(os.sched_getaffinity(0))
            with ThreadPoolExecutor(max_workers=max(1, min(len(spools), cores))) as pool:
                listed = list(pool.map(lambda i: _spool_layer(images, image.layers[i],
                                                              spools[i]),
                                       range(len(spools))))
            tree = MergedTree()
            for i, members in enumerate(listed):
                tree.merge_layer(i, members)
            files = Path(scratch, "files")
            files.mkdir()
            warmer = ExecWarmer(ImageTree(tree, spools, files), LOOKUP_BUDGET,
                                name=f"image {name}")
            warmer.start(args, cfg.env, cfg.working_dir or "/", first=RUNTIME_FILES)
            if not warmer.wait(timeout):
                log.warning("image %s: the start-up files' lookup stopped after %.0f s", name,
                            timeout)
            paths = warmer.stop().paths
        finally:
            for spool in spools:
                spool.close()
    assigned = assign_files(tree.nodes, len(image.layers), paths)
    seconds = time.monotonic() - t0
    log.info("image %s: %d start-up files of %r found in %.1f s", name,
             len(assigned.all()), args[0], seconds)
    return StartupFiles(assigned, tuple(paths), seconds)


def startup_layout(images: ImageStore, image: ResolvedImage, *, tmp_dir: Path
                   ) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``ConvertOptions.prioritize_per_layer`` for the start-up layout of ``image``: its
    layers that have start-up files (use with ``rebuild_prioritized=False``: a layer that
    already is eStargz is kept as it is). Empty when nothing is found or the lookup fails
    (logged: the layout is plain)."""
    try:
        found = startup_files(images, image, tmp_dir=tmp_dir)
    except (OSError, EOFError, tarfile.TarError, IpfsnapError) as exc:
        # not a warning: a layer unreadable here is one the conversion then refuses, and
        # its error is the one line the user gets
        log.info("image %s: start-up files not found (%s): plain layout", image.record.name,
                 exc)
        return ()
    if found is None:
        return ()
    # sorted: the lookup's threads find files in any order, and the list is part of the
    # conversion's input (a push of the same image must give the same bytes and CIDs); the
    # mount prefetches a layer's whole list as one range, so its order inside does not count
    return tuple((layer.digest, tuple(sorted(names)))
                 for layer, names in zip(image.layers, found.files.files, strict=True)
                 if names)


def _platform_images(images: ImageStore, ref: str, platforms: Sequence[Platform],
                     all_platforms: bool) -> list[ResolvedImage]:
    """The images (one per manifest) a push of ``ref`` keeps: every manifest of its index
    (``all_platforms``), else the best match of each of ``platforms`` (none: this
    machine's), as the conversion selects them."""
    if not all_platforms:
        wanted: Sequence[Platform | None] = list(platforms) or [None]
        return [images.resolve(ref, p) for p in wanted]
    record = images.get(ref)
    out = []
    for desc in images.walk(record.target):
        if mediatypes.is_manifest(desc.media_type) and images.blobs.exists(desc.digest):
            manifest = images.read_manifest(desc)
            out.append(ResolvedImage(record, desc, manifest,
                                     images.read_config(manifest.config)))
    return out


def push_layout(images: ImageStore, ref: str, *, platforms: Sequence[Platform] = (),
                all_platforms: bool = False, tmp_dir: Path
                ) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """:func:`startup_layout` of every platform a push of ``ref`` keeps; a layer two
    platforms share gets both lists (each platform's command finds its files first)."""
    merged: dict[str, set[str]] = {}
    for image in _platform_images(images, ref, platforms, all_platforms):
        for digest, names in startup_layout(images, image, tmp_dir=tmp_dir):
            merged.setdefault(digest, set()).update(names)
    return tuple((digest, tuple(sorted(names))) for digest, names in merged.items())


