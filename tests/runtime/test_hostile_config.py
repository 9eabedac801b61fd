"""Hostile image configs: every value an image's config feeds into the OCI runtime spec.

An image pulled from IPFS is untrusted. Unit tests drive the real config parser
(``ipfsnap.oci.parse_config``) and the spec builder against rootfs trees holding the hostile
files; ``test_hostile_config_runc.py`` runs the same images under runc through the CLI.
Each refusal must be one line naming the image and the field.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipfsnap.errors import IpfsnapError
from ipfsnap.oci import parse_config
from ipfsnap.runtime import (
    BadRunOption,
    BindMount,
    ContainerConfig,
    UserNotFound,
    build_spec,
    parse_mount,
)
from ipfsnap.runtime.errors import ImageConfigError
from ipfsnap.runtime.spec import (
    MAX_ACCOUNT_FILE,
    MAX_ARG_STRLEN,
    image_container_config,
)
from tests.support import require_root

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
     ("/etc/passwd/x", "not a directory"), ("/app\x00/x", "NUL"),
     ("/app/\ud800", "lone surrogate")],
)
def test_bad_workdir_is_refused(root: Path, wd: str, problem: str) -> None:
    refused(root, {"WorkingDir": wd}, "WorkingDir", problem)


def test_workdir_missing_is_left_to_runc(root: Path) -> None:
    # runc (and docker) create a missing working directory, inside the rootfs
    assert spec_of(root, image_cfg({"WorkingDir": "/srv/new"}))["process"]["cwd"] == "/srv/new"


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
    many = [f"V{i}=x" for i in range(300_000)]
    msg = refused(root, {"Env": many}, "Env", "300000 variables", "execve")


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
     ({"Entrypoint": ["/dev/fd/3"]}, "inside /dev"),
     ({"Cmd": ["echo", "y" * MAX_ARG_STRLEN]}, "per string"),
     ({"Cmd": ["echo"] + ["y"] * 300_000}, "execve")],
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
