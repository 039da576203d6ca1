import datetime as dt
import json
import os
from pathlib import Path

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
    for checksum in ("header", "full"):  # a folder opens, and fails on its first read
        r = read_file(str(tmp_path), checksum=checksum)
        assert (r.status, r.reason, r.message) == ("quarantined", "io_error", "Is a directory")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc/self/fd")
def test_every_outcome_closes_its_file(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "text").write_text("not an image at all")
    paths = [str(tmp_path / "empty"), str(tmp_path / "text"), str(tmp_path),
             get_testdata_file("CT_small.dcm"), get_testdata_file("rtplan_truncated.dcm")]
    before = len(os.listdir("/proc/self/fd"))
    reasons = [read_file(p, checksum=c).reason for p in paths * 20 for c in ("header", "full")]
    assert set(reasons) == {"empty_file", "not_dicom", "io_error", None, "truncated"}
    assert len(os.listdir("/proc/self/fd")) == before


def test_pydicom_truncated_files_are_caught():
    for name in ("rtplan_truncated.dcm", "MR_truncated.dcm"):
        r = read_file(get_testdata_file(name))
        assert (r.status, r.reason) == ("quarantined", "truncated"), name


# --- header-only reads (checksum="header") --------------------------------------------

def _big_ct(path, pixel_bytes: int, trailing: bool = False):
    """CT_small with its pixel data replaced by ``pixel_bytes`` bytes (and, optionally, a
    DataSetTrailingPadding element after it)."""
    import pydicom

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    side = int((pixel_bytes // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.PixelData = bytes(range(256)) * (side * side * 2 // 256) + b"\0" * (side * side * 2 % 256)
    del ds[0xFFFCFFFC]  # CT_small ends with padding; a typical file ends with its pixels
    if trailing:
        ds.add_new(0xFFFCFFFC, "OB", b"\0" * 64)
    ds.save_as(path, enforce_file_format=True)
    return path


def _bytes_read() -> int:
    """Bytes this process has read through read(2) so far (Linux /proc accounting)."""
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_header_mode_never_reads_the_pixel_data(tmp_path):
    import hashlib

    path = str(_big_ct(tmp_path / "big.dcm", 8 << 20))
    data = Path(path).read_bytes()
    pixel_at = data.index(b"\xe0\x7f\x10\x00")  # the Pixel Data element's tag
    before = _bytes_read()
    head = read_file(path, checksum="header")
    header_cost = _bytes_read() - before
    full = read_file(path, checksum="full")
    full_cost = _bytes_read() - before - header_cost
    assert head.status == full.status == "ok"
    assert header_cost < 64 * 1024 < 8 << 20 <= full_cost
    assert head.checksum_bytes == pixel_at and full.checksum_bytes == len(data)
    assert head.sha256 == hashlib.sha256(data[:pixel_at]).hexdigest()
    assert full.sha256 == hashlib.sha256(data).hexdigest()
    assert head.record == full.record  # the same row either way
    assert head.size == full.size == len(data)


def test_header_mode_checks_what_it_does_not_read(tmp_path):
    """Truncated pixel data is found from the file size; elements after the pixel data and
    encapsulated fragments make the walk read the rest; a rejected file is hashed whole."""
    import hashlib

    whole = tmp_path / "whole.dcm"
    _big_ct(whole, 1 << 20)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole.read_bytes()[:-1000])
    r = read_file(str(cut), checksum="header")
    assert (r.status, r.reason) == ("quarantined", "truncated")
    assert r.sha256 == hashlib.sha256(cut.read_bytes()).hexdigest()
    assert r.checksum_bytes == cut.stat().st_size

    padded = _big_ct(tmp_path / "padded.dcm", 1 << 20, trailing=True)
    h, f = read_file(str(padded), checksum="header"), read_file(str(padded), checksum="full")
    assert h.status == f.status == "ok" and h.record == f.record
    assert h.checksum_bytes < f.checksum_bytes == padded.stat().st_size

    for name in ("JPEG2000.dcm", "SC_rgb_rle.dcm", "image_dfl.dcm", "MR_small_RLE.dcm"):
        src = get_testdata_file(name)
        h, f = read_file(src, checksum="header"), read_file(src, checksum="full")
        assert h.status == f.status == "ok", (name, h.message)
        assert h.record == f.record, name
