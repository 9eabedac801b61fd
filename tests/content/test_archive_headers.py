"""Image archives are read with bounded tar headers (ipfsnap.oci.tarheaders), as layers
are: an archive's PAX and GNU headers cannot make an import hang, recurse or buffer without
limit, and are refused in one line (issue 8: found reading the code after the CI fuzz
campaign's hang)."""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

import pytest

from ipfsnap.content import ArchiveError, ImageStore, import_image
from tests.snapshot.tarbuild import END, pax_record, special_header, ustar_member

HOSTILE = {
    # "2 2 2 ...=": tarfile's record regex backtracked to the "=" from every record (this
    # 1 KiB gzip file: ~10 minutes)
    "backtracking": (special_header(tarfile.XHDTYPE, b"2 " * 450_000 + b"=")
                     + ustar_member("oci-layout") + END, "malformed PAX record"),
    # 500 PAX headers in a row: tarfile's recursion ran out of stack (RecursionError, not
    # an ipfsnap error)
    "chain": (special_header(tarfile.XHDTYPE, pax_record(b"a", b"b")) * 500
              + ustar_member("oci-layout") + END, "more than 32 PAX or GNU long-name headers"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_headers_refused(tmp_path: Path, case: str) -> None:
    raw, reason = HOSTILE[case]
    archive = tmp_path / f"{case}.tar.gz"
    archive.write_bytes(gzip.compress(raw, 6))
    store = ImageStore(tmp_path / "state")
    with pytest.raises(ArchiveError) as info:
        import_image(store, archive, "victim:1")
    text = str(info.value)
    assert "\n" not in text, text
    assert f"archive {archive}: not a readable tar archive: {reason}" in text, text
    assert store.list() == [] and list(store.blobs.list()) == []


def test_lzma_alone_data_is_not_decompressed(tmp_path: Path) -> None:
    # 13 bytes an LZMA-alone decoder reads as a 4 GiB dictionary: tarfile's "r:*" tried it
    # (MemoryError under the fuzz campaign's address-space limit, found by fuzzing); only
    # gzip, bzip2 and xz magic select a decompressor, anything else is a plain tar
    archive = tmp_path / "lzma.tar"
    archive.write_bytes(bytes.fromhex("7effffffffffffffffffffffff"))
    with pytest.raises(ArchiveError, match="not a readable tar archive: truncated header"):
        import_image(ImageStore(tmp_path / "state"), archive, "victim:1")


def test_docker_manifest_nested_deep_is_refused(tmp_path: Path) -> None:
    # a docker-archive manifest.json nested 100,000 deep: json.loads raised RecursionError
    nested = b"[" * 100_000 + b"]" * 100_000
    archive = tmp_path / "deep.tar"
    archive.write_bytes(ustar_member("manifest.json", nested) + END)
    with pytest.raises(ArchiveError, match=r"manifest\.json is not valid JSON"):
        import_image(ImageStore(tmp_path / "state"), archive, "victim:1")
