import struct
import zlib
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from etl.errors import FileRejected
from etl.safety import check, sniff


def _part10(ds: Dataset, ts=ExplicitVRLittleEndian) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.file_meta.TransferSyntaxUID = ts
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _minimal() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.5"
    ds.PatientName = "Doe^Jane"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = 8
    ds.PixelData = bytes(16)
    return ds


def test_sniff():
    assert sniff(b"") == "not_dicom"
    assert sniff(b"hello world, this is text") == "not_dicom"
    assert sniff(b"\x89PNG\r\n\x1a\n" + bytes(200)) == "not_dicom"
    assert sniff(bytes(128) + b"DICM" + bytes(10)) == "part10"
    assert sniff(Path(get_testdata_file("ExplVR_BigEndNoMeta.dcm")).read_bytes()) == "raw"


def test_a_good_file_passes_and_the_header_ends_at_pixel_data():
    buf = _part10(_minimal())
    layout = check(buf)
    assert layout.kind == "part10"
    assert layout.transfer_syntax == ExplicitVRLittleEndian
    assert buf[layout.header_end:layout.header_end + 4] == b"\xe0\x7f\x10\x00"


@pytest.mark.parametrize("cut", [140, 200, -10, -17])
def test_truncation_anywhere_is_detected(cut):
    buf = _part10(_minimal())
    with pytest.raises(FileRejected) as exc:
        check(buf[:cut])
    assert exc.value.reason == "truncated"


def test_a_4_gib_length_is_element_too_large_not_allocated():
    buf = bytearray(_part10(_minimal()))
    i = buf.index(b"\xe0\x7f\x10\x00")
    struct.pack_into("<I", buf, i + 8, 0xFFFFFFF0)  # OB: 2 reserved bytes, then the length
    with pytest.raises(FileRejected, match="4294967280 bytes") as exc:
        check(bytes(buf))
    assert exc.value.reason == "element_too_large"


def test_nesting_beyond_the_limit_is_too_deep():
    # 1,000 nested sequences written by hand (pydicom itself cannot write them)
    item_start = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    seq_start = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    seq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    body = (seq_start + item_start) * 1000 + (item_end + seq_end) * 1000
    buf = _part10(_minimal())
    i = buf.index(b"\xe0\x7f\x10\x00")
    with pytest.raises(FileRejected) as exc:
        check(buf[:i] + body + buf[i:], max_depth=64)
    assert exc.value.reason == "too_deep"


def test_nesting_within_the_limit_passes():
    ds = _minimal()
    inner = Dataset()
    inner.CodeValue = "1"
    for _ in range(5):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    ds.ContentSequence = Sequence([inner])
    assert check(_part10(ds)).elements > 10


def test_deflated_files_are_walked_after_inflating():
    buf = _part10(_minimal(), DeflatedExplicitVRLittleEndian)
    layout = check(buf)
    assert layout.deflated
    meta_end = layout.dataset_offset
    broken = buf[:meta_end] + zlib.compress(b"garbage")[2:-4]
    with pytest.raises(FileRejected):
        check(broken)
