"""ipfs-push against a real IPFS daemon (the managed node fixture).

Every pushed image is checked by walking it from its CID through the daemon with plain RPC
``cat`` calls, as a reader that trusts nothing but the CID would: root descriptor -> index ->
manifest -> config + layers, verifying every digest, every url and CID, the TOC digests and
the diffIDs.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from ipfsnap.cli.main import main
from ipfsnap.content import ImageNotFound, ImageStore, import_image
from ipfsnap.content.sample import SampleImage, gzip_bytes
from ipfsnap.errors import IpfsnapError
from ipfsnap.estargz import TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION
from ipfsnap.image.convert import ConvertOptions
from ipfsnap.image.errors import PushError
from ipfsnap.image.push import PushOptions, PushResult, push_image
from ipfsnap.ipfs import AddResult, IPFSClient, RetryPolicy, compute_cid, normalize_cid
from ipfsnap.ipfs.node import ManagedNode
from ipfsnap.oci import (
    Descriptor,
    ImageConfig,
    mediatypes,
    parse_config,
    parse_document,
    sha256_digest,
)
from tests.fixtures.ipfs import NodeFactory
from tests.image.test_convert import (
    CHUNK,
    Layer,
    blob_set,
    check_estargz_layer,
    gzip_layer,
    make_image,
    sample_image,
    sample_tars,
    tar_files,
)
from tests.interop.gochecker import CheckerUnavailable, build_checker
from tests.support import require, require_tool

OPTS = PushOptions(convert=ConvertOptions(chunk_size=CHUNK, level=6))


@pytest.fixture
def client(ipfs_node: ManagedNode) -> Iterator[IPFSClient]:
    with IPFSClient(ipfs_node.api_url, timeout=60) as c:
        yield c


def push(store: ImageStore, ref: str, client: IPFSClient, state: Path,
         opts: PushOptions = OPTS) -> PushResult:
    return push_image(store, ref, client, opts, state_dir=state)


# -- walking a pushed image from its CID --------------------------------------------------------


@dataclass
class Walked:
    """What the walk found: every descriptor and blob by kind."""

    root: Descriptor
    documents: dict[str, bytes] = field(default_factory=dict)
    configs: list[ImageConfig] = field(default_factory=list)
    layers: list[tuple[Descriptor, bytes, str]] = field(default_factory=list)  # desc, blob, diffID
    descriptors: list[Descriptor] = field(default_factory=list)


def fetch(client: IPFSClient, desc: Descriptor) -> bytes:
    """The blob behind ``desc``'s one ipfs url, checked against CID, digest and size."""
    assert len(desc.urls) == 1, desc
    url = desc.urls[0]
    assert url.startswith("ipfs://")
    cid = url.removeprefix("ipfs://")
    assert normalize_cid(cid) == cid  # CIDv1 base32 as written
    data = client.cat(cid)
    assert len(data) == desc.size
    assert sha256_digest(data) == desc.digest
    assert compute_cid(data) == cid
    return data


def walk(client: IPFSClient, cid: str) -> Walked:
    raw = client.cat(cid)
    assert compute_cid(raw) == cid
    obj = json.loads(raw)
    assert list(obj) == ["mediaType", "digest", "size", "urls"]  # compact, reference order
    root = Descriptor.from_dict(obj)
    out = Walked(root)

    def visit(desc: Descriptor) -> None:
        out.descriptors.append(desc)
        data = fetch(client, desc)
        out.documents[desc.digest] = data
        doc = parse_document(data, desc.digest, desc.media_type)
        assert doc.media_type == desc.media_type
        if mediatypes.is_index(desc.media_type):
            assert desc.media_type == mediatypes.OCI_INDEX
            for m in doc.manifests:  # type: ignore[union-attr]
                visit(m)
            return
        assert desc.media_type == mediatypes.OCI_MANIFEST
        config_desc = doc.config  # type: ignore[union-attr]
        out.descriptors.append(config_desc)
        assert config_desc.media_type == mediatypes.OCI_CONFIG
        config = parse_config(fetch(client, config_desc))
        out.configs.append(config)
        layers = doc.layers  # type: ignore[union-attr]
        assert len(config.diff_ids) == len(layers)
        for layer, diff_id in zip(layers, config.diff_ids, strict=True):
            out.descriptors.append(layer)
            out.layers.append((layer, fetch(client, layer), diff_id))

    visit(root)
    return out


def check_estargz_image(walked: Walked) -> None:
    for layer, blob, diff_id in walked.layers:
        check_estargz_layer(layer, blob, diff_id)


# -- tests ---------------------------------------------------------------------------------------


