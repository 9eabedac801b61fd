"""Record which files a workload reads: the input of ``ipfsnap image optimize``.

The image's layers are unpacked as ordinary (overlayfs) snapshots, the workload runs once in a
runc container on them, and ``strace -f`` follows ``runc run`` into the container. Why strace:

* fanotify marks a mount or a superblock; runc moves the rootfs into a new mount namespace
  (a copy of the mount, so a mount mark does not follow) and the paths fanotify reports must
  be read back through ``/proc/self/fd`` from outside that namespace;
* a FUSE passthrough recorder works but slows every read of a big image through Python;
* strace sees the path string each ``open``/``openat``/``execve`` was given, exactly as the
  container's process saw it, in one ordered log - simple and robust. Its cost (a ptrace stop
  per traced syscall) only slows the recording run.

runc's own opens (before the container starts, and runc's monitor) are ignored: a process
counts as the container's once it has made an ``execve`` of something that is not runc (its
``runc init`` child re-executes runc itself), and its children count too.

Recorded paths are container paths. :func:`resolve_files` turns them into the regular files
and symlinks of the image that provide them, walking the layer tars (whiteouts and opaque
directories hide lower entries; symlinks, also of parent directories such as Debian's
``/lib -> usr/lib``, are resolved inside the image, and both the link and its target count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import logging
import posixpath
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tarfile
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ipfsnap.content import ImageStore, ResolvedImage
from ipfsnap.docparse import MalformedDocument, parse_json
from ipfsnap.errors import UsageError
from ipfsnap.image.errors import RecordError, UnpackError
from ipfsnap.image.snapshotters import OVERLAYFS, snapshotter_root
from ipfsnap.image.unpack import unpack_layers
from ipfsnap.oci import Descriptor, mediatypes
from ipfsnap.oci.tarheaders import BoundedTarInfo, EndGuard
from ipfsnap.runtime import ContainerStore, Runc, image_args
from ipfsnap.runtime.containers import ContainerRecord
from ipfsnap.runtime.spec import image_container_config
from ipfsnap.whiteouts import OPAQUE_WHITEOUT, WHITEOUT_PREFIX

log = logging.getLogger(__name__)

#: syscalls strace reports: the ones that open or execute a file, the ones that change the
#: directory relative paths are resolved against, and process creation (to know which
#: processes belong to the container)
TRACED = "execve,execveat,open,openat,openat2,creat,chdir,clone,clone3,fork,vfork"
#: longest path string strace prints in full (PATH_MAX)
STRACE_STRING = 4096
#: symlinks followed while resolving one path before giving up (the kernel's limit, 40)
MAX_SYMLINKS = 40
#: default seconds the workload may run before it is killed (the reference's default period)
DEFAULT_PERIOD = 10.0


@dataclass(frozen=True)
class Workload:
    """What to run. ``None`` fields take the image's own values."""

    #: replaces the image's Cmd (with no ``entrypoint`` the image's Entrypoint stays)
    args: tuple[str, ...] | None = None
    #: replaces the image's Entrypoint (and drops its Cmd unless ``args`` are given)
    entrypoint: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()
    cwd: str | None = None
    user: str | None = None
    #: seconds before the workload is killed (the recording then ends)
    period: float = DEFAULT_PERIOD

    def process_args(self, image: ResolvedImage) -> list[str]:
        cfg = image.config
        if self.entrypoint is not None:
            return image_args(self.entrypoint, self.args or (), ())
        cmd = self.args if self.args is not None else cfg.cmd
        return image_args(cfg.entrypoint, cmd, ())


@dataclass(frozen=True)
class Recording:
    """The result of one recording run."""

    #: container paths opened or executed, absolute and lexically clean, first access order
    accessed: tuple[str, ...]
    #: exit status of the workload (128+9 when it was killed at the end of the period)
    exit_code: int
    timed_out: bool
    seconds: float


@dataclass
class Node:
    """One path of the merged image tree: which layer provides it and what it is."""

    layer: int
    kind: str  # "reg" | "dir" | "symlink" | "hardlink" | "other"
    link: str = ""
    #: permission bits, and for a regular file (or a hardlink to one in the same layer) its
    #: size and the offset of its bytes in the layer's uncompressed tar (-1: unknown)
    mode: int = 0
    size: int = 0
    offset: int = -1


