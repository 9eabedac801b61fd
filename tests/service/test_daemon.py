"""The snapshotter daemon as a real process: on-demand start, one per state dir, permissions,
every request round trip (errors re-raised as the same class), signals and stop."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ipfsnap.errors import IpfsnapError
from ipfsnap.service import SnapshotterClient, connect_or_start, lock_holder
from ipfsnap.service.errors import DaemonStartError, ProtocolError, ServiceUnavailable
from ipfsnap.snapshot import Info, SnapshotStore, Snapshotter
from ipfsnap.snapshot.errors import (
    SnapshotExists,
    SnapshotHasChildren,
    SnapshotInvalidArgument,
    SnapshotNotFound,
    SnapshotStateError,
)
from tests.service.conftest import Svc
from tests.support import require_root, require_tool


def test_started_on_demand_in_its_own_session(
    make_svc: Callable[..., Svc], caplog: pytest.LogCaptureFixture
) -> None:
    require_root()
    svc = make_svc()
    assert svc.pid() is None
    with pytest.raises(ServiceUnavailable, match=r"snapshotter\.sock"):
        svc.client().ping()
    caplog.set_level(logging.INFO, logger="ipfsnap.service.client")
    with connect_or_start(svc.config) as client:
        pid = client.ping()["pid"]
    assert f"started snapshotter (pid {pid})" in caplog.text
    assert svc.pid() == pid
    assert os.getsid(pid) == pid  # its own session: outlives the command that started it
    assert (svc.state / "snapshotter.log").read_text().count(f"snapshotter (pid {pid}) serving")
    # a second connect finds the running one and starts nothing
    caplog.clear()
    with connect_or_start(svc.config) as client:
        assert client.ping()["pid"] == pid
    assert "started snapshotter" not in caplog.text


def test_permissions_of_state_dir_socket_and_pid_file(make_svc: Callable[..., Svc]) -> None:
    require_root()
    svc = make_svc()
    os.chmod(svc.state, 0o755)
    with connect_or_start(svc.config):
        pass
    assert stat.S_IMODE(os.stat(svc.state).st_mode) == 0o700
    sock = os.stat(svc.state / "snapshotter.sock")
    assert stat.S_ISSOCK(sock.st_mode)
    assert stat.S_IMODE(sock.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(svc.state / "snapshotter.pid").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(svc.state / "snapshotter.log").st_mode) == 0o600


def test_two_state_dirs_coexist(make_svc: Callable[..., Svc]) -> None:
    require_root()
    a, b = make_svc("a"), make_svc("b")
    with connect_or_start(a.config) as ca, connect_or_start(b.config) as cb:
        pa, pb = ca.ping(), cb.ping()
        assert pa["pid"] != pb["pid"]
        assert pa["state_dir"] == str(a.state) and pb["state_dir"] == str(b.state)
        ca.prepare("only-in-a")
        assert [i.name for i in ca.walk()] == ["only-in-a"]
        assert cb.walk() == []
        with pytest.raises(SnapshotNotFound):
            cb.stat("only-in-a")
        cb.stop()
        assert b.pid() is None
        assert ca.ping()["pid"] == pa["pid"]  # stopping b left a alone


def test_a_second_daemon_on_the_same_state_dir_refuses(make_svc: Callable[..., Svc]) -> None:
    require_root()
    svc = make_svc()
    with connect_or_start(svc.config) as client:
        pid = client.ping()["pid"]
        res = svc.cli("snapshotter", "--foreground", check=False)
        assert res.returncode == 1
        assert f"already serves state dir {svc.state} (pid {pid}" in res.stderr
        assert client.ping()["pid"] == pid  # the first one is untouched


def test_long_state_dir_paths_work(tmp_path: Path, make_svc: Callable[..., Svc]) -> None:
    """sun_path holds 108 bytes; deeper state dirs are reached through /proc/self/fd."""
    require_root()
    svc = make_svc("d" * 120)
    assert len(str(svc.state / "snapshotter.sock")) > 108
    with connect_or_start(svc.config) as client:
        assert client.ping()["state_dir"] == str(svc.state)


def test_start_failure_names_the_log(make_svc: Callable[..., Svc]) -> None:
    require_root()
    svc = make_svc()
    # broken after the client loaded it: the daemon, which reads it again, refuses it
    svc.config.config_path.write_text("no_such_key = 1\n")
    pattern = r"exited with status 1 .*unknown key.*snapshotter\.log"
    with pytest.raises(DaemonStartError, match=pattern):
        connect_or_start(svc.config)
    assert svc.pid() is None


# ---- every request, against the in-process store as the oracle ------------------------------


def _run_script(s: Snapshotter, root: Path) -> list[Any]:
    """The same calls on a client or a store; results with paths made root-relative."""
    out: list[Any] = []

    def rec(fn: Callable[[], Any]) -> None:
        try:
            value = fn()
        except IpfsnapError as exc:
            out.append(("error", type(exc), str(exc)))
            return
        text = repr(value).replace(str(root), "<root>")
        out.append(("ok", text))

    def info(i: Info) -> tuple[object, ...]:
        return (i.name, i.kind, i.parent, i.labels)

    rec(lambda: s.prepare("base", labels={"a": "1"}))
    rec(lambda: (root / "snapshots").is_dir())
    rec(lambda: s.prepare("base"))  # AlreadyExists
    rec(lambda: s.mounts("base"))
    rec(lambda: s.commit("", "base"))  # invalid argument
    rec(lambda: s.commit("L1", "base", {"b": "2"}))
    rec(lambda: s.commit("L1", "base"))  # base is gone: NotFound
    rec(lambda: s.mounts("L1"))  # committed: FailedPrecondition
    rec(lambda: info(s.stat("L1")))
    rec(lambda: s.prepare("top", parent="L1"))
    rec(lambda: s.view("v1", parent="L1", labels={"x": "y"}))
    rec(lambda: s.view("v0"))
    rec(lambda: s.prepare("bad", parent="top"))  # parent not committed
    rec(lambda: s.prepare("orphan", parent="missing"))
    rec(lambda: s.remove("L1"))  # has children
    rec(lambda: s.remove("nope"))
    rec(lambda: s.stat(""))
    rec(lambda: s.prepare(""))
    if isinstance(s, (SnapshotStore, SnapshotterClient)):
        rec(lambda: info(s.update(Info("L1", s.stat("L1").kind, labels={"c": "3"}),
                                  ["labels.c"])))
        rec(lambda: info(s.update(Info("L1", s.stat("L1").kind, labels={}), ["labels.b"])))
        rec(lambda: info(s.update(Info("L1", s.stat("L1").kind), ["parent"])))
        rec(lambda: info(s.update(Info("ghost", s.stat("L1").kind), [])))
        rec(lambda: [info(i) for i in s.walk()])
        rec(lambda: [info(i) for i in s.walk(["labels.x==y"])])
        rec(lambda: [info(i) for i in s.walk(["kind==committed", "name==top"])])
        rec(lambda: s.walk(["labels.==="]))
        rec(lambda: s.usage("L1"))
        rec(lambda: s.usage("nope"))
        (root / "snapshots").exists()
    rec(lambda: s.remove("top"))
    rec(lambda: s.remove("v1"))
    rec(lambda: s.remove("L1"))
    rec(lambda: s.remove("v0"))
    rec(lambda: [info(i) for i in s.walk()] if hasattr(s, "walk") else None)
    return out


def test_every_request_matches_the_in_process_store(
    make_svc: Callable[..., Svc], tmp_path: Path
) -> None:
    require_root()
    svc = make_svc()
    with connect_or_start(svc.config) as client:
        remote = _run_script(client, svc.state / "snapshots" / "stargz")
    local_root = tmp_path / "local"
    with SnapshotStore(local_root) as store:
        local = _run_script(store, local_root)
    assert len(remote) == len(local)
    for got, want in zip(remote, local, strict=True):
        assert got == want
    kinds = {r[1] for r in remote if r[0] == "error"}
    # the script did reach every family the Snapshotter can raise
    assert {SnapshotExists, SnapshotNotFound, SnapshotStateError, SnapshotHasChildren,
            SnapshotInvalidArgument} <= kinds


def test_bad_requests_get_protocol_errors(make_svc: Callable[..., Svc]) -> None:
    require_root()
    svc = make_svc()
    with connect_or_start(svc.config) as client:
        with pytest.raises(ProtocolError, match="unknown request 'format_disk'"):
            client.call("format_disk")
        with pytest.raises(ProtocolError, match="missing argument 'key'"):
            client.call("prepare", {})
        with pytest.raises(ProtocolError, match="labels must be an object"):
            client.call("prepare", {"key": "k", "labels": ["a"]})
        assert client.ping()  # the connection is still usable
    # garbage on a raw connection: one error answer, then the daemon closes it
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(svc.state / "snapshotter.sock"))
    with s, s.makefile("rb") as f:
        s.sendall(b"this is not json\n")
        reply = json.loads(f.readline())
        assert reply["ok"] is False
        assert reply["error"]["type"] == "ipfsnap.service.errors.ProtocolError"
        assert f.readline() == b""


def test_sigterm_stops_it_and_the_next_command_starts_a_new_one(
    make_svc: Callable[..., Svc],
) -> None:
    require_root()
    svc = make_svc()
    with connect_or_start(svc.config) as client:
        pid = client.ping()["pid"]
        client.prepare("kept")
    os.kill(pid, signal.SIGTERM)
    svc.wait_gone()
    assert not (svc.state / "snapshotter.sock").exists()
    assert "signal SIGTERM: stopping (mounts stay)" in (svc.state / "snapshotter.log").read_text()
    with connect_or_start(svc.config) as client:
        assert client.ping()["pid"] != pid
        assert client.stat("kept").name == "kept"  # persisted


def test_a_client_survives_a_daemon_restart(make_svc: Callable[..., Svc]) -> None:
    require_root()
    svc = make_svc()
    client = connect_or_start(svc.config)
    with client:
        client.prepare("a")
        svc.kill9()
        with pytest.raises(ServiceUnavailable):
            client.stat("a")
        connect_or_start(svc.config).close()
        # same client object: its old connection is dead, it reconnects
        assert client.stat("a").name == "a"


def test_cli_snapshotter_start_stop_and_ls(make_svc: Callable[..., Svc]) -> None:
    require_root()
    svc = make_svc()
    res = svc.cli("snapshotter")
    assert "started snapshotter (pid" in res.stderr
    pid = svc.pid()
    assert pid is not None and pid > 0
    assert "already running" in svc.cli("snapshotter").stderr
    with SnapshotterClient(svc.state) as client:
        client.prepare("p")
        client.commit("c", "p")
        client.view("v", parent="c")
    lines = [json.loads(x) for x in svc.cli("snapshot", "ls").stdout.splitlines()]
    assert [(x["name"], x["kind"], x["parent"]) for x in lines] == [
        ("c", "committed", ""), ("v", "view", "c")]
    res = svc.cli("snapshotter", "stop")
    assert f"snapshotter (pid {pid}) unmounted its layers and stopped" in res.stderr
    assert svc.pid() is None
    assert "no snapshotter runs" in svc.cli("snapshotter", "stop").stderr
    # stopped: ls answers from the store, status says nothing is served; neither starts one
    lines = [json.loads(x) for x in svc.cli("snapshot", "ls").stdout.splitlines()]
    assert [(x["name"], x["kind"], x["parent"]) for x in lines] == [
        ("c", "committed", ""), ("v", "view", "c")]
    res = svc.cli("snapshot", "status")
    assert res.stdout == ""
    assert f"snapshotter not running for {svc.state}" in res.stderr
    assert svc.pid() is None


def test_queries_on_a_fresh_state_dir_start_nothing(make_svc: Callable[..., Svc]) -> None:
    svc = make_svc()
    for args in (("snapshot", "ls"), ("snapshot", "status"), ("snapshot", "ls", "--json")):
        res = svc.cli(*args)
        assert res.stdout == "", args
        if args[1] == "status":
            assert "snapshotter not running" in res.stderr
    assert svc.pid() is None
    assert sorted(p.name for p in svc.state.iterdir()) == []  # not even a store created


def test_grpc_address_needs_foreground(make_svc: Callable[..., Svc]) -> None:
    svc = make_svc()
    res = svc.cli("snapshotter", "--grpc-address", str(svc.state / "grpc.sock"), check=False)
    assert res.returncode == 2
    assert "--grpc-address" in res.stderr
    assert svc.pid() is None


def test_python_m_entry_point_runs() -> None:
    res = subprocess.run([sys.executable, "-m", "ipfsnap.cli.main", "snapshotter", "--help"],
                         capture_output=True, text=True, check=True)
    assert "--foreground" in res.stdout
    assert lock_holder(Path("/nonexistent-state-dir")) is None


def test_concurrent_on_demand_starts_share_one_daemon(make_svc: Callable[..., Svc]) -> None:
    require_root()
    svc = make_svc()
    pids: list[int] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            with connect_or_start(svc.config) as c:
                pids.append(int(c.ping()["pid"]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(pids) == 4 and len(set(pids)) == 1
    assert svc.pid() == pids[0]
    # one daemon ever served; any loser of the start race refused and said why
    log = (svc.state / "snapshotter.log").read_text()
    assert log.count(") serving ") == 1
    losers = log.count("already serves state dir")
    assert losers <= 3


def test_parallel_clients_are_served_concurrently(make_svc: Callable[..., Svc]) -> None:
    require_root()
    svc = make_svc()
    connect_or_start(svc.config).close()
    results: dict[str, list[str]] = {"ok": [], "exists": []}
    lock = threading.Lock()

    def work(n: int) -> None:
        with SnapshotterClient(svc.state) as c:
            for i in range(10):
                c.prepare(f"k-{n}-{i}")
            try:
                c.prepare("contended")
                with lock:
                    results["ok"].append(str(n))
            except SnapshotExists:
                with lock:
                    results["exists"].append(str(n))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results["ok"]) == 1 and len(results["exists"]) == 5
    with SnapshotterClient(svc.state) as c:
        assert len(c.walk()) == 6 * 10 + 1


def test_systemd_unit_is_valid(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    unit = Path(__file__).resolve().parents[2] / "deploy" / "ipfsnap-snapshotter.service"
    text = unit.read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert settings["Type"] == "simple"
    assert settings["KillMode"] == "process"
    assert settings["Restart"] == "on-failure"
    exe = Path(sys.executable).with_name("ipfsnap")
    assert exe.exists()
    assert settings["ExecStart"].split()[1:] == ["snapshotter", "--foreground"]
    copy = tmp_path / "ipfsnap-snapshotter.service"
    copy.write_text(text.replace(settings["ExecStart"].split()[0], str(exe)))
    res = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert "ipfsnap-snapshotter.service" not in res.stderr, res.stderr


def test_probing_the_lock_never_makes_a_start_fail(make_svc: Callable[..., Svc]) -> None:
    """lock_holder() tests the lock without taking it: a start racing with probes (as the
    on-demand start loop does every 50 ms) always gets the lock."""
    require_root()
    svc = make_svc()
    stop = threading.Event()
    probes = [0]

    def probe() -> None:
        while not stop.is_set():
            lock_holder(svc.state)
            probes[0] += 1

    t = threading.Thread(target=probe)
    t.start()
    try:
        for _ in range(3):
            with connect_or_start(svc.config) as client:
                client.stop()
    finally:
        stop.set()
        t.join()
    assert probes[0] > 100
    assert "already serves" not in (svc.state / "snapshotter.log").read_text()
