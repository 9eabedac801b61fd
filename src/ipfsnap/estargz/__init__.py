"""The eStargz / stargz / zstd:chunked layer format: build, open, verify (pure, synchronous).

See docs/architecture.md for the stable interface other packages code against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipfsnap._lazy import lazy_exports

if TYPE_CHECKING:
    from ipfsnap.estargz.builder import BuildOptions, BuildResult, build
    from ipfsnap.estargz.errors import (
        BadCompression,
        BadFooter,
        BadTar,
        ChunkDigestMismatch,
        ChunkTooLarge,
        EStargzError,
        InvalidTOC,
        NameTooLong,
        PrioritizedFileNotFound,
        TOCDigestMismatch,
        TOCTooLarge,
        TooManyEntries,
        TruncatedBlob,
        UnsafeEntry,
    )
    from ipfsnap.estargz.reader import (
        LayerIndex,
        LayerReader,
        VerifyResult,
        clean_path,
        decompress_chunk,
        open_layer,
        verify_blob,
    )
    from ipfsnap.estargz.toc import entry_to_json
    from ipfsnap.estargz.types import (
        DEFAULT_CHUNK_SIZE,
        DEFAULT_LIMITS,
        NO_PREFETCH_LANDMARK,
        PREFETCH_LANDMARK,
        TOC_DIGEST_ANNOTATION,
        TOC_TAR_NAME,
        UNCOMPRESSED_SIZE_ANNOTATION,
        BytesRangeReader,
        Chunk,
        FileRangeReader,
        Limits,
        RangeReader,
        TOCEntry,
    )

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_LIMITS",
    "NO_PREFETCH_LANDMARK",
    "PREFETCH_LANDMARK",
    "TOC_DIGEST_ANNOTATION",
    "TOC_TAR_NAME",
    "UNCOMPRESSED_SIZE_ANNOTATION",
    "BadCompression",
    "BadFooter",
    "BadTar",
    "BuildOptions",
    "BuildResult",
    "BytesRangeReader",
    "Chunk",
    "ChunkDigestMismatch",
    "ChunkTooLarge",
    "EStargzError",
    "FileRangeReader",
    "InvalidTOC",
    "LayerIndex",
    "LayerReader",
    "Limits",
    "NameTooLong",
    "PrioritizedFileNotFound",
    "RangeReader",
    "TOCDigestMismatch",
    "TOCEntry",
    "TOCTooLarge",
    "TooManyEntries",
    "TruncatedBlob",
    "UnsafeEntry",
    "VerifyResult",
    "build",
    "clean_path",
    "decompress_chunk",
    "entry_to_json",
    "open_layer",
    "verify_blob",
]

# Submodules load on first use of one of their names (see ipfsnap._lazy).
if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_exports(__name__, __file__)