@dataclass
class LayerFiles:
    """Per layer (bottom first): the files of that layer to prioritize, in access order."""

    files: list[list[str]] = field(default_factory=list)

    def all(self) -> list[str]:
        return [f for layer in self.files for f in layer]


def parse_command(text: str, what: str) -> tuple[str, ...]:
    """A JSON array (as the reference's ``--args '["-c", "x"]'``) or a shell-like string."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            value: Any = parse_json(stripped)
        except MalformedDocument as exc:  # also an array nested past the recursion limit
            raise UsageError(f"{what} {text!r}: not a JSON array: {exc}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"{what} {text!r}: must be a JSON array of strings")
        return tuple(value)
    try:
        return tuple(shlex.split(text))
    except ValueError as exc:
        raise UsageError(f"{what} {text!r}: {exc}") from None


# -- running the workload under strace ---------------------------------------------------------


class _TracingRunc(Runc):
    """runc whose foreground ``run`` goes through ``strace -f`` (every other call is plain)."""

    def __init__(self, state_dir: Path, strace: str, trace: Path) -> None:
        super().__init__(state_dir)
        self._strace = [strace, "-f", "-qq", "-s", str(STRACE_STRING), "-e", f"trace={TRACED}",
                        "-e", "signal=none", "-o", str(trace)]
        self._tracing = False

    def _base(self) -> list[str]:
        base = super()._base()
        return [*self._strace, *base] if self._tracing else base

    def run_foreground(self, container_id: str, bundle: Path, **kw: Any) -> int:
        self._tracing = True
        try:
            return super().run_foreground(container_id, bundle, **kw)
        finally:
            self._tracing = False


def record_workload(
    images: ImageStore,
    image: ResolvedImage,
    workload: Workload,
    *,
    state_dir: Path,
    output: IO[Any] | int | None = None,
) -> Recording:
    """Run ``workload`` once on ``image`` (layers unpacked as overlayfs snapshots, which later
    runs reuse) and return the files it opened, in order. ``output`` gets the workload's
    stdout and stderr (default: discarded)."""
    strace = shutil.which("strace")
    if strace is None:
        raise RecordError(f"image {image.record.name}: cannot record: strace is not installed "
                          "(apt-get install strace)")
    args = workload.process_args(image)
    if not args:
        raise UsageError(f"image {image.record.name}: no Entrypoint/Cmd; give --args")
    if workload.period <= 0:
        raise UsageError(f"--period {workload.period}: must be positive")
    # The image's own fields go through the same checks as `run` (errors name the field,
    # e.g. config.Env[2]), before any layer is unpacked. Overridden args are passed whole:
    # process_args already applied the workload's entrypoint/args rules.
    overridden = workload.args is not None or workload.entrypoint is not None
    config = image_container_config(
        image.record.name, image.config, command=args if overridden else (),
        env=workload.env, cwd=workload.cwd, user=workload.user, net="none",
    )
    state_dir = Path(state_dir).absolute()
    from ipfsnap.snapshot import SnapshotStore, mount_all

    snaps = SnapshotStore(snapshotter_root(state_dir, OVERLAYFS))
    try:
        with images.lease():
            result = unpack_layers(image.record.name, image.layers, image.config.diff_ids,
                                   snaps, blobs=images.blobs, fetcher=None, lazy=False)
        if not result.top:
            raise UsageError(f"image {image.record.name}: has no layers")
        cid = f"ipfsnap-optimize-{secrets.token_hex(6)}"
        key = f"ipfsnap-container {cid}"
        containers = ContainerStore(state_dir)
        trace = containers.root / f".{cid}.strace"
        containers.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        containers.runc = _TracingRunc(state_dir, strace, trace)
        ccfg = dataclasses.replace(config, hostname=cid[:63])

        def mount(target: Path) -> None:
            mount_all(snaps.prepare(key, result.top), target)

        def release(record: ContainerRecord) -> None:
            with contextlib.suppress(Exception):
                snaps.remove(key)

        record = containers.create(cid, image=image.record.name, snapshot_key=key,
                                   snapshotter=OVERLAYFS, rm=True, args=args)
        timed_out = threading.Event()
        killer = Runc(state_dir)

        def stop() -> None:
            timed_out.set()
            log.info("image %s: recording period of %.1f s over: stopping the workload",
                     image.record.name, workload.period)
            with contextlib.suppress(Exception):
                killer.kill(cid, signal.SIGKILL, all_processes=True)

        timer = threading.Timer(workload.period, stop)
        start = time.monotonic()
        try:
            timer.start()
            out = output if output is not None else subprocess.DEVNULL
            code = containers.run(record, ccfg, mount_rootfs=mount, release=release,
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            seconds = time.monotonic() - start
            with open(trace, encoding="utf-8", errors="surrogateescape") as f:
                accessed = parse_trace(f, ccfg.cwd)
        except FileNotFoundError as exc:
            if exc.filename != str(trace):
                raise
            raise RecordError(f"image {image.record.name}: strace wrote no trace {trace} (is "
                              "ptrace allowed here?)") from None
        finally:
            timer.cancel()
            with contextlib.suppress(OSError):
                trace.unlink()
    finally:
        snaps.close()
    log.info("image %s: workload %s ran %.1f s (exit %d%s), %d paths accessed",
             image.record.name, args, seconds, code, ", killed" if timed_out.is_set() else "",
             len(accessed))
    return Recording(tuple(accessed), code, timed_out.is_set(), seconds)


# -- the strace log ------------------------------------------------------------------------------

#: "PID rest" lines of ``strace -f -o``
_LINE = re.compile(r"^(\d+)\s+(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+|\?)")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_RUNC_INIT = ("runc", "init")


def _unescape(s: str) -> str:
    # strace escapes non-printable bytes C-style (\n, \t, \ooo, \xNN)
    raw = s.encode("latin-1", "backslashreplace").decode("unicode_escape")
    return raw.encode("latin-1", "ignore").decode("utf-8", "surrogateescape")


def _join_unfinished(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """(pid, complete call text) with ``<unfinished ...>``/``resumed>`` pairs joined."""
    pending: dict[int, str] = {}
    for line in lines:
        m = _LINE.match(line.rstrip("\n"))
        if not m:
            continue
        pid, rest = int(m.group(1)), m.group(2)
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")].rstrip()
            continue
        if rest.startswith("<... "):
            _, _, tail = rest.partition("resumed>")
            rest = pending.pop(pid, "") + tail
        yield pid, rest


def _is_runc(strings: Sequence[str]) -> bool:
    """An execve of runc itself (the traced command, ``runc init``, its memfd re-exec)."""
    path, argv0 = [*strings, "", ""][:2]
    return (path.startswith("/proc/self/") or "runc" in posixpath.basename(path)
            or "runc" in posixpath.basename(argv0))


def parse_trace(lines: Iterable[str], cwd: str = "/") -> list[str]:
    """Container paths opened or executed, first access order, from ``strace -f`` output.

    Processes seen before the container's first ``execve`` of something other than runc are
    runc's, and so are the children they create later (runc lives in the host's PID
    namespace, so the pids its clones return are the ones strace prints). The process making
    that first execve and every other process appearing later are the container's (their
    clones return pids of the container's namespace, useless here). Failed calls are skipped;
    directories and paths outside the image are filtered later, by :func:`resolve_files`.
    """
    runc: set[int] = set()
    container: set[int] = set()
    started = False
    cwds: dict[int, str] = {}
    seen: set[str] = set()
    out: list[str] = []

    def note(path: str) -> None:
        if path not in seen:
            seen.add(path)
            out.append(path)

    for pid, text in _join_unfinished(lines):
        m = _CALL.match(text)
        if not m:
            continue
        name, argtext, ret = m.group(1), m.group(2), m.group(3)
        if ret == "?" or int(ret) < 0:
            continue
        result = int(ret)
        strings = [_unescape(s) for s in _STRING.findall(argtext)]
        if pid not in container and pid not in runc:
            if started:
                container.add(pid)
            else:
                runc.add(pid)
        if name in ("clone", "clone3", "fork", "vfork"):
            if pid in runc and result > 0:
                runc.add(result)
            continue
        if name in ("execve", "execveat"):
            if pid in runc:
                if _is_runc(strings):
                    continue
                runc.discard(pid)
                container.add(pid)
                started = True
            if strings and strings[0] and (name == "execve" or argtext.startswith("AT_FDCWD")):
                note(_absolute(cwds.get(pid, cwd), strings[0]))
            continue
        if pid not in container or not strings:
            continue
        if name == "chdir":
            cwds[pid] = _absolute(cwds.get(pid, cwd), strings[0])
            continue
        if (name in ("openat", "openat2") and not argtext.startswith("AT_FDCWD")
                and not strings[0].startswith("/")):
            continue  # relative to a directory fd: not resolvable from the log
        note(_absolute(cwds.get(pid, cwd), strings[0]))
    return out


def _absolute(cwd: str, path: str) -> str:
    return posixpath.normpath(posixpath.join(cwd, path)) if path else cwd


# -- from container paths to the layers that provide them ----------------------------------------


def _clean(name: str) -> str:
    """A tar member name as a clean relative path ("" for the root)."""
    cleaned = posixpath.normpath("/" + name).lstrip("/")
    return "" if cleaned == "." else cleaned


def _layer_stream(images: ImageStore, desc: Descriptor) -> IO[bytes]:
    f = images.blobs.open(desc.digest)
    compression = mediatypes.layer_compression(desc.media_type)
    if compression == "gzip":
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(f)
    return f


class MergedTree:
    """The image's paths while its layers are merged: ``nodes`` (clean relative path -> the
    layer providing it), with every path's children indexed, so that a whiteout or an opaque
    directory touches only what is below it. (Scanning every path for each whiteout made a
    layer of many whiteouts over a big tree quadratic.) The index may keep paths that no
    longer have a node (below an opaque directory, ancestors of what the layer keeps); they
    cost a look, never a wrong answer."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self._children: dict[str, set[str]] = {}

    def add(self, path: str, node: Node) -> None:
        self.nodes[path] = node
        child = path
        while child:
            parent = child.rpartition("/")[0]
            kids = self._children.setdefault(parent, set())
            if child in kids:
                break  # its ancestors are indexed already
            kids.add(child)
            child = parent

    def children(self, path: str) -> list[str]:
        """The indexed paths right below ``path`` ("" = the root); some may have no node."""
        return list(self._children.get(path, ()))

    def has_below(self, path: str) -> bool:
        """Whether some path strictly below ``path`` has a node."""
        stack = [path]
        while stack:
            for child in self._children.get(stack.pop(), ()):
                if child in self.nodes:
                    return True
                stack.append(child)
        return False

    def below(self, path: str) -> list[str]:
        """Every indexed path strictly below ``path`` ("" = the root: all of them)."""
        out: list[str] = []
        stack = [path]
        while stack:
            for child in self._children.get(stack.pop(), ()):
                out.append(child)
                stack.append(child)
        return out

    def delete_subtree(self, path: str) -> None:
        """``path`` and everything below it, index included."""
        for p in [path, *self.below(path)]:
            self.nodes.pop(p, None)
            self._children.pop(p, None)
        self._children.get(path.rpartition("/")[0], set()).discard(path)

    def merge_layer(self, i: int, members: Iterable[tarfile.TarInfo]) -> None:
        """Apply the tar entries of layer ``i`` (bottom first) as overlayfs shows them."""
        this_layer: set[str] = set()
        opaqued: set[str] = set()
        for member in members:
            name = _clean(member.name)
            if not name:
                continue
            parent, _, base = name.rpartition("/")
            if base == OPAQUE_WHITEOUT:
                # what the lower layers have below it goes; this layer's own entries stay
                # (a second marker for the same directory finds nothing more to remove)
                if parent not in opaqued:
                    opaqued.add(parent)
                    for p in self.below(parent):
                        if p not in this_layer:
                            self.nodes.pop(p, None)
                continue
            if base.startswith(WHITEOUT_PREFIX):
                self.delete_subtree((parent + "/" if parent else "") + base[len(WHITEOUT_PREFIX):])
                continue
            old = self.nodes.get(name)
            if old is not None and old.kind == "dir" and not member.isdir():
                # a non-directory replaces a directory and everything below it
                self.delete_subtree(name)
            if member.isreg():
                node = Node(i, "reg", mode=member.mode, size=member.size,
                            offset=member.offset_data)
            elif member.isdir():
                node = Node(i, "dir", mode=member.mode)
            elif member.issym():
                node = Node(i, "symlink", member.linkname, mode=member.mode)
            elif member.islnk():
                node = Node(i, "hardlink", member.linkname, mode=member.mode)
                target = self.nodes.get(_clean(member.linkname))
                if target is not None and target.kind == "reg" and target.layer == i:
                    # a tar hardlink names an earlier member of the same tar, which holds
                    # the bytes
                    node.size, node.offset = target.size, target.offset
            else:
                node = Node(i, "other", mode=member.mode)
            self.add(name, node)
            this_layer.add(name)


