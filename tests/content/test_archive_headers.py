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
    "backtracking": special_header(tarfile.XHDTYPE, b"2 " * 450_000 + b"=")
    + ustar_member("oci-layout") + END,
    # 500 PAX headers in a row: tarfile's recursion ran out of stack (RecursionError, not
    # an ipfsnap error)
    "chain": special_header(tarfile.XHDTYPE, pax_record(b"a", b"b")) * 500
    + ustar_member("oci-layout") + END,
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_headers_refused(tmp_path: Path, case: str) -> None:
    archive = tmp_path / f"{case}.tar.gz"
    archive.write_bytes(gzip.compress(HOSTILE[case], 6))
    store = ImageStore(tmp_path / "state")
    # tarfile tries every compression and lists why each failed: the archive's message
    # says "not a readable tar archive" (the reason is the unpacker tests' business)
    with pytest.raises(ArchiveError) as info:
        import_image(store, archive, "victim:1")
    text = str(info.value)
    assert "\n" not in text and f"archive {archive}: not a readable tar archive" in text, text
    assert store.list() == [] and list(store.blobs.list()) == []


def test_docker_manifest_nested_deep_is_refused(tmp_path: Path) -> None:
    # a docker-archive manifest.json nested 100,000 deep: json.loads raised RecursionError
    nested = b"[" * 100_000 + b"]" * 100_000
    archive = tmp_path / "deep.tar"
    archive.write_bytes(ustar_member("manifest.json", nested) + END)
    with pytest.raises(ArchiveError, match=r"manifest\.json is not valid JSON"):
        import_image(ImageStore(tmp_path / "state"), archive, "victim:1")
