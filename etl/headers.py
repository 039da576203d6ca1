"""One file in, one typed record out: pure functions, no Dask, no lake.

``read_file(path)`` reads the file (only its header, up to the Pixel Data
element, with ``checksum="header"``; all of it with ``"full"``), checksums it,
checks the structure (:mod:`etl.safety`), turns the header (never the pixel data) into DICOM JSON
(PS3.18 F.2) — with the fast raw parser (:mod:`etl.rawjson`) when it applies, in the
same walk over the element headers as the structure checks (:mod:`etl.onewalk`), with
pydicom otherwise — validates the required UIDs, applies the privacy policy of a
research lake to that JSON, and converts the attributes the schema names to typed
values (:mod:`etl.record`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import orjson
import pydicom
from pydicom.dataset import Dataset

from etl import onewalk, safety
from etl.config import HEAD_BYTES
from etl.errors import REQUIRED_UIDS, FileRejected
from etl.onewalk import strip_bulk as _strip_bulk
from etl.quality import valid_uid
from etl.record import COLUMN_TAGS, age_years, parse_date, record_from_json, text
from lakehouse.deid import Policy

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
DIRECTORY_RECORD_SEQUENCE = "00041220"
#: the required UIDs and their tags in DICOM JSON
UID_TAGS = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E",
            "SOPInstanceUID": "00080018", "SOPClassUID": "00080016"}
#: UIDs that identify an instance (remapped in research lakes)
INSTANCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_AGE, _BIRTH, _STUDY_DATE = "00101010", "00100030", "00080020"
#: ``full``: SHA-256 of every byte of the file; ``header``: of the bytes before the Pixel
#: Data element (the whole file when it has none), so pixel bytes are never read.
CHECKSUMS = ("header", "full")


@dataclass(slots=True)
class FileResult:
    """The outcome of reading one file (before duplicate detection)."""

    path: str
    size: int
    mtime_ns: int
    sha256: str | None = None
    #: how many bytes from the start of the file ``sha256`` covers
    checksum_bytes: int | None = None
    #: ``ok``, ``skipped`` or ``quarantined``
    status: str = "ok"
    reason: str | None = None
    message: str | None = None
    record: dict[str, Any] = field(default_factory=dict)


def read_file(path: str, size: int = -1, mtime_ns: int = 0, *, max_depth: int = 64,
              bulk_data_threshold: int = 1024, policy: Policy | None = None,
              fast: bool = True, checksum: str = "full") -> FileResult:
    """Read, check and parse one file; every outcome is a :class:`FileResult`.

    ``checksum="header"`` reads only up to the Pixel Data element (a bounded first
    read, grown as the structure walk asks) and hashes those bytes; a file that is
    rejected is always read and hashed whole, so quarantine checksums are of the file.
    """
    if checksum not in CHECKSUMS:
        raise ValueError(f"checksum must be one of {CHECKSUMS}, not {checksum!r}")
    result = FileResult(path, size, mtime_ns)
    try:
        # the file descriptor itself, no file object (a fifth of the CPU of the reads of
        # a small file): the reads below are few and large, and a short read only means
        # one more round of the loop
        fd = os.open(path, os.O_RDONLY)
        try:
            file_size = os.fstat(fd).st_size
            if checksum == "header":
                buf = os.read(fd, HEAD_BYTES)
            else:
                buf = _read_rest(fd, file_size)
                file_size = len(buf)
            while True:
                try:
                    record, layout = _parse(buf, os.path.basename(path), max_depth=max_depth,
                                            bulk_data_threshold=bulk_data_threshold,
                                            policy=policy, fast=fast, file_size=file_size)
                    break
                except safety.NeedMore as more:
                    want = min(max(more.offset, 2 * len(buf)), file_size)
                    chunk = os.read(fd, want - len(buf))
                    if len(buf) >= file_size or not chunk:
                        raise FileRejected("truncated", "the file shrank while being read") \
                            from None
                    buf += chunk
                except FileRejected:
                    if len(buf) >= file_size:
                        raise
                    buf += _read_rest(fd, file_size - len(buf))  # a rejection is decided,
                    # and hashed, on the whole file
        finally:
            os.close(fd)
    except OSError as exc:
        return _reject(result, FileRejected("io_error", exc.strerror or type(exc).__name__))
    except FileRejected as exc:
        result.size = len(buf)
        result.sha256 = hashlib.sha256(buf).hexdigest()
        result.checksum_bytes = len(buf)
        return _reject(result, exc)
    result.size = file_size
    covered = layout.header_end if checksum == "header" else len(buf)
    result.sha256 = hashlib.sha256(memoryview(buf)[:covered]).hexdigest()
    result.checksum_bytes = covered
    result.record = record
    return result


def _read_rest(fd: int, expected: int) -> bytes:
    """Every byte from the file position to the end of the file (``expected`` of them,
    unless the file changed since its ``fstat``)."""
    parts = []
    while chunk := os.read(fd, max(expected, 64 * 1024)):
        parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _reject(result: FileResult, exc: FileRejected) -> FileResult:
    result.status = "skipped" if exc.skipped else "quarantined"
    result.reason = exc.reason
    result.message = exc.message
    return result


def parse(buf: bytes, name: str = "", *, max_depth: int = 64, bulk_data_threshold: int = 1024,
          policy: Policy | None = None, fast: bool = True) -> dict[str, Any]:
    """Typed header record of a complete DICOM file held in ``buf``.

    With a ``policy`` (research lakes) the record and its DICOM JSON are those of
    the de-identified header, and ``record["id_map"]`` lists the original ↔
    pseudonym pairs used (for the vault), as ``(kind, original, pseudonym)`` tuples.
    ``fast=False`` forces the pydicom path (the reference the fast path is tested
    against).
    """
    return _parse(buf, name, max_depth=max_depth, bulk_data_threshold=bulk_data_threshold,
                  policy=policy, fast=fast)[0]


def _parse(buf: bytes, name: str = "", *, max_depth: int = 64, bulk_data_threshold: int = 1024,
           policy: Policy | None = None, fast: bool = True,
           file_size: int | None = None) -> tuple[dict[str, Any], safety.Layout]:
    if not buf:
        raise FileRejected("empty_file", "the file has zero bytes")
    if fast:  # the safety checks and the raw JSON in one walk (when the fast path applies)
        # shared: nothing below changes the header (it is filtered into new containers,
        # converted and written), so remembered elements need not be copied
        layout, header = onewalk.walk(buf, max_depth=max_depth, file_size=file_size,
                                      bulk_data_threshold=bulk_data_threshold, shared=True)
    else:
        layout, header = safety.check(buf, max_depth=max_depth, file_size=file_size), None
    dropped: list[str] = []
    media_class = layout.media_storage_sop_class or ""
    ts = layout.transfer_syntax
    if header is None:
        ds = _dcmread(buf, layout)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            with warnings.catch_warnings():  # an invalid UID's warning holds its raw value
                warnings.simplefilter("ignore")
                media_class = str(meta.get("MediaStorageSOPClassUID", "") or media_class)
                if ts is None and "TransferSyntaxUID" in meta:
                    ts = str(meta.TransferSyntaxUID)
        header = to_json_dict(ds, bulk_data_threshold)
        # values pydicom could not convert were left out of the JSON: flag them
        dropped = [c.name for c, tag in COLUMN_TAGS if tag not in header and int(tag, 16) in ds]
    if name.upper() == "DICOMDIR" or media_class == DICOMDIR_SOP_CLASS \
            or DIRECTORY_RECORD_SEQUENCE in header:
        raise FileRejected("dicomdir", "DICOMDIR media directory")
    uids = _required_uids(header, media_class)
    if policy is None:
        record, invalid = record_from_json(header)
        record.update(uids)
    else:
        record, invalid = _deidentified_record(header, uids, policy)
    invalid += [c for c in dropped if c not in invalid]
    record["invalid_attributes"] = invalid or None
    record["TransferSyntaxUID"] = ts
    if "dicom_json" not in record:
        record["dicom_json"] = _dumps(header)
    return record, layout


def _deidentified_record(header: dict, uids: dict[str, str],
                         policy: Policy) -> tuple[dict[str, Any], list[str]]:
    """The record of the de-identified header: every value comes from the filtered JSON."""
    age = _first(header, _AGE)
    # the dates only when the age string does not give the age
    original_age = age_years(age, None, None)
    if original_age is None:
        original_age = age_years(age, parse_date(_first(header, _BIRTH)),
                                 parse_date(_first(header, _STUDY_DATE)))
    result = policy.apply(header)
    record, invalid = record_from_json(result.json)
    for keyword in INSTANCE_UIDS:
        record[keyword] = _first(result.json, UID_TAGS[keyword])
    record["SOPClassUID"] = uids["SOPClassUID"]  # a class, not an instance: never remapped
    record["patient_age_years"] = None if original_age is None else min(original_age, 90.0)
    record["dicom_json"] = _dumps(result.json)
    # (kind, original, pseudonym) tuples: Arrow fills the struct fields by position
    record["id_map"] = list(dict.fromkeys(result.mapping))
    return record, invalid


def _first(header: dict, tag: str) -> str | None:
    """``text`` of the element's first value (a string's, inline)."""
    elem = header.get(tag)
    values = elem.get("Value") if elem else None
    if not values:
        return None
    value = values[0]
    if value.__class__ is str:
        return value.strip().strip("\x00").strip() or None
    return text(value)


def _dcmread(buf: bytes, layout: safety.Layout) -> Dataset:
    data = buf if layout.deflated else buf[:layout.header_end]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                                   force=layout.kind == "raw")
    except RecursionError:
        raise FileRejected("too_deep", "sequences nested too deeply for the parser") from None
    except Exception as exc:  # pydicom raises many types on malformed input
        raise FileRejected("parse_error", f"{type(exc).__name__}: {exc}"[:300]) from None


def _required_uids(header: dict, media_class: str) -> dict[str, str]:
    out = {}
    for keyword in REQUIRED_UIDS:
        value = _first(header, UID_TAGS[keyword])
        if keyword == "SOPClassUID":
            value = value or media_class or None
        if not value:
            raise FileRejected(f"missing_uid:{keyword}", f"{keyword} is absent or empty")
        if not valid_uid(value):  # no value in the message: it may identify a patient
            raise FileRejected(f"invalid_uid:{keyword}", f"{keyword} is not a valid UID "
                                                         f"({len(value)} characters)")
        out[keyword] = value
    return out


# --- DICOM JSON ---------------------------------------------------------------

def to_json_dict(ds: Dataset, bulk_data_threshold: int) -> dict:
    """The header as DICOM JSON (PS3.18 F.2) with bulk data left out (pydicom path)."""

    def drop_bulk(_elem) -> str:
        return ""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            data = ds.to_json_dict(bulk_data_threshold=bulk_data_threshold,
                                   bulk_data_element_handler=drop_bulk)
        except Exception:  # some attributes cannot be written as their VR requires
            data = ds.to_json_dict(bulk_data_threshold=bulk_data_threshold,
                                   bulk_data_element_handler=drop_bulk,
                                   suppress_invalid_tags=True)
            _keep_raw_values(ds, data)
    _strip_bulk(data)
    return data


def _keep_raw_values(ds: Dataset, data: dict) -> None:
    """Top-level attributes pydicom could not write (a DS of "abc") are kept with their
    raw text, so that the typed column can be flagged invalid and the value is not lost."""
    # the tags: iterating a Dataset yields its elements, converting every value
    for tag in ds.keys():  # noqa: SIM118
        key = f"{tag:08X}"
        if key in data:
            continue
        elem = ds.get_item(tag, keep_deferred=True)  # never converted here
        if elem is None or elem.VR not in _TEXT_VRS:
            continue  # a binary value that cannot be read (its length is not a whole
            # number of values) or an unknown VR stays out: there is no text to keep
        value = "" if elem.value is None else elem.value
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        text_value = str(value).rstrip("\x00 ")
        data[key] = {"vr": elem.VR, "Value": text_value.split("\\")} if text_value \
            else {"vr": elem.VR}


#: VRs whose values are text, kept raw by :func:`_keep_raw_values` when pydicom cannot
#: write them
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH",
                       "ST", "TM", "UC", "UI", "UR", "UT"})


#: one encoder for every header (``json.dumps`` with options builds a new one per call);
#: a header is a tree built afresh from the file's bytes, never a cycle, so the encoder
#: need not track the containers it is inside. The fallback of :func:`_dumps`.
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"),
                           check_circular=False).encode


def _dumps(header: dict) -> str:
    """The header's DICOM JSON text: orjson's (compact, UTF-8, about a fifth of the CPU
    of ``json``), which parses to the same values as ``json``'s text. Floats may be
    written differently (``1e-7`` for ``1e-07``, ``0.000015`` for ``1.5e-05``: the same
    number). Where the two would not parse alike, the text is ``json``'s, as before:
    orjson writes NaN and infinities as ``null`` (``json`` writes ``NaN`` and
    ``Infinity``), so a text with a ``null`` in it (a NaN, or a None value, or only the
    word in a string) is written by ``json``; and orjson refuses integers beyond 64 bits
    and strings with lone surrogates, which ``json`` writes."""
    try:
        data = orjson.dumps(header)
    except TypeError:  # orjson.JSONEncodeError
        return _ENCODE(header)
    if b"null" in data:
        return _ENCODE(header)
    return data.decode()
