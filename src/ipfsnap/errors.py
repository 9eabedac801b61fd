"""The one exception tree of ipfsnap.

Every error a user can cause or meet derives from :class:`IpfsnapError`. Its message is one
clear line that names the object (image, blob, CID, path, daemon) and the problem; the CLI
prints exactly that line and exits with :attr:`IpfsnapError.exit_code`.

Each package adds its own leaves in its own ``errors.py`` (``ipfsnap.estargz.errors``,
``ipfsnap.ipfs.errors`` ...), deriving from one of the branches below, so callers can catch
a whole family (``except IPFSError``) without importing the package that raises it.
"""

from __future__ import annotations


class IpfsnapError(Exception):
    """Base of every ipfsnap error. ``str(err)`` is the one-line message for the user."""

    #: process exit code the CLI uses for this family of errors
    exit_code: int = 1


class UsageError(IpfsnapError):
    """The user asked for something malformed (bad option value, bad reference)."""

    exit_code = 2


class ConfigError(IpfsnapError):
    """The configuration file or environment is invalid."""


class FormatError(IpfsnapError):
    """A blob, archive or document does not have the format it claims (eStargz, tar, OCI)."""


class IntegrityError(IpfsnapError):
    """Content does not match the digest that names or describes it."""


class LimitExceeded(FormatError):
    """Input exceeds a configured safety limit (TOC size, entry count, name length...)."""


class UnsafePathError(FormatError):
    """An entry's name or link target would escape its root (absolute, ``..``)."""


class IPFSError(IpfsnapError):
    """Talking to the IPFS daemon failed."""


class StoreError(IpfsnapError):
    """The local content or image store cannot do what was asked."""


class NotFoundError(IpfsnapError):
    """A named object (image, blob, snapshot, container) does not exist."""


class AlreadyExistsError(IpfsnapError):
    """A named object (snapshot, container id, image name) already exists."""


class SnapshotError(IpfsnapError):
    """A snapshot operation failed."""


class MountError(IpfsnapError):
    """Mounting or unmounting a filesystem failed."""


class RuntimeFailure(IpfsnapError):
    """Preparing or running a container failed (runc, bundle)."""


class ServiceError(IpfsnapError):
    """The snapshotter service is unreachable or answered with an error."""
