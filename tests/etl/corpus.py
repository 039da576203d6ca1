"""A corpus of hostile and broken inputs, each kind with its expected outcome.

``build(root)`` writes one file (or link) per kind below ``root`` and returns
the kinds: relative path, expected outcome, expected reason, and for files
that must be ingested the attributes expected in ``invalid_attributes`` and
a few exact values.
"""

from __future__ import annotations

import gzip
import io
import os
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
PIXEL_TAG = b"\xe0\x7f\x10\x00"

#: (SpecificCharacterSet, PatientName) pairs pydicom encodes and decodes exactly.
CHARSETS: list[tuple[str | list[str], str]] = [
    ("ISO_IR 100", "Müller^Jürgen"),
    ("ISO_IR 101", "Dvořák^Łukasz"),
    ("ISO_IR 109", "Ħaġar^Ċensu"),
    ("ISO_IR 110", "Šaltis^Ąžuolas"),
    ("ISO_IR 144", "Иванов^Иван"),
    ("ISO_IR 127", "قباني^لنزار"),
    ("ISO_IR 126", "Παπαδόπουλος^Γιώργος"),
    ("ISO_IR 138", "שרון^דבורה"),
    ("ISO_IR 148", "Öztürk^Ağrı"),
    ("ISO_IR 166", "สมชาย^ใจดี"),
    ("ISO_IR 13", "ﾔﾏﾀﾞ^ﾀﾛｳ"),
    ("ISO_IR 192", "Nguyễn^Thị Minh Khai"),
    ("GB18030", "Wang^XiaoDong=王^小东"),
    ("GBK", "李^华"),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    (["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),
    (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),
]


@dataclass
class Kind:
    name: str
    path: str
    outcome: str
    reason: str | None = None
    invalid: list[str] | None = None
    #: exact column values expected in the instances row
    values: dict[str, Any] = field(default_factory=dict)


class _Uids:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"1.2.826.0.1.3680043.10.1234.{self.n}"


def base(uid: _Uids) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = uid()
    ds.StudyInstanceUID = uid()
    ds.SeriesInstanceUID = uid()
    ds.PatientID = "P1"
    ds.PatientName = "Doe^Jane"
    ds.Modality = "CT"
    ds.StudyDate = "20230105"
    ds.StudyTime = "101500"
    ds.SeriesDescription = "Axial 1.25"
    ds.SliceThickness = "1.25"
    ds.InstanceNumber = "1"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(64))
    return ds


def part10(ds: Dataset, ts: str = ExplicitVRLittleEndian, meta_ts: str | None = None) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CT)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "1.2.3")
    ds.file_meta.TransferSyntaxUID = ts
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _meta_end(data: bytes) -> int:
    pos = 132
    while data[pos:pos + 2] == b"\x02\x00":
        vr = data[pos + 4:pos + 6]
        if vr in (b"OB", b"UN", b"UT", b"SQ", b"OW"):
            pos += 12 + struct.unpack_from("<I", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
    return pos


def _dataset_bytes(ds: Dataset, implicit: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def _nested(levels: int) -> bytes:
    item_start = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    seq_start = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    seq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (seq_start + item_start) * levels + (item_end + seq_end) * levels


def build(root: Path) -> list[Kind]:
    root.mkdir(parents=True, exist_ok=True)
    uid = _Uids()
    rng = random.Random(4)
    kinds: list[Kind] = []

    def put(name: str, data: bytes, outcome: str, reason: str | None = None, *,
            invalid: list[str] | None = None, values: dict | None = None) -> None:
        (root / name).write_bytes(data)
        kinds.append(Kind(name, name, outcome, reason, invalid, values or {}))

    good = part10(base(uid))
    pix = good.index(PIXEL_TAG)

    # --- not DICOM at all
    put("zero_byte.dcm", b"", "quarantined", "empty_file")
    put("notes.txt", b"Export from PACS.\nCall radiology IT.\n", "quarantined", "not_dicom")
    put("report.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n%%EOF\n" * 20,
        "quarantined", "not_dicom")
    put("screen.png", b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR"
        + rng.randbytes(3000), "quarantined", "not_dicom")
    put("image.dcm.gz", gzip.compress(good, mtime=0), "quarantined", "not_dicom")
    put("random.bin", b"\xff\xfe" + rng.randbytes(4094), "quarantined", "not_dicom")
    put("meta.json", b'{"00100010": {"vr": "PN"}}', "quarantined", "not_dicom")
    put("preamble_no_magic", bytes(128), "quarantined", "not_dicom")
    put("preamble_only.dcm", bytes(128) + b"DICM", "quarantined", "truncated")

    # --- truncated
    put("cut_in_file_meta.dcm", good[:150], "quarantined", "truncated")
    desc = good.index(b"Axial 1.25")
    put("cut_in_dataset.dcm", good[:desc + 4], "quarantined", "truncated")
    put("cut_in_element_header.dcm", good[:pix + 6], "quarantined", "truncated")
    put("cut_in_pixel_data.dcm", good[:len(good) - 20], "quarantined", "truncated")
    buf = bytearray(part10(base(uid)))
    i = buf.index(b"\x08\x00\x3e\x10")  # SeriesDescription (0008,103E), LO: 2-byte length
    struct.pack_into("<H", buf, i + 6, 0x7FF0)
    put("length_beyond_file.dcm", bytes(buf), "quarantined", "truncated")

    # --- bounds and depth
    ds = base(uid)
    ds.PixelData = bytes(6000)
    buf = bytearray(part10(ds))
    i = buf.index(PIXEL_TAG)
    struct.pack_into("<I", buf, i + 8, 0xFFFFFFF0)
    put("declares_4_gib.dcm", bytes(buf), "quarantined", "element_too_large")
    ds = base(uid)
    ds.add_new(0x00091010, "LO", "ACME 1.0")  # private creator
    ds.add_new(0x00091000 | 0x1001, "OB", bytes(64 << 20))
    sop = ds.SOPInstanceUID
    put("private_64_mib.dcm", part10(ds), "ingested", values={"SOPInstanceUID": sop})
    for levels in (1_000, 100_000):
        data = part10(base(uid))
        i = data.index(PIXEL_TAG)
        put(f"nested_{levels}.dcm", data[:i] + _nested(levels) + data[i:],
            "quarantined", "too_deep")

    # --- encodings and transfer syntaxes
    ds = base(uid)
    sop = ds.SOPInstanceUID
    explicit = part10(ds)
    body = _dataset_bytes(ds, implicit=True)
    put("vr_mismatch_explicit_meta_implicit_data.dcm", explicit[:_meta_end(explicit)] + body,
        "ingested", values={"SOPInstanceUID": sop, "SliceThickness": 1.25})
    ds = base(uid)
    ds.PixelData = bytes(64)
    put("big_endian.dcm", part10(ds, ExplicitVRBigEndian), "ingested",
        values={"SliceThickness": 1.25, "Rows": 8})
    put("implicit_le.dcm", part10(base(uid), ImplicitVRLittleEndian), "ingested",
        values={"SeriesDescription": "Axial 1.25"})
    put("deflated.dcm", part10(base(uid), DeflatedExplicitVRLittleEndian), "ingested",
        values={"StudyDate": "2023-01-05"})
    ds = base(uid)
    data = part10(ds)
    ts_bytes = ExplicitVRLittleEndian.encode() + b"\x00"
    put("unknown_transfer_syntax.dcm", data.replace(ts_bytes, b"1.2.3.4.5.6.7.8.9.1\x00"),
        "quarantined", "unsupported_transfer_syntax")
    ds = base(uid)
    sop = ds.SOPInstanceUID
    data = part10(ds)
    meta_end = _meta_end(data)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT
    meta.MediaStorageSOPInstanceUID = sop
    mbuf = DicomBytesIO()
    mbuf.is_little_endian, mbuf.is_implicit_VR = True, False
    write_dataset(mbuf, meta)
    put("missing_transfer_syntax.dcm", bytes(128) + b"DICM" + mbuf.getvalue() + data[meta_end:],
        "ingested", values={"SOPInstanceUID": sop})
    put("no_file_meta_implicit.dcm", _dataset_bytes(base(uid), implicit=True), "ingested",
        values={"Modality": "CT"})
    ds = base(uid)
    ds.PixelData = encapsulate([b"\xff\xd8 not a jpeg stream \xff\xd9" * 3])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.PhotometricInterpretation = "YBR_FULL_422"
    put("jpeg_undecodable_pixels.dcm", part10(ds, JPEGBaseline8Bit), "ingested",
        values={"TransferSyntaxUID": JPEGBaseline8Bit})

    # --- required UIDs
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        ds = base(uid)
        data_ds = ds
        delattr(data_ds, keyword)
        data = part10(data_ds)
        if keyword in ("SOPInstanceUID", "SOPClassUID"):  # and from the file meta, no fallback
            meta_kw = "MediaStorage" + keyword
            del data_ds.file_meta[meta_kw]
            out = io.BytesIO()
            data_ds.preamble = bytes(128)
            pydicom.dcmwrite(out, data_ds, enforce_file_format=False)
            data = out.getvalue()
        put(f"missing_{keyword}.dcm", data, "quarantined", f"missing_uid:{keyword}")
        ds = base(uid)
        setattr(ds, keyword, "1.2.03.abc")
        put(f"invalid_{keyword}.dcm", part10(ds), "quarantined", f"invalid_uid:{keyword}")

    # --- bad values in good files: the row is kept, the value is NULL and flagged
    ds = base(uid)
    ds.SliceThickness = "9876"  # pydicom refuses to write a bad DS: patch the bytes
    put("ds_not_numeric.dcm", part10(ds).replace(b"9876", b"thin"), "ingested",
        invalid=["SliceThickness"],
        values={"SliceThickness": None, "StudyDate": "2023-01-05"})
    ds = base(uid)
    ds.InstanceNumber = "4321"
    put("is_not_numeric.dcm", part10(ds).replace(b"4321", b"one "), "ingested",
        invalid=["InstanceNumber"],
        values={"InstanceNumber": None})
    ds = base(uid)
    ds.StudyDate = "20231345"
    put("impossible_date.dcm", part10(ds), "ingested", invalid=["StudyDate"],
        values={"StudyDate": None, "study_year": None})
    ds = base(uid)
    ds.SeriesDescription = "Axial\x07\x1b[2J 1.25"
    put("control_characters.dcm", part10(ds), "ingested", invalid=["SeriesDescription"],
        values={"SeriesDescription": None, "SliceThickness": 1.25})
    ds = base(uid)
    ds.SeriesDescription = "Axial " * 40
    ds.StationName = "CT-SCANNER-ROOM-12"  # SH: at most 16
    put("over_long_values.dcm", part10(ds), "ingested",
        invalid=["SeriesDescription", "StationName"], values={"SeriesDescription": None})
    ds = base(uid)
    ds.FrameOfReferenceUID = "1.2.x"
    put("invalid_optional_uid.dcm", part10(ds), "ingested", invalid=["FrameOfReferenceUID"],
        values={"FrameOfReferenceUID": None})

    # --- character sets
    for n, (charset, name) in enumerate(CHARSETS):
        ds = base(uid)
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        label = charset if isinstance(charset, str) else "+".join(c or "ASCII" for c in charset)
        put(f"charset_{n:02d}_{label.replace(' ', '_')}.dcm", part10(ds), "ingested",
            values={"PatientName": name})
    # ISO 2022 IR 58 (GB2312), encoded by hand: pydicom 3.0.2 writes it without its
    # escape sequence, and on reading leaves ESC $ ) A in the text. The row is kept and
    # the name, which still holds control characters, is flagged.
    ds = base(uid)
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 58"]
    raw = b"Zhang^San=\x1b$)A" + "张".encode("gb2312") + b"^\x1b$)A" + "三".encode("gb2312")
    placeholder = "Zhang^San=" + "X" * (len(raw) - 10)
    ds.PatientName = placeholder
    put("charset_ISO_2022_IR_58.dcm", part10(ds).replace(placeholder.encode(), raw), "ingested",
        invalid=["PatientName"], values={"PatientName": None, "PatientID": "P1"})
    ds = base(uid)
    ds.SpecificCharacterSet = "ISO_IR 100"  # but the bytes below are UTF-8
    name = "Zë^Jür"  # 8 bytes in UTF-8, as many as Doe^Jane
    data = part10(ds).replace(b"Doe^Jane", name.encode())
    put("mislabelled_utf8.dcm", data, "ingested",
        values={"PatientName": name.encode().decode("latin-1")})

    # --- media, links, duplicates
    put("DICOMDIR", Path(get_testdata_file("DICOMDIR")).read_bytes(), "skipped", "dicomdir")
    ds = base(uid)
    data = part10(ds)
    put("original.dcm", data, "ingested", values={"SOPInstanceUID": ds.SOPInstanceUID})
    put("original_exact_copy.dcm", data, "duplicate")
    ds.SeriesDescription = "Axial 1.25 (edited)"
    put("original_conflicting_copy.dcm", part10(ds), "conflict")
    loop = root / "loop"
    loop.mkdir()
    os.symlink("..", loop / "back_to_root")
    kinds.append(Kind("symlink_loop", "loop/back_to_root", "none"))
    os.symlink("does_not_exist.dcm", root / "broken_link.dcm")
    kinds.append(Kind("broken_symlink", "broken_link.dcm", "quarantined", "io_error"))
    return kinds
