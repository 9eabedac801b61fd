"""Start-up cost of the CLI: parsing a command line loads no heavy dependency.

Each check runs in a fresh interpreter (this process has imported everything already) and
looks at ``sys.modules``: no timing, so the result does not depend on the machine's load.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ipfsnap._lazy import parse_exports

#: third-party modules (and the slow stdlib parts they drag in) that only the commands which
#: use them may load: async I/O, the containerd gRPC API, FUSE, zstd, the HTTP parser
HEAVY = ("trio", "grpc", "pyfuse3", "zstandard", "h11", "msgspec")

#: packages whose namespaces load their submodules on first use (ipfsnap._lazy)
LAZY_PACKAGES = (
    "ipfsnap.content",
    "ipfsnap.estargz",
    "ipfsnap.fs",
    "ipfsnap.ipfs",
    "ipfsnap.service",
    "ipfsnap.snapshot",
)


def loaded_after(code: str) -> set[str]:
    """Top-level names of the modules loaded after running ``code`` in a new interpreter."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    return {name.split(".")[0] for name in json.loads(last)}


def test_probe_sees_heavy_imports() -> None:
    """The probe itself works: importing the FUSE layer's client side does load trio."""
    assert "trio" in loaded_after("import ipfsnap.ipfs.aclient")


def test_import_main_and_build_parser_load_nothing_heavy() -> None:
    loaded = loaded_after(
        "import ipfsnap.cli.main\nipfsnap.cli.main.build_parser()"
    )
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["image", "rpull", "--help"], ["run", "--help"], ["estargz", "build", "--help"]],
)
def test_help_loads_nothing_heavy(argv: list[str]) -> None:
    loaded = loaded_after(
        "import contextlib, io\nfrom ipfsnap.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        f"    main({argv!r})\n"
    )
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_image_ls_loads_nothing_heavy(tmp_path: Path) -> None:
    loaded = loaded_after(
        "from ipfsnap.cli.main import main\n"
        f"assert main(['--state-dir', {str(tmp_path)!r}, 'image', 'ls', '--json']) == 0\n"
    )
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_sync_ipfs_client_does_not_load_trio() -> None:
    loaded = loaded_after("from ipfsnap.ipfs import IPFSClient, normalize_cid, parse_api")
    assert "trio" not in loaded


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_lazy_namespace_exports_every_name(package: str) -> None:
    mod = importlib.import_module(package)
    exports = parse_exports(mod.__file__)
    assert set(exports) == set(mod.__all__)
    for name, submodule in exports.items():
        assert submodule.startswith(package + ".")
        # the package hands out the submodule's own object
        source = importlib.import_module(submodule)
        assert getattr(mod, name) is getattr(source, name), f"{package}.{name}"
    assert set(mod.__all__) <= set(dir(mod))
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = mod.no_such_name


def test_from_import_of_lazy_names_in_fresh_interpreter() -> None:
    """``from package import name`` works before the submodule was ever loaded."""
    imports = "\n".join(
        f"from {pkg} import {', '.join(importlib.import_module(pkg).__all__)}"
        for pkg in LAZY_PACKAGES
    )
    loaded_after(imports)


def test_cli_defaults_match_the_library() -> None:
    """Defaults the CLI states without importing the library (to start fast) agree with it."""
    from ipfsnap.cli import estargz, image_optimize, image_push
    from ipfsnap.estargz.types import DEFAULT_CHUNK_SIZE
    from ipfsnap.image.convert import DEFAULT_LEVEL
    from ipfsnap.image.record import DEFAULT_PERIOD

    assert image_push.DEFAULT_LEVEL == DEFAULT_LEVEL
    assert image_optimize.DEFAULT_PERIOD == DEFAULT_PERIOD
    assert estargz.DEFAULT_CHUNK_SIZE == DEFAULT_CHUNK_SIZE
