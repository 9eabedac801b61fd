"""Local content store: blobs, image names, import/export, registry pulls, sample images."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipfsnap._lazy import lazy_exports

if TYPE_CHECKING:
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

# Submodules load on first use of one of their names (see ipfsnap._lazy).
if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_exports(__name__, __file__)