def merged_tree(images: ImageStore, layers: Sequence[Descriptor]) -> dict[str, Node]:
    """Every path of the image's root filesystem (clean, relative) -> the layer providing it."""
    tree = MergedTree()
    for i, desc in enumerate(layers):
        try:
            _merge_layer(tree, i, images, desc)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise UnpackError(f"layer {desc.digest}: unreadable tar stream: {exc}") from exc
    return tree.nodes


def _merge_layer(tree: MergedTree, i: int, images: ImageStore, desc: Descriptor) -> None:
    """Apply layer ``i`` to ``tree`` (its tar is bounded as the unpacker's: snapshot/apply)."""
    with _layer_stream(images, desc) as stream, \
            tarfile.open(fileobj=EndGuard(stream), mode="r|", tarinfo=BoundedTarInfo) as tar:
        tree.merge_layer(i, tar)


def _resolve(tree: dict[str, Node], path: str, visit: list[str]) -> str | None:
    """Resolve container path ``path`` inside ``tree``; symlinks met go to ``visit``.
    Returns the final clean relative path, or None when it does not exist in the image."""
    todo = [c for c in path.split("/") if c not in ("", ".")]
    todo.reverse()
    current: list[str] = []
    links = 0
    while todo:
        comp = todo.pop()
        if comp == "..":
            if current:
                current.pop()
            continue
        candidate = "/".join([*current, comp])
        node = tree.get(candidate)
        if node is None:
            if todo:
                # a directory a tar implies by its entries below (tars need not hold their
                # files' parent directories); if it does not exist, neither does the rest
                current.append(comp)
                continue
            return None
        if node.kind == "symlink":
            links += 1
            if links > MAX_SYMLINKS:
                return None
            visit.append(candidate)
            target = node.link
            if target.startswith("/"):
                current = []
            parts = [c for c in target.split("/") if c not in ("", ".")]
            todo.extend(reversed(parts))
            continue
        current.append(comp)
    return "/".join(current)


def resolve_files(
    images: ImageStore, layers: Sequence[Descriptor], accessed: Iterable[str]
) -> LayerFiles:
    """Assign each accessed path (and each symlink on its way) to the top-most layer that
    provides it; directories, missing paths and special files are left out."""
    return assign_files(merged_tree(images, layers), len(layers), accessed)


def assign_files(tree: dict[str, Node], layers: int, accessed: Iterable[str]) -> LayerFiles:
    """:func:`resolve_files` over a merged ``tree`` of ``layers`` layers."""
    files = LayerFiles([[] for _ in range(layers)])
    seen: set[str] = set()

    def add(p: str) -> None:
        node = tree.get(p)
        if node is None or node.kind not in ("reg", "symlink", "hardlink") or p in seen:
            return
        seen.add(p)
        files.files[node.layer].append(p)

    for path in accessed:
        visit: list[str] = []
        final = _resolve(tree, path, visit)
        for link in visit:
            add(link)
        if final:
            add(final)
    return files
