"""The DICOM JSON text of a header (etl.headers._dumps, orjson) against ``json``'s, the
text written before: the same values when parsed (key order, number classes and signs
included) over the whole test corpus, and ``json``'s very text where the two would not
parse alike (NaN and infinities, integers beyond 64 bits, None values)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from etl import onewalk
from etl.errors import FileRejected
from etl.headers import _ENCODE, _dumps, parse
from lakehouse.deid import Policy
from lakehouse.privacy import Pseudonymizer
from tests.etl.test_fastpath import corpus


def parsed(text: str) -> str:
    """The parsed value, comparable with ==: repr keeps key order, int/float and -0.0."""
    return repr(json.loads(text))


def test_same_values_as_json_over_the_corpus(archive):
    policy = Policy(Pseudonymizer(bytes(range(32))))
    headers = 0
    differ = []
    text_differs = 0
    for path in corpus(archive[0]):
        buf = Path(path).read_bytes()
        try:
            _, header = onewalk.walk(buf)
        except (FileRejected, Exception):
            continue
        if header is None:
            continue
        for h in (header, policy.apply(header).json):
            headers += 1
            got, want = _dumps(h), _ENCODE(h)
            if parsed(got) != parsed(want):
                differ.append(Path(path).name)
            text_differs += got != want
    assert differ == []
    assert headers >= 700
    assert text_differs >= 1  # floats such as 1e-06 are written 1e-6: the same number


def _file(tmp_path: Path, **values) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "P1"
    ds.Modality = "CT"
    for k, v in values.items():
        setattr(ds, k, v)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "f.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


@pytest.mark.parametrize("policy", [None, Policy(Pseudonymizer(bytes(range(32))))],
                         ids=["identified", "research"])
def test_non_finite_numbers_keep_jsons_text(tmp_path, policy):
    """orjson would write NaN and Infinity as null: such a header is written by json, as
    before (NaN, Infinity), so the stored text parses to the same values."""
    buf = _file(tmp_path, SliceThickness="1e-7",  # DS
                SpiralPitchFactor=float("nan"), CTDIvol=float("inf"))  # FD
    rec = parse(buf, "f.dcm", policy=policy)
    text = rec["dicom_json"]
    assert "NaN" in text and "Infinity" in text and "1e-07" in text
    values = json.loads(text)
    assert math.isnan(values["00189311"]["Value"][0])
    assert values["00189345"]["Value"] == [math.inf]
    assert values["00180050"]["Value"] == [1e-07]
    assert text == _ENCODE(json.loads(text))


def test_integers_beyond_64_bits_and_none_values():
    header = {"00200013": {"vr": "IS", "Value": [2 ** 70]},
              "00080020": {"vr": "DA", "Value": [None]}}
    assert _dumps(header) == '{"00200013":{"vr":"IS","Value":[1180591620717411303424]},' \
                             '"00080020":{"vr":"DA","Value":[null]}}'
    assert _dumps({"00080060": {"vr": "CS", "Value": ["CT"]},
                   "00180050": {"vr": "DS", "Value": [1.5e-05, -0.0, 1e16]}}) == \
        '{"00080060":{"vr":"CS","Value":["CT"]},"00180050":{"vr":"DS","Value":[0.000015,' \
        '-0.0,1e+16]}}'
