"""``ipfs-push``: turn a local image into an IPFS-enabled image named by one CID.

Steps (the reference's ``ipfs.Push`` does the same through containerd's converter hooks):

1. :func:`ipfsnap.image.convert.convert_image` makes the eStargz tree (or, with
   ``estargz=False``, only the OCI media types and the platform selection).
2. Every blob is added to IPFS bottom-up (layers and config, then the manifest, then the
   index) with ``cid-version=1`` and ``pin=true``. Each descriptor gets
   ``urls: ["ipfs://<CIDv1 base32>"]`` (earlier urls are replaced), so manifests and indexes
   are rewritten - and get new digests - before they are added themselves.
3. The compact JSON descriptor of the top blob (mediaType, digest, size, urls) is added last;
   its CID is the image's name. The reference keeps the source's structure (a manifest stays a
   manifest, an index stays an index), and so do we.

Every CID the daemon returns is compared with :func:`ipfsnap.ipfs.compute_cid` of the same
bytes, computed in the same pass that re-checks the blob's sha256 digest (for layers this is
one extra read of the file, ~50 ms per 30 MB; ``verify_layer_cids=False`` skips the CID part
but never the digest check). Documents are encoded deterministically
(:func:`ipfsnap.oci.canonical_json`), so pushing the same image twice gives the same CID.

The pushed tree stays in the local store under the name ``ipfs://<CID>``. A failed push
names nothing and removes the blobs it wrote, so the store is as it was.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Protocol

from ipfsnap.content import ImageStore
from ipfsnap.content.errors import BlobNotFound, IncompleteImage
from ipfsnap.errors import IPFSError, IpfsnapError
from ipfsnap.image.convert import ConvertOptions, ConvertResult, convert_image
from ipfsnap.image.errors import CIDMismatch, PushError, SourceBlobMismatch, UnsupportedMediaType
from ipfsnap.image.resolve import IPFS_URL_PREFIX
from ipfsnap.ipfs import AddResult, BadCID, normalize_cid
from ipfsnap.ipfs.unixfs import DagBuilder
from ipfsnap.oci import (
    Descriptor,
    Index,
    Manifest,
    canonical_json,
    mediatypes,
    sha256_digest,
)
from ipfsnap.progress import Progress

log = logging.getLogger(__name__)

#: nesting depth of indexes we follow (same bound as the content store's)
MAX_DEPTH = 8
_READ = 1 << 20


class BlobAdder(Protocol):
    """What push needs of an IPFS client (:class:`ipfsnap.ipfs.IPFSClient` fits)."""

    def add(
        self,
        source: str | os.PathLike[str] | IO[bytes] | bytes,
        name: str | None = None,
        *,
        pin: bool = True,
        timeout: float | None = None,
        progress: Progress | None = None,
    ) -> AddResult: ...


@dataclass(frozen=True)
class PushOptions:
    convert: ConvertOptions = field(default_factory=ConvertOptions)
    #: compare the daemon's CID of each layer with one computed locally (configs, manifests,
    #: indexes and the root are always compared: they are small)
    verify_layer_cids: bool = True


@dataclass(frozen=True)
class PushResult:
    """A pushed image: its CID and what it took."""

    cid: str
    #: the local name of the pushed image, ``ipfs://<cid>``
    name: str
    #: the descriptor whose compact JSON the CID names (also the local name's target)
    root: Descriptor
    conversion: ConvertResult
    #: distinct blobs added (root descriptor included) and their bytes
    blobs_added: int
    bytes_added: int
    convert_seconds: float
    add_seconds: float


def ipfs_url(cid: str) -> str:
    return IPFS_URL_PREFIX + cid


def root_descriptor(desc: Descriptor) -> Descriptor:
    """The compact root: media type, digest, size and urls only (as the reference writes)."""
    return Descriptor(desc.media_type, desc.digest, desc.size, desc.urls)


def root_descriptor_bytes(desc: Descriptor) -> bytes:
    """The JSON whose CID names the image (compact, deterministic)."""
    return canonical_json(root_descriptor(desc).to_dict())


def _pieces(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while piece := f.read(_READ):
            yield piece


def _dag_of(data: bytes) -> str:
    b = DagBuilder()
    b.write(data)
    return b.finish().cid


@dataclass
class _Pusher:
    store: ImageStore
    client: BlobAdder
    what: str
    progress: Progress | None
    verify_layer_cids: bool
    created: set[str]
    #: source digest -> urls given to it (shared layers/configs are added once)
    done: dict[str, tuple[str, ...]] = field(default_factory=dict)
    blobs: int = 0
    nbytes: int = 0

    def _add(
        self, source: Path | bytes, kind: str, digest: str, expect: str | None,
        key: str | None = None,
    ) -> str:
        key = key or digest[7:19]
        try:
            result = self.client.add(source, name=key, pin=True, progress=self.progress)
        except IPFSError as exc:
            raise PushError(f"{self.what}: adding {kind} {digest} to IPFS failed: {exc}") from None
        try:
            cid = normalize_cid(result.cid)
        except BadCID as exc:
            raise PushError(f"{self.what}: IPFS returned a bad CID for {kind} {digest}: {exc}"
                            ) from None
        if expect is not None and cid != expect:
            raise CIDMismatch(
                f"{self.what}: IPFS added {kind} {digest} as {cid}, but its content has CID "
                f"{expect} (is the daemon using other add options?)"
            )
        self.blobs += 1
        self.nbytes += result.size
        log.info("%s: added %s %s as %s", self.what, kind, digest, cid)
        return cid

    def leaf(self, desc: Descriptor, kind: str) -> Descriptor:
        """A layer or config: verify it, add its file, set its url."""
        urls = self.done.get(desc.digest)
        if urls is None:
            path = self.store.blobs.path(desc.digest)
            h = hashlib.sha256()
            dag = DagBuilder()
            n = 0
            check_cid = kind != "layer" or self.verify_layer_cids
            try:
                for piece in _pieces(path):
                    h.update(piece)
                    n += len(piece)
                    if check_cid:
                        dag.write(piece)
            except FileNotFoundError:
                raise IncompleteImage(f"{self.what}: {kind} {desc.digest} is not in the store"
                                      ) from None
            got = "sha256:" + h.hexdigest()
            if got != desc.digest or n != desc.size:
                raise SourceBlobMismatch(
                    f"{self.what}: {kind} {desc.digest} in the store is {n} bytes hashing to "
                    f"{got} (descriptor: {desc.size} bytes)"
                )
            expect = dag.finish().cid if check_cid else None
            cid = self._add(path, kind, desc.digest, expect)
            urls = (ipfs_url(cid),)
            self.done[desc.digest] = urls
        return replace(desc, urls=urls)

    def _document(self, desc: Descriptor, data: bytes, kind: str) -> Descriptor:
        digest = sha256_digest(data)
        if not self.store.blobs.exists(digest):
            self.store.blobs.write(data, digest, what=kind)
            self.created.add(digest)
        new = replace(desc, digest=digest, size=len(data))
        cid = self._add(data, kind, digest, _dag_of(data))
        return replace(new, urls=(ipfs_url(cid),))

    def tree(self, desc: Descriptor, depth: int = 0) -> Descriptor:
        """Push the tree under ``desc`` bottom-up; returns ``desc`` rewritten with urls."""
        if depth > MAX_DEPTH:
            raise UnsupportedMediaType(f"{self.what}: indexes nested deeper than {MAX_DEPTH}")
        try:
            doc = self.store.read_document(desc)
        except BlobNotFound:
            raise IncompleteImage(f"{self.what}: {desc.digest} is not in the store") from None
        except IpfsnapError as exc:
            raise type(exc)(f"{self.what}: {exc}") from None
        if isinstance(doc, Index):
            entries = tuple(self.tree(m, depth + 1) for m in doc.manifests)
            data = replace(doc, media_type=mediatypes.OCI_INDEX, manifests=entries).to_bytes()
            return self._document(desc, data, "index")
        assert isinstance(doc, Manifest)
        # layers first, then the config (the reference's order; any order gives the same CIDs)
        layers = tuple(self.leaf(layer, "layer") for layer in doc.layers)
        config = self.leaf(doc.config, "config")
        man = replace(doc, media_type=mediatypes.OCI_MANIFEST, config=config, layers=layers)
        return self._document(desc, man.to_bytes(), "manifest")


def push_image(
    store: ImageStore,
    ref: str,
    client: BlobAdder,
    options: PushOptions | None = None,
    *,
    state_dir: Path,
    progress: Progress | None = None,
) -> PushResult:
    """Convert and push the local image ``ref``; name the result ``ipfs://<CID>``.

    Raises an :class:`~ipfsnap.errors.IpfsnapError` naming the image and blob on any failure,
    after removing the blobs this push wrote (the store and its names are as before).
    """
    opts = options or PushOptions()
    record = store.get(ref)
    what = f"image {record.name}"
    created: set[str] = set()
    try:
        with store.lease():
            conv = convert_image(store, record.target, opts.convert, state_dir=state_dir,
                                 what=what, progress=progress)
            created |= conv.created
            start = time.monotonic()
            pusher = _Pusher(store, client, what, progress, opts.verify_layer_cids, created)
            top = pusher.tree(conv.target)
            root = root_descriptor(top)
            data = root_descriptor_bytes(top)
            cid = pusher._add(data, "root descriptor of", top.digest, _dag_of(data), "root")
            add_seconds = time.monotonic() - start
            name = ipfs_url(cid)
            store.put(name, root)
    except BaseException as exc:
        created |= getattr(exc, "created", set())
        if created:
            log.info("%s: push failed; removing %d blobs it wrote", what, len(created))
            try:
                store.discard_unreferenced(created)
            except IpfsnapError as cleanup:
                log.warning("%s: could not remove the blobs of the failed push: %s", what,
                            cleanup)
        raise
    log.info("%s: pushed as %s (%d blobs, %d bytes; convert %.1f s, add %.1f s)", what, cid,
             pusher.blobs, pusher.nbytes, conv.seconds, add_seconds)
    return PushResult(cid, name, root, conv, pusher.blobs, pusher.nbytes, conv.seconds,
                      add_seconds)
