"""Hostile image configs: every value an image's config feeds into the OCI runtime spec.

An image pulled from IPFS is untrusted. Unit tests drive the real config parser
(``ipfsnap.oci.parse_config``) and the spec builder against rootfs trees holding the hostile
files; the integration tests at the end import hostile images (the busybox sample's lower
layer, a top layer of hostile files, a hostile config) and run them under runc through the CLI,
as root. Each refusal must be one line naming the image and the field; nothing outside the
rootfs may be read or written (a host canary directory is compared before and after).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipfsnap.content import ImageStore
from ipfsnap.content.archive import import_image
from ipfsnap.content.sample import write_layout_index
from ipfsnap.errors import IpfsnapError
from ipfsnap.oci import Descriptor, Manifest, mediatypes, parse_config
from ipfsnap.runtime import (
    BadRunOption,
    BindMount,
    ContainerConfig,
    UserNotFound,
    build_spec,
    parse_mount,
)
from ipfsnap.runtime.containers import ContainerStore, mountinfo_targets, unmount_all
from ipfsnap.runtime.errors import ImageConfigError
from ipfsnap.runtime.spec import (
    MAX_ACCOUNT_FILE,
    MAX_ARG_STRLEN,
    image_container_config,
)
from tests.reliability.hostile import make_canary
from tests.support import require_root, require_tool

IMAGE = "ipfs://bafyhostile"
PASSWD = "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n"
GROUP = "root:x:0:\nstaff:x:50:alice\nalice:x:1000:\n"


def config_doc(**container: Any) -> dict[str, Any]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["sh"], **container},
        "rootfs": {"type": "layers", "diff_ids": []},
    }


def image_cfg(container: dict[str, Any], **overrides: Any) -> ContainerConfig:
    """The container config of an image whose config holds ``container``, through the real
    parser (JSON bytes, as they come off IPFS)."""
    data = json.dumps(config_doc(**container)).encode()
    return image_container_config(IMAGE, parse_config(data, "config"), **overrides)


def spec_of(root: Path, cfg: ContainerConfig, etc: dict[str, Path] | None = None) -> Any:
    return build_spec(cfg, container_id="c1", rootfs=root, etc_files=etc or {},
                      cgroups_path="/x/c1")


def one_line(exc: BaseException, *names: str) -> str:
    msg = str(exc)
    assert isinstance(exc, IpfsnapError), repr(exc)
    assert "\n" not in msg and len(msg) < 400, msg
    for name in names:
        assert name in msg, (name, msg)
    return msg


def refused(root: Path, container: dict[str, Any], field: str, *names: str,
            **overrides: Any) -> str:
    """The image is refused with ImageConfigError naming the image and ``field``."""
    with pytest.raises(ImageConfigError) as exc:
        spec_of(root, image_cfg(container, **overrides))
    return one_line(exc.value, f"image {IMAGE}", f"config.{field}", *names)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "rootfs"
    for d in ("bin", "etc", "proc", "dev", "sys", "tmp", "home/alice", "app"):
        (r / d).mkdir(parents=True)
    (r / "bin" / "busybox").write_bytes(b"\x7fELF")
    (r / "etc" / "passwd").write_text(PASSWD)
    (r / "etc" / "group").write_text(GROUP)
    return r


@pytest.fixture
def host_canary(tmp_path: Path) -> Path:
    """A host directory an image's symlinks point at (absolute path, outside the rootfs):
    it holds a passwd naming user 'evil' and must never be read or mounted."""
    c = tmp_path / "canary"
    c.mkdir()
    (c / "passwd").write_text("evil:x:4242:4242::/evil:/bin/sh\n")
    return c


@pytest.fixture
def no_hang() -> Iterator[None]:
    """Guard against a read that blocks forever (a fifo): fail after 20 s instead of hanging."""

    def boom(signum: int, frame: object) -> None:
        raise TimeoutError("blocked (hang guard)")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -- WorkingDir -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wd", ["/proc/self/fd/7", "/proc/1/cwd", "/proc", "/proc/self/root/etc", "/dev/fd/3",
           "/dev", "/./proc//self/fd/7", "/tmp/../proc/self/cwd"],
)
def test_workdir_in_proc_or_dev_is_refused(root: Path, wd: str) -> None:
    msg = refused(root, {"WorkingDir": wd}, "WorkingDir", repr(wd), "CVE-2024-21626")
    assert "inside /proc" in msg or "inside /dev" in msg


@pytest.mark.parametrize("target", ["/proc/self/fd/7", "../../../../proc/self/cwd", "/dev/fd"])
def test_workdir_symlink_into_proc_is_refused(root: Path, target: str) -> None:
    os.symlink(target, root / "work")
    msg = refused(root, {"WorkingDir": "/work"}, "WorkingDir", "'/work'", "resolves to")
    assert "CVE-2024-21626" in msg


def test_workdir_symlink_out_of_the_rootfs_stays_inside(root: Path, host_canary: Path) -> None:
    # absolute and relative symlinks pointing at the host's canary resolve inside the rootfs
    os.symlink(str(host_canary), root / "abs")
    os.symlink("../../../../../../.." + str(host_canary), root / "app" / "rel")
    os.symlink("/etc", root / "etclink")
    for wd, expected in (
        ("/abs", str(host_canary)),
        ("/app/rel", str(host_canary)),
        ("/etclink", "/etc"),
        ("/etclink/../tmp", "/tmp"),  # lexical '..' first, as docker: /tmp
    ):
        spec = spec_of(root, image_cfg({"WorkingDir": wd}))
        assert spec["process"]["cwd"] == expected
    # the spec's cwd names a path of the container, which runc resolves after pivot_root; the
    # host canary was neither created nor changed
    assert sorted(p.name for p in host_canary.iterdir()) == ["passwd"]
    assert not (root / str(host_canary)[1:]).exists()


@pytest.mark.parametrize(
    ("wd", "expected"),
    [("/a/../b", "/b"), ("/..", "/"), ("/../../etc", "/etc"), ("/app/./x/", "/app/x"),
     ("//app", "/app"), ("", "/")],
)
def test_workdir_dotdot_is_folded_like_docker(root: Path, wd: str, expected: str) -> None:
    assert spec_of(root, image_cfg({"WorkingDir": wd}))["process"]["cwd"] == expected


@pytest.mark.parametrize(
    ("wd", "problem"),
    [("app", "absolute"), ("./app", "absolute"), ("/bin/busybox", "not a directory"),
     ("/etc/passwd/x", "not a directory"), ("/app\x00/x", "NUL"), ("/a" * 2048, "PATH_MAX"),
     ("/app/\ud800", "lone surrogate"), ("/app/\udc80", "lone surrogate")],
)
def test_bad_workdir_is_refused(root: Path, wd: str, problem: str) -> None:
    refused(root, {"WorkingDir": wd}, "WorkingDir", problem)


def test_symlink_loops(root: Path, tmp_path: Path) -> None:
    os.symlink("loop2", root / "loop1")
    os.symlink("/loop1", root / "loop2")
    refused(root, {"WorkingDir": "/loop1/x"}, "WorkingDir", "'/loop1/x'", "too many symlinks")
    refused(root, {"Entrypoint": ["/loop2"]}, "Entrypoint/Cmd", "'/loop2'", "too many symlinks")
    (root / "etc" / "passwd").unlink()
    os.symlink("/loop1", root / "etc" / "passwd")
    refused(root, {"User": "alice"}, "User", "/etc/passwd", "too many symlinks")
    (root / "etc" / "passwd").unlink()
    with pytest.raises(BadRunOption) as exc:
        spec_of(root, image_cfg({}, mounts=[BindMount(tmp_path, "/loop2/m")]))
    one_line(exc.value, "--mount", "'/loop2/m'", "too many symlinks")


def test_workdir_missing_is_left_to_runc(root: Path) -> None:
    # runc (and docker) create a missing working directory, inside the rootfs
    assert spec_of(root, image_cfg({"WorkingDir": "/srv/new"}))["process"]["cwd"] == "/srv/new"


def test_cli_values_may_carry_undecodable_bytes(root: Path) -> None:
    # argv bytes that are not UTF-8 reach Python as U+DC80-U+DCFF: the user's own, accepted
    spec = spec_of(root, image_cfg({}, cwd="/app/\udcff", command=["echo", "\udc80"],
                                   env=["K=\udcfe"]))
    assert "K=\udcfe" in spec["process"]["env"]
    assert spec["process"]["cwd"] == "/app/\udcff"


def test_cli_cwd_is_checked_the_same_way(root: Path) -> None:
    with pytest.raises(BadRunOption) as exc:
        spec_of(root, image_cfg({"WorkingDir": "/app"}, cwd="/proc/self/fd/5"))
    one_line(exc.value, "--cwd", "/proc/self/fd/5")
    assert IMAGE not in str(exc.value)  # the user's value, not the image's


# -- User -------------------------------------------------------------------------------------


def test_user_forms(root: Path) -> None:
    def user_of(u: str) -> Any:
        return spec_of(root, image_cfg({"User": u}))["process"]["user"]

    assert user_of("alice:staff") == {"uid": 1000, "gid": 50}
    assert user_of("alice") == {"uid": 1000, "gid": 1000, "additionalGids": [50]}
    assert user_of("1000:0") == {"uid": 1000, "gid": 0, "additionalGids": [50]}
    assert user_of("4294967294") == {"uid": 4294967294, "gid": 0}  # largest uid_t
    assert user_of(" 7 ") == {"uid": 7, "gid": 0}


@pytest.mark.parametrize(
    ("user", "problem"),
    [("4294967295", "out of range"), ("4294967296", "out of range"),
     ("1" * 5000, "out of range"), ("alice:99999999999", "out of range"),
     (":5", "empty user"), ("a:b:c", "more than one ':'"), ("alice\x00", "NUL")],
)
def test_bad_user_is_refused(root: Path, user: str, problem: str) -> None:
    msg = refused(root, {"User": user}, "User", problem)
    assert len(msg) < 300  # a 5000-digit id is cut short in the message


@pytest.mark.parametrize("user", ["mallory", "²", "٣", "alice:nogroup", "-1"])
def test_unknown_user_or_group(root: Path, user: str) -> None:
    # '²' and '٣' pass str.isdigit(); int() rejects the first and reads the second as 3
    with pytest.raises(UserNotFound) as exc:
        spec_of(root, image_cfg({"User": user}))
    one_line(exc.value, f"image {IMAGE}: config.User", "not found")


@pytest.mark.parametrize(
    "target", ["{canary}/passwd", "../../../../../..{canary}/passwd", "/proc/self/environ",
               "/proc/1/root/etc/passwd"],
)
def test_passwd_symlink_to_host_or_proc_reads_nothing_outside(
    root: Path, host_canary: Path, target: str
) -> None:
    (root / "etc" / "passwd").unlink()
    os.symlink(target.format(canary=host_canary), root / "etc" / "passwd")
    # the host canary's passwd names 'evil': resolving it would mean the host file was read
    with pytest.raises(UserNotFound):
        spec_of(root, image_cfg({"User": "evil"}))
    assert spec_of(root, image_cfg({"User": "4242"}))["process"]["user"]["gid"] == 0


def test_passwd_fifo_socket_dir_are_not_read(root: Path, no_hang: None) -> None:
    passwd = root / "etc" / "passwd"
    passwd.unlink()
    os.mkfifo(passwd)  # opening it would block forever
    msg = refused(root, {"User": "alice"}, "User", "/etc/passwd is a fifo")
    assert "not a regular file" in msg
    # numeric users need the file too (HOME, groups): same refusal, no hang
    refused(root, {"User": "0"}, "User", "fifo")
    passwd.unlink()
    passwd.mkdir()
    refused(root, {"User": "alice"}, "User", "/etc/passwd is a directory")
    passwd.rmdir()
    group = root / "etc" / "group"
    group.unlink()
    os.symlink("fifo", group)
    os.mkfifo(root / "etc" / "fifo")
    passwd.write_text(PASSWD)
    refused(root, {"User": "alice"}, "User", "/etc/group is a fifo")


def test_passwd_device_node_is_never_opened(root: Path) -> None:
    require_root()
    passwd = root / "etc" / "passwd"
    passwd.unlink()
    # char 1:1 is /dev/mem: opened by the (root) host process, it would read host memory
    os.mknod(passwd, 0o644 | 0o020000, os.makedev(1, 1))
    refused(root, {"User": "alice"}, "User", "/etc/passwd is a character device")


def test_huge_account_files(root: Path) -> None:
    passwd = root / "etc" / "passwd"
    with passwd.open("r+b") as f:
        f.truncate(MAX_ACCOUNT_FILE + 1)  # sparse: no disk used
    refused(root, {"User": "alice"}, "User", "over the", str(MAX_ACCOUNT_FILE))
    # a user in more groups than setgroups(2) takes
    passwd.write_text(PASSWD)
    (root / "etc" / "group").write_text(
        "".join(f"g{i}:x:{i + 2000}:alice\n" for i in range(65537))
    )
    refused(root, {"User": "alice"}, "User", "65537 groups")


def test_hostile_passwd_fields(root: Path) -> None:
    (root / "etc" / "passwd").write_text(
        "big:x:99999999999:0::/:/bin/sh\nrel:x:5:5::home/rel:/bin/sh\n" + PASSWD
    )
    with pytest.raises(UserNotFound) as exc:
        spec_of(root, image_cfg({"User": "big"}))
    one_line(exc.value, "malformed /etc/passwd entry", "'big'")
    # a relative (or NUL-carrying) home never becomes HOME
    env = spec_of(root, image_cfg({"User": "rel"}))["process"]["env"]
    assert "HOME=/" in env


# -- Env --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "problem"),
    [("NOEQ", "no '='"), ("=value", "empty name"), ("A=\x00b", "NUL"), ("A\x00=b", "NUL"),
     ("A=\udc80\ud800", "lone surrogate")],
)
def test_bad_env_entry_is_refused(item: str, problem: str) -> None:
    with pytest.raises(ImageConfigError) as exc:
        image_cfg({"Env": ["PATH=/bin", item]})
    one_line(exc.value, f"image {IMAGE}: config.Env[1]", problem)


def test_env_duplicates_last_wins_first_position(root: Path) -> None:
    env = spec_of(root, image_cfg({"Env": ["A=1", "B=2", "A=3", "PATH=/x"]},
                                  env=["B=cli"]))["process"]["env"]
    assert env[:4] == ["PATH=/x", "HOME=/root", "A=3", "B=cli"]
    assert [e for e in env if e.startswith("A=")] == ["A=3"]


def test_env_too_big_for_execve(root: Path) -> None:
    # one string over MAX_ARG_STRLEN: named, cut short in the message
    big = "BIG=" + "x" * MAX_ARG_STRLEN
    msg = refused(root, {"Env": [big]}, "Env", "'BIG=xxx", "per string")
    assert len(msg) < 300
    # many small strings over ARG_MAX in all (~2 MiB here; 4 MiB is the config's own limit)
    many = [f"V{i}=xxxxxxxxxxxx" for i in range(100_000)]
    refused(root, {"Env": many}, "Env", "100000 variables", "execve")


# -- Entrypoint / Cmd -------------------------------------------------------------------------


def test_no_command(root: Path) -> None:
    containers: list[dict[str, Any]] = [
        {"Cmd": None}, {"Cmd": [], "Entrypoint": []}, {"Cmd": None, "Entrypoint": None}
    ]
    for container in containers:
        with pytest.raises(BadRunOption) as exc:
            spec_of(root, image_cfg(container))
        one_line(exc.value, "no command")


@pytest.mark.parametrize(
    ("container", "problem"),
    [({"Entrypoint": [""], "Cmd": ["x"]}, "program name"),
     ({"Entrypoint": ["sh", "-c", "a\x00b"]}, "[2]"),
     ({"Cmd": ["/proc/self/exe"]}, "CVE-2019-5736"),
     ({"Cmd": ["/x" * 2048]}, "PATH_MAX"),
     ({"Entrypoint": ["/dev/fd/3"]}, "inside /dev"),
     ({"Cmd": ["echo", "y" * MAX_ARG_STRLEN]}, "per string"),
     ({"Cmd": ["echo"] + ["y" * 16] * 100_000}, "execve")],
)
def test_bad_command_is_refused(root: Path, container: dict[str, Any], problem: str) -> None:
    refused(root, {"Cmd": None, **container}, "Entrypoint/Cmd", problem)


def test_program_symlink_to_proc_self_exe(root: Path) -> None:
    os.symlink("/proc/self/exe", root / "bin" / "evil")
    refused(root, {"Entrypoint": ["/bin/evil"]}, "Entrypoint/Cmd", "'/proc/self/exe'")
    # a relative program path is resolved from the working directory
    refused(root, {"WorkingDir": "/bin", "Entrypoint": ["./evil"]}, "Entrypoint/Cmd",
            "/proc/self/exe")
    # a command given on the command line replaces the image's; it is the user's own choice
    spec = spec_of(root, image_cfg({"Entrypoint": ["/bin/evil"]}, command=["sh"]))
    assert spec["process"]["args"] == ["sh"]


# -- fields ipfsnap run does not use ----------------------------------------------------------


def test_unused_fields_do_not_reach_the_spec(root: Path) -> None:
    hostile = {
        "Volumes": {"/proc/self/fd/7": {}, "../../../etc": {}, "/\x00": {}},
        "ExposedPorts": {"99999999/tcp": {}, "-1/udp": {}, "garbage": {}},
        "StopSignal": "SIGKILL; rm -rf /",
        "Labels": {f"l{i}": "v" * 1000 for i in range(3000)},  # ~3 MB of labels
        "Healthcheck": {"Test": ["CMD", "/proc/self/exe"]},
        "OnBuild": ["RUN evil"],
        "Shell": ["/proc/self/exe"],
        "Hostname": "evil\nhost",
        "Domainname": "x" * 10000,
    }
    plain = spec_of(root, image_cfg({"Cmd": ["sh"]}))
    assert spec_of(root, image_cfg({"Cmd": ["sh"], **hostile})) == plain
    for signal_value in ("9", "SIGKILL", "", "SIGRTMAX+99"):
        assert spec_of(root, image_cfg({"StopSignal": signal_value})) == plain
    # non-string StopSignal / non-object Labels are refused by the config parser itself
    with pytest.raises(IpfsnapError, match="StopSignal"):
        image_cfg({"StopSignal": 9})
    with pytest.raises(IpfsnapError, match="Labels"):
        image_cfg({"Labels": ["a"]})


# -- mounts: ipfsnap's /etc files and --mount -------------------------------------------------


def test_mount_destinations(root: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()

    def dst_of(dst: str) -> Any:
        spec = spec_of(root, image_cfg({}, mounts=[BindMount(src, dst)]))
        return [m["destination"] for m in spec["mounts"] if m["source"] == str(src)]

    os.symlink("/etc", root / "etclink")
    assert dst_of("/etclink/conf") == ["/etc/conf"]  # resolved inside the rootfs
    assert dst_of("/dev/snd") == ["/dev/snd"]  # given by the user as such: allowed
    for link, target in (("procl", "/proc/self"), ("devl", "../dev"), ("sysl", "/sys/kernel")):
        os.symlink(target, root / link)
    for dst, problem in (
        ("/proc/sys/kernel", "inside /proc"),
        ("/procl/fd", "inside /proc"),
        ("/devl", "leads into /dev"),
        ("/sysl", "leads into /sys"),
        ("/bin/busybox/x", "not a directory"),
    ):
        with pytest.raises(BadRunOption) as exc:
            dst_of(dst)
        one_line(exc.value, "--mount", problem)
    with pytest.raises(BadRunOption) as exc:
        parse_mount(f"type=bind,src={src},dst=/tmp/../proc")
    one_line(exc.value, "--mount", "must not contain '..'")
    os.symlink("/", root / "rootlink")
    with pytest.raises(BadRunOption, match="cover the container's root"):
        dst_of("/rootlink")


@pytest.mark.parametrize(
    ("path", "target", "problem"),
    [("etc/hosts", "/proc/sys/kernel/hostname", "inside /proc"),
     ("etc/hostname", "../dev/null", "leads into /dev"),
     ("etc", "/proc/self/cwd", "inside /proc")],
)
def test_image_etc_symlinks_under_ipfsnap_files(
    root: Path, tmp_path: Path, path: str, target: str, problem: str
) -> None:
    link = root / path
    if link.is_dir():
        for child in link.iterdir():
            child.unlink()
        link.rmdir()
    os.symlink(target, link)
    etc = {f"/etc/{n}": tmp_path / n for n in ("resolv.conf", "hosts", "hostname")}
    with pytest.raises(ImageConfigError) as exc:
        spec_of(root, image_cfg({}), etc)
    one_line(exc.value, f"image {IMAGE}", problem)


def test_image_etc_symlink_inside_rootfs_is_followed(root: Path, tmp_path: Path) -> None:
    # Ubuntu-style /etc/resolv.conf -> ../run/systemd/resolve/stub-resolv.conf (dangling)
    os.symlink("../run/systemd/resolve/stub-resolv.conf", root / "etc" / "resolv.conf")
    spec = spec_of(root, image_cfg({}), {"/etc/resolv.conf": tmp_path / "r"})
    dests = [m["destination"] for m in spec["mounts"] if m["source"] == str(tmp_path / "r")]
    assert dests == ["/run/systemd/resolve/stub-resolv.conf"]


@pytest.mark.parametrize("name", ["proc", "sys", "dev"])
def test_kernel_mountpoint_not_a_directory(root: Path, name: str) -> None:
    (root / name).rmdir()
    os.symlink("/etc", root / name)
    with pytest.raises(ImageConfigError) as exc:
        spec_of(root, image_cfg({}))
    one_line(exc.value, f"image {IMAGE}: /{name} is a symlink")


# -- hostname ---------------------------------------------------------------------------------


@pytest.mark.parametrize("hostname", ["evil\n1.2.3.4 bank", "a b", "x/y", "-lead", "h" * 64,
                                      "h\x00"])
def test_bad_hostname(root: Path, hostname: str) -> None:
    with pytest.raises(BadRunOption) as exc:
        spec_of(root, image_cfg({}, hostname=hostname))
    one_line(exc.value, "--hostname")


def test_good_hostnames(root: Path) -> None:
    for h in ("box", "web-1.example.org", "my_container", "h" * 63, "0"):
        assert spec_of(root, image_cfg({}, hostname=h))["hostname"] == h


# =============================================================================================
# Real containers: hostile images imported into a state dir and run under runc by the CLI
# (overlayfs snapshotter: layers unpacked, so device nodes and fifos of a layer are real).


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.mtime, info.uid, info.gid = 0, 0, 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _entry(name: str, kind: bytes, link: str = "", data: bytes = b"", mode: int = 0o644,
           dev: tuple[int, int] = (0, 0)) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.size = kind, link, mode, len(data)
    info.devmajor, info.devminor = dev
    return info, data


def hostile_layers(canary: Path) -> dict[str, bytes]:
    """Top layers over the busybox base, each holding one kind of hostile file."""
    sym, c = tarfile.SYMTYPE, str(canary)
    return {
        "links": _tar([
            _entry("work", sym, "/proc/self/fd/7"),
            _entry("escape", sym, "../../../../../../../.." + c),
            _entry("data-proc", sym, "/proc/self"),
            _entry("data-etc", sym, "/etc"),
            _entry("bin/evil", sym, "/proc/self/exe"),
        ]),
        "passwd-host": _tar([_entry("etc/passwd", sym, c + "/passwd")]),
        "passwd-fifo": _tar([_entry("etc/passwd", tarfile.FIFOTYPE)]),
        # char 1:1 is /dev/mem: the host must never open it
        "passwd-mem": _tar([_entry("etc/passwd", tarfile.CHRTYPE, dev=(1, 1))]),
        "hosts-proc": _tar([_entry("etc/hosts", sym, "/proc/sys/kernel/hostname")]),
    }


#: case: (image config, top layer, extra run options, what the one-line error must name)
REFUSED: dict[str, tuple[dict[str, Any], str, tuple[str, ...], tuple[str, ...]]] = {
    "workdir-proc-fd": ({"WorkingDir": "/proc/self/fd/7"}, "links", (),
                        ("config.WorkingDir", "'/proc/self/fd/7'", "CVE-2024-21626")),
    "workdir-symlink-proc": ({"WorkingDir": "/work"}, "links", (),
                             ("config.WorkingDir", "'/work'", "resolves to '/proc/self/fd/7'")),
    "user-passwd-to-host": ({"User": "evil"}, "passwd-host", (),
                            ("config.User 'evil'", "not found in the image's /etc/passwd")),
    "user-passwd-fifo": ({"User": "root"}, "passwd-fifo", (),
                         ("config.User 'root'", "/etc/passwd is a fifo")),
    "user-passwd-dev-mem": ({"User": "root"}, "passwd-mem", (),
                            ("config.User 'root'", "/etc/passwd is a character device")),
    "env-no-equals": ({"Env": ["A=1", "NOEQ"]}, "links", (), ("config.Env[1] 'NOEQ'", "'='")),
    "program-proc-self-exe": ({"Entrypoint": ["/bin/evil"]}, "links", (),
                              ("config.Entrypoint/Cmd", "'/proc/self/exe'")),
    "etc-hosts-into-proc": ({}, "hosts-proc", (), ("/etc/hosts", "inside /proc")),
    "mount-via-symlink-into-proc": ({}, "links", ("--mount", "src={src},dst=/data-proc/x"),
                                    ("--mount", "resolves to '/proc/self/x'")),
}


@pytest.fixture(scope="module")
def hostile_world(tmp_path_factory: pytest.TempPathFactory, busybox_image: Any) -> Iterator[
        tuple[Path, Path, dict[str, str]]]:
    """(state dir, host canary, case -> image name): every hostile image imported once."""
    require_root()
    require_tool("runc")
    base = tmp_path_factory.mktemp("hostile-config")
    state = base / "state"
    state.mkdir()
    canary = make_canary(base)  # the escape tests' canary, plus a passwd naming 'evil'
    (canary / "passwd").write_text("evil:x:4242:4242::/evil:/bin/sh\n")
    (canary / "src").mkdir()
    (canary / "src" / "marker").write_text("host marker\n")
    layers = hostile_layers(canary)
    cases: dict[str, tuple[dict[str, Any], str]] = {
        k: (cfg, layer) for k, (cfg, layer, _, _) in REFUSED.items()}
    cases["workdir-escape"] = ({"WorkingDir": "/escape"}, "links")
    cases["unused-fields"] = ({
        "Env": ["A=1", "B=2", "A=3"],
        "Volumes": {"/proc/self/fd/7": {}, "../../../etc": {}},
        "ExposedPorts": {"99999999/tcp": {}, "garbage": {}},
        "StopSignal": "SIGKILL; rm -rf /",
        "Labels": {f"l{i}": "v" * 1000 for i in range(1000)},
    }, "links")
    store = ImageStore(state)
    names = {}
    for case, (container, layer) in cases.items():
        layout = build_image(base / "layouts" / case, busybox_image, layers[layer],
                             {"Cmd": ["sh"], **container}, f"ipfsnap-test/hostile-{case}:1")
        names[case] = import_image(store, layout)[0].name
    yield state, canary, names
    containers = ContainerStore(state)
    for cid in containers.ids():
        with contextlib.suppress(Exception):
            containers.destroy(cid, force=True)
    for target in reversed(mountinfo_targets()):
        if target.startswith(f"{state}/"):
            unmount_all(Path(target))


def build_image(out: Path, busybox: Any, top: bytes, container: dict[str, Any],
                name: str) -> Path:
    """An OCI layout: the busybox sample's lower layer, ``top``, and a config holding
    ``container``."""
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes, media_type: str) -> Descriptor:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (blobs / digest[7:]).write_bytes(data)
        return Descriptor(media_type, digest, len(data))

    lower = (busybox.blobs / busybox.layer_digests[0][7:]).read_bytes()
    layers = (blob(lower, mediatypes.OCI_LAYER_GZIP),
              blob(gzip.compress(top, mtime=0), mediatypes.OCI_LAYER_GZIP))
    config = json.loads((busybox.blobs / busybox.config_digest[7:]).read_bytes())
    config["config"] = container
    top_id = "sha256:" + hashlib.sha256(top).hexdigest()
    config["rootfs"]["diff_ids"] = [busybox.diff_ids[0], top_id]
    cdesc = blob(json.dumps(config).encode(), mediatypes.OCI_CONFIG)
    manifest = Manifest(mediatypes.OCI_MANIFEST, cdesc, layers).to_bytes()
    write_layout_index(out, name, blob(manifest, mediatypes.OCI_MANIFEST))
    return out


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(path.rglob("*"))}


def cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipfsnap.cli.main", "--state-dir", str(state), *args],
        capture_output=True, text=True, timeout=120,  # guards against a hang only
    )


@pytest.mark.integration
@pytest.mark.parametrize("case", list(REFUSED))
def test_hostile_image_is_refused_under_runc(
    hostile_world: tuple[Path, Path, dict[str, str]], case: str
) -> None:
    state, canary, names = hostile_world
    before = tree(canary)
    _, _, options, expected = REFUSED[case]
    opts = [o.format(src=canary / "src") for o in options]
    # a command given on the command line would replace the image's Entrypoint and Cmd
    command = [] if "Entrypoint" in REFUSED[case][0] else ["sh", "-c", "echo ran"]
    p = cli(state, "run", "--rm", *opts, names[case], "c-" + case[:20], *command)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode != 0 and "ran" not in p.stdout, (p.stdout, p.stderr)
    assert len(lines) == 1 and lines[0].startswith("ipfsnap: "), p.stderr
    print(f"{case}: {lines[0]}")  # shown with -s: the table in docs/reliability.md
    who = "--mount" if "--mount" in expected else f"image {names[case]}"
    for name in (who, *expected):
        assert name in lines[0], (name, lines[0])
    assert tree(canary) == before
    assert ContainerStore(state).ids() == []
    assert not [m for m in mountinfo_targets() if m.startswith(f"{state}/containers/")]


@pytest.mark.integration
def test_hostile_workdir_and_mount_stay_inside_the_rootfs(
    hostile_world: tuple[Path, Path, dict[str, str]]
) -> None:
    state, canary, names = hostile_world
    before = tree(canary)
    # WorkingDir is a symlink to the host canary's path: the container gets the same path
    # inside its own rootfs (made by runc), writes land there
    script = "pwd; echo pwned > planted; ls; cat /etc/passwd | head -1"
    p = cli(state, "run", "--rm", names["workdir-escape"], "c-escape", "sh", "-c", script)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [str(canary), "planted", "root:x:0:0:root:/root:/bin/sh"]
    # a --mount destination through the image's symlink /data-etc -> /etc lands on the
    # container's /etc, not the host's
    p = cli(state, "run", "--rm", "--mount", f"type=bind,src={canary / 'src'},dst=/data-etc/sub,ro",
            names["workdir-escape"], "c-mount", "sh", "-c", "cat /etc/sub/marker; ls /data-etc/sub")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "host marker\nmarker\n"
    assert not Path("/etc/sub").exists()
    assert tree(canary) == before


@pytest.mark.integration
def test_unused_hostile_fields_run_and_env_duplicates(
    hostile_world: tuple[Path, Path, dict[str, str]]
) -> None:
    state, _, names = hostile_world
    p = cli(state, "run", "--rm", names["unused-fields"], "c-unused", "sh", "-c",
            'echo "A=$A B=$B"; ls /proc/self/fd/7 /etc/../../../etc 2>&1 | head -1')
    assert p.returncode == 0, p.stderr
    # the later duplicate wins (as docker); Volumes / ExposedPorts / StopSignal are not used
    assert p.stdout.splitlines()[0] == "A=3 B=2"


# -- any config: a spec that is safe, or one clean line ----------------------------------------

_PIECES = ["/", "..", ".", "proc", "self", "fd", "7", "dev", "work", "escape", "app", "etc",
           "passwd", ":", "=", "\x00", "\ud800", "²", "4294967295", "alice", " ", "\n", "-1"]
_text = st.lists(st.sampled_from(_PIECES), max_size=8).map("".join)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(wd=_text, user=_text, env=st.lists(_text, max_size=3),
       cmd=st.lists(_text, min_size=0, max_size=3), entrypoint=st.none() | st.lists(_text))
def test_any_config_gives_a_safe_spec_or_one_clean_line(
    root: Path, wd: str, user: str, env: list[str], cmd: list[str],
    entrypoint: list[str] | None,
) -> None:
    if not (root / "work").is_symlink():
        os.symlink("/proc/self/fd/7", root / "work")
        os.symlink("../../../../..", root / "escape")
    container = {"WorkingDir": wd, "User": user, "Env": env, "Cmd": cmd,
                 "Entrypoint": entrypoint}
    try:
        spec = spec_of(root, image_cfg(container))
    except IpfsnapError as exc:
        one_line(exc)
        return
    cwd = spec["process"]["cwd"]
    assert cwd.startswith("/") and ".." not in cwd.split("/")
    assert not any(cwd == t or cwd.startswith(t + "/") for t in ("/proc", "/dev"))
    assert all("\x00" not in s for s in spec["process"]["env"] + spec["process"]["args"])
    assert 0 <= spec["process"]["user"]["uid"] <= 0xFFFFFFFE
