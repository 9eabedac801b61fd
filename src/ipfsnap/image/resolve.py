"""Resolve an IPFS-enabled image: CID -> root descriptor -> index/manifest -> config.

Every blob is fetched through the first ``ipfs://CID`` url of its descriptor and checked
against the descriptor's digest and size before anything reads it. The root descriptor is
trusted because its CID names it (the IPFS daemon verifies blocks against their CIDs); from
there each digest vouches for the next level.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ipfsnap.content import BlobStore
from ipfsnap.errors import IPFSError
from ipfsnap.image.errors import (
    BadImageRef,
    BlobFetchError,
    BlobVerificationError,
    PlatformNotFound,
    RemoteImageFormatError,
)
from ipfsnap.ipfs import BadCID, IPFSClient, normalize_cid
from ipfsnap.oci import (
    MAX_DOCUMENT_SIZE,
    Descriptor,
    DigestMismatch,
    ImageConfig,
    Index,
    Manifest,
    OCIFormatError,
    Platform,
    best_match,
    host_platform,
    load_json,
    mediatypes,
    parse_config,
    parse_document,
    sha256_digest,
)
from ipfsnap.progress import Progress

log = logging.getLogger(__name__)

IPFS_URL_PREFIX = "ipfs://"
#: bound on the root descriptor: a compact descriptor (mediaType, digest, size, urls) is
#: about 250 bytes; 64 KiB leaves room for many annotations while a hostile CID pointing at
#: a huge file costs at most that much
MAX_ROOT_DESCRIPTOR = 64 << 10
#: an index of indexes of manifests is already unusual; deeper nesting is refused
MAX_INDEX_DEPTH = 8
#: pieces queued between the IPFS stream and the content store while fetching a layer; the
#: client hands over pieces of at most one socket read, so this bounds memory to a few MiB
_QUEUE_PIECES = 64
#: seconds a blocked queue operation waits before re-checking for cancellation
_POLL = 0.5

ClientSource = IPFSClient | Callable[[], IPFSClient]


def parse_ipfs_ref(ref: str) -> str:
    """``CID``, ``ipfs://CID`` or ``/ipfs/CID`` -> the CID (v1, base32)."""
    text = ref.strip()
    if text.startswith(IPFS_URL_PREFIX):
        cid = text[len(IPFS_URL_PREFIX):]
    elif text.startswith("/ipfs/"):
        cid = text[len("/ipfs/"):]
    else:
        cid = text
    cid = cid.rstrip("/")
    if not cid or "/" in cid:
        raise BadImageRef(f"image reference {ref!r}: want CID, ipfs://CID or /ipfs/CID")
    try:
        return normalize_cid(cid)
    except BadCID as exc:
        raise BadImageRef(f"image reference {ref!r}: not a CID: {exc}") from None


def image_name(cid: str) -> str:
    """The local name of the image rpulled from ``cid``."""
    return IPFS_URL_PREFIX + cid


def ipfs_cid(desc: Descriptor, what: str = "blob") -> str:
    """The CID of the first ``ipfs://`` url of ``desc`` (as the reference: no path allowed)."""
    for url in desc.urls:
        if url.startswith(IPFS_URL_PREFIX):
            cid = url[len(IPFS_URL_PREFIX):]
            if not cid or "/" in cid:
                raise RemoteImageFormatError(f"{what} {desc.digest}: bad ipfs url {url!r}")
            try:
                return normalize_cid(cid)
            except BadCID as exc:
                raise RemoteImageFormatError(
                    f"{what} {desc.digest}: bad CID in url {url!r}: {exc}"
                ) from None
    raise RemoteImageFormatError(f"{what} {desc.digest}: descriptor has no ipfs:// url")


def fetching_line(desc: Descriptor) -> str:
    """The progress line the reference prints per blob it fetches."""
    return f"fetching {desc.digest[:len('sha256:') + 8]}... {desc.media_type}"


