"""Build one of ipfsnap's offline sample images and print the path of its oci-archive.

Usage: ``.venv/bin/python scripts/build_sample.py busybox|python [OUT_DIR]``

busybox is built from Debian's ``busybox-static`` into OUT_DIR (default: a directory under
the system temp dir) in well under a second; python (Debian bookworm + python3, debootstrap)
takes about a minute the first time and is cached under /var/cache/ipfsnap-test, so OUT_DIR
does not apply to it. The image's name is printed on the second line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ipfsnap.content.sample import build_busybox, build_python
from ipfsnap.errors import IpfsnapError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("busybox", "python"))
    parser.add_argument("out_dir", nargs="?", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.kind == "busybox":
            out = args.out_dir or Path(tempfile.mkdtemp(prefix="ipfsnap-sample-"))
            image = build_busybox(out)
        else:
            image = build_python()
    except IpfsnapError as exc:
        sys.stderr.write(f"build_sample: {exc}\n")
        return 1
    if image.oci_archive is None:  # pragma: no cover - both builders write one
        sys.stderr.write(f"build_sample: {args.kind}: no oci-archive was written\n")
        return 1
    sys.stdout.write(f"{image.oci_archive}\n{image.name}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
