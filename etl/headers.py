"""One file in, one typed record out: pure functions, no Dask, no lake.

``read_file(path)`` reads the bytes once (checksum), checks the structure
(:mod:`etl.safety`), parses the header with pydicom (never the pixel data),
validates the required UIDs and converts the attributes the schema names to
typed values, plus the full header as DICOM JSON (PS3.18 F.2).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from etl import safety
from etl.errors import FileRejected
from lakehouse.deid import Policy
from lakehouse.schemas import HEADER_COLUMNS

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
REQUIRED_UIDS = (
    ("StudyInstanceUID", "missing_study_uid"),
    ("SeriesInstanceUID", "missing_series_uid"),
    ("SOPInstanceUID", "missing_sop_instance_uid"),
)
_DATE_RE = re.compile(r"^(\d{4})\.?(\d{2})\.?(\d{2})$")
_TIME_RE = re.compile(r"^(\d{2}):?(?:(\d{2}):?(?:(\d{2})(?:\.(\d{1,6}))?)?)?$")
_AGE_RE = re.compile(r"^(\d{1,3})([DWMY])$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


@dataclass(slots=True)
class FileResult:
    """The outcome of reading one file (before duplicate detection)."""

    path: str
    size: int
    mtime_ns: int
    sha256: str | None = None
    #: ``ok``, ``skipped`` or ``quarantined``
    status: str = "ok"
    reason: str | None = None
    message: str | None = None
    record: dict[str, Any] = field(default_factory=dict)


def read_file(path: str, size: int = -1, mtime_ns: int = 0, *, max_depth: int = 64,
              bulk_data_threshold: int = 1024, policy: Policy | None = None) -> FileResult:
    result = FileResult(path, size, mtime_ns)
    try:
        with open(path, "rb") as fh:
            buf = fh.read()
    except OSError as exc:
        return _reject(result, FileRejected("unreadable", exc.strerror or type(exc).__name__))
    result.size = len(buf)
    result.sha256 = hashlib.sha256(buf).hexdigest()
    try:
        result.record = parse(buf, os.path.basename(path), max_depth=max_depth,
                              bulk_data_threshold=bulk_data_threshold, policy=policy)
    except FileRejected as exc:
        return _reject(result, exc)
    return result


def _reject(result: FileResult, exc: FileRejected) -> FileResult:
    result.status = "skipped" if exc.skipped else "quarantined"
    result.reason = exc.reason
    result.message = exc.message
    return result


def parse(buf: bytes, name: str = "", *, max_depth: int = 64,
          bulk_data_threshold: int = 1024, policy: Policy | None = None) -> dict[str, Any]:
    """Typed header record of a complete DICOM file held in ``buf``.

    With a ``policy`` (research lakes) the record and its DICOM JSON are those of
    the de-identified header, and ``record["id_map"]`` lists the original ↔
    pseudonym pairs used (for the vault).
    """
    if not buf:
        raise FileRejected("empty_file", "the file has zero bytes")
    layout = safety.check(buf, max_depth=max_depth)
    ds = _dcmread(buf, layout)
    meta = getattr(ds, "file_meta", None)
    media_class = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
    if name.upper() == "DICOMDIR" or media_class == DICOMDIR_SOP_CLASS \
            or "DirectoryRecordSequence" in ds:
        raise FileRejected("dicomdir", "DICOMDIR media directory")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uids = _required_uids(ds, media_class)
        ts = layout.transfer_syntax or (str(meta.TransferSyntaxUID)
                                        if meta is not None and "TransferSyntaxUID" in meta
                                        else None)
        header = to_json_dict(ds, bulk_data_threshold)
        if policy is None:
            record = extract(ds)
            record.update(uids)
            record["dicom_json"] = _dumps(header)
        else:
            record = _deidentified_record(ds, header, uids, policy)
        record["TransferSyntaxUID"] = ts
    return record


def _deidentified_record(ds: Dataset, header: dict, uids: dict[str, str],
                         policy: Policy) -> dict[str, Any]:
    """The record of the de-identified header: every value comes from the filtered JSON."""
    original_age = age_years(_str(ds.get("PatientAge")),
                             parse_date(_str(ds.get("PatientBirthDate"))),
                             parse_date(_str(ds.get("StudyDate"))))
    result = policy.apply(header)
    clean = Dataset.from_json(result.json)
    record = extract(clean)
    for keyword in uids:
        if keyword == "SOPClassUID":
            record[keyword] = uids[keyword]  # a class, not an instance: never remapped
        else:
            record[keyword] = _str(clean.get(keyword))
    record["patient_age_years"] = None if original_age is None else min(original_age, 90.0)
    record["dicom_json"] = _dumps(result.json)
    record["id_map"] = [{"kind": k, "original": o, "pseudonym": p}
                        for k, o, p in dict.fromkeys(result.mapping)]
    return record


def _dcmread(buf: bytes, layout: safety.Layout) -> Dataset:
    header = buf if layout.deflated else buf[:layout.header_end]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(header), stop_before_pixels=True,
                                   force=layout.kind == "raw")
    except RecursionError:
        raise FileRejected("too_deep", "sequences nested too deeply for the parser") from None
    except Exception as exc:  # pydicom raises many types on malformed input
        raise FileRejected("parse_error", f"{type(exc).__name__}: {exc}"[:300]) from None


def _required_uids(ds: Dataset, media_class: str) -> dict[str, str]:
    out = {}
    for keyword, reason in REQUIRED_UIDS:
        value = _str(ds.get(keyword))
        if not value:
            raise FileRejected(reason, f"{keyword} is absent or empty")
        if not UID(value).is_valid:
            raise FileRejected("invalid_uid", f"{keyword} {value[:80]!r} is not a valid UID")
        out[keyword] = value
    sop_class = _str(ds.get("SOPClassUID")) or media_class
    if not sop_class:
        raise FileRejected("missing_sop_class_uid", "SOPClassUID is absent or empty")
    out["SOPClassUID"] = sop_class
    return out


# --- value conversion ---------------------------------------------------------

def extract(ds: Dataset) -> dict[str, Any]:
    """Typed values of the schema's header columns (absent or invalid -> None)."""
    rec: dict[str, Any] = {}
    for col in HEADER_COLUMNS:
        try:
            elem = ds.data_element(col.keyword or col.name)
        except Exception:  # an undecodable element is an absent value
            elem = None
        value = None if elem is None else elem.value
        try:
            rec[col.name] = convert(value, col.type)
        except (ValueError, TypeError, OverflowError, AttributeError):
            rec[col.name] = None
    rec["patient_age_years"] = age_years(rec.get("PatientAge"), rec.get("PatientBirthDate"),
                                         rec.get("StudyDate"))
    rec["study_year"] = rec["StudyDate"].year if rec.get("StudyDate") else None
    return rec


