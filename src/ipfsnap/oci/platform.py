"""Platforms (``linux/amd64``, ``linux/arm64/v8``): parsing, this machine's, matching."""

from __future__ import annotations

import platform as _platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ipfsnap.oci.errors import InvalidPlatform, OCIFormatError

#: uname machine names -> (OCI architecture, variant)
_MACHINE = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "i386": ("386", ""),
    "i686": ("386", ""),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
}


@dataclass(frozen=True)
class Platform:
    """An OCI platform object (the fields of ``platform`` in an index entry / config)."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text

    def normalized(self) -> Platform:
        """Same platform with the implied arm64 variant (``v8``) spelled out."""
        arch, variant = self.architecture, self.variant
        if arch == "aarch64":
            arch = "arm64"
        if arch in ("x86_64", "x86-64"):
            arch = "amd64"
        if arch == "arm64" and variant in ("", "8"):
            variant = "v8"
        return Platform(self.os, arch, variant, self.os_version, self.os_features)

    def to_dict(self) -> dict[str, Any]:
        # field order as the OCI spec / Go struct: architecture, os, os.version, os.features,
        # variant
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            out["os.version"] = self.os_version
        if self.os_features:
            out["os.features"] = list(self.os_features)
        if self.variant:
            out["variant"] = self.variant
        return out

    @classmethod
    def from_dict(cls, data: Any, what: str = "platform") -> Platform:
        if not isinstance(data, dict):
            raise OCIFormatError(f"{what}: platform must be an object")
        os_name = data.get("os")
        arch = data.get("architecture")
        variant = data.get("variant", "")
        version = data.get("os.version", "")
        features = data.get("os.features", [])
        if not isinstance(os_name, str) or not isinstance(arch, str):
            raise OCIFormatError(f"{what}: platform needs string os and architecture")
        if not isinstance(variant, str) or not isinstance(version, str):
            raise OCIFormatError(f"{what}: platform variant/os.version must be strings")
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise OCIFormatError(f"{what}: platform os.features must be a list of strings")
        return cls(os_name, arch, variant, version, tuple(features))


def parse_platform(text: str) -> Platform:
    """``os/arch[/variant]`` as given to ``--platform``."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(p and p.isprintable() and " " not in p for p in parts):
        raise InvalidPlatform(f"invalid platform {text!r} (want os/arch[/variant])")
    return Platform(parts[0].lower(), parts[1].lower(), parts[2].lower() if len(parts) == 3 else "")


def host_platform() -> Platform:
    """This machine's platform (always ``linux``)."""
    machine = _platform.machine().lower()
    arch, variant = _MACHINE.get(machine, (machine, ""))
    return Platform("linux", arch, variant)


def matches(want: Platform, have: Platform) -> bool:
    """Whether an image for ``have`` satisfies a request for ``want``.

    OS and architecture must be equal; a variant in ``want`` must be equal too, an empty one
    accepts any variant (as ``docker pull --platform linux/arm`` does).
    """
    w, h = want.normalized(), have.normalized()
    if w.os != h.os or w.architecture != h.architecture:
        return False
    if w.variant and h.variant and w.variant != h.variant:
        return False
    if w.variant and not h.variant:
        # an entry with no variant fits only when it is the architecture's default one
        return w.architecture == "arm64" and w.variant == "v8"
    return True


def best_match(want: Platform, candidates: Sequence[Platform | None]) -> int | None:
    """Index of the best candidate for ``want`` (exact variant first), else None."""
    w = want.normalized()
    exact = None
    loose = None
    for i, cand in enumerate(candidates):
        if cand is None or not matches(w, cand):
            continue
        if cand.normalized().variant == w.variant:
            if exact is None:
                exact = i
        elif loose is None:
            loose = i
    return exact if exact is not None else loose
