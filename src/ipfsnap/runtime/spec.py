"""OCI runtime bundles: ``config.json`` (runtime-spec 1.0.2) from a plain :class:`ContainerConfig`.

The defaults follow what docker and containerd give a container, so images behave as users
expect from ``docker run`` / ``ctr run``:

* Namespaces pid, ipc, uts, mount and network. ``--net none`` (the default, as ``ctr run``
  without CNI) is a new network namespace in which runc brings up only ``lo``; ``--net host``
  shares the host's network namespace (no ``network`` entry) and copies the host's
  ``/etc/resolv.conf`` and ``/etc/hosts``.
* Mounts: /proc, /dev (tmpfs), /dev/pts, /dev/shm, /dev/mqueue, /sys (read-only), the cgroup
  hierarchy (read-only), then ``/etc/resolv.conf``, ``/etc/hosts`` and ``/etc/hostname`` bind
  mounted from files written into the bundle (the image's own files are never modified), then
  the user's bind mounts in the order given.
* The docker default capability set (14 capabilities) in bounding/effective/permitted for
  root; a non-root user keeps only the bounding set (moby does the same since 20.10, so a
  non-root process cannot regain them), never inheritable/ambient (CVE-2022-24769).
* maskedPaths / readonlyPaths as moby's defaults (/proc/kcore, /proc/keys, /sys/firmware...;
  /proc/sys, /proc/sysrq-trigger... read-only).
* ``noNewPrivileges`` on: setuid binaries in the image cannot raise privileges.
* RLIMIT_NOFILE 1024/1024, containerd's default (select()-safe, like a login shell).
* The device cgroup denies everything; runc adds its default allow list (null, zero, full,
  tty, random, urandom, ptmx, pts) itself.
* No seccomp profile: Debian's runc supports one, but writing docker's profile is out of this
  module's scope; namespaces, capabilities and no_new_privileges are the isolation here.

An image's config is untrusted input (it comes off a peer-to-peer network), so every value it
feeds into the spec is checked here, and a refusal names the image and the field
(:class:`ImageConfigError`); the same checks on command-line values raise :class:`BadRunOption`.
Paths are resolved inside the rootfs as the container would see them (symlinks of the image
never lead out of it) and the resolved path is what the spec carries, so runc never follows an
image symlink itself; the working directory may not resolve into /proc or /dev (their
``fd/N`` magic links lead to the runtime's open files: CVE-2024-21626), nor a mount destination
to ``/`` or into /proc. Files the host reads from the rootfs (/etc/passwd, /etc/group) are read
only when they are regular files: a device node or fifo of the image is never opened by the
host. docs/reliability.md ("Hostile image configs") lists each case and why.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import stat
import struct
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn, Protocol

from ipfsnap.errors import IpfsnapError
from ipfsnap.runtime.errors import BadRunOption, BundleError, ImageConfigError, UserNotFound

log = logging.getLogger(__name__)

OCI_VERSION = "1.0.2"

#: docker/containerd's default PATH when neither the image nor the user sets one
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: docker's (and containerd's) default capability set
DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

#: moby's default masked paths (kernel internals and host hardware info)
MASKED_PATHS: tuple[str, ...] = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)

#: moby's default read-only paths (host-global kernel knobs)
READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

#: containerd's default RLIMIT_NOFILE (soft and hard)
DEFAULT_NOFILE = 1024

#: HOST_NAME_MAX on Linux: longer names are rejected by sethostname(2)
HOST_NAME_MAX = 64

#: symlinks followed while resolving a path inside the rootfs (the kernel's MAXSYMLINKS)
MAX_SYMLINKS = 40

#: /etc/passwd or /etc/group bigger than this is not parsed (hostile image)
MAX_ACCOUNT_FILE = 8 << 20

NET_MODES = ("none", "host")

#: largest uid/gid: uid_t is 32 bits and (uid_t)-1 means "no change" to setuid(2)
MAX_ID = 0xFFFFFFFE

#: the kernel's NGROUPS_MAX: setgroups(2) takes at most this many supplementary groups
NGROUPS_MAX = 65536

#: the kernel's PATH_MAX (with the NUL): chdir(2) and execve(2) fail with ENAMETOOLONG on
#: longer paths; refusing them first also bounds the work of resolving them in the rootfs
PATH_MAX = 4096

#: the kernel's MAX_ARG_STRLEN: execve(2) fails with E2BIG for any one argument or
#: environment string (with its NUL) longer than 32 pages
MAX_ARG_STRLEN = 32 * 4096

#: container trees holding the kernel's and the runtime's magic links (/proc/self/fd/N,
#: /proc/<pid>/cwd, and /dev/fd -> /proc/self/fd that runc creates): a working directory or
#: an image's program path resolving into them could reach the runtime's open files
#: (CVE-2024-21626)
MAGIC_TREES = ("/proc", "/dev")

#: top-level directories the spec mounts kernel filesystems on; runc refuses (CVE-2019-19921)
#: to mount over a symlink there, so an image where one is not a directory cannot run
KERNEL_MOUNTPOINTS = ("/proc", "/sys", "/dev")

#: a hostname as sethostname(2) and /etc/hosts take it: RFC 1123 letters, digits, '-' and
#: '.', plus '_' (common in container names); anything else (a newline, a space) would also
#: corrupt the /etc/hosts and /etc/hostname ipfsnap writes
_HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")

#: bytes of one argv/envp pointer
_POINTER = struct.calcsize("P")

#: hostile values are quoted in messages cut to this many characters (one short line)
_SHOW_MAX = 80

#: ContainerConfig field -> the image config field it came from
_IMAGE_FIELDS = {"args": "Entrypoint/Cmd", "env": "Env", "cwd": "WorkingDir", "user": "User"}
#: ContainerConfig field -> the command-line option that sets it
_OPTIONS = {"args": "command", "env": "--env", "cwd": "--cwd", "user": "--user"}

# 64 MiB tmpfs for /dev and /dev/shm, as docker/containerd (65536k)
_TMPFS_SIZE = "size=65536k"


@dataclass(frozen=True)
class BindMount:
    """A user bind mount (``--mount type=bind,src=...,dst=...[,ro]``)."""

    source: Path
    destination: str
    readonly: bool = False


@dataclass
class ContainerConfig:
    """Everything the runtime needs to know about one container, independent of images."""

    args: list[str]
    env: list[str] = field(default_factory=list)
    cwd: str = "/"
    #: "" (root), "uid", "uid:gid", "name", "name:group"
    user: str = ""
    #: "" = the container id (or the host's name with --net host)
    hostname: str = ""
    tty: bool = False
    mounts: list[BindMount] = field(default_factory=list)
    #: "none" (own netns with only lo) or "host"
    net: str = "none"
    rlimit_nofile: int = DEFAULT_NOFILE
    #: the image the values come from ("" for a plain rootfs), named in errors
    image: str = ""
    #: the fields above ("args", "env", "cwd", "user") taken from the image's config: a bad
    #: value there is the image's fault (ImageConfigError), not the user's (BadRunOption)
    from_image: frozenset[str] = frozenset()


class ImageConfigView(Protocol):
    """What the runtime reads from an image config (``ipfsnap.oci.ImageConfig`` has it)."""

    @property
    def entrypoint(self) -> list[str] | None: ...

    @property
    def cmd(self) -> list[str] | None: ...

    @property
    def env(self) -> list[str]: ...

    @property
    def working_dir(self) -> str: ...

    @property
    def user(self) -> str: ...


@dataclass(frozen=True)
class ResolvedUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    home: str = "/"


# ---------------------------------------------------------------------------------------------
# option parsing


def parse_mount(text: str) -> BindMount:
    """Parse ``type=bind,src=/a,dst=/b[,ro]`` (also ``source=``, ``destination=``/``target=``,
    ``ro=true|false``, ``readonly``, ``rw``)."""
    fields: dict[str, str] = {}
    readonly = False
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep:
            if key in ("ro", "readonly"):
                readonly = True
                continue
            if key == "rw":
                readonly = False
                continue
            raise BadRunOption(f"--mount {text!r}: unknown flag {key!r}")
        if key in ("ro", "readonly"):
            if value.lower() not in ("true", "1", "false", "0"):
                raise BadRunOption(f"--mount {text!r}: {key}= must be true or false")
            readonly = value.lower() in ("true", "1")
            continue
        alias = {"source": "src", "destination": "dst", "target": "dst"}.get(key, key)
        if alias not in ("type", "src", "dst"):
            raise BadRunOption(f"--mount {text!r}: unknown key {key!r}")
        if alias in fields:
            raise BadRunOption(f"--mount {text!r}: {alias} given twice")
        fields[alias] = value
    mtype = fields.get("type", "bind")
    if mtype != "bind":
        raise BadRunOption(f"--mount {text!r}: only type=bind is supported, got {mtype!r}")
    src, dst = fields.get("src", ""), fields.get("dst", "")
    if not src or not dst:
        raise BadRunOption(f"--mount {text!r}: both src= and dst= are required")
    return BindMount(Path(src).absolute(), clean_container_path(dst, f"--mount {text!r}"), readonly)


def clean_container_path(path: str, what: str) -> str:
    """An absolute, normalised path inside the container; ``..`` is refused."""
    if not path.startswith("/"):
        raise BadRunOption(f"{what}: container path {path!r} must be absolute")
    parts = [p for p in PurePosixPath(path).parts[1:] if p != "."]
    if ".." in parts:
        raise BadRunOption(f"{what}: container path {path!r} must not contain '..'")
    return "/" + "/".join(parts)


def parse_env(items: Iterable[str]) -> list[str]:
    """``K=V`` items; a bare ``K`` takes the value of the caller's environment (as docker)."""
    out: list[str] = []
    for item in items:
        key, sep, _ = item.partition("=")
        if not key or "\0" in item:
            raise BadRunOption(f"--env {item!r}: expected KEY=VALUE")
        if not sep:
            if key in os.environ:
                out.append(f"{key}={os.environ[key]}")
            continue
        out.append(item)
    return out