def convert(value: Any, typ: pa.DataType) -> Any:
    if value is None or value == "" or (isinstance(value, bytes) and not value):
        return None
    if pa.types.is_list(typ):
        values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
        inner = typ.value_type
        out = [convert(v, inner) for v in values]
        out = [v for v in out if v is not None]
        return out or None
    if isinstance(value, MultiValue | list | tuple):
        if not value:
            return None
        if pa.types.is_string(typ):
            return "\\".join(_str(v) or "" for v in value) or None
        value = value[0]
    if pa.types.is_string(typ):
        return _str(value)
    if pa.types.is_floating(typ):
        f = float(value)
        return f if math.isfinite(f) else None
    if pa.types.is_integer(typ):
        return int(float(value))
    if pa.types.is_date(typ):
        return parse_date(_str(value))
    if pa.types.is_time(typ):
        return parse_time(_str(value))
    raise TypeError(f"no conversion to {typ}")


def _str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    s = str(value).strip().strip("\x00").strip()
    return s or None


def parse_date(s: str | None) -> dt.date | None:
    if not s:
        return None
    m = _DATE_RE.match(s)
    if not m:
        return None
    try:
        return dt.date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None


def parse_time(s: str | None) -> dt.time | None:
    if not s:
        return None
    m = _TIME_RE.match(s)
    if not m:
        return None
    hh, mm, ss = int(m[1]), int(m[2] or 0), int(m[3] or 0)
    us = int((m[4] or "0").ljust(6, "0"))
    if ss == 60:  # leap second, allowed by DICOM
        ss = 59
    try:
        return dt.time(hh, mm, ss, us)
    except ValueError:
        return None


def age_years(age: str | None, birth: dt.date | None, study: dt.date | None) -> float | None:
    if age:
        m = _AGE_RE.match(age)
        if m:
            return round(int(m[1]) * _AGE_UNIT_YEARS[m[2]], 4)
    if birth and study and study >= birth:
        years = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
        return float(years)
    return None


# --- DICOM JSON ---------------------------------------------------------------

def to_json_dict(ds: Dataset, bulk_data_threshold: int) -> dict:
    """The header as DICOM JSON (PS3.18 F.2) with bulk data left out."""

    def drop_bulk(_elem) -> str:
        return ""

    data = ds.to_json_dict(bulk_data_threshold=bulk_data_threshold,
                           bulk_data_element_handler=drop_bulk, suppress_invalid_tags=True)
    _strip_bulk(data)
    return data


def _dumps(header: dict) -> str:
    return json.dumps(header, ensure_ascii=False, separators=(",", ":"))


def _strip_bulk(obj: dict) -> None:
    for tag in [t for t, v in obj.items() if "BulkDataURI" in v]:
        del obj[tag]
    for v in obj.values():
        if v.get("vr") == "SQ":
            for item in v.get("Value", []) or []:
                if isinstance(item, dict):
                    _strip_bulk(item)
