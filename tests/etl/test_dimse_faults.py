"""A DIMSE PACS that misbehaves (:mod:`tests.badpacs`, a real pynetdicom server on
loopback): C-FIND answers without the UIDs asked for, associations aborted or silent in
the middle of a C-FIND or a C-GET, C-GETs that send half of what they report, or other
instances, or fail.

What must hold: no traceback, one clear line when nothing can be done, every instance
that did not arrive is retried by the next run (which, the PACS mended, completes the
lake), and nothing half-received stays in the vault's staging.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from catalog import open_lake
from etl import IngestConfig
from etl.errors import SourceError
from etl.sources import ingest_remote
from etl.sources.dimse import DimseSource
from lake_cli import main
from lakehouse import Lake
from tests.badpacs import AE_TITLE, BadPacs

CONFIG = IngestConfig(scheduler="threads", workers=2, batch_files=64)
SERIES, PER_SERIES = 2, 3


@pytest.fixture(scope="module")
def datasets() -> list[pydicom.Dataset]:
    """Two series of three CT images (pydicom's CT_small with UIDs of their own)."""
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study = generate_uid()
    out = []
    for _ in range(SERIES):
        series = generate_uid()
        for i in range(PER_SERIES):
            ds = copy.deepcopy(base)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = i + 1
            out.append(ds)
    return out


def _source(pacs: BadPacs) -> DimseSource:
    return DimseSource(AE_TITLE, "127.0.0.1", pacs.port, timeout=2)


def _in_lake(path: Path) -> tuple[set[str], list]:
    with open_lake(path) as cat:
        return ({r[0] for r in cat.con.execute("SELECT SOPInstanceUID FROM instances")
                 .fetchall()},
                cat.con.execute("SELECT reason, count(*) FROM quarantine GROUP BY 1").fetchall())


def _staged(path: Path) -> list[Path]:
    return [p for p in (path / "vault" / "staging").rglob("*") if p.is_file()]


#: fault -> (listed, fetched, failed) of the first run, or the end of its one-line error
FIRST_RUN = {
    "find-no-series": (0, 0, 0),
    "find-empty-uid": (0, 0, 0),
    "find-abort": "C-FIND series: no response within 2 s or the association was aborted",
    "find-no-class": "no instance could be retrieved (C-GET failed with status 0xA702)",
    "get-half": (6, 2, 4),  # the first of the three of each series
    "get-renamed": "no instance could be retrieved (not received)",
    "get-abort": (6, 1, 5),  # the first instance, then the association is gone
    "get-fail": "no instance could be retrieved (C-GET failed with status 0xA701)",
    "get-silent": "no instance could be retrieved (C-GET: no response or association "
                  "aborted)",
}


@pytest.mark.parametrize("fault", sorted(FIRST_RUN))
def test_a_misbehaving_pacs_loses_nothing(datasets, tmp_path, fault, caplog):
    uids = {str(ds.SOPInstanceUID) for ds in datasets}
    path = tmp_path / "lake"
    lake = Lake.create(path, profile="identified")
    expected = FIRST_RUN[fault]
    spooled = set(Path(tempfile.gettempdir()).glob("tmp*.dcm"))
    with BadPacs(datasets, {fault}, silent=3) as pacs, caplog.at_level(logging.WARNING):
        if isinstance(expected, str):
            with pytest.raises(SourceError) as err:
                ingest_remote(lake, _source(pacs), CONFIG)
            assert str(err.value) == f"cannot read source {pacs.url()}: {expected}"
        else:
            pulled = ingest_remote(lake, _source(pacs), CONFIG)
            assert (pulled.listed, pulled.fetched, pulled.failed) == expected
            failed = json.loads(Path(pulled.state_file).read_text())["failed"]
            assert len(failed) == expected[2]
            assert pulled.run.outcomes["ingested"] == expected[1]
        assert _staged(path) == []
        got, quarantine = _in_lake(path)
        assert got < uids and quarantine == []
        if fault in ("find-no-series", "find-empty-uid"):
            n = SERIES if fault == "find-no-series" else SERIES * PER_SERIES
            assert f"{n} C-FIND answers of {pacs.url()} had no usable UID and were left " \
                "out" in caplog.text
        pacs.faults.clear()  # the PACS mended
        again = ingest_remote(lake, _source(pacs), CONFIG)
    assert again.listed == len(uids) and again.failed == 0
    assert json.loads(Path(again.state_file).read_text())["failed"] == {}
    assert _in_lake(path) == (uids, []) and _staged(path) == []
    # received instances were spooled to the staging (and removed with it), never to the
    # system's temporary folder
    assert set(Path(tempfile.gettempdir()).glob("tmp*.dcm")) == spooled


def test_an_aborted_c_find_is_one_line(datasets, tmp_path, capsys):
    path = tmp_path / "lake"
    Lake.create(path, profile="identified")
    with BadPacs(datasets, {"find-abort"}) as pacs:
        code = main(["ingest", pacs.url(), "--lake", str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.endswith("C-FIND series: no response within 30 s or the association was "
                        "aborted\n")