def env_value(env: Sequence[str], key: str) -> str | None:
    """The last ``key=`` entry of ``env`` (the one a process sees), or None."""
    value = None
    for item in env:
        k, sep, v = item.partition("=")
        if sep and k == key:
            value = v
    return value


def merge_env(*layers: Sequence[str]) -> list[str]:
    """Later layers override earlier ones key by key; the first position of a key is kept."""
    merged: dict[str, str] = {}
    for layer in layers:
        for item in layer:
            key, _, value = item.partition("=")
            merged[key] = value
    return [f"{k}={v}" for k, v in merged.items()]


def image_args(
    entrypoint: Sequence[str] | None, cmd: Sequence[str] | None, override: Sequence[str]
) -> list[str]:
    """The process args, as ``ctr run``: given args replace Entrypoint *and* Cmd entirely;
    without them the image's Entrypoint + Cmd run (docker would keep the Entrypoint)."""
    if override:
        return list(override)
    return list(entrypoint or []) + list(cmd or [])


# ---------------------------------------------------------------------------------------------
# values from an image (untrusted) or the command line


def show(value: str) -> str:
    """``value`` quoted for a one-line message: escapes (newline, NUL) visible, cut short."""
    text = repr(value)
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 4] + "...'"


def _what(cfg: ContainerConfig, name: str) -> str:
    if name in cfg.from_image:
        return f"image {cfg.image}: config.{_IMAGE_FIELDS[name]}"
    return _OPTIONS[name]