class BlobFetcher:
    """Fetches blobs of an IPFS-enabled image into the content store, verified.

    ``client`` may be a factory, called on the first fetch (commands whose blobs are all
    local never need an IPFS API). ``report`` receives one :func:`fetching_line` per blob
    actually fetched (already-stored blobs are not fetched again).
    """

    def __init__(
        self,
        client: ClientSource,
        blobs: BlobStore,
        *,
        report: Callable[[str], None] | None = None,
        progress: Progress | None = None,
    ) -> None:
        self._client_source = client
        self._client: IPFSClient | None = client if isinstance(client, IPFSClient) else None
        self.blobs = blobs
        self.report = report
        self.progress = progress
        self.fetched: list[Descriptor] = []

    @property
    def client(self) -> IPFSClient:
        if self._client is None:
            source = self._client_source
            assert not isinstance(source, IPFSClient)
            self._client = source()
        return self._client

    def _announce(self, desc: Descriptor) -> None:
        self.fetched.append(desc)
        log.info("fetching %s (%s, %d bytes)", desc.digest, desc.media_type, desc.size)
        if self.report is not None:
            self.report(fetching_line(desc))

    # -- root ---------------------------------------------------------------------------
    def root(self, cid: str) -> Descriptor:
        """The compact JSON descriptor named by ``cid`` (an index or a manifest)."""
        pieces: list[bytes] = []
        got = 0

        def sink(data: bytes) -> None:
            nonlocal got
            got += len(data)
            if got > MAX_ROOT_DESCRIPTOR:
                raise RemoteImageFormatError(
                    f"image ipfs://{cid}: root is larger than {MAX_ROOT_DESCRIPTOR} bytes; "
                    "not an image descriptor"
                )
            pieces.append(data)

        try:
            self.client.cat_into(cid, 0, None, sink)
        except IPFSError as exc:
            raise BlobFetchError(f"image ipfs://{cid}: cannot read the root descriptor: {exc}"
                                 ) from exc
        what = f"image ipfs://{cid} root descriptor"
        try:
            desc = Descriptor.from_dict(load_json(b"".join(pieces), what, MAX_ROOT_DESCRIPTOR),
                                        what)
        except OCIFormatError as exc:
            raise RemoteImageFormatError(str(exc)) from None
        if not (mediatypes.is_index(desc.media_type) or mediatypes.is_manifest(desc.media_type)):
            raise RemoteImageFormatError(
                f"{what}: media type {desc.media_type!r} is neither an index nor a manifest"
            )
        return desc

    # -- documents ----------------------------------------------------------------------
    def document_bytes(self, desc: Descriptor, what: str) -> bytes:
        """A small blob (index, manifest, config): from the store, else fetched; verified."""
        if desc.size > MAX_DOCUMENT_SIZE:
            raise RemoteImageFormatError(
                f"{what} {desc.digest}: {desc.size} bytes exceeds the document limit "
                f"{MAX_DOCUMENT_SIZE}"
            )
        if self.blobs.exists(desc.digest):
            data = self.blobs.read(desc.digest, MAX_DOCUMENT_SIZE)
            if len(data) == desc.size and sha256_digest(data) == desc.digest:
                return data
            log.warning("stored blob %s does not match its descriptor; fetching it again",
                        desc.digest)
            self.blobs.delete(desc.digest)
        cid = ipfs_cid(desc, what)
        self._announce(desc)
        try:
            data = self.client.cat(cid, 0, desc.size) if desc.size else b""
        except IPFSError as exc:
            raise BlobFetchError(f"{what} {desc.digest} (ipfs://{cid}): {exc}") from exc
        got = sha256_digest(data)
        if got != desc.digest:
            raise BlobVerificationError(
                f"{what} {desc.digest} (ipfs://{cid}): content hashes to {got}; rejected"
            )
        self.blobs.write(data, desc.digest, what=what)
        return data

    def document(self, desc: Descriptor, what: str) -> Manifest | Index:
        data = self.document_bytes(desc, what)
        try:
            return parse_document(data, f"{what} {desc.digest}", desc.media_type)
        except OCIFormatError as exc:
            raise RemoteImageFormatError(str(exc)) from None

    def config(self, desc: Descriptor) -> ImageConfig:
        data = self.document_bytes(desc, "config")
        try:
            return parse_config(data, f"config {desc.digest}")
        except OCIFormatError as exc:
            raise RemoteImageFormatError(str(exc)) from None

    # -- big blobs ----------------------------------------------------------------------
    def blob(self, desc: Descriptor, what: str = "layer") -> None:
        """Make sure the blob is in the content store: stream it from IPFS, verifying the
        digest and size while it is written (the store keeps nothing that fails)."""
        if self.blobs.exists(desc.digest):
            return
        cid = ipfs_cid(desc, what)
        self._announce(desc)
        try:
            self.blobs.ingest(
                self._stream(cid, desc.size, desc.digest), desc.digest, desc.size,
                what=what, progress=self.progress,
            )
        except DigestMismatch as exc:
            raise BlobVerificationError(f"{what} {desc.digest} (ipfs://{cid}): {exc}; rejected"
                                        ) from exc
        except IPFSError as exc:
            raise BlobFetchError(f"{what} {desc.digest} (ipfs://{cid}): {exc}") from exc
        if self.progress is not None:
            self.progress.finish(desc.digest[7:19], f"fetched {desc.size} bytes")

    def _stream(self, cid: str, size: int, digest: str) -> Iterator[bytes]:
        """The blob's bytes as an iterator, from one streaming ``cat`` in a thread (the
        client pushes into a sink; the store pulls)."""
        if size == 0:
            return
        q: queue.Queue[bytes | BaseException | None] = queue.Queue(_QUEUE_PIECES)
        cancel = threading.Event()

        class _Cancelled(Exception):
            pass

        def put(item: bytes | BaseException | None) -> None:
            while True:
                if cancel.is_set():
                    raise _Cancelled
                try:
                    q.put(item, timeout=_POLL)
                    return
                except queue.Full:
                    continue

        def produce() -> None:
            try:
                self.client.cat_into(cid, 0, size, put)
            except _Cancelled:
                return
            except BaseException as exc:
                with contextlib.suppress(_Cancelled):
                    put(exc)
                return
            with contextlib.suppress(_Cancelled):
                put(None)

        t = threading.Thread(target=produce, name=f"fetch {digest[7:19]}", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()
            t.join()


@dataclass(frozen=True)
class ResolvedRemote:
    """One platform of an IPFS-enabled image, its documents verified and stored."""

    cid: str
    target: Descriptor
    manifest_descriptor: Descriptor
    manifest: Manifest
    config: ImageConfig


def resolve_remote(
    fetcher: BlobFetcher,
    cid: str,
    platform: Platform | None = None,
    *,
    on_manifest: Callable[[Manifest], None] | None = None,
) -> ResolvedRemote:
    """Root descriptor -> (index ->) manifest for ``platform`` -> config, all verified and
    stored in the content store. ``on_manifest`` is called with the verified manifest before
    the config is fetched (work that needs only the layer descriptors can start there)."""
    want = platform or host_platform()
    target = fetcher.root(cid)
    desc = target
    for _ in range(MAX_INDEX_DEPTH):
        kind = "index" if mediatypes.is_index(desc.media_type) else "manifest"
        doc = fetcher.document(desc, kind)
        if isinstance(doc, Manifest):
            if on_manifest is not None:
                on_manifest(doc)
            config = fetcher.config(doc.config)
            return ResolvedRemote(cid, target, desc, doc, config)
        i = best_match(want, [m.platform for m in doc.manifests])
        if i is None:
            have = ", ".join(str(m.platform) for m in doc.manifests if m.platform) or "none"
            raise PlatformNotFound(
                f"image ipfs://{cid}: no manifest for platform {want} (has {have})"
            )
        desc = doc.manifests[i]
    raise RemoteImageFormatError(f"image ipfs://{cid}: indexes nested deeper than "
                                 f"{MAX_INDEX_DEPTH}")
