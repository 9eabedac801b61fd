"""The snapshot model: operations, errors, persistence, walk filters, usage, cleanup."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from ipfsnap.errors import AlreadyExistsError, NotFoundError, SnapshotError
from ipfsnap.snapshot import Info, Kind, Mount, SnapshotStore, Snapshotter
from ipfsnap.snapshot.errors import (
    SnapshotHasChildren,
    SnapshotInvalidArgument,
    SnapshotStateError,
)


def _committed(
    store: SnapshotStore,
    name: str,
    parent: str = "",
    files: dict[str, bytes] | None = None,
    labels: dict[str, str] | None = None,
) -> None:
    key = f"{name}-active"
    store.prepare(key, parent)
    for rel, data in (files or {}).items():
        p = store.path(key) / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    store.commit(name, key, labels)


def test_prepare_commit_stat_chain(store_root: Path) -> None:
    store = SnapshotStore(store_root)
    mounts = store.prepare("k1", labels={"a": "1"})
    assert len(mounts) == 1 and mounts[0].type == "bind"
    info = store.stat("k1")
    assert (info.name, info.kind, info.parent, info.labels) == ("k1", Kind.ACTIVE, "", {"a": "1"})
    assert info.created is not None and info.updated is not None
    store.commit("base", "k1", {"c": "2"})
    with pytest.raises(NotFoundError, match="'k1'"):
        store.stat("k1")
    base = store.stat("base")
    # as containerd: the committed snapshot carries the commit's labels
    assert (base.kind, base.labels) == (Kind.COMMITTED, {"c": "2"})
    store.prepare("k2", "base")
    assert store.stat("k2").parent == "base"
    store.commit("top", "k2")
    assert store.stat("top").parent == "base"
    assert (store_root / "metadata.db").exists()
    # the committed snapshot kept its directory (same id)
    assert store.path("base").is_dir() and store.path("top").is_dir()
    assert store.path("base") != store.path("top")


def test_errors_name_the_key(store_root: Path) -> None:
    store = SnapshotStore(store_root)
    store.prepare("k")
    with pytest.raises(AlreadyExistsError, match="'k'"):
        store.prepare("k")
    with pytest.raises(AlreadyExistsError, match="'k'"):
        store.view("k")
    with pytest.raises(NotFoundError, match="'nope'"):
        store.prepare("k2", "nope")
    with pytest.raises(SnapshotStateError, match=r"'k'.*not committed"):
        store.prepare("k3", "k")  # parent is active
    store.view("v")
    with pytest.raises(SnapshotStateError, match="'v'"):
        store.commit("name", "v")  # a view cannot be committed
    with pytest.raises(NotFoundError, match="'missing'"):
        store.commit("name", "missing")
    store.commit("c", "k")
    store.prepare("k4")
    with pytest.raises(AlreadyExistsError, match="'c'"):
        store.commit("c", "k4")  # committed names and keys share one namespace
    with pytest.raises(SnapshotStateError, match="'c'"):
        store.mounts("c")
    with pytest.raises(SnapshotInvalidArgument):
        store.prepare("")
    # failed creations left no rows and no directories behind
    assert sorted(i.name for i in store.walk()) == ["c", "k4", "v"]
    assert len(os.listdir(store_root / "snapshots")) == 3


def test_remove_refuses_with_children(store_root: Path) -> None:
    store = SnapshotStore(store_root)
    _committed(store, "base", files={"f": b"x"})
    store.prepare("child", "base")
    store.view("v", "base")
    with pytest.raises(SnapshotHasChildren, match=r"'base'.*'child'.*'v'"):
        store.remove("base")
    assert isinstance(SnapshotHasChildren("x"), SnapshotError)
    child_dir = store.path("child").parent
    store.remove("child")
    assert not child_dir.exists()
    with pytest.raises(NotFoundError):
        store.stat("child")
    with pytest.raises(SnapshotHasChildren):
        store.remove("base")
    store.remove("v")
    base_dir = store.path("base").parent
    store.remove("base")
    assert not base_dir.exists()
    assert store.walk() == []
    with pytest.raises(NotFoundError, match="'base'"):
        store.remove("base")


def test_ids_are_not_reused(store_root: Path) -> None:
    store = SnapshotStore(store_root)
    store.prepare("a")
    first = store.path("a")
    store.remove("a")
    store.prepare("b")
    assert store.path("b") != first


def test_mount_shapes(store_root: Path) -> None:
    store = SnapshotStore(store_root)
    snaps = store_root / "snapshots"
    assert store.prepare("a") == [Mount("bind", str(store.path("a")), ["rw", "rbind"])]
    store.commit("A", "a")
    a_fs = str(store.path("A"))
    m = store.prepare("b", "A")
    assert len(m) == 1 and m[0].type == "overlay" and m[0].source == "overlay"
    b_id = store.path("b").parent.name
    opts = [o for o in m[0].options if o != "index=off"]
    assert opts == [
        f"workdir={snaps / b_id / 'work'}",
        f"upperdir={snaps / b_id / 'fs'}",
        f"lowerdir={a_fs}",
    ]
    store.commit("B", "b")
    b_fs = str(store.path("B"))
    # view of one parent: read-only bind of the parent's fs
    assert store.view("v1", "A") == [Mount("bind", a_fs, ["ro", "rbind"])]
    # view of a chain: overlay with only lowerdirs, nearest first
    v2 = store.view("v2", "B")
    assert [o for o in v2[0].options if o != "index=off"] == [f"lowerdir={b_fs}:{a_fs}"]
    # a view with no parent: its own (empty) dir, read-only
    assert store.view("v0") == [Mount("bind", str(store.path("v0")), ["ro", "rbind"])]
    # active on a chain: lowerdirs nearest first
    m3 = store.prepare("c", "B")
    assert m3[0].options[-1] == f"lowerdir={b_fs}:{a_fs}"
    # mounts() gives the same again
    assert store.mounts("c") == m3 and store.mounts("v2") == v2


def test_persisted_across_reopen(store_root: Path) -> None:
    store = SnapshotStore(store_root)
    _committed(store, "base", files={"f": b"data"}, labels={"l": "v"})
    m = store.prepare("work", "base", {"x": "y"})
    store.view("look", "base")
    before = {i.name: i for i in store.walk()}
    store.close()
    store2 = SnapshotStore(store_root)
    after = {i.name: i for i in store2.walk()}
    assert after == before
    assert after["work"] == Info(
        "work", Kind.ACTIVE, "base", {"x": "y"}, before["work"].created, before["work"].updated
    )
    assert store2.mounts("work") == m
    assert (store2.path("base") / "f").read_bytes() == b"data"
    # operations continue where they left off
    store2.commit("done", "work")
    with pytest.raises(SnapshotHasChildren):
        store2.remove("base")


def test_update_labels(store_root: Path) -> None:
    store = SnapshotStore(store_root)
    store.prepare("k", labels={"a": "1", "b": "2"})
    created = store.stat("k").created
    info = store.update(Info("k", Kind.ACTIVE, labels={"a": "10", "c": "3"}), ["labels.a"])
    assert info.labels == {"a": "10", "b": "2"}
    # a label path absent from info.labels deletes that label
    info = store.update(Info("k", Kind.ACTIVE, labels={}), ["labels.b"])
    assert info.labels == {"a": "10"}
    info = store.update(Info("k", Kind.ACTIVE, labels={"z": "9"}), ["labels"])
    assert info.labels == {"z": "9"}
    info = store.update(Info("k", Kind.ACTIVE, labels={"w": "1"}))
    assert info.labels == {"w": "1"}
    assert info.created == created and info.updated is not None and created is not None
    assert info.updated >= created
    with pytest.raises(SnapshotInvalidArgument, match=r"'k'.*'parent'"):
        store.update(Info("k", Kind.ACTIVE, parent="x"), ["parent"])
    with pytest.raises(NotFoundError, match="'nope'"):
        store.update(Info("nope", Kind.ACTIVE), ["labels"])
    assert store.stat("k").labels == {"w": "1"}


def test_walk_filters(store_root: Path) -> None:
    store = SnapshotStore(store_root)
    _committed(store, "base", labels={"containerd.io/snapshot.ref": "sha256:abc", "t": "1"})
    _committed(store, "mid", "base", labels={"t": "2"})
    store.prepare("act", "mid", {"t": "3"})
    store.view("vw", "base")

    def names(*filters: str) -> list[str]:
        return sorted(i.name for i in store.walk(list(filters)))

    assert names() == ["act", "base", "mid", "vw"]
    assert names('labels."containerd.io/snapshot.ref"==sha256:abc') == ["base"]
    assert names('labels."containerd.io/snapshot.ref"') == ["base"]  # presence
    assert names("labels.t==2") == ["mid"]
    assert names('labels.t=="3"') == ["act"]
    assert names("name==mid") == ["mid"]
    assert names("kind==committed") == ["base", "mid"]
    assert names("kind==view") == ["vw"]
    assert names("parent==base") == ["mid", "vw"]
    assert names("parent==base,kind==view") == ["vw"]  # comma: all must match
    assert names("name==act", "name==vw") == ["act", "vw"]  # several filters: any
    assert names("kind!=committed") == ["act", "vw"]
    assert names("name~=^m") == ["mid"]
    assert names("labels.t~=[23]") == ["act", "mid"]
    assert names("labels.nope==x") == []
    assert sorted(i.name for i in store.walk("kind==active")) == ["act"]  # a bare str
    for bad in ['labels."unterminated', "name==", "name==a b", "=="]:
        with pytest.raises(SnapshotInvalidArgument, match="filter"):
            store.walk([bad])


def test_usage(store_root: Path) -> None:
    store = SnapshotStore(store_root)
    store.prepare("k")
    root = store.path("k")
    empty = store.usage("k")
    assert empty.inodes == 1
    (root / "a").write_bytes(b"x" * 100_000)
    os.link(root / "a", root / "hard")  # same inode: counted once
    (root / "d").mkdir()
    (root / "d" / "b").write_bytes(b"y")
    u = store.usage("k")
    assert u.inodes == 4  # root, a(=hard), d, d/b
    assert u.size >= empty.size + 100_000
    store.commit("c", "k")
    assert store.usage("c") == u  # recorded at commit
    (store.path("c") / "late").write_bytes(b"z" * 50_000)
    assert store.usage("c") == u  # not re-measured for committed snapshots


def test_cleanup_removes_only_strays(store_root: Path) -> None:
    store = SnapshotStore(store_root)
    _committed(store, "keep", files={"f": b"1"})
    snaps = store_root / "snapshots"
    stray = snaps / "9999"
    (stray / "fs" / "sub").mkdir(parents=True)
    (stray / "fs" / "sub" / "file").write_bytes(b"x")
    temp = snaps / "new-abc"
    (temp / "fs").mkdir(parents=True)
    # a symlink inside a stray dir must not be followed by the removal
    outside = store_root.parent / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"p")
    (stray / "fs" / "link").symlink_to(outside)
    removed = store.cleanup()
    assert sorted(removed) == sorted([stray, temp])
    assert not stray.exists() and not temp.exists()
    assert (store.path("keep") / "f").read_bytes() == b"1"
    assert (outside / "precious").read_bytes() == b"p"
    assert store.cleanup() == []


def test_concurrent_threads(store_root: Path) -> None:
    """The service calls the store from several threads: one connection, serialised."""
    store = SnapshotStore(store_root)
    _committed(store, "base")
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(8):
                store.prepare(f"t{t}-{i}", "base", {"t": str(t)})
                store.commit(f"c{t}-{i}", f"t{t}-{i}")
                store.stat(f"c{t}-{i}")
                store.walk([f"labels.t=={t}"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    infos = store.walk(["kind==committed"])
    assert len(infos) == 1 + 6 * 8
    dirs = {store.path(i.name) for i in infos}
    assert len(dirs) == len(infos)  # every snapshot its own directory
    assert len(os.listdir(store_root / "snapshots")) == len(infos)


def test_root_with_overlay_separators_refused(tmp_path: Path) -> None:
    with pytest.raises(SnapshotInvalidArgument, match="must not contain"):
        SnapshotStore(tmp_path / "a:b")


def test_store_is_a_snapshotter(store_root: Path) -> None:
    store: Snapshotter = SnapshotStore(store_root)  # mypy checks the structural match
    store.prepare("k")
    assert store.stat("k").kind is Kind.ACTIVE