def _refuse(cfg: ContainerConfig, name: str, problem: str) -> NoReturn:
    """Raise the error for a bad ``name`` value: the image's fault or the user's."""
    if name in cfg.from_image:
        raise ImageConfigError(f"{_what(cfg, name)} {problem}")
    raise BadRunOption(f"{_what(cfg, name)} {problem}")


def _text_problem(value: str, strict: bool = True) -> str | None:
    """Why ``value`` cannot be passed to the kernel as a C string, or None.

    ``strict`` (values from an image's JSON): every surrogate is refused, as no UTF-8 text
    holds one (runc's JSON decoder would turn it into U+FFFD, another string than the one
    checked here). Not strict (the command line): undecodable argv bytes, which Python
    carries as surrogates U+DC80-U+DCFF, are the user's own and pass.
    """
    if "\0" in value:
        return "contains a NUL byte"
    try:
        value.encode("utf-8", "strict" if strict else "surrogateescape")
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate)"
    return None


def _check_env_item(item: str, strict: bool = True) -> str | None:
    """Why ``item`` is not a ``KEY=VALUE`` runc accepts, or None."""
    problem = _text_problem(item, strict)
    if problem:
        return problem
    key, sep, _ = item.partition("=")
    if not sep:
        return "has no '=' (expected KEY=VALUE; runc refuses it)"
    if not key:
        return "has an empty name (expected KEY=VALUE)"
    return None


def image_container_config(
    image: str,
    config: ImageConfigView,
    *,
    command: Sequence[str] = (),
    env: Sequence[str] = (),
    cwd: str | None = None,
    user: str | None = None,
    hostname: str = "",
    tty: bool = False,
    mounts: Sequence[BindMount] = (),
    net: str = "none",
) -> ContainerConfig:
    """The container config of ``image`` (its name, for errors) under command-line overrides.

    ``command`` replaces Entrypoint and Cmd (as ``ctr run``); ``env`` (already ``K=V``) is
    merged over the image's Env key by key; ``cwd`` and ``user`` replace WorkingDir and User.
    The image's Env entries are checked here (their index is known here only); everything
    else is checked when the spec is built against the mounted rootfs.
    """
    from_image = set()
    if not command:
        from_image.add("args")
    image_env = list(config.env)
    for i, item in enumerate(image_env):
        problem = _check_env_item(item)
        if problem:
            raise ImageConfigError(f"image {image}: config.Env[{i}] {show(item)} {problem}")
    if image_env:
        from_image.add("env")
    if not cwd and config.working_dir:
        from_image.add("cwd")
    if user is None and config.user:
        from_image.add("user")
    return ContainerConfig(
        args=image_args(config.entrypoint, config.cmd, command),
        env=merge_env(image_env, env),
        cwd=cwd or config.working_dir or "/",
        user=user if user is not None else config.user,
        hostname=hostname,
        tty=tty,
        mounts=list(mounts),
        net=net,
        image=image,
        from_image=frozenset(from_image),
    )


# ---------------------------------------------------------------------------------------------
# files inside the rootfs


