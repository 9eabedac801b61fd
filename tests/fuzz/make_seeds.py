"""Write the seed inputs of every fuzz target (small valid and near-valid inputs) into
``tests/fuzz/corpus/<target>/seed-*`` and the libFuzzer token dictionaries into
``tests/fuzz/dicts/``. Rerun after changing a target's input format:

    .venv/bin/python -m tests.fuzz.make_seeds
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import struct
import tarfile

import zstandard

from ipfsnap.estargz.footer import gzip_footer, legacy_footer, zstd_footer
from ipfsnap.ipfs.cid import CID, DAG_PB, RAW, SHA2_256, b58encode
from tests.fuzz.targets import (
    CORPUS_DIR,
    DICTS_DIR,
    build_layer,
    sample_payload,
    sample_tar,
)
from tests.snapshot.tarbuild import E, make_tar, raw_header

DIGEST = "sha256:" + "a" * 64


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _footer_seeds() -> list[bytes]:
    g = gzip_footer(0x1234)
    return [
        g,
        gzip_footer(0),
        legacy_footer(77),
        zstd_footer(100, 20, 40),
        g[:-1],
        g.replace(b"STARGZ", b"STARGY"),
        g.replace(b"0000000000001234", b"000000000000ABCD"),
        g.replace(b"0000000000001234", b"00000000000012-4"),
        zstd_footer(1 << 63, 1 << 63, 1 << 63),
        struct.pack("<QQQQ", 1, 2, 3, 2) + b"GnUlInUx",
    ]


def _toc(entries: list[dict[str, object]]) -> bytes:
    return json.dumps({"version": 1, "entries": entries}, indent="\t").encode()


def _toc_seeds() -> list[bytes]:
    reg = {"name": "f", "type": "reg", "size": 3, "offset": 10, "digest": DIGEST}
    return [
        sample_payload("gzip").toc,
        sample_payload("zstd").toc,
        _toc([]),
        _toc([{"name": "d/", "type": "dir", "mode": 493}, {**reg, "name": "d/f"}]),
        _toc([
            {**reg, "size": 10, "chunkSize": 4, "chunkDigest": DIGEST},
            {"name": "f", "type": "chunk", "offset": 20, "chunkOffset": 4, "chunkSize": 6,
             "chunkDigest": DIGEST},
        ]),
        _toc([
            {**reg, "innerOffset": 5, "chunkDigest": DIGEST},
            {"name": "h", "type": "hardlink", "linkName": "f"},
            {"name": "s", "type": "symlink", "linkName": "../../etc/passwd"},
            {"name": "c", "type": "char", "devMajor": 1, "devMinor": 3},
            {"name": "x", "type": "reg", "xattrs": {"user.a": "dmFsdWU="}},
            {"name": ".prefetch.landmark", "type": "reg", "size": 1, "offset": 5,
             "digest": DIGEST},
        ]),
        _toc([{"name": "a", "type": "hardlink", "linkName": "b"},
              {"name": "b", "type": "hardlink", "linkName": "a"}]),
        _toc([{"name": "../x", "type": "reg"}, {"name": "/abs", "type": "dir"}]),
        _toc([{"name": "f", "type": "reg"}, {"name": "f/g", "type": "reg"}]),
        b'{"version": 1, "entries": [{"name": "a", "type": "reg", "size": 1e400}]}',
    ]


def _chunk_input(compression: str, plain: bytes, inner: int = 0, extra: bytes = b"") -> bytes:
    piece = plain[inner:]
    mode = 0 if compression == "gzip" else 1
    if compression == "gzip":
        body = gzip.compress(plain, compresslevel=1, mtime=0) + extra
    else:
        body = zstandard.ZstdCompressor(level=1).compress(plain) + extra
    head = bytes([mode]) + struct.pack("<II", inner, len(piece))
    return head + hashlib.sha256(piece).digest() + body


def _chunk_seeds() -> list[bytes]:
    text = b"hello, chunk " * 20
    return [
        _chunk_input("gzip", text),
        _chunk_input("zstd", text),
        _chunk_input("gzip", text, inner=13),
        _chunk_input("zstd", text, inner=100),
        _chunk_input("gzip", text, extra=gzip.compress(b"next member", mtime=0)),
        _chunk_input("gzip", b"\0" * 4000),  # a small bomb: 4000 bytes from ~30
        _chunk_input("gzip", text)[:-9],  # truncated member
    ]


def _open_layer_seeds() -> list[bytes]:
    small = make_tar([E("a", data=b"abc"), E("d", "d"), E("d/l", "l", link="../a")])
    gz = build_layer(small, "gzip")
    zs = build_layer(small, "zstd")
    return [gz, zs, gz[:-1], zs[:100] + zs[101:], build_layer(sample_tar(), "gzip")]


def _tar_seeds() -> list[bytes]:
    gnu = io.BytesIO()
    with tarfile.open(fileobj=gnu, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("long/" + "n" * 120)
        ti.size = 2
        tf.addfile(ti, io.BytesIO(b"hi"))
        ti = tarfile.TarInfo("big")
        ti.uid = 1 << 40  # base-256 number field
        tf.addfile(ti, io.BytesIO(b""))
    escapes = make_tar(
        [
            E("../x", data=b"x"),
            E("/abs", data=b"x"),
            E("a/../../x", data=b"x"),
            E("l", "l", link="/etc"),
            E("l/owned", data=b"x"),
            E("h", "h", link="../../etc/passwd"),
            E("s", "l", link="../../outside"),
            E("hs", "h", link="s"),
            E(".wh...", data=b""),
            E("dev", "c", dev=(8, 0)),
            E("suid", data=b"#!", mode=0o6755),
        ]
    )
    pax = make_tar([E("p", data=b"pax", uid=70000, mtime=2**33, xattrs={"user.x": "y"})])
    huge = raw_header(E("huge"), 1 << 40)
    return [
        sample_tar(),
        gnu.getvalue(),
        escapes,
        pax,
        huge,
        pax[:700],
        gzip.compress(pax, mtime=0),
        zstandard.ZstdCompressor().compress(pax),
    ]


_CONFIG_DIGEST = _digest(b"{}")


def _oci_seeds() -> dict[str, list[bytes]]:
    desc = {
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": DIGEST,
        "size": 42,
        "urls": ["ipfs://bafkreigh2akiscaildc"],
        "annotations": {"containerd.io/snapshot/stargz/toc.digest": DIGEST},
        "platform": {"os": "linux", "architecture": "amd64", "variant": "v8"},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": _CONFIG_DIGEST, "size": 2},
        "layers": [desc],
        "annotations": {"a": "b"},
    }
    docker = {**manifest, "mediaType": "application/vnd.docker.distribution.manifest.v2+json"}
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{**desc, "mediaType": "application/vnd.oci.image.manifest.v1+json"}],
    }
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [DIGEST]},
        "config": {"Entrypoint": ["/bin/sh"], "Cmd": ["-c", "echo"], "Env": ["A=b"],
                   "WorkingDir": "/", "User": "0:0", "Labels": {"k": "v"},
                   "ExposedPorts": {"80/tcp": {}}},
        "history": [{"created_by": "x"}],
    }

    def enc(*docs: object) -> list[bytes]:
        return [json.dumps(d).encode() for d in docs]

    return {
        "oci_descriptor": [*enc(desc, {**desc, "size": -1}, {**desc, "digest": "md5:x"}),
                           b'{"mediaType": "x", "digest": "' + DIGEST.encode() + b'", "size": 1}'],
        "oci_manifest": enc(manifest, docker, {**manifest, "layers": {}}, index),
        "oci_index": enc(index, {**index, "manifests": [manifest]}, manifest),
        "oci_config": enc(config, {**config, "rootfs": {"type": "layers", "diff_ids": ["x"]}}),
        "oci_document": enc(manifest, index, docker, config),
        "oci_config_spec": enc(*(
            {**config, "config": {**config["config"], **c}}  # type: ignore[dict-item]
            for c in _SPEC_CONTAINERS
        )),
    }


#: image config fields the spec target starts from: the accounts and paths of its rootfs
#: (tests/fuzz/targets.py ``_spec_rootfs``), and the ways in which they lead out of it
_SPEC_CONTAINERS: list[dict[str, object]] = [
    {"Entrypoint": ["/bin/sh"], "User": "alice", "WorkingDir": "/home/alice"},
    {"Entrypoint": None, "Cmd": ["sh", "-c", "id"], "User": "1000:staff", "Env": ["PATH=/bin"]},
    {"User": "alice:50", "WorkingDir": "/app/sub", "Env": ["HOME=/x", "A="]},
    {"User": "4294967295", "WorkingDir": "/work"},
    {"User": "root", "WorkingDir": "/escape/etc"},
    {"Cmd": [], "Entrypoint": ["/bin/../bin/sh"], "WorkingDir": "../../tmp"},
]


def _archive_seeds() -> list[bytes]:
    """A one-layer image as an oci-archive and a docker-archive (a few KiB each)."""
    import tempfile
    from pathlib import Path

    from ipfsnap.content.sample import (
        TarEntry,
        build_tar,
        gzip_bytes,
        tar_directory,
        write_docker_archive,
        write_layout_index,
    )
    from ipfsnap.oci import Descriptor, mediatypes, sha256_digest

    layer = build_tar([TarEntry("etc", "dir", mode=0o755), TarEntry("etc/hosts", data=b"x\n")])
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
                         "rootfs": {"type": "layers",
                                    "diff_ids": [sha256_digest(layer)]}}).encode()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        layout = root / "layout"
        blobs = layout / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        gz = gzip_bytes(layer)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": mediatypes.OCI_MANIFEST,
            "config": {"mediaType": mediatypes.OCI_CONFIG, "digest": sha256_digest(config),
                       "size": len(config)},
            "layers": [{"mediaType": mediatypes.OCI_LAYER_GZIP, "digest": sha256_digest(gz),
                        "size": len(gz)}],
        }).encode()
        for blob in (gz, config, manifest):
            (blobs / sha256_digest(blob).removeprefix("sha256:")).write_bytes(blob)
        target = Descriptor(mediatypes.OCI_MANIFEST, sha256_digest(manifest), len(manifest))
        write_layout_index(layout, "fuzz/oci:1", target)
        tar_directory(layout, root / "oci.tar")
        write_docker_archive(root / "docker.tar", "fuzz/docker:1", config, [layer])
        for name in ("oci.tar", "docker.tar"):
            out.append((root / name).read_bytes())
    return out


def _cid_seeds() -> list[bytes]:
    mh = bytes([SHA2_256, 32]) + hashlib.sha256(b"x").digest()
    raw = CID(1, RAW, mh)
    pb = CID(1, DAG_PB, mh)
    v0 = CID(0, DAG_PB, mh)
    z = "z" + b58encode(raw.to_bytes())
    return [
        str(raw).encode(),
        str(pb).encode(),
        v0.v0().encode(),
        z.encode(),
        str(raw).upper().encode(),
        raw.to_bytes(),
        mh,
        b"k51qzi5uqu5dlvj2baxnqndepeb86cbk3ng7n3i46uzyxzyqj2xjonzllnv0v8",
        b"bafkqaaa",  # identity, empty
        b"Qm" + b"1" * 44,
    ]


def _addr_seeds() -> list[bytes]:
    return [
        b"/ip4/127.0.0.1/tcp/5001",
        b"/ip4/127.0.0.1/tcp/5001/http",
        b"/ip6/::1/tcp/5001/https",
        b"/dns4/localhost/tcp/443/tls/http",
        b"/dns/example.com/tcp/80",
        b"/unix/tmp/api.sock",
        b"http://127.0.0.1:5001",
        b"https://[::1]:5001/",
        b"http://user:pw@host:1",
        b"/ip4/127.0.0.1/tcp/99999",
    ]


def _swarm_key_seeds() -> list[bytes]:
    key = bytes(range(32))
    return [
        b"/key/swarm/psk/1.0.0/\n/base16/\n" + key.hex().encode() + b"\n",
        b"/key/swarm/psk/1.0.0/\r\n/base64/\r\n" + base64.b64encode(key) + b"\r\n",
        b"/key/swarm/psk/1.0.0/\n/bin/\n" + bytes(range(65, 97)),
        b"/key/swarm/psk/1.0.0/\n/base16/\n" + key.hex().encode()[:-2] + b"zz\n",
        b"/key/swarm/psk/2.0.0/\n/base16/\n" + key.hex().encode(),
    ]


def _config_seeds() -> list[bytes]:
    return [
        b"""state_dir = "/var/lib/ipfsnap"