def test_push_and_walk_from_the_cid(
    image_store: ImageStore, state_dir: Path, client: IPFSClient
) -> None:
    sample_image(image_store, "test/sample:1")
    before = {r.name for r in image_store.list()}
    result = push(image_store, "test/sample:1", client, state_dir)
    walked = walk(client, result.cid)
    # a manifest stays a manifest (the reference keeps the source's structure)
    assert walked.root.media_type == mediatypes.OCI_MANIFEST
    assert walked.root == result.root
    assert len(walked.layers) == 2
    check_estargz_image(walked)
    for (_, blob, _), tar in zip(walked.layers, sample_tars(), strict=True):
        assert tar_files(gzip.decompress(blob)) == tar_files(tar)
    # stored locally under ipfs://CID, whole
    assert result.name == f"ipfs://{result.cid}"
    assert {r.name for r in image_store.list()} == before | {result.name}
    record = image_store.get(result.name)
    assert record.target == walked.root
    image_store.check_complete(record.target)
    for desc in walked.descriptors:
        assert image_store.blobs.exists(desc.digest)
    assert result.blobs_added == 5  # 2 layers, config, manifest, root descriptor


def test_multi_platform_index(
    image_store: ImageStore, state_dir: Path, client: IPFSClient,
    busybox_multiarch: SampleImage,
) -> None:
    import_image(image_store, busybox_multiarch.layout)
    opts = PushOptions(convert=ConvertOptions(chunk_size=CHUNK, level=6, all_platforms=True))
    result = push(image_store, busybox_multiarch.name, client, state_dir, opts)
    walked = walk(client, result.cid)
    assert walked.root.media_type == mediatypes.OCI_INDEX
    index = parse_document(walked.documents[walked.root.digest], "index")
    assert len(index.manifests) == 2  # type: ignore[union-attr]
    assert all(m.platform is not None for m in index.manifests)  # type: ignore[union-attr]
    # shared layers: one blob, one CID, used by both manifests
    assert len(walked.layers) == 4
    assert len({d.digest for d, _, _ in walked.layers}) == 2
    assert len({d.urls for d, _, _ in walked.layers}) == 2
    check_estargz_image(walked)
    # default: this machine's platform only
    host = push(image_store, busybox_multiarch.name, client, state_dir)
    host_walk = walk(client, host.cid)
    host_index = parse_document(host_walk.documents[host_walk.root.digest], "index")
    assert len(host_index.manifests) == 1  # type: ignore[union-attr]


def test_same_image_twice_gives_the_same_cid(
    image_store: ImageStore, tmp_path: Path, client: IPFSClient
) -> None:
    sample_image(image_store, "test/sample:1")
    first = push(image_store, "test/sample:1", client, tmp_path / "state")
    second = push(image_store, "test/sample:1", client, tmp_path / "state")
    assert second.cid == first.cid
    assert first.conversion.built == 2 and second.conversion.built == 0
    # without the conversion cache too (a fresh state dir converts again)
    third = push(image_store, "test/sample:1", client, tmp_path / "other")
    assert third.conversion.built == 2
    assert third.cid == first.cid
    # pushing the pushed image keeps its layers and gives the same CID again
    fourth = push(image_store, first.name, client, tmp_path / "state")
    assert fourth.conversion.built == 0
    assert fourth.cid == first.cid


def test_estargz_false_adds_urls_only(
    image_store: ImageStore, state_dir: Path, client: IPFSClient
) -> None:
    src = sample_image(image_store, "test/sample:1")
    source = image_store.read_manifest(src)
    old_urls = source.layers[0].with_urls(("https://example.com/old",))
    # a url from elsewhere is replaced, not kept
    manifest = image_store.read_manifest(src)
    doc = replace(manifest, layers=(old_urls, *manifest.layers[1:]))
    data = doc.to_bytes()
    target = Descriptor(mediatypes.OCI_MANIFEST, image_store.blobs.write(data), len(data))
    image_store.put("test/urls:1", target)
    opts = PushOptions(convert=ConvertOptions(estargz=False))
    result = push(image_store, "test/urls:1", client, state_dir, opts)
    walked = walk(client, result.cid)
    assert [d.digest for d, _, _ in walked.layers] == [x.digest for x in source.layers]
    for desc, _, _ in walked.layers:
        assert TOC_DIGEST_ANNOTATION not in desc.annotations
        assert UNCOMPRESSED_SIZE_ANNOTATION not in desc.annotations
        assert desc.media_type == mediatypes.OCI_LAYER_GZIP
        assert desc.urls[0].startswith("ipfs://")
    assert walked.configs[0].diff_ids == image_store.read_config(source.config).diff_ids
    assert result.conversion.built == 0