class SymlinkLoop(ImageConfigError):
    """Resolving a path in the rootfs met more than MAX_SYMLINKS symlinks."""

    def __init__(self, root: Path | str, path: str) -> None:
        #: the problem alone, for callers that name the field themselves
        self.problem = f"too many symlinks (over {MAX_SYMLINKS}; a loop?)"
        super().__init__(f"rootfs {root}: {path}: {self.problem}")


class Tree(Protocol):
    """A directory tree seen as a rootfs: one directory, or a stack of layers
    (runtime/layers.py). ``parts`` are a path's components below the root, already free of
    symlinks and ``..``."""

    def lstat(self, parts: Sequence[str]) -> os.stat_result | None:
        """The entry's status without following a final symlink; None if it is absent."""
        ...

    def readlink(self, parts: Sequence[str]) -> str:
        """The target of the symlink at ``parts``."""
        ...


def resolve_links(tree: Tree, path: str, *, what: Path | str) -> list[str]:
    """The components of ``path`` below the root of ``tree`` with every symlink resolved as
    if the root were ``/``: the result never leaves the root (``..`` stops there, an absolute
    target starts again at the root). Components that do not exist are kept as given.
    ``what`` names the root in the error for a symlink loop."""
    parts = [p for p in PurePosixPath(path).parts if p not in ("/", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        st = tree.lstat([*resolved, name])
        if st is None:
            # missing: the rest cannot exist either; keep it for the caller's error message
            resolved.append(name)
            resolved.extend(p for p in parts if p != "..")
            break
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise SymlinkLoop(what, path)
            target = tree.readlink([*resolved, name])
            if target.startswith("/"):
                resolved = []
            parts = [p for p in PurePosixPath(target).parts if p not in ("/", ".")] + parts
            continue
        resolved.append(name)
    return resolved


@dataclass(frozen=True)
class DirTree:
    """One directory as a :class:`Tree`."""

    root: Path

    def lstat(self, parts: Sequence[str]) -> os.stat_result | None:
        try:
            return self.root.joinpath(*parts).lstat()
        except OSError:
            return None

    def readlink(self, parts: Sequence[str]) -> str:
        return os.readlink(self.root.joinpath(*parts))

    def host_path(self, parts: Sequence[str]) -> Path | None:
        return self.root.joinpath(*parts)

    def listdir(self, parts: Sequence[str]) -> list[str]:
        try:
            return os.listdir(self.root.joinpath(*parts))
        except OSError:
            return []


def resolve_in_root(root: Path, path: str) -> Path:
    """``path`` inside ``root`` with every symlink resolved as if ``root`` were ``/``.

    An image's /etc/passwd may be a symlink (even an absolute one); following it naively would
    read the host's file. The result never leaves ``root``.
    """
    return root.joinpath(*resolve_links(DirTree(root), path, what=root))


def resolve_container_path(root: Path, path: str) -> str:
    """The absolute container path ``path`` names once the image's symlinks are resolved
    (inside ``root``); components that do not exist are kept as given."""
    rel = resolve_in_root(root, path).relative_to(root)
    return "/" if str(rel) == "." else "/" + str(rel)


def clean_cwd(path: str) -> str:
    """An absolute working directory, ``.`` and ``..`` folded lexically (as docker does:
    ``..`` of ``/`` is ``/``, so this never climbs out of the container's root)."""
    parts: list[str] = []
    for p in PurePosixPath(path).parts[1:]:
        if p == "..":
            if parts:
                parts.pop()
        elif p != ".":
            parts.append(p)
    return "/" + "/".join(parts)


def _under(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree + "/")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"


def _non_directory_on_path(root: Path, path: str, *, include_last: bool) -> str | None:
    """The first existing component of the (resolved) container ``path`` that is not a
    directory, or None; components after a missing one do not exist either."""
    parts = [p for p in PurePosixPath(path).parts[1:]]
    if not include_last:
        parts = parts[:-1]
    current = root
    for i, name in enumerate(parts):
        current = current / name
        try:
            st = current.lstat()
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return "/" + "/".join(parts[: i + 1]) + f" (a {_kind(st.st_mode)})"
    return None


def _read_account_file(rootfs: Path, path: str, source: str) -> list[list[str]]:
    """The rows of the rootfs's ``path`` (/etc/passwd, /etc/group); [] when it is missing.

    Only a regular file is opened: the host process runs as root, and opening a device node
    of the image (/etc/passwd as char 1:1 = /dev/mem, a disk, a watchdog) would act on the
    host's device, a fifo would block forever.
    """
    try:
        real = resolve_in_root(rootfs, path)
    except SymlinkLoop as exc:
        raise ImageConfigError(f"{source}: {path}: {exc.problem}") from None
    try:
        st = real.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise BundleError(f"{source}: {path}: cannot read: {exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ImageConfigError(
            f"{source}: {path} is a {_kind(st.st_mode)}, not a regular file; not read"
        )
    if st.st_size > MAX_ACCOUNT_FILE:
        raise ImageConfigError(
            f"{source}: {path} has {st.st_size} bytes, over the {MAX_ACCOUNT_FILE}-byte limit"
        )
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(real, flags)
        with os.fdopen(fd, "rb") as f:
            # checked again on the open file: the path was only looked at before
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ImageConfigError(f"{source}: {path} is not a regular file; not read")
            data = f.read(MAX_ACCOUNT_FILE + 1)
    except OSError as exc:
        raise BundleError(f"{source}: {path}: cannot read: {exc}") from exc
    if len(data) > MAX_ACCOUNT_FILE:
        raise ImageConfigError(f"{source}: {path} is over the {MAX_ACCOUNT_FILE}-byte limit")
    rows = []
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def _is_number(text: str) -> bool:
    # ASCII only: str.isdigit() accepts '²' and '٣', which int() rejects or reads as 3
    return text.isascii() and text.isdigit()


def _int_id(text: str) -> int | None:
    """A uid/gid field of /etc/passwd or /etc/group; None when not a valid id."""
    if _is_number(text) and len(text) <= len(str(MAX_ID)):
        value = int(text)
        if value <= MAX_ID:
            return value
    return None


def _spec_id(text: str, what: str, fail: type[IpfsnapError]) -> int | None:
    """A numeric uid/gid of a user spec; None for a name; out of range is an error."""
    if not _is_number(text):
        return None
    value = _int_id(text)
    if value is None:
        raise fail(f"{what}: id {show(text)} is out of range (0 to {MAX_ID})")
    return value


def resolve_user(
    rootfs: Path,
    user: str,
    *,
    what: str = "",
    source: str = "",
    from_image: bool = False,
) -> ResolvedUser:
    """Resolve ``uid[:gid]`` / ``name[:group]`` against the rootfs's /etc/passwd and /etc/group.

    A numeric uid absent from /etc/passwd is fine (gid 0, home /), as docker; a name that is
    absent is an error. Supplementary groups are the /etc/group entries listing the user.
    ``what`` names the value in errors (``--user 'x'``, ``image I: config.User 'x'``),
    ``source`` the rootfs (``image I``); ``from_image`` makes a malformed value the image's
    fault (:class:`ImageConfigError`) rather than the user's (:class:`BadRunOption`).
    """
    what = f"{what or '--user'} {show(user)}"
    source = source or f"rootfs {rootfs}"
    # a refusal to read /etc/passwd names the value that needed it, and the image
    where = what if from_image else f"{what}: {source}" if user else source
    fail: type[IpfsnapError] = ImageConfigError if from_image else BadRunOption
    problem = _text_problem(user, from_image)
    if problem:
        raise fail(f"{what} {problem}")
    spec = user.strip() or "0"
    uname, _, gname = spec.partition(":")
    if not uname:
        raise fail(f"{what}: empty user (expected uid[:gid] or name[:group])")
    if ":" in gname:
        raise fail(f"{what}: more than one ':' (expected uid[:gid] or name[:group])")
    uid = _spec_id(uname, what, fail)
    g = _spec_id(gname, what, fail) if gname else None
    # /etc/group is read beside /etc/passwd: on a lazily pulled rootfs each first read is
    # a round trip to IPFS (0.1-0.3 s through bitswap), and both are needed for every
    # container. Its errors still come after passwd's, as if read in turn.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="etc-group") as pool:
        pending_groups = pool.submit(_read_account_file, rootfs, "/etc/group", where)
        passwd = _read_account_file(rootfs, "/etc/passwd", where)
        return _resolve_user_rows(
            passwd, pending_groups, uid, uname, g, gname, what=what, source=source
        )


def _resolve_user_rows(
    passwd: list[list[str]],
    pending_groups: Future[list[list[str]]],
    uid: int | None,
    uname: str,
    g: int | None,
    gname: str,
    *,
    what: str,
    source: str,
) -> ResolvedUser:
    entry: list[str] | None = None
    for row in passwd:
        if len(row) < 4:
            continue
        if (uid is None and row[0] == uname) or (uid is not None and _int_id(row[2]) == uid):
            entry = row
            break
    if entry is None and uid is None:
        raise UserNotFound(f"{what}: user {show(uname)} not found in the image's /etc/passwd")
    if entry is not None:
        uid_found = _int_id(entry[2])
        gid_found = _int_id(entry[3])
        if uid_found is None or gid_found is None:
            raise UserNotFound(
                f"{what}: {source}: malformed /etc/passwd entry for {show(entry[0])}"
            )
        uid, gid = uid_found, gid_found
        home = entry[5] if len(entry) > 5 and entry[5] else "/"
        login = entry[0]
    else:
        assert uid is not None
        gid, home, login = 0, "/", ""
    if _text_problem(home, strict=False) or not home.startswith("/"):
        # HOME of a hostile passwd goes into the environment: keep it a plain absolute path
        log.warning("%s: home %s of %s is unusable, using /", source, show(home), show(login))
        home = "/"
    groups = pending_groups.result()
    if gname:
        if g is None:
            for row in groups:
                if len(row) >= 3 and row[0] == gname and _int_id(row[2]) is not None:
                    g = _int_id(row[2])
                    break
            if g is None:
                raise UserNotFound(
                    f"{what}: group {show(gname)} not found in the image's /etc/group"
                )
        gid = g
    # a dict keeps /etc/group's order and makes each duplicate check O(1): with a list, an
    # image listing the user in 65537 groups took minutes (quadratic)
    extra: dict[int, None] = {}
    if login:
        for row in groups:
            if len(row) >= 4 and login in row[3].split(","):
                g2 = _int_id(row[2])
                if g2 is not None and g2 != gid:
                    extra[g2] = None
    if len(extra) > NGROUPS_MAX:
        raise ImageConfigError(
            f"{what}: {source}: /etc/group lists the user in {len(extra)} groups, over the "
            f"kernel's {NGROUPS_MAX}"
        )
    return ResolvedUser(uid, gid, tuple(extra), home)


# ---------------------------------------------------------------------------------------------
# the spec


def default_hostname(cfg: ContainerConfig, container_id: str) -> str:
    if cfg.hostname:
        return cfg.hostname
    if cfg.net == "host":
        return socket.gethostname()
    return container_id[: HOST_NAME_MAX - 1]


def _arg_max() -> int:
    """What execve(2) takes in all (strings + NULs + pointers): a quarter of the stack limit
    (which runc and the container inherit from us), as glibc's sysconf reports it."""
    try:
        value = os.sysconf("SC_ARG_MAX")
    except (OSError, ValueError):
        value = -1
    # 2 MiB = a quarter of the usual 8 MiB stack limit
    return value if value > 0 else 2 << 20


def _validate(cfg: ContainerConfig, container_id: str) -> None:
    """Checks that need no rootfs; raises BadRunOption / ImageConfigError naming the value."""
    if not cfg.args:
        raise BadRunOption(
            f"container {container_id}: no command (the image has no Entrypoint/Cmd and none given)"
        )
    if not cfg.args[0]:
        _refuse(cfg, "args", f"{show(cfg.args[0])}: the program name (first item) is empty")
    for i, arg in enumerate(cfg.args):
        problem = _text_problem(arg, "args" in cfg.from_image)
        if problem:
            _refuse(cfg, "args", f"[{i}] {show(arg)} {problem}")
    if cfg.net not in NET_MODES:
        raise BadRunOption(f"--net {cfg.net!r}: expected one of {', '.join(NET_MODES)}")
    if cfg.hostname and (
        len(cfg.hostname) >= HOST_NAME_MAX or not _HOSTNAME.match(cfg.hostname)
    ):
        raise BadRunOption(
            f"--hostname {show(cfg.hostname)}: expected at most {HOST_NAME_MAX - 1} letters, "
            "digits, '-', '.' or '_'"
        )
    problem = _text_problem(cfg.cwd, "cwd" in cfg.from_image)
    if problem:
        _refuse(cfg, "cwd", f"{show(cfg.cwd)} {problem}")
    if not cfg.cwd.startswith("/"):
        _refuse(cfg, "cwd", f"{show(cfg.cwd)}: the working directory must be an absolute path")
    if len(cfg.cwd.encode("utf-8", "surrogateescape")) >= PATH_MAX:
        _refuse(cfg, "cwd", f"{show(cfg.cwd)}: longer than the kernel's PATH_MAX ({PATH_MAX})")
    for item in cfg.env:
        # the image's entries were checked strictly (with their index) already
        problem = _check_env_item(item, strict=False)
        if problem:
            raise BadRunOption(f"env {show(item)} {problem}")
    # execve(2) limits, checked here so the error names the culprit instead of runc's E2BIG
    totals = {"args": 0, "env": 0}
    for name, values in (("args", cfg.args), ("env", cfg.env)):
        for value in values:
            size = len(value.encode("utf-8", "surrogateescape")) + 1
            if size > MAX_ARG_STRLEN:
                _refuse(cfg, name, f"{show(value)}: {size} bytes, over the kernel's "
                        f"{MAX_ARG_STRLEN}-byte limit per string")
            totals[name] += size + _POINTER  # execve counts the argv/envp pointer too
    total = totals["args"] + totals["env"]
    arg_max = _arg_max()
    if total > arg_max:
        # blame the bigger part
        culprit = "env" if totals["env"] > totals["args"] else "args"
        _refuse(
            cfg,
            culprit,
            f"is too big: command and environment take {total} bytes ({len(cfg.args)} args, "
            f"{len(cfg.env)} variables), over execve's {arg_max} (E2BIG)",
        )


def _source(cfg: ContainerConfig, rootfs: Path) -> str:
    return f"image {cfg.image}" if cfg.image else f"rootfs {rootfs}"


def _check_kernel_mountpoints(cfg: ContainerConfig, rootfs: Path) -> None:
    """/proc, /sys and /dev of the rootfs must be directories (or missing: runc makes them)."""
    for path in KERNEL_MOUNTPOINTS:
        try:
            st = (rootfs / path[1:]).lstat()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise BundleError(f"{_source(cfg, rootfs)}: {path}: {exc}") from exc
        if not stat.S_ISDIR(st.st_mode):
            raise ImageConfigError(
                f"{_source(cfg, rootfs)}: {path} is a {_kind(st.st_mode)}, not a directory "
                "(the kernel's filesystem is mounted there)"
            )


def _resolve_cwd(cfg: ContainerConfig, rootfs: Path) -> str:
    """The working directory with the image's symlinks resolved inside the rootfs."""
    cwd = clean_cwd(cfg.cwd)
    try:
        resolved = resolve_container_path(rootfs, cwd)
    except SymlinkLoop as exc:
        _refuse(cfg, "cwd", f"{show(cfg.cwd)}: {exc.problem}")
    via = f"{show(cfg.cwd)}" + (f" (resolves to {show(resolved)})" if resolved != cwd else "")
    for tree in MAGIC_TREES:
        if _under(resolved, tree):
            _refuse(
                cfg,
                "cwd",
                f"{via}: a working directory inside {tree} is refused (its fd/N links lead "
                "to the runtime's open files, CVE-2024-21626)",
            )
    bad = _non_directory_on_path(rootfs, resolved, include_last=True)
    if bad:
        _refuse(cfg, "cwd", f"{via}: {bad} in the rootfs is not a directory")
    if resolved != cfg.cwd:
        log.info("%s %s: using %s", _what(cfg, "cwd"), show(cfg.cwd), resolved)
    return resolved


def _check_program(cfg: ContainerConfig, rootfs: Path) -> None:
    """An image's program given by path must not lead into /proc or /dev (as the cwd)."""
    if "args" not in cfg.from_image or "/" not in cfg.args[0]:
        return  # a bare name is looked up in PATH by the container; the user's own command
    program = cfg.args[0] if cfg.args[0].startswith("/") else cfg.cwd + "/" + cfg.args[0]
    if len(program.encode("utf-8", "surrogateescape")) >= PATH_MAX:
        _refuse(cfg, "args", f"{show(cfg.args[0])}: longer than the kernel's PATH_MAX ({PATH_MAX})")
    try:
        resolved = resolve_container_path(rootfs, clean_cwd(program))
    except SymlinkLoop as exc:
        _refuse(cfg, "args", f"{show(cfg.args[0])}: {exc.problem}")
    for tree in MAGIC_TREES:
        if _under(resolved, tree):
            _refuse(
                cfg,
                "args",
                f"{show(cfg.args[0])} resolves to {show(resolved)}: a program inside {tree} "
                "is refused (/proc/self/exe is the runtime itself, CVE-2019-5736)",
            )


def _mount_destination(rootfs: Path, dest: str, what: str, fail: type[IpfsnapError]) -> str:
    """A bind mount's destination with the image's symlinks resolved inside the rootfs.

    The resolved path goes into the spec, so runc never follows a symlink of the image
    (securejoin races, CVE-2021-30465), and the checks below see where the mount lands.
    """
    try:
        resolved = resolve_container_path(rootfs, dest)
    except SymlinkLoop as exc:
        raise fail(f"{what}: destination {show(dest)}: {exc.problem}") from None
    via = show(dest) + (f" (resolves to {show(resolved)})" if resolved != dest else "")
    if resolved == "/":
        raise fail(f"{what}: destination {via} would cover the container's root")
    if _under(resolved, "/proc"):
        raise fail(f"{what}: destination {via} lies inside /proc (refused, as runc does)")
    for tree in KERNEL_MOUNTPOINTS:
        if resolved != dest and _under(resolved, tree):
            raise fail(f"{what}: destination {via}: a symlink of the image leads into {tree}")
    bad = _non_directory_on_path(rootfs, resolved, include_last=False)
    if bad:
        raise fail(f"{what}: destination {via}: {bad} in the rootfs is not a directory")
    if resolved != dest:
        log.info("%s: mount destination %s resolves to %s", what, dest, resolved)
    return resolved


def _default_mounts() -> list[dict[str, Any]]:
    return [
        {
            "destination": "/proc",
            "type": "proc",
            "source": "proc",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", _TMPFS_SIZE],
        },
        # gid=5 is the "tty" group in every Debian/busybox passwd; mode 0620 = owner rw, group w
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", _TMPFS_SIZE],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
        },
    ]


def _bind(source: Path, destination: str, readonly: bool) -> dict[str, Any]:
    # rprivate: mounts made later on the host are not propagated into the container
    options = ["rbind", "rprivate"]
    if readonly:
        options.append("ro")
    return {"destination": destination, "type": "bind", "source": str(source), "options": options}


def build_spec(
    cfg: ContainerConfig,
    *,
    container_id: str,
    rootfs: Path,
    etc_files: Mapping[str, Path],
    cgroups_path: str,
) -> dict[str, Any]:
    """The runtime-spec document (a JSON-ready dict) for ``cfg``.

    ``etc_files`` maps container paths (``/etc/resolv.conf``...) to files to bind mount there.
    """
    _validate(cfg, container_id)
    source = _source(cfg, rootfs)
    _check_kernel_mountpoints(cfg, rootfs)
    cwd = _resolve_cwd(cfg, rootfs)
    _check_program(cfg, rootfs)
    user = resolve_user(
        rootfs,
        cfg.user,
        what=_what(cfg, "user"),
        source=source,
        from_image="user" in cfg.from_image,
    )
    env = merge_env(
        [f"PATH={DEFAULT_PATH}", f"HOME={user.home}"] + (["TERM=xterm"] if cfg.tty else []),
        cfg.env,
    )
    caps = list(DEFAULT_CAPABILITIES)
    privileged_sets = caps if user.uid == 0 else []
    user_doc: dict[str, Any] = {"uid": user.uid, "gid": user.gid}
    if user.additional_gids:
        user_doc["additionalGids"] = list(user.additional_gids)
    mounts = _default_mounts()
    for dest, src in etc_files.items():
        # ipfsnap's own files: where the image's /etc leads is the image's doing
        where = _mount_destination(rootfs, dest, source, ImageConfigError)
        mounts.append(_bind(src, where, readonly=False))
    for m in cfg.mounts:
        if not m.source.exists():
            raise BadRunOption(f"--mount src={m.source}: no such file or directory")
        where = _mount_destination(rootfs, m.destination, f"--mount dst={m.destination}",
                                   BadRunOption)
        mounts.append(_bind(m.source, where, m.readonly))
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if cfg.net != "host":
        namespaces.append({"type": "network"})
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": cfg.tty,
            "user": user_doc,
            "args": list(cfg.args),
            "env": env,
            "cwd": cwd,
            "capabilities": {
                "bounding": caps,
                "effective": list(privileged_sets),
                "permitted": list(privileged_sets),
                "inheritable": [],
                "ambient": [],
            },
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": cfg.rlimit_nofile, "soft": cfg.rlimit_nofile}
            ],
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": default_hostname(cfg, container_id),
        "mounts": mounts,
        "linux": {
            "cgroupsPath": cgroups_path,
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": namespaces,
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }


