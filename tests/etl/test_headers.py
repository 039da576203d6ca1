import datetime as dt
import json
import os

import pytest
from pydicom.data import get_charset_files, get_testdata_file

from etl.headers import read_file
from etl.record import age_years, parse_date, parse_time

# decoded PatientName of pydicom's character set test files (PS3.5 Annex H-K examples)
CHARSET_NAMES = {
    "chrArab.dcm": "قباني^لنزار",
    "chrFren.dcm": "Buc^Jérôme",
    "chrGerm.dcm": "Äneas^Rüdiger",
    "chrGreek.dcm": "Διονυσιος",
    "chrH31.dcm": "Yamada^Tarou=山田^太郎=やまだ^たろう",
    "chrH32.dcm": "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう",
    "chrHbrw.dcm": "שרון^דבורה",
    "chrI2.dcm": "Hong^Gildong=洪^吉洞=홍^길동",
    "chrRuss.dcm": "Люкceмбypг",
    "chrX1.dcm": "Wang^XiaoDong=王^小東",
    "chrX2.dcm": "Wang^XiaoDong=王^小东",
}


@pytest.mark.parametrize("name", sorted(CHARSET_NAMES))
def test_names_are_decoded_per_specific_character_set(name):
    path = next(f for f in get_charset_files("*") if os.path.basename(f) == name)
    r = read_file(path)
    assert r.status == "ok", r.message
    assert r.record["PatientName"] == CHARSET_NAMES[name]
    pn = json.loads(r.record["dicom_json"])["00100010"]["Value"][0]  # PS3.18 F.2.2 PN model
    parts = [pn.get(k, "") for k in ("Alphabetic", "Ideographic", "Phonetic")]
    assert "=".join(parts).rstrip("=") == CHARSET_NAMES[name]


def test_ct_small_typed_values():
    r = read_file(get_testdata_file("CT_small.dcm"))
    rec = r.record
    assert r.status == "ok"
    assert rec["Modality"] == "CT"
    assert rec["StudyDate"] == dt.date(2004, 1, 19)
    assert rec["StudyTime"] == dt.time(7, 27, 30)  # "072730"
    assert rec["SliceThickness"] == 5.0
    assert rec["PixelSpacing"] == [0.661468, 0.661468]
    assert rec["Rows"] == 128 and rec["Columns"] == 128
    assert rec["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert rec["study_year"] == 2004
    assert r.size == os.path.getsize(get_testdata_file("CT_small.dcm"))
    assert len(r.sha256) == 64
    assert "7FE00010" not in rec["dicom_json"]  # bulk data left out


def test_value_parsers():
    assert parse_date("20240229") == dt.date(2024, 2, 29)
    assert parse_date("2024.02.29") == dt.date(2024, 2, 29)
    assert parse_date("20230229") is None  # impossible date
    assert parse_date("garbage") is None
    assert parse_time("0930") == dt.time(9, 30)
    assert parse_time("093001.5") == dt.time(9, 30, 1, 500000)
    assert parse_time("09:30:01") == dt.time(9, 30, 1)
    assert parse_time("256000") is None
    assert age_years("045Y", None, None) == 45.0
    assert age_years("006M", None, None) == 0.5
    assert age_years(None, dt.date(2000, 6, 1), dt.date(2020, 5, 31)) == 19.0
    assert age_years("bogus", None, None) is None


def test_unreadable_and_empty_files(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert read_file(str(empty)).reason == "empty_file"
    assert read_file(str(tmp_path / "missing")).reason == "io_error"
    text = tmp_path / "notes.txt"
    text.write_text("not an image at all")
    r = read_file(str(text))
    assert (r.status, r.reason) == ("quarantined", "not_dicom")


def test_pydicom_truncated_files_are_caught():
    for name in ("rtplan_truncated.dcm", "MR_truncated.dcm"):
        r = read_file(get_testdata_file(name))
        assert (r.status, r.reason) == ("quarantined", "truncated"), name
