"""`ipfsnap estargz ...` commands: build, verify, ls, cat."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipfsnap.cli.common import Context, parse_size, print_json
from ipfsnap.errors import NotFoundError, StoreError, UsageError

#: the builder's default chunk size (``ipfsnap.estargz.types.DEFAULT_CHUNK_SIZE``; a test
#: checks they agree), stated here because that module loads msgspec, which parsing any
#: command line must not (tests/cli/test_startup.py)
DEFAULT_CHUNK_SIZE = 4 << 20

# The format code (zstandard, tarfile...) loads in the handlers, not at start-up.
if TYPE_CHECKING:
    from ipfsnap.estargz import FileRangeReader

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this area's sub-commands to the top-level parser."""
    p = sub.add_parser("estargz", help="build, verify and inspect eStargz layer blobs")
    esub = p.add_subparsers(dest="estargz_command", metavar="COMMAND")
    esub.required = True

    b = esub.add_parser("build", help="convert a tar (plain, gzip or zstd) to an eStargz blob")
    b.add_argument("input", metavar="IN.tar", help="input tar ('-' for stdin)")
    b.add_argument("output", metavar="OUT.blob", help="output blob (written atomically)")
    b.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_SIZE, metavar="N")
    b.add_argument(
        "--prioritize",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATH",
        help="files to put first, before the .prefetch.landmark",
    )
    b.add_argument(
        "--allow-missing-prioritized",
        action="store_true",
        help="ignore prioritized paths that are not in the tar",
    )
    b.add_argument(
        "--level",
        type=int,
        default=None,
        metavar="N",
        help="compression level (default 9 for gzip, 3 for zstd)",
    )
    b.add_argument("--compression", choices=("gzip", "zstd"), default="gzip")
    b.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="compression threads (default: one per CPU)",
    )
    b.set_defaults(func=cmd_build)

    v = esub.add_parser("verify", help="check the TOC (and its digest) and every chunk")
    v.add_argument("blob", metavar="BLOB")
    v.add_argument("--toc-digest", metavar="sha256:...", default=None)
    v.set_defaults(func=cmd_verify)

    ls = esub.add_parser("ls", help="print the TOC entries, one JSON object per line")
    ls.add_argument("blob", metavar="BLOB")
    ls.set_defaults(func=cmd_ls)

    c = esub.add_parser("cat", help="write a file's bytes (or a range of them) to stdout")
    c.add_argument("blob", metavar="BLOB")
    c.add_argument("path", metavar="PATH")
    c.add_argument("--offset", type=parse_size, default=0, metavar="N")
    c.add_argument("--length", type=parse_size, default=None, metavar="M")
    c.set_defaults(func=cmd_cat)


def _open_blob(path: str) -> tuple[FileRangeReader, int, Any]:
    from ipfsnap.estargz import FileRangeReader

    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the caller's ExitStack
    except FileNotFoundError:
        raise NotFoundError(f"blob {path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"blob {path}: {exc.strerror}") from None
    return FileRangeReader(f, path), os.fstat(f.fileno()).st_size, f


def cmd_build(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.estargz import BuildOptions, build
    from ipfsnap.progress import progress_for

    if args.chunk_size <= 0:
        raise UsageError("--chunk-size must be positive")
    if args.workers < 0:
        raise UsageError("--workers must not be negative")
    if args.level is not None:
        lo, hi = (0, 9) if args.compression == "gzip" else (-7, 22)
        if not lo <= args.level <= hi:
            raise UsageError(f"--level for {args.compression} must be in {lo}..{hi}")
    opts = BuildOptions(
        chunk_size=args.chunk_size,
        level=args.level,
        compression=args.compression,
        prioritize=tuple(args.prioritize),
        allow_missing_prioritized=args.allow_missing_prioritized,
        workers=args.workers,
    )
    out = Path(args.output)
    with contextlib.ExitStack() as stack:
        if args.input == "-":
            src = sys.stdin.buffer
        else:
            try:
                src = stack.enter_context(open(args.input, "rb"))
            except FileNotFoundError:
                raise NotFoundError(f"input tar {args.input}: no such file") from None
            except OSError as exc:
                raise UsageError(f"input tar {args.input}: {exc.strerror}") from None
        # Write beside the target and rename, so a failed build leaves nothing behind.
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        except OSError as exc:
            raise StoreError(f"cannot create {out}: {exc.strerror or exc}") from None
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
            with os.fdopen(fd, "wb") as dst:
                result = build(src, dst, opts, progress=progress_for())
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, out)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise StoreError(f"building {out}: {exc.strerror or exc}") from None
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    doc: dict[str, Any] = {
        "tocDigest": result.toc_digest,
        "blobDigest": result.blob_digest,
        "blobSize": result.blob_size,
        "diffID": result.diff_id,
        "uncompressedSize": result.uncompressed_size,
        "compression": result.compression,
        "annotations": result.annotations(),
    }
    if result.missing_prioritized:
        doc["missingPrioritized"] = list(result.missing_prioritized)
    print_json(doc)
    return 0


def cmd_verify(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.estargz import verify_blob

    reader, size, f = _open_blob(args.blob)
    with f:
        res = verify_blob(reader, size, toc_digest=args.toc_digest, name=args.blob)
    print_json(
        {
            "tocDigest": res.toc_digest,
            "entries": res.entries,
            "compression": res.compression,
            "chunks": res.chunks,
        }
    )
    return 0


def cmd_ls(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.estargz import entry_to_json, open_layer

    reader, size, f = _open_blob(args.blob)
    with f:
        index = open_layer(reader, size, name=args.blob)
    for e in index.toc_entries:
        sys.stdout.write(json.dumps(entry_to_json(e), ensure_ascii=False) + "\n")
    sys.stdout.flush()
    return 0


def cmd_cat(args: argparse.Namespace, ctx: Context) -> int:
    from ipfsnap.estargz import LayerReader, open_layer

    reader, size, f = _open_blob(args.blob)
    with f:
        index = open_layer(reader, size, name=args.blob)
        lr = LayerReader(index, reader)
        data = lr.read(args.path, args.offset, args.length)
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0
