"""The driver's keywords of DICOM tags (etl.keywords), against pydicom's own lookup."""

from pydicom._dicom_dict import DicomDictionary, RepeatersDictionary
from pydicom.datadict import keyword_for_tag as pydicom_keyword

from etl import keywords


def _tags() -> list[int]:
    tags = list(DicomDictionary)
    # repeating groups: each mask with its x digits as 0, as F and as a mix
    for mask in RepeatersDictionary:
        for fill in ("0", "F", "2"):
            tags.append(int(mask.replace("x", fill), 16))
    # private (odd groups, creators among them), unknown standard, group lengths
    tags += [0x00090010, 0x00091010, 0x00291008, 0x7FE10010, 0x60010010, 0x00100099,
             0x00080000, 0x00200000, 0x50010005, 0xFFFEE000, 0x00000000, 0xFFFFFFFF]
    return tags


def test_every_tag_has_pydicoms_keyword():
    tables = keywords._dictionary()
    assert tables is not None and len(tables[0]) == len(DicomDictionary)
    tags = _tags()
    assert len(tags) > 5000
    got = [keywords._standalone_keyword(t, tables) for t in tags]
    assert got == [pydicom_keyword(t) for t in tags]
    # a few exact ones, so that the reference cannot drift unseen
    assert got[tags.index(0x0008103E)] == "SeriesDescription"
    assert keywords._standalone_keyword(0x60023000, tables) == "OverlayData"
    assert keywords._standalone_keyword(0x60033000, tables) == ""  # private group
    assert keywords._standalone_keyword(0x00100099, tables) == ""


def test_with_pydicom_loaded_pydicom_answers(monkeypatch):
    # pydicom is loaded in this process: the lookup is pydicom's, not the file loaded alone
    monkeypatch.setattr(keywords, "_dictionary", lambda: 1 / 0)
    assert keywords.keyword_for_tag(0x00100010) == "PatientName"
    assert keywords.keyword_for_tag(0x00091010) == ""