ipfs_api = "/ip4/127.0.0.1/tcp/5001"
ipfs = true
noprefetch = false
no_background_fetch = false
prefetch_size = 0
prefetch_timeout_sec = 10
max_concurrency = 2
cache_size_limit = 0

[blob]
chunk_size = 50000
fetching_timeout_sec = 300
max_retries = 5

[fuse]
attr_timeout = 1.0
entry_timeout = 1
""",
        b"[blob]\nchunk_size = -1\n",
        b"unknown = 1\n",
        b"fuse = 3\n",
        b"[fuse]\nattr_timeout = inf\n",
        b"max_concurrency = 0x7fffffffffffffff\n",
        b'state_dir = 5\n[blob\n',
    ]


def _elf_seeds() -> list[bytes]:
    """Small executables and shared objects of both classes and byte orders."""
    from tests.runtime.elfs import ElfSpec, build_elf

    return [
        build_elf(ElfSpec(interpreter="/lib64/ld-linux-x86-64.so.2",
                          needed=("libm.so.6", "libc.so.6"), runpath="$ORIGIN/../lib")),
        build_elf(ElfSpec(elf_class=1, byte_order=2, machine=40, needed=("libc.so.6",),
                          rpath="/opt/lib")),
        build_elf(ElfSpec()),
        build_elf(ElfSpec(needed=("a.so",), strtab_addr=1)),
    ]


def seeds() -> dict[str, list[bytes]]:
    out = {
        "estargz_footer": _footer_seeds(),
        "estargz_toc": _toc_seeds(),
        "estargz_chunk": _chunk_seeds(),
        "estargz_layer_gzip": [sample_payload("gzip").toc, *_toc_seeds()[2:]],
        "estargz_layer_zstd": [sample_payload("zstd").toc, *_toc_seeds()[2:]],
        "estargz_open_layer": _open_layer_seeds(),
        "estargz_tar": _tar_seeds(),
        "estargz_build": _tar_seeds(),
        "snapshot_apply": _tar_seeds(),
        "ipfs_cid": _cid_seeds(),
        "ipfs_multiaddr": _addr_seeds(),
        "ipfs_api_file": [*_addr_seeds(), b"/ip4/127.0.0.1/tcp/5001\n", b"\xff\xfe"],
        "ipfs_swarm_key": _swarm_key_seeds(),
        "config_toml": _config_seeds(),
        "content_archive": _archive_seeds(),
        "runtime_elf": _elf_seeds(),
    }
    out.update(_oci_seeds())
    return out


#: libFuzzer dictionaries: the tokens a format is made of, so mutations speak it
DICTS: dict[str, list[str]] = {
    "toc": ["name", "type", "size", "offset", "chunkOffset", "chunkSize", "chunkDigest",
            "innerOffset", "digest", "linkName", "mode", "uid", "gid", "xattrs", "devMajor",
            "devMinor", "reg", "dir", "chunk", "hardlink", "symlink", "char", "block",
            "fifo", "version", "entries", ".prefetch.landmark", ".no.prefetch.landmark",
            "sha256:", "../", "9223372036854775807", "18446744073709551616", "null", "1e400"],
    "spec": ["Entrypoint", "Cmd", "Env", "WorkingDir", "User", "alice", "staff", "root",
             "/bin/sh", "/home/alice", "/proc/self/fd/7", "/work", "/escape", "/etc/passwd",
             "/dev", "..", ":", "=", "4294967295", "\\u0000", "PATH=", "HOME=", "null"],
    "oci": ["schemaVersion", "mediaType", "config", "layers", "manifests", "digest", "size",
            "urls", "annotations", "platform", "os", "architecture", "variant", "os.features",
            "rootfs", "diff_ids", "Entrypoint", "Cmd", "Env", "Labels", "WorkingDir", "User",
            "sha256:", "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json", "NaN", "Infinity",
            "1e400", "null", "true"],
    "toml": ["state_dir", "ipfs_api", "ipfs_auth", "ipfs", "noprefetch",
             "no_background_fetch", "prefetch_size", "prefetch_timeout_sec",
             "max_concurrency", "cache_size_limit", "managed_ipfs", "[blob]", "[fuse]",
             "chunk_size", "fetching_timeout_sec", "max_retries", "min_wait_msec",
             "max_wait_msec", "attr_timeout", "entry_timeout", "inf", "nan", "0x", "1e400",
             "true", "\"\"\"", "[[", "1979-05-27T07:32:00Z"],
    "addr": ["/ip4/", "/ip6/", "/dns4/", "/dns6/", "/dns/", "/tcp/", "/http", "/https",
             "/tls", "/unix/", "http://", "https://", "127.0.0.1", "::1", "%", "[", "]",
             "@", ":5001"],
    "tar": ["ustar\x00", "ustar  \x00", "././@LongLink", "path=", "linkpath=", "size=",
            "uid=", "mtime=", "SCHILY.xattr.", "GNU.sparse.", "trusted.overlay.opaque",
            ".wh.", ".wh..wh..opq", "../", "00000000000"],
}
def _dict_line(token: str) -> str:
    body = "".join(
        c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else f"\\x{ord(c):02x}" for c in token
    )
    return f'"{body}"'


def main() -> None:
    for target, inputs in seeds().items():
        d = CORPUS_DIR / target
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("seed-*"):
            old.unlink()
        for i, data in enumerate(inputs):
            (d / f"seed-{i:02d}").write_bytes(data)
    DICTS_DIR.mkdir(exist_ok=True)
    for name, tokens in DICTS.items():
        text = "".join(_dict_line(t) + "\n" for t in tokens)
        (DICTS_DIR / f"{name}.dict").write_text(text, encoding="ascii")


if __name__ == "__main__":
    main()
