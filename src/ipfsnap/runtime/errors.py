"""Errors of the container runtime (bundles, runc, container records)."""

from __future__ import annotations

from ipfsnap.errors import (
    AlreadyExistsError,
    FormatError,
    NotFoundError,
    RuntimeFailure,
    UsageError,
)


class BadRunOption(UsageError):
    """A run option (``--mount``, ``--user``, ``--env``, ``--net``...) is malformed."""


class UserNotFound(RuntimeFailure):
    """A ``--user``/image User name is not in the rootfs's /etc/passwd or /etc/group."""


class BundleError(RuntimeFailure):
    """The OCI bundle (config.json, resolv.conf, hosts...) cannot be written."""


class RuncError(RuntimeFailure):
    """runc failed (could not start, create, kill or delete a container)."""


class ContainerExists(AlreadyExistsError):
    """A container id is already in use in this state dir."""


class ContainerNotFound(NotFoundError):
    """No container with this id in this state dir."""


class ContainerRunning(RuntimeFailure):
    """The container is still running (``rm`` without ``-f``)."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM/SIGHUP/SIGINT arrived while a container was being prepared or cleaned up.

    A BaseException (as KeyboardInterrupt) so no ``except Exception`` swallows it; the CLI
    exits with 128 + ``signum``.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


class ImageConfigError(FormatError):
    """An image's config (or a file the runtime reads from its rootfs, as /etc/passwd) holds
    a value that cannot be run safely; the message names the image and the field."""


class ElfFormatError(FormatError):
    """An ELF file's headers are malformed or point outside it (runtime/elf.py)."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        #: the problem alone, for callers that name the file themselves
        self.problem = problem
