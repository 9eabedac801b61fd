"""Sample images built offline and deterministically, for tests, benchmarks and demos.

* :func:`build_busybox` - a two-layer busybox image from Debian's ``busybox-static``
  (``/bin/busybox`` plus applet symlinks, ``/etc/passwd``; layer 2 adds files, a hard link and
  a whiteout of a layer-1 file), as an OCI layout, oci-archive and docker-archive. Fixed
  mtimes, owners and gzip headers make the digests identical on every build with the same
  busybox binary and zlib.
* :func:`build_python` - Debian bookworm (debootstrap minbase) plus python3 in a second layer,
  cached under ``/var/cache/ipfsnap-test`` because it takes ~30 s and network access to the
  apt mirror.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import io
import json
import logging
import os
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ipfsnap.errors import IpfsnapError
from ipfsnap.oci import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    Descriptor,
    Index,
    Manifest,
    Platform,
    canonical_json,
    digest_hex,
    host_platform,
    mediatypes,
    parse_platform,
    parse_reference,
    sha256_digest,
)
from ipfsnap.whiteouts import OPAQUE_WHITEOUT, OPAQUE_XATTR

log = logging.getLogger(__name__)

#: fixed timestamp of every entry (2023-11-14T22:13:20Z) so builds are reproducible
SAMPLE_MTIME = 1_700_000_000
SAMPLE_CREATED = "2023-11-14T22:13:20Z"
BUSYBOX_NAME = "ipfsnap-test/busybox:1"
BUSYBOX_APPLETS = (
    "sh",
    "echo",
    "cat",
    "id",
    "ls",
    "env",
    "sleep",
    "true",
    "false",
    "pwd",
    "mkdir",
    "rm",
    "touch",
    "wc",
    "head",
    "tail",
    "grep",
    "sed",
    "stat",
    "hostname",
    "test",
    "uname",
    "ps",
    "find",
    "readlink",
    "sha256sum",
    "md5sum",
    "dd",
    "cp",
    "mv",
    "ln",
    "chmod",
    "date",
)
PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = b"root:x:0:\nnogroup:x:65534:\n"
REMOVED_FILE = "etc/removed.txt"
HELLO = b"Hello from layer 2\n"


class SampleBuildError(IpfsnapError):
    """Building a sample image failed (missing tool, debootstrap or apt failure)."""


@dataclass
class TarEntry:
    """One entry of a sample layer: ``kind`` is file, dir, symlink, hardlink or whiteout."""

    path: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    link: str = ""


def build_tar(entries: Iterable[TarEntry]) -> bytes:
    """An uncompressed, reproducible layer tar (PAX, root-owned, fixed mtime)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            name = e.path
            if e.kind == "whiteout":
                parent, _, base = name.rpartition("/")
                name = f"{parent}/.wh.{base}" if parent else f".wh.{base}"
            info = tarfile.TarInfo(name)
            info.mtime = SAMPLE_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = e.mode
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif e.kind == "symlink":
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, e.link, 0o777
                tar.addfile(info)
            elif e.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, e.link
                tar.addfile(info)
            else:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    """Reproducible gzip: no file name, mtime 0, fixed level."""
    return gzip.compress(data, compresslevel=6, mtime=0)


@dataclass
class SampleImage:
    """A built sample image and what tests may expect of it."""

    name: str
    #: OCI image layout directory
    layout: Path
    #: descriptor of the top blob (manifest, or index for multi-platform builds)
    target: Descriptor
    #: per platform string: manifest descriptor
    manifests: dict[str, Descriptor]
    config_digest: str
    #: compressed layer digests (bottom first) and their uncompressed diff_ids
    layer_digests: list[str]
    diff_ids: list[str]
    #: uncompressed layer tars (bottom first)
    layer_tars: list[bytes]
    #: regular files of the merged root filesystem after applying whiteouts (path -> bytes)
    files: dict[str, bytes] = field(default_factory=dict)
    #: paths removed by a whiteout in an upper layer
    removed: list[str] = field(default_factory=list)
    oci_archive: Path | None = None
    docker_archive: Path | None = None

    @property
    def blobs(self) -> Path:
        return self.layout / "blobs" / "sha256"


