"""Unit tests of the OCI bundle generator (no root, no runc)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ipfsnap.errors import UsageError
from ipfsnap.runtime import (
    BadRunOption,
    BindMount,
    ContainerConfig,
    UserNotFound,
    build_spec,
    image_args,
    merge_env,
    parse_env,
    parse_mount,
    resolve_user,
    write_bundle,
)
from ipfsnap.runtime.spec import DEFAULT_PATH, resolve_in_root

PASSWD = "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\n"
GROUP = "root:x:0:\ntty:x:5:\nstaff:x:50:alice,bob\nalice:x:1000:\nwheel:x:10:bob\n"


@pytest.fixture
def etc_root(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    return root


def spec_for(root: Path, **kw: object) -> dict[str, object]:
    cfg = ContainerConfig(**{"args": ["sh"], **kw})  # type: ignore[arg-type]
    return build_spec(cfg, container_id="c1", rootfs=root, etc_files={}, cgroups_path="/x/c1")


# -- --mount ----------------------------------------------------------------------------------


def test_parse_mount_forms(tmp_path: Path) -> None:
    m = parse_mount(f"type=bind,src={tmp_path},dst=/data,ro")
    assert m == BindMount(tmp_path, "/data", True)
    m = parse_mount(f"type=bind,source={tmp_path},target=/a/./b/,readonly=false")
    assert m == BindMount(tmp_path, "/a/b", False)
    m = parse_mount(f"src={tmp_path},destination=/x,ro=true")
    assert m.readonly and m.destination == "/x"
    rel = parse_mount("type=bind,src=relative/dir,dst=/y")
    assert rel.source == Path("relative/dir").absolute()


@pytest.mark.parametrize(
    "text",
    [
        "type=volume,src=/a,dst=/b",
        "type=bind,dst=/b",
        "type=bind,src=/a",
        "type=bind,src=/a,dst=relative",
        "type=bind,src=/a,dst=/b/../../etc",
        "type=bind,src=/a,dst=/b,bogus=1",
        "type=bind,src=/a,dst=/b,rx",
        "type=bind,src=/a,src=/c,dst=/b",
        "type=bind,src=/a,dst=/b,ro=maybe",
    ],
)
def test_parse_mount_errors(text: str) -> None:
    with pytest.raises(BadRunOption) as exc:
        parse_mount(text)
    assert isinstance(exc.value, UsageError)
    assert text in str(exc.value) and "\n" not in str(exc.value)


def test_missing_bind_source_is_an_error(etc_root: Path, tmp_path: Path) -> None:
    with pytest.raises(BadRunOption, match="no such file"):
        spec_for(etc_root, mounts=[BindMount(tmp_path / "nope", "/data")])


# -- env / args -------------------------------------------------------------------------------


def test_env_parse_and_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPFSNAP_T_FROM_HOST", "hv")
    monkeypatch.delenv("IPFSNAP_T_UNSET", raising=False)
    assert parse_env(["A=1", "B=", "IPFSNAP_T_FROM_HOST", "IPFSNAP_T_UNSET"]) == [
        "A=1",
        "B=",
        "IPFSNAP_T_FROM_HOST=hv",
    ]
    with pytest.raises(BadRunOption):
        parse_env(["=x"])
    assert merge_env(["PATH=/a", "X=1"], ["X=2", "Y=3"]) == ["PATH=/a", "X=2", "Y=3"]


def test_image_args_follow_ctr() -> None:
    assert image_args(["/entry"], ["a", "b"], []) == ["/entry", "a", "b"]
    assert image_args(None, ["sh"], []) == ["sh"]
    # ctr semantics: given args replace Entrypoint and Cmd
    assert image_args(["/entry"], ["a"], ["echo", "hi"]) == ["echo", "hi"]


def test_env_defaults(etc_root: Path) -> None:
    env = spec_for(etc_root, env=["FOO=bar"])["process"]["env"]  # type: ignore[index]
    assert f"PATH={DEFAULT_PATH}" in env and "HOME=/root" in env and "FOO=bar" in env
    assert not any(e.startswith("TERM=") for e in env)
    env = spec_for(etc_root, env=["PATH=/only", "HOME=/h"], tty=True)["process"]["env"]  # type: ignore[index]
    assert "PATH=/only" in env and "HOME=/h" in env and "TERM=xterm" in env
    assert len([e for e in env if e.startswith("PATH=")]) == 1


# -- user -------------------------------------------------------------------------------------


def test_resolve_user(etc_root: Path) -> None:
    root = resolve_user(etc_root, "")
    assert (root.uid, root.gid, root.home) == (0, 0, "/root")
    alice = resolve_user(etc_root, "alice")
    assert (alice.uid, alice.gid, alice.home) == (1000, 1000, "/home/alice")
    assert alice.additional_gids == (50,)  # staff lists alice; wheel does not
    assert resolve_user(etc_root, "1000").gid == 1000  # numeric uid found in passwd
    assert resolve_user(etc_root, "alice:wheel").gid == 10
    assert resolve_user(etc_root, "1000:77").gid == 77
    unknown = resolve_user(etc_root, "4242")
    assert (unknown.uid, unknown.gid, unknown.additional_gids) == (4242, 0, ())
    assert resolve_user(etc_root, "4242:5").gid == 5


def test_resolve_user_errors(etc_root: Path) -> None:
    with pytest.raises(UserNotFound, match="'mallory'"):
        resolve_user(etc_root, "mallory")
    with pytest.raises(UserNotFound, match="'nogroup'"):
        resolve_user(etc_root, "alice:nogroup")
    with pytest.raises(BadRunOption):
        resolve_user(etc_root, ":5")
    # no /etc/passwd at all: names cannot resolve, numbers can
    empty = etc_root.parent / "empty"
    empty.mkdir()
    assert resolve_user(empty, "7").uid == 7
    with pytest.raises(UserNotFound):
        resolve_user(empty, "alice")


def test_passwd_symlink_stays_inside_rootfs(etc_root: Path) -> None:
    # an absolute symlink must resolve inside the rootfs, never to the host's /etc/passwd
    real = etc_root / "etc" / "passwd.real"
    (etc_root / "etc" / "passwd").rename(real)
    real.write_text("root:x:0:0::/r00t:/bin/sh\nzed:x:77:88::/z:/bin/sh\n")
    os.symlink("/etc/../../../etc/passwd.real", etc_root / "etc" / "passwd")
    assert resolve_in_root(etc_root, "/etc/passwd") == real
    assert resolve_user(etc_root, "zed").uid == 77
    assert resolve_user(etc_root, "").home == "/r00t"
    loop = etc_root / "etc" / "loop"
    os.symlink("loop", loop)
    with pytest.raises(Exception, match="too many symlinks"):
        resolve_in_root(etc_root, "/etc/loop")


# -- security defaults ------------------------------------------------------------------------


def test_security_defaults(etc_root: Path) -> None:
    spec = spec_for(etc_root)
    linux = spec["linux"]
    assert isinstance(linux, dict)
    for p in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"):
        assert p in linux["maskedPaths"]
    for p in ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"):
        assert p in linux["readonlyPaths"]
    proc = spec["process"]
    assert isinstance(proc, dict)
    caps = proc["capabilities"]
    assert set(caps["bounding"]) == {
        "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
        "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
    }  # fmt: skip
    assert "CAP_SYS_ADMIN" not in caps["bounding"]
    assert caps["effective"] == caps["bounding"] and caps["inheritable"] == []
    assert proc["noNewPrivileges"] is True
    assert proc["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    assert linux["cgroupsPath"] == "/x/c1"
    ns = {n["type"] for n in linux["namespaces"]}
    assert ns == {"pid", "ipc", "uts", "mount", "network"}
    mounts = {m["destination"]: m for m in spec["mounts"]}  # type: ignore[attr-defined]
    assert "ro" in mounts["/sys"]["options"] and "ro" in mounts["/sys/fs/cgroup"]["options"]
    for d in ("/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue"):
        assert d in mounts
    # a non-root user keeps only the bounding set
    caps = spec_for(etc_root, user="alice")["process"]["capabilities"]  # type: ignore[index]
    assert caps["effective"] == [] and caps["permitted"] == [] and caps["bounding"]
    # host network: no network namespace
    linux = spec_for(etc_root, net="host")["linux"]
    ns = {n["type"] for n in linux["namespaces"]}  # type: ignore[index]
    assert "network" not in ns


def test_bad_configs(etc_root: Path) -> None:
    with pytest.raises(BadRunOption, match="no command"):
        spec_for(etc_root, args=[])
    with pytest.raises(BadRunOption, match="--net"):
        spec_for(etc_root, net="bridge")
    with pytest.raises(BadRunOption, match="--cwd"):
        spec_for(etc_root, cwd="relative")
    with pytest.raises(BadRunOption, match="--hostname"):
        spec_for(etc_root, hostname="h" * 64)


def test_write_bundle(etc_root: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    data = tmp_path / "data"
    data.mkdir()
    cfg = ContainerConfig(
        args=["sh"], hostname="box", mounts=[BindMount(data, "/data", readonly=True)]
    )
    spec = write_bundle(bundle, cfg, container_id="c1", rootfs=etc_root, cgroups_path="/p/c1")
    on_disk = json.loads((bundle / "config.json").read_text())
    assert on_disk == spec and spec["hostname"] == "box"
    assert (bundle / "hostname").read_text() == "box\n"
    assert "127.0.1.1\tbox" in (bundle / "hosts").read_text()
    assert "nameserver" not in (bundle / "resolv.conf").read_text()
    by_dst = {m["destination"]: m for m in spec["mounts"]}
    assert by_dst["/etc/resolv.conf"]["source"] == str(bundle / "resolv.conf")
    assert by_dst["/etc/hosts"]["source"] == str(bundle / "hosts")
    assert by_dst["/data"]["source"] == str(data) and "ro" in by_dst["/data"]["options"]
    # host network copies the host's resolver configuration
    cfg.net = "host"
    write_bundle(bundle, cfg, container_id="c1", rootfs=etc_root, cgroups_path="/p/c1")
    host = Path("/etc/resolv.conf")
    if host.exists():
        assert (bundle / "resolv.conf").read_bytes() == host.read_bytes()
    # the default hostname is the container id
    spec = write_bundle(
        bundle, ContainerConfig(args=["sh"]), container_id="c1", rootfs=etc_root, cgroups_path=""
    )
    assert spec["hostname"] == "c1"
