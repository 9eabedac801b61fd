"""OCI/Docker image types and media types, digests, references, parsing with limits."""

from __future__ import annotations

from ipfsnap.oci import mediatypes
from ipfsnap.oci.digest import (
    digest_hex,
    is_digest,
    sha256_digest,
    validate_digest,
    verify_bytes,
)
from ipfsnap.oci.errors import (
    DigestMismatch,
    DocumentTooLarge,
    InvalidDigest,
    InvalidPlatform,
    InvalidReference,
    OCIFormatError,
    UnknownMediaType,
)
from ipfsnap.oci.platform import Platform, best_match, host_platform, matches, parse_platform
from ipfsnap.oci.reference import Reference, normalize_name, parse_reference
from ipfsnap.oci.types import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    MAX_DOCUMENT_SIZE,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    canonical_json,
    convert_manifest_to_oci,
    iter_children,
    load_json,
    parse_config,
    parse_document,
    parse_index,
    parse_manifest,
)

__all__ = [
    "ANNOTATION_CONTAINERD_NAME",
    "ANNOTATION_REF_NAME",
    "MAX_DOCUMENT_SIZE",
    "Descriptor",
    "DigestMismatch",
    "DocumentTooLarge",
    "ImageConfig",
    "Index",
    "InvalidDigest",
    "InvalidPlatform",
    "InvalidReference",
    "Manifest",
    "OCIFormatError",
    "Platform",
    "Reference",
    "UnknownMediaType",
    "best_match",
    "canonical_json",
    "convert_manifest_to_oci",
    "digest_hex",
    "host_platform",
    "is_digest",
    "iter_children",
    "load_json",
    "matches",
    "mediatypes",
    "normalize_name",
    "parse_config",
    "parse_document",
    "parse_index",
    "parse_manifest",
    "parse_platform",
    "parse_reference",
    "sha256_digest",
    "validate_digest",
    "verify_bytes",
]
