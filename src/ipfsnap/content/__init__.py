"""Local content store: blobs, image names, import/export, registry pulls, sample images."""

from __future__ import annotations

from ipfsnap.content.archive import export_image, import_image
from ipfsnap.content.blobs import BlobStore
from ipfsnap.content.errors import (
    AmbiguousImport,
    ArchiveError,
    BlobNotFound,
    ImageNotFound,
    IncompleteImage,
    RegistryAuthError,
    RegistryError,
    StoreCorrupt,
)
from ipfsnap.content.store import GCResult, ImageRecord, ImageStore, ResolvedImage

__all__ = [
    "AmbiguousImport",
    "ArchiveError",
    "BlobNotFound",
    "BlobStore",
    "GCResult",
    "ImageNotFound",
    "ImageRecord",
    "ImageStore",
    "IncompleteImage",
    "RegistryAuthError",
    "RegistryError",
    "ResolvedImage",
    "StoreCorrupt",
    "export_image",
    "import_image",
]
