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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ipfsnap.runtime.errors import BadRunOption, BundleError, UserNotFound

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
# files inside the rootfs


def resolve_in_root(root: Path, path: str) -> Path:
    """``path`` inside ``root`` with every symlink resolved as if ``root`` were ``/``.

    An image's /etc/passwd may be a symlink (even an absolute one); following it naively would
    read the host's file. The result never leaves ``root``.
    """
    parts = [p for p in PurePosixPath(path).parts if p not in ("/", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, name)
        try:
            st = candidate.lstat()
        except OSError:
            # missing: the rest cannot exist either; keep it for the caller's error message
            resolved.append(name)
            resolved.extend(p for p in parts if p != "..")
            break
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise BundleError(f"{root}: too many symlinks resolving {path}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in PurePosixPath(target).parts if p not in ("/", ".")] + parts
            continue
        resolved.append(name)
    return root.joinpath(*resolved)


def _read_account_file(rootfs: Path, path: str) -> list[list[str]]:
    real = resolve_in_root(rootfs, path)
    try:
        with real.open("rb") as f:
            data = f.read(MAX_ACCOUNT_FILE + 1)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return []
    except OSError as exc:
        raise BundleError(f"{rootfs}{path}: cannot read: {exc}") from exc
    if len(data) > MAX_ACCOUNT_FILE:
        raise BundleError(f"{rootfs}{path}: larger than {MAX_ACCOUNT_FILE} bytes")
    rows = []
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def _int_id(text: str) -> int | None:
    if text.isdigit():
        value = int(text)
        # uid_t is 32 bits; (uid_t)-1 is "no change"
        if value < 0xFFFFFFFF:
            return value
    return None


def resolve_user(rootfs: Path, user: str) -> ResolvedUser:
    """Resolve ``uid[:gid]`` / ``name[:group]`` against the rootfs's /etc/passwd and /etc/group.

    A numeric uid absent from /etc/passwd is fine (gid 0, home /), as docker; a name that is
    absent is an error. Supplementary groups are the /etc/group entries listing the user.
    """
    spec = user.strip() or "0"
    uname, _, gname = spec.partition(":")
    if not uname:
        raise BadRunOption(f"--user {user!r}: empty user")
    passwd = _read_account_file(rootfs, "/etc/passwd")
    entry: list[str] | None = None
    uid = _int_id(uname)
    for row in passwd:
        if len(row) < 4:
            continue
        if (uid is None and row[0] == uname) or (uid is not None and _int_id(row[2]) == uid):
            entry = row
            break
    if entry is None and uid is None:
        raise UserNotFound(f"user {uname!r}: not found in the image's /etc/passwd")
    if entry is not None:
        uid_found = _int_id(entry[2])
        gid_found = _int_id(entry[3])
        if uid_found is None or gid_found is None:
            raise UserNotFound(f"user {uname!r}: malformed /etc/passwd entry in the image")
        uid, gid = uid_found, gid_found
        home = entry[5] if len(entry) > 5 and entry[5] else "/"
        login = entry[0]
    else:
        assert uid is not None
        gid, home, login = 0, "/", ""
    groups = _read_account_file(rootfs, "/etc/group")
    if gname:
        g = _int_id(gname)
        if g is None:
            for row in groups:
                if len(row) >= 3 and row[0] == gname and _int_id(row[2]) is not None:
                    g = _int_id(row[2])
                    break
            if g is None:
                raise UserNotFound(f"group {gname!r}: not found in the image's /etc/group")
        gid = g
    extra: list[int] = []
    if login:
        for row in groups:
            if len(row) >= 4 and login in row[3].split(","):
                g = _int_id(row[2])
                if g is not None and g != gid and g not in extra:
                    extra.append(g)
    return ResolvedUser(uid, gid, tuple(extra), home)


# ---------------------------------------------------------------------------------------------
# the spec


def default_hostname(cfg: ContainerConfig, container_id: str) -> str:
    if cfg.hostname:
        return cfg.hostname
    if cfg.net == "host":
        return socket.gethostname()
    return container_id[: HOST_NAME_MAX - 1]


def _validate(cfg: ContainerConfig, container_id: str) -> None:
    if not cfg.args:
        raise BadRunOption(
            f"container {container_id}: no command (the image has no Entrypoint/Cmd and none given)"
        )
    if cfg.net not in NET_MODES:
        raise BadRunOption(f"--net {cfg.net!r}: expected one of {', '.join(NET_MODES)}")
    if cfg.hostname and (len(cfg.hostname) >= HOST_NAME_MAX or "\0" in cfg.hostname):
        raise BadRunOption(f"--hostname {cfg.hostname!r}: at most {HOST_NAME_MAX - 1} bytes")
    clean_container_path(cfg.cwd, "--cwd")
    for item in cfg.env:
        if "=" not in item or item.startswith("="):
            raise BadRunOption(f"env {item!r}: expected KEY=VALUE")


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
    user = resolve_user(rootfs, cfg.user)
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
        mounts.append(_bind(src, dest, readonly=False))
    for m in cfg.mounts:
        if not m.source.exists():
            raise BadRunOption(f"--mount src={m.source}: no such file or directory")
        mounts.append(_bind(m.source, m.destination, m.readonly))
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
            "cwd": clean_container_path(cfg.cwd, "--cwd"),
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
