"""A stack of layer directories read as the one tree overlayfs would show, without mounting.

The snapshotter warms an image's command right after a pull (service/daemon.py), when no
container and so no overlay mount exists yet: the files are looked up here in the layers'
own directories (lazy FUSE mounts or unpacked directories, in overlayfs's format) and read
from the layer that provides them. Mounting an overlay instead would need a mount point, a
cleanup after a crash and, while a read is in flight, would keep the layers' mounts busy for
a removal.

overlayfs's lookup rules, as far as a reader of files needs them (the kernel's
Documentation/filesystems/overlayfs.rst): the topmost layer holding a name wins; a
character device 0/0 is a whiteout (the name is deleted below it); a directory with the
``trusted.overlay.opaque=y`` xattr hides the same directory of every lower layer; a
non-directory hides every lower layer's entries below its name. Redirects and metacopy are
never set on snapshot layers (snapshot/apply.py refuses them, fs/inodes.py never presents
them), so they are not followed.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ipfsnap.whiteouts import OPAQUE_XATTR


def is_whiteout(st: os.stat_result) -> bool:
    """overlayfs's whiteout: a character device with device number 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


#: what one layer holds at a directory path a lookup passes through
_ABSENT, _DIR, _OPAQUE_DIR, _HIDES = range(4)


@dataclass
class LayeredTree:
    """``layers`` (directories, topmost first) as one tree: a ``runtime.spec.Tree``.

    Lookups of the directories on the way are cached (the layers of committed snapshots
    never change; a warm-up looks up a few dozen paths below the same few directories, and
    on a lazy layer each lookup or xattr read is a request to its filesystem process).
    """

    layers: Sequence[Path]
    _dirs: dict[tuple[int, tuple[str, ...]], int] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _dir_state(self, index: int, parts: tuple[str, ...]) -> int:
        key = (index, parts)
        with self._lock:
            cached = self._dirs.get(key)
        if cached is not None:
            return cached
        path = self.layers[index].joinpath(*parts)
        try:
            st = path.lstat()
        except OSError:
            state = _ABSENT
        else:
            if not stat.S_ISDIR(st.st_mode):
                # a whiteout deletes the name; any other non-directory replaces it: either
                # way nothing of the lower layers below it shows
                state = _HIDES
            else:
                state = _OPAQUE_DIR if _opaque(path) else _DIR
        with self._lock:
            self._dirs[key] = state
        return state

    def host_path(self, parts: Sequence[str]) -> Path | None:
        """The path, in the layer that provides it, of the entry at ``parts`` (a path
        below the root free of symlinks and ``..``); None if the tree has no such entry."""
        found = self._find(tuple(parts))
        return found[0] if found is not None else None

    def lstat(self, parts: Sequence[str]) -> os.stat_result | None:
        found = self._find(tuple(parts))
        return found[1] if found is not None else None

    def readlink(self, parts: Sequence[str]) -> str:
        path = self.host_path(parts)
        if path is None:
            raise FileNotFoundError(os.path.join("/", *parts))
        return os.readlink(path)

    def listdir(self, parts: Sequence[str]) -> list[str]:
        """The names overlayfs lists in the directory at ``parts``: the layers' copies of it
        merged from the top down to an opaque one (or one above a layer whose entry there is
        not a directory), the topmost entry of a name deciding, whiteouts left out (the
        kernel's readdir shows a whiteout in a directory only one layer holds, and a lookup of
        that name then fails: here a listed name is one a lookup finds)."""
        key = tuple(parts)
        seen: set[str] = set()
        names: list[str] = []
        for index in range(len(self.layers)):
            last = False
            for depth in range(1, len(key) + 1):
                state = self._dir_state(index, key[:depth])
                if state == _HIDES:
                    return names
                if state == _ABSENT:
                    break
                if state == _OPAQUE_DIR:
                    last = True
            else:
                try:
                    entries = list(os.scandir(self.layers[index].joinpath(*key)))
                except OSError:
                    entries = []
                for entry in entries:
                    if entry.name in seen:
                        continue
                    seen.add(entry.name)
                    try:
                        hidden = is_whiteout(entry.stat(follow_symlinks=False))
                    except OSError:
                        hidden = True
                    if not hidden:
                        names.append(entry.name)
            if last:
                break
        return names

    def _find(self, parts: tuple[str, ...]) -> tuple[Path, os.stat_result] | None:
        for index in range(len(self.layers)):
            last = False
            for depth in range(1, len(parts)):
                state = self._dir_state(index, parts[:depth])
                if state == _HIDES:
                    return None
                if state == _ABSENT:
                    break  # this layer has nothing at or below here; lower layers may
                if state == _OPAQUE_DIR:
                    last = True  # this directory hides the lower layers' copies of it
            else:
                path = self.layers[index].joinpath(*parts)
                try:
                    st = path.lstat()
                except OSError:
                    pass
                else:
                    return None if is_whiteout(st) else (path, st)
            if last:
                return None
        return None
