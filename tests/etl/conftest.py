"""A real PACS (Orthanc on loopback) loaded with the session's generated archive."""

from __future__ import annotations

import pytest

from tests.pacs import orthanc_missing, run_orthanc


@pytest.fixture(scope="session")
def orthanc(archive):
    """Orthanc holding every file of the sample archive it accepts (it refuses the
    broken ones and keeps the first of two files with the same SOPInstanceUID)."""
    why = orthanc_missing()
    if why:
        pytest.skip(why)
    with run_orthanc() as server:
        server.stored = server.upload_folder(archive[0])
        yield server