def test_cli_prints_the_cid_and_nothing_else(
    image_store: ImageStore, state_dir: Path, ipfs_node: ManagedNode, client: IPFSClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sample_image(image_store, "test/sample:1")
    argv = ["--state-dir", str(state_dir), "--ipfs-api", ipfs_node.api_multiaddr,
            "image", "ipfs-push", "--level", "6", "test/sample:1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(r"bafk[a-z2-7]+\n", out), out
    cid = out.strip()
    assert image_store.get(f"ipfs://{cid}").target.media_type == mediatypes.OCI_MANIFEST
    check_estargz_image(walk(client, cid))
    # --estargz=false through the CLI
    assert main([*argv[:-1], "--estargz=false", "test/sample:1"]) == 0
    plain = capsys.readouterr().out.strip()
    assert plain != cid
    walked = walk(client, plain)
    assert all(TOC_DIGEST_ANNOTATION not in d.annotations for d, _, _ in walked.layers)


def test_pushed_layer_opens_with_the_reference_library(
    image_store: ImageStore, state_dir: Path, client: IPFSClient, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    require_tool("go")
    cache = Path(request.config.cache.mkdir("interop-go-checker"))  # type: ignore[union-attr]
    try:
        checker = build_checker(cache)
    except CheckerUnavailable as exc:
        require(False, str(exc))
        raise
    sample_image(image_store, "test/sample:1")
    result = push(image_store, "test/sample:1", client, state_dir)
    for i, (desc, blob, _) in enumerate(walk(client, result.cid).layers):
        path = tmp_path / f"layer{i}"
        path.write_bytes(blob)
        proc = subprocess.run(
            [str(checker), "verify", "-blob", str(path),
             "-toc-digest", desc.annotations[TOC_DIGEST_ANNOTATION]],
            capture_output=True, text=True, check=False,
        )
        assert proc.returncode == 0, proc.stderr


# -- bad input: one line, non-zero exit, store and names as they were ---------------------------


def cli_fails(state_dir: Path, api: str, ref: str, capsys: pytest.CaptureFixture[str],
              *needles: str) -> str:
    store = ImageStore(state_dir)
    names = [(r.name, r.target) for r in store.list()]
    blobs = blob_set(store)
    argv = ["--state-dir", str(state_dir), "--ipfs-api", api, "image", "ipfs-push",
            "--level", "1", ref]
    code = main(argv)
    captured = capsys.readouterr()
    assert code != 0
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    for needle in needles:
        assert needle in lines[0]
    assert [(r.name, r.target) for r in store.list()] == names
    assert not any(r.name.startswith("ipfs://") for r in store.list())
    assert blob_set(store) == blobs
    return lines[0]


def test_bad_input_through_the_cli(
    image_store: ImageStore, state_dir: Path, ipfs_node: ManagedNode,
    capsys: pytest.CaptureFixture[str],
) -> None:
    api = ipfs_node.api_multiaddr
    tars = sample_tars()
    # no daemon at the given address: caught before converting anything
    sample_image(image_store, "test/sample:1")
    cli_fails(state_dir, "/ip4/127.0.0.1/tcp/1", "test/sample:1", capsys,
              "image docker.io/test/sample:1", "127.0.0.1:1")
    # a ref that does not exist
    cli_fails(state_dir, api, "test/nothing:1", capsys, "test/nothing:1", "not in the local store")
    # a corrupt layer after a good one: the good one's conversion is undone too
    garbage = gzip_bytes(b"this is not a tar archive at all" * 100)
    make_image(image_store, "test/corrupt:1",
               [gzip_layer(tars[0]), Layer(garbage, mediatypes.OCI_LAYER_GZIP, b"")],
               diff_ids=[sha256_digest(tars[0]), sha256_digest(b"x")])
    cli_fails(state_dir, api, "test/corrupt:1", capsys, "test/corrupt:1",
              sha256_digest(garbage))
    # unknown media type
    make_image(image_store, "test/odd:1", [gzip_layer(tars[0], "application/x-odd")])
    cli_fails(state_dir, api, "test/odd:1", capsys, "application/x-odd")
    # a missing blob
    target = make_image(image_store, "test/missing:1", [gzip_layer(tars[1])])
    layer = image_store.read_manifest(target).layers[0]
    image_store.blobs.delete(layer.digest)
    cli_fails(state_dir, api, "test/missing:1", capsys, "test/missing:1", layer.digest,
              "not in the store")
    # a digest mismatch (a corrupt blob in the store)
    target = make_image(image_store, "test/flipped:1", [gzip_layer(tars[0])])
    layer = image_store.read_manifest(target).layers[0]
    path = image_store.blobs.path(layer.digest)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x55
    path.write_bytes(bytes(data))
    cli_fails(state_dir, api, "test/flipped:1", capsys, "test/flipped:1", layer.digest)
    # and with --estargz=false the push itself catches the corrupt blob
    store = ImageStore(state_dir)
    names = store.list()
    code = main(["--state-dir", str(state_dir), "--ipfs-api", api, "image", "ipfs-push",
                 "--estargz=false", "test/flipped:1"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err and layer.digest in err
    assert store.list() == names


class KillAfter:
    """An IPFS client that stops the daemon after ``n`` successful adds."""

    def __init__(self, client: IPFSClient, node: ManagedNode, n: int) -> None:
        self.client = client
        self.node = node
        self.left = n
        self.adds = 0

    def add(self, source: object, name: str | None = None, **kw: object) -> AddResult:
        if self.left == 0:
            self.node.stop()
        self.left -= 1
        result = self.client.add(source, name, **kw)  # type: ignore[arg-type]
        self.adds += 1
        return result


def test_daemon_going_away_mid_push(
    image_store: ImageStore, state_dir: Path, ipfs_node_factory: NodeFactory
) -> None:
    node = ipfs_node_factory()
    sample_image(image_store, "test/sample:1")
    names = image_store.list()
    blobs = blob_set(image_store)
    with IPFSClient(node.api_url, timeout=10, retry=RetryPolicy(max_retries=2)) as c:
        killer = KillAfter(c, node, 2)
        with pytest.raises(PushError) as info:
            push_image(image_store, "test/sample:1", killer, OPTS,  # type: ignore[arg-type]
                       state_dir=state_dir)
    assert killer.adds == 2
    assert not node.running
    message = str(info.value)
    assert "\n" not in message
    assert "image docker.io/test/sample:1" in message
    assert re.search(r"adding (layer|config|manifest) sha256:[0-9a-f]{64} to IPFS failed", message)
    assert image_store.list() == names
    assert blob_set(image_store) == blobs


def test_missing_ref(image_store: ImageStore, state_dir: Path, client: IPFSClient) -> None:
    with pytest.raises(ImageNotFound, match="test/none:1"):
        push(image_store, "test/none:1", client, state_dir)


def test_a_daemon_with_other_add_options_is_caught(
    image_store: ImageStore, state_dir: Path, client: IPFSClient
) -> None:
    """A CID that is not the one computed locally for the same bytes fails the push."""

    class CIDv0Adder:
        def add(self, source: object, name: str | None = None, **kw: object) -> AddResult:
            res = client.add(source, name, **kw)  # type: ignore[arg-type]
            # the same bytes chunked differently (as a daemon with other defaults would)
            return AddResult(cid="bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy",
                             size=res.size)

    sample_image(image_store, "test/sample:1")
    blobs = blob_set(image_store)
    with pytest.raises(IpfsnapError, match="CID"):
        push_image(image_store, "test/sample:1", CIDv0Adder(), OPTS,  # type: ignore[arg-type]
                   state_dir=state_dir)
    assert blob_set(image_store) == blobs
    assert not any(r.name.startswith("ipfs://") for r in image_store.list())


class Recorder:
    """A Progress that remembers every report."""

    def __init__(self) -> None:
        self.updates: list[tuple[str, str, int]] = []
        self.finished: list[tuple[str, str]] = []

    def update(self, key: str, status: str, done: int = 0, total: int = 0) -> None:
        self.updates.append((key, status, done))

    def finish(self, key: str, status: str) -> None:
        self.finished.append((key, status))


def test_progress_per_blob(image_store: ImageStore, state_dir: Path, client: IPFSClient) -> None:
    src = sample_image(image_store, "test/sample:1")
    rec = Recorder()
    result = push_image(image_store, "test/sample:1", client, OPTS, state_dir=state_dir,
                        progress=rec)
    walked = walk(client, result.cid)
    for layer in image_store.read_manifest(src).layers:
        key = layer.digest[7:19]
        assert any(k == key and s == "converting" for k, s, _ in rec.updates)
        assert any(k == key and s.startswith("converted") for k, s in rec.finished)
    for desc in walked.descriptors:
        key = desc.digest[7:19]
        adding = [n for k, s, n in rec.updates if k == key and s == "adding"]
        assert adding and max(adding) == desc.size
        cid = desc.urls[0].removeprefix("ipfs://")
        assert (key, f"added {cid}") in rec.finished