def _write_blob(layout: Path, data: bytes) -> str:
    digest = sha256_digest(data)
    path = layout / "blobs" / "sha256" / digest_hex(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(data)
    return digest


def write_layout_index(layout: Path, name: str, target: Descriptor) -> None:
    """``oci-layout`` and an ``index.json`` naming ``target`` as containerd's export does."""
    ref = parse_reference(name)
    desc = target.with_annotations(
        {ANNOTATION_CONTAINERD_NAME: ref.name, ANNOTATION_REF_NAME: ref.tag or "latest"}
    )
    index = Index(mediatypes.OCI_INDEX, (desc,))
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_bytes(
        canonical_json({"imageLayoutVersion": mediatypes.OCI_LAYOUT_VERSION})
    )
    (layout / "index.json").write_bytes(index.to_bytes())


#: a .pyc's header (PEP 552): magic, flags (0 = checked against the source's mtime and size),
#: the source's mtime and size when it was compiled
_PYC_HEADER = struct.Struct("<4sIII")


def pyc_source(pyc: Path) -> Path | None:
    """The source file a .pyc was compiled from: ``d/__pycache__/m.<tag>[.opt-N].pyc`` (PEP
    3147) or a legacy ``d/m.pyc`` beside it; None for other files."""
    if pyc.suffix != ".pyc":
        return None
    if pyc.parent.name == "__pycache__":
        # module names have no dots: the name ends at the first one
        return pyc.parent.parent / (pyc.name.split(".", 1)[0] + ".py")
    return pyc.with_suffix(".py")


def clamp_pyc(data: bytes, source: os.stat_result | None) -> bytes:
    """``data`` (a .pyc) recording :data:`SAMPLE_MTIME` as its source's mtime, when it was
    valid for ``source`` as compiled.

    Archives here set every mtime to SAMPLE_MTIME (reproducible digests). A timestamp-checked
    .pyc records its source's real mtime, so in the archive it no longer matches: Python then
    reads the source too and compiles it again at every start (in the benchmark image, two
    file reads instead of one per module imported, each a round trip on a lazy rootfs).
    Stale, hash-based or unreadable .pyc files are left as they are.
    """
    if source is None or len(data) < _PYC_HEADER.size:
        return data
    _magic, flags, mtime, size = _PYC_HEADER.unpack_from(data)
    if flags != 0 or mtime != int(source.st_mtime) & 0xFFFFFFFF:
        return data
    if size != source.st_size & 0xFFFFFFFF:
        return data
    return data[:8] + struct.pack("<I", SAMPLE_MTIME) + data[12:]


def _add_regular(tar: tarfile.TarFile, info: tarfile.TarInfo, full: Path, rel: Path,
                 roots: Sequence[Path]) -> None:
    """Add the regular file ``full`` (image path ``rel``) as ``info``; a .pyc valid for its
    source keeps matching it at :data:`SAMPLE_MTIME` (see :func:`clamp_pyc`). ``roots``: the
    directories holding the image's tree, top first (a layer's upperdir, then the layers
    below)."""
    source = pyc_source(rel)
    if source is None:
        with open(full, "rb") as f:
            tar.addfile(info, f)
        return
    data = clamp_pyc(full.read_bytes(), _image_stat(str(source), roots))
    tar.addfile(info, io.BytesIO(data))


#: symlinks followed at most when looking for a .pyc's source (the kernel's own limit is 40)
_MAX_LINKS = 8


def _image_stat(path: str, roots: Sequence[Path]) -> os.stat_result | None:
    """The stat of the regular file the image path ``path`` names, as Python's import sees
    it: symlinks followed inside the image (absolute ones from its root), the first root
    holding a name wins. None when there is none (or a whiteout, a loop)."""
    for _ in range(_MAX_LINKS + 1):
        rel = os.path.normpath("/" + path).lstrip("/")
        for root in roots:
            try:
                st = os.lstat(root / rel)
            except OSError:
                continue
            break
        else:
            return None
        if stat.S_ISREG(st.st_mode):
            return st
        if not stat.S_ISLNK(st.st_mode):
            return None
        target = os.readlink(root / rel)
        path = target if target.startswith("/") else os.path.join(os.path.dirname(rel), target)
    return None


def tar_directory(src: Path, out: Path, *, prefix: str = "", root_owned: bool = True) -> None:
    """Reproducible tar of a directory tree (sorted, fixed mtime), atomically.

    ``root_owned`` forces uid/gid 0 (archives); root filesystems keep their owners.
    """
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for root, dirs, files in os.walk(src):
            dirs.sort()
            for name in sorted([*dirs, *files]):
                full = Path(root) / name
                arc = prefix + str(full.relative_to(src))
                info = tar.gettarinfo(str(full), arc)
                info.mtime = SAMPLE_MTIME
                if root_owned:
                    info.uid = info.gid = 0
                    info.uname = info.gname = "root"
                if info.isreg():
                    _add_regular(tar, info, full, full.relative_to(src), [src])
                else:
                    tar.addfile(info)
    tmp.replace(out)


def write_docker_archive(out: Path, name: str, config: bytes, layer_tars: Sequence[bytes]) -> None:
    """A ``docker save``-style archive: manifest.json, repositories, <id>/layer.tar, config."""
    ref = parse_reference(name)
    short = ref.path.removeprefix("library/") if ref.domain == "docker.io" else ref.repository
    with tempfile.TemporaryDirectory() as tmpdir:
        root = Path(tmpdir)
        config_name = digest_hex(sha256_digest(config)) + ".json"
        (root / config_name).write_bytes(config)
        layer_paths = []
        for data in layer_tars:
            layer_id = digest_hex(sha256_digest(data))
            (root / layer_id).mkdir()
            (root / layer_id / "VERSION").write_bytes(b"1.0")
            (root / layer_id / "layer.tar").write_bytes(data)
            layer_paths.append(f"{layer_id}/layer.tar")
        manifest = [
            {"Config": config_name, "RepoTags": [f"{short}:{ref.tag}"], "Layers": layer_paths}
        ]
        (root / "manifest.json").write_bytes(json.dumps(manifest).encode())
        last = layer_paths[-1].split("/")[0]
        (root / "repositories").write_bytes(json.dumps({short: {ref.tag: last}}).encode())
        tar_directory(root, out)


def _busybox_layers(busybox: Path) -> tuple[list[TarEntry], list[TarEntry]]:
    binary = busybox.read_bytes()
    lower = [
        TarEntry("bin", "dir", mode=0o755),
        TarEntry("bin/busybox", data=binary, mode=0o755),
        *[TarEntry(f"bin/{a}", "symlink", link="busybox") for a in BUSYBOX_APPLETS],
        TarEntry("dev", "dir", mode=0o755),
        TarEntry("etc", "dir", mode=0o755),
        TarEntry("etc/passwd", data=PASSWD),
        TarEntry("etc/group", data=GROUP),
        TarEntry(REMOVED_FILE, data=b"this file is deleted by layer 2\n"),
        TarEntry("proc", "dir", mode=0o555),
        TarEntry("root", "dir", mode=0o700),
        TarEntry("sys", "dir", mode=0o555),
        TarEntry("tmp", "dir", mode=0o1777),
    ]
    upper = [
        TarEntry("data", "dir", mode=0o755),
        TarEntry("data/numbers.txt", data=b"".join(b"%d\n" % i for i in range(1000))),
        TarEntry("etc", "dir", mode=0o755),
        TarEntry(REMOVED_FILE, "whiteout"),
        TarEntry("hello.txt", data=HELLO),
        TarEntry("hello-link.txt", "hardlink", link="hello.txt"),
    ]
    return lower, upper


def build_busybox(
    out_dir: Path,
    *,
    name: str = BUSYBOX_NAME,
    platforms: Sequence[str] | None = None,
    busybox: Path = Path("/bin/busybox"),
    archives: bool = True,
) -> SampleImage:
    """Build the busybox sample under ``out_dir`` (``layout/``, ``image.oci.tar``,
    ``image.docker.tar``).

    ``platforms`` (e.g. ``["linux/amd64", "linux/arm64"]``) builds an index with one manifest
    per platform sharing the layers (only the config's architecture differs; the binary is
    this machine's, so only the host entry actually runs). Default: one manifest for this
    machine, no index. The docker-archive is written for single-platform builds only.
    """
    if not busybox.is_file():
        raise SampleBuildError(f"sample image: {busybox} missing (apt-get install busybox-static)")
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = out_dir / "layout"
    if layout.exists():
        shutil.rmtree(layout)
    lower, upper = _busybox_layers(busybox)
    tars = [build_tar(lower), build_tar(upper)]
    diff_ids = [sha256_digest(t) for t in tars]
    layers = []
    for t in tars:
        gz = gzip_bytes(t)
        layers.append(Descriptor(mediatypes.OCI_LAYER_GZIP, _write_blob(layout, gz), len(gz)))
    plats = [parse_platform(p) for p in platforms] if platforms else [host_platform()]
    manifests: dict[str, Descriptor] = {}
    config_digest = ""
    config_bytes = b""
    for plat in plats:
        config = {
            "created": SAMPLE_CREATED,
            "architecture": plat.architecture,
            "os": plat.os,
            **({"variant": plat.variant} if plat.variant else {}),
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["/bin/sh"],
                "WorkingDir": "/",
                "Labels": {"org.opencontainers.image.title": "ipfsnap busybox sample"},
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [
                {"created": SAMPLE_CREATED, "created_by": "ipfsnap sample: busybox"},
                {"created": SAMPLE_CREATED, "created_by": "ipfsnap sample: files + whiteout"},
            ],
        }
        cbytes = canonical_json(config)
        cdesc = Descriptor(mediatypes.OCI_CONFIG, _write_blob(layout, cbytes), len(cbytes))
        manifest = Manifest(mediatypes.OCI_MANIFEST, cdesc, tuple(layers))
        mbytes = manifest.to_bytes()
        platform_field = Platform(plat.os, plat.architecture, plat.variant) if platforms else None
        manifests[str(plat)] = Descriptor(
            mediatypes.OCI_MANIFEST,
            _write_blob(layout, mbytes),
            len(mbytes),
            platform=platform_field,
        )
        if plat == plats[0]:
            config_digest, config_bytes = cdesc.digest, cbytes
    if platforms:
        index = Index(mediatypes.OCI_INDEX, tuple(manifests.values()))
        ibytes = index.to_bytes()
        target = Descriptor(mediatypes.OCI_INDEX, _write_blob(layout, ibytes), len(ibytes))
    else:
        target = next(iter(manifests.values()))
    write_layout_index(layout, name, target)
    files = {
        "bin/busybox": busybox.read_bytes(),
        "etc/passwd": PASSWD,
        "etc/group": GROUP,
        "hello.txt": HELLO,
        "hello-link.txt": HELLO,
        "data/numbers.txt": b"".join(b"%d\n" % i for i in range(1000)),
    }
    image = SampleImage(
        name=parse_reference(name).name,
        layout=layout,
        target=target,
        manifests=manifests,
        config_digest=config_digest,
        layer_digests=[d.digest for d in layers],
        diff_ids=diff_ids,
        layer_tars=tars,
        files=files,
        removed=[REMOVED_FILE],
    )
    if archives:
        image.oci_archive = out_dir / "image.oci.tar"
        tar_directory(layout, image.oci_archive)
        if not platforms:
            image.docker_archive = out_dir / "image.docker.tar"
            write_docker_archive(image.docker_archive, name, config_bytes, tars)
    return image


# -- Debian bookworm + python3 (slow, cached) -----------------------------------------------

#: bump when the recipe changes, so cached builds are rebuilt
PYTHON_IMAGE_VERSION = "4"
PYTHON_NAME = "ipfsnap-test/python:3-bookworm"
DEFAULT_CACHE = Path("/var/cache/ipfsnap-test")


def apt_mirror() -> str:
    """This machine's Debian mirror (first ``deb`` URI in the apt sources)."""
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in candidates:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if parts[0] == "URIs:" and len(parts) > 1 and "security" not in parts[1]:
                return parts[1]
            if parts[0] == "deb":
                uri = next((p for p in parts[1:] if "://" in p), "")
                if uri and "security" not in uri:
                    return uri
    return "http://deb.debian.org/debian"


def _run(cmd: list[str], what: str, timeout: float = 900) -> None:
    log.info("sample image: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SampleBuildError(f"sample image: {what} failed: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        raise SampleBuildError(f"sample image: {what} exited {proc.returncode}: {tail[0]}")


def upperdir_to_tar(upper: Path, lower: Path, out: Path) -> None:
    """Turn an overlayfs upperdir into an OCI layer tar.

    Overlay whiteouts (char device 0/0) become ``.wh.<name>`` entries; opaque directories
    (xattr ``trusted.overlay.opaque=y``) get a ``.wh..wh..opq`` entry, but only when the
    directory also exists in ``lower``: overlay marks *new* directories opaque too, and an
    opaque marker there would be noise (FACTS.md section 5).
    """
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for root, dirs, files in os.walk(upper):
            dirs.sort()
            rel_root = Path(root).relative_to(upper)
            for name in sorted([*dirs, *files]):
                full = Path(root) / name
                rel = rel_root / name
                st = os.lstat(full)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    info = tarfile.TarInfo(str(rel_root / f".wh.{name}"))
                    info.mtime = SAMPLE_MTIME
                    tar.addfile(info)
                    continue
                info = tar.gettarinfo(str(full), str(rel))
                info.mtime = SAMPLE_MTIME
                if info.isreg():
                    # a .pyc's source may be in this layer or below it
                    _add_regular(tar, info, full, rel, [upper, lower])
                else:
                    tar.addfile(info)
                if stat.S_ISDIR(st.st_mode):
                    try:
                        opaque = os.getxattr(full, OPAQUE_XATTR, follow_symlinks=False)
                    except OSError:
                        opaque = b""
                    if opaque == b"y" and (lower / rel).is_dir():
                        wh = tarfile.TarInfo(str(rel / OPAQUE_WHITEOUT))
                        wh.mtime = SAMPLE_MTIME
                        tar.addfile(wh)


def build_python(cache_dir: Path = DEFAULT_CACHE, *, name: str = PYTHON_NAME) -> SampleImage:
    """Debian bookworm minbase + python3 (2 layers), cached by :data:`PYTHON_IMAGE_VERSION`.

    Needs root (debootstrap, chroot, overlay mount) and the apt mirror. The result's OCI
    layout and oci-archive live in ``cache_dir/python-<version>``; later calls reuse them.
    """
    base = cache_dir / f"python-{PYTHON_IMAGE_VERSION}"
    meta = base / "sample.json"
    if meta.is_file():
        return _load_cached(base, meta)
    base.mkdir(parents=True, exist_ok=True)
    # one builder at a time (parallel test runs); the others wait and reuse its result
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if meta.is_file():
            return _load_cached(base, meta)
        return _build_python(base, meta, name)


#: device nodes a package's maintainer scripts may open, made in a chroot's own /dev
#: (name, major, minor: the kernel's numbers, Documentation/admin-guide/devices.txt)
CHROOT_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
                  ("urandom", 1, 9), ("tty", 5, 0))


@contextlib.contextmanager
def chroot_mounts(root: Path) -> Iterator[None]:
    """/proc and /sys (read-only) and a private /dev for running apt-get in chroot ``root``.

    Never the host's own /dev, /proc/sys or /sys read-write: a package's maintainer script
    runs as root in the chroot and would change the host (a bind-mounted /dev/null left with
    mode 0644 broke every later apt-get run on the machine, whose _apt user could no longer
    redirect to it; procps applies /etc/sysctl.d to the running kernel through /proc/sys).
    """
    mounts = (("proc", ["-t", "proc", "-o", "ro,nosuid,nodev,noexec", "proc"]),
              ("sys", ["-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs"]),
              ("dev", ["-t", "tmpfs", "-o", "mode=755,nosuid,size=1m", "tmpfs"]))
    done: list[Path] = []
    try:
        for sub, args in mounts:
            target = root / sub
            target.mkdir(exist_ok=True)
            _run(["mount", *args, str(target)], f"mount {sub} in the chroot")
            done.append(target)
        dev = root / "dev"
        for name, major, minor in CHROOT_DEVICES:
            os.mknod(dev / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(dev / name, 0o666)  # mknod's mode went through the umask
        for name, target_name in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                                  ("stdout", "/proc/self/fd/1"),
                                  ("stderr", "/proc/self/fd/2")):
            os.symlink(target_name, dev / name)
        (dev / "pts").mkdir()
        (dev / "shm").mkdir(mode=0o1777)
        yield
    finally:
        for target in reversed(done):
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _build_python(base: Path, meta: Path, name: str) -> SampleImage:
    if os.geteuid() != 0:
        raise SampleBuildError("sample image: building the python image needs root")
    if shutil.which("debootstrap") is None:
        raise SampleBuildError("sample image: debootstrap not installed")
    work = Path(tempfile.mkdtemp(prefix="build-", dir=base))
    try:
        rootfs = work / "rootfs"
        _run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), apt_mirror()],
            "debootstrap",
        )
        # debootstrap leaves the downloaded .debs behind (~60 MB); no image ships them
        # and the package lists (~50 MB); Debian's own images ship neither
        for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        for index in (rootfs / "var/lib/apt/lists").glob("*"):
            if index.is_file():
                index.unlink()
        layer1 = work / "layer1.tar"
        tar_directory(rootfs, layer1, root_owned=False)
        upper, ovwork, merged = work / "upper", work / "ovwork", work / "merged"
        for d in (upper, ovwork, merged):
            d.mkdir()
        _run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={rootfs},upperdir={upper},workdir={ovwork}",
                str(merged),
            ],
            "overlay",
        )
        try:
            with chroot_mounts(merged):
                shutil.copy("/etc/resolv.conf", merged / "etc/resolv.conf")
                env = "DEBIAN_FRONTEND=noninteractive"
                _run(
                    ["chroot", str(merged), "/usr/bin/env", env, "apt-get", "update", "-q"],
                    "apt-get update",
                )
                _run(
                    [
                        "chroot",
                        str(merged),
                        "/usr/bin/env",
                        env,
                        "apt-get",
                        "install",
                        "-y",
                        "-q",
                        "--no-install-recommends",
                        "python3",
                    ],
                    "apt-get install python3",
                )
                _run(["chroot", str(merged), "apt-get", "clean"], "apt-get clean")
        finally:
            subprocess.run(["umount", str(merged)], capture_output=True)
        for junk in ("var/lib/apt/lists", "var/cache/apt", "etc/resolv.conf"):
            p = upper / junk
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        layer2 = work / "layer2.tar"
        upperdir_to_tar(upper, rootfs, layer2)
        image = _assemble(base, name, [layer1.read_bytes(), layer2.read_bytes()])
    finally:
        subprocess.run(["umount", "-R", str(work / "merged")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    meta.write_text(json.dumps({"name": image.name, "target": image.target.to_dict()}))
    return _load_cached(base, meta)


def _assemble(base: Path, name: str, tars: list[bytes]) -> SampleImage:
    layout = base / "layout"
    if layout.exists():
        shutil.rmtree(layout)
    diff_ids = [sha256_digest(t) for t in tars]
    layers = []
    for t in tars:
        gz = gzip_bytes(t)
        layers.append(Descriptor(mediatypes.OCI_LAYER_GZIP, _write_blob(layout, gz), len(gz)))
    plat = host_platform()
    config = {
        "created": SAMPLE_CREATED,
        "architecture": plat.architecture,
        "os": "linux",
        "config": {
            "Env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
            ],
            "Cmd": ["/usr/bin/python3"],
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": SAMPLE_CREATED, "created_by": "debootstrap minbase bookworm"},
            {"created": SAMPLE_CREATED, "created_by": "apt-get install python3"},
        ],
    }
    cbytes = canonical_json(config)
    cdesc = Descriptor(mediatypes.OCI_CONFIG, _write_blob(layout, cbytes), len(cbytes))
    mbytes = Manifest(mediatypes.OCI_MANIFEST, cdesc, tuple(layers)).to_bytes()
    target = Descriptor(mediatypes.OCI_MANIFEST, _write_blob(layout, mbytes), len(mbytes))
    write_layout_index(layout, name, target)
    tar_directory(layout, base / "image.oci.tar")
    return SampleImage(
        parse_reference(name).name,
        layout,
        target,
        {str(plat): target},
        cdesc.digest,
        [d.digest for d in layers],
        diff_ids,
        [],
    )


def _load_cached(base: Path, meta: Path) -> SampleImage:
    info = json.loads(meta.read_text())
    target = Descriptor.from_dict(info["target"])
    layout = base / "layout"
    manifest = json.loads((layout / "blobs/sha256" / digest_hex(target.digest)).read_bytes())
    config = json.loads(
        (layout / "blobs/sha256" / digest_hex(manifest["config"]["digest"])).read_bytes()
    )
    return SampleImage(
        info["name"],
        layout,
        target,
        {str(host_platform()): target},
        manifest["config"]["digest"],
        [entry["digest"] for entry in manifest["layers"]],
        list(config["rootfs"]["diff_ids"]),
        [],
        oci_archive=base / "image.oci.tar",
    )
