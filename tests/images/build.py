"""Sample image builders for tests and scripts (the code lives in ipfsnap.content.sample so
benchmarks and the README quickstart can import it from the installed package)."""

from __future__ import annotations

from ipfsnap.content.sample import (
    BUSYBOX_NAME,
    PYTHON_NAME,
    SampleImage,
    build_busybox,
    build_python,
    build_tar,
    upperdir_to_tar,
)

__all__ = [
    "BUSYBOX_NAME",
    "PYTHON_NAME",
    "SampleImage",
    "build_busybox",
    "build_python",
    "build_tar",
    "upperdir_to_tar",
]