_HOSTS_TEMPLATE = """127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
fe00::0\tip6-localnet
ff00::0\tip6-mcastprefix
ff02::1\tip6-allnodes
ff02::2\tip6-allrouters
127.0.1.1\t{hostname}
"""


def write_etc_files(bundle: Path, cfg: ContainerConfig, hostname: str) -> dict[str, Path]:
    """Write resolv.conf, hosts and hostname into ``bundle``; return container path -> file."""
    files = {
        "/etc/resolv.conf": bundle / "resolv.conf",
        "/etc/hosts": bundle / "hosts",
        "/etc/hostname": bundle / "hostname",
    }
    try:
        if cfg.net == "host":
            for name in ("resolv.conf", "hosts"):
                host = Path("/etc") / name
                if host.exists():
                    shutil.copyfile(host, bundle / name)
                else:
                    (bundle / name).write_text("")
        else:
            # only lo exists: no name server can be reached, say so instead of copying the
            # host's (which would time out on every lookup)
            files["/etc/resolv.conf"].write_text("# ipfsnap: --net none, no name servers\n")
            files["/etc/hosts"].write_text(_HOSTS_TEMPLATE.format(hostname=hostname))
        files["/etc/hostname"].write_text(hostname + "\n")
    except OSError as exc:
        raise BundleError(f"bundle {bundle}: cannot write /etc files: {exc}") from exc
    for f in files.values():
        f.chmod(0o644)
    return files


def write_bundle(
    bundle: Path,
    cfg: ContainerConfig,
    *,
    container_id: str,
    rootfs: Path,
    cgroups_path: str,
) -> dict[str, Any]:
    """Create ``bundle/config.json`` (and the /etc files) for a rootfs that is already mounted."""
    try:
        bundle.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(f"bundle {bundle}: cannot create: {exc}") from exc
    _validate(cfg, container_id)
    hostname = default_hostname(cfg, container_id)
    etc = write_etc_files(bundle, cfg, hostname)
    spec = build_spec(
        cfg, container_id=container_id, rootfs=rootfs, etc_files=etc, cgroups_path=cgroups_path
    )
    tmp = bundle / "config.json.tmp"
    try:
        tmp.write_text(json.dumps(spec, indent=2))
        os.replace(tmp, bundle / "config.json")
    except OSError as exc:
        raise BundleError(f"bundle {bundle}: cannot write config.json: {exc}") from exc
    log.debug("wrote bundle %s for container %s", bundle, container_id)
    return spec
