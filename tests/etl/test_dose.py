"""etl.dose: TID 10011 content read from the DICOM JSON the ingest stores."""

import copy
import json

import pydicom
import pytest

from etl import dose
from etl.headers import read_file


@pytest.fixture(scope="module")
def reports(archive):
    """{StudyInstanceUID: DICOM JSON dict} of every generated dose report, as ingested."""
    root, truth = archive
    out = {}
    for rel, outcome in truth.files.items():
        if outcome != "ingested":
            continue
        ds = pydicom.dcmread(root / rel, stop_before_pixels=True, specific_tags=["Modality"])
        if ds.Modality == "SR":
            result = read_file(str(root / rel))
            assert result.status == "ok"
            out[result.record["StudyInstanceUID"]] = json.loads(result.record["dicom_json"])
    return out


def test_events_equal_the_generated_reports(reports, truth):
    assert set(reports) == set(truth.dose_reports)
    for study, header in reports.items():
        expected = truth.dose_reports[study]
        rows = dose.events(header)
        assert [tuple(r) for r in rows] == [dose.FIELDS] * len(rows)
        assert [{"event_uid": r["IrradiationEventUID"], "acquisition_type": r["acquisition_type"],
                 "protocol": r["acquisition_protocol"], "target_region": r["target_region"],
                 "phantom": r["phantom_type"], "ctdivol": r["CTDIvol"], "dlp": r["DLP"]}
                for r in rows] == expected["events"]
        assert [r["event_index"] for r in rows] == list(range(1, len(rows) + 1))
        assert {r["accumulated_DLP"] for r in rows} == {expected["accumulated_dlp"]}


def test_what_is_not_a_ct_dose_report_gives_no_rows(reports):
    header = next(iter(reports.values()))
    assert dose.events({}) == []
    assert dose.events([]) == []  # type: ignore[arg-type]
    other = copy.deepcopy(header)
    other[dose.CONCEPT_NAME]["Value"][0][dose.CODE_VALUE]["Value"] = ["126000"]  # TID 1500
    assert dose.events(other) == []
    no_ct = copy.deepcopy(header)
    no_ct[dose.CONTENT_SEQUENCE]["Value"] = [
        item for item in no_ct[dose.CONTENT_SEQUENCE]["Value"]
        if dose._concept(item) not in (dose.ACQUISITION, dose.ACCUMULATED)]
    assert dose.events(no_ct) == []


def acquisitions(header):
    return [i for i in header[dose.CONTENT_SEQUENCE]["Value"]
            if dose._concept(i) == dose.ACQUISITION]


def test_damaged_values_become_none_not_errors(reports):
    header = copy.deepcopy(next(iter(reports.values())))
    first = acquisitions(header)[0]
    ct_dose = next(c for c in first[dose.CONTENT_SEQUENCE]["Value"]
                   if dose._concept(c) == dose.CT_DOSE)
    for item in ct_dose[dose.CONTENT_SEQUENCE]["Value"]:
        if dose._concept(item) == dose.CTDIVOL:
            item[dose.MEASURED_VALUE]["Value"][0][dose.NUMERIC_VALUE]["Value"] = ["abc"]
        if dose._concept(item) == dose.DLP:
            item[dose.MEASURED_VALUE]["Value"] = []
    # the protocol's text removed (as an allow-list may), the region's code damaged
    first[dose.CONTENT_SEQUENCE]["Value"] = [
        c for c in first[dose.CONTENT_SEQUENCE]["Value"] if dose._concept(c) != dose.PROTOCOL]
    for c in first[dose.CONTENT_SEQUENCE]["Value"]:
        if dose._concept(c) == dose.TARGET_REGION:
            c[dose.CONCEPT_CODE] = {"vr": "SQ", "Value": ["not an item"]}
    row = dose.events(header)[0]
    assert (row["CTDIvol"], row["DLP"], row["acquisition_protocol"], row["target_region"]) == \
        (None, None, None, None)
    assert row["IrradiationEventUID"] is not None


@pytest.mark.parametrize("value, expected", [(12.5, 12.5), ("7.25", 7.25), ("nan", None),
                                             ("inf", None), (True, None), (None, None)])
def test_numbers(value, expected):
    assert dose._number([value]) == expected
