"""Typed column values from a DICOM JSON header (PS3.18 F.2): pure, no pydicom objects.

The DICOM JSON dict is the intermediate form of the ingest: pydicom's
``to_json_dict`` or the fast raw parser produce it, the privacy policy filters
it, and this module turns it into the typed values of the schema's columns.
Absent or unparseable values are None.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable
from typing import Any

import pyarrow as pa
from pydicom.datadict import tag_for_keyword

from etl.quality import CHECKED_VRS, valid_string
from lakehouse.schemas import HEADER_COLUMNS, Column

_DATE_RE = re.compile(r"^(\d{4})\.?(\d{2})\.?(\d{2})$")
_TIME_RE = re.compile(r"^(\d{2}):?(?:(\d{2}):?(?:(\d{2})(?:\.(\d{1,6}))?)?)?$")
_AGE_RE = re.compile(r"^(\d{1,3})([DWMY])$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def _tag(keyword: str) -> str:
    t = tag_for_keyword(keyword)
    assert t is not None, keyword
    return f"{t:08X}"


#: (column, its tag in DICOM JSON) for every header column
COLUMN_TAGS: tuple[tuple[Column, str], ...] = tuple(
    (c, _tag(c.keyword or c.name)) for c in HEADER_COLUMNS)


def _scalar_for(typ: pa.DataType) -> Callable[[Any], Any]:
    """The conversion of one JSON value to ``typ`` (what :func:`scalar` does, decided once
    per column instead of once per value)."""
    if pa.types.is_string(typ):
        return lambda v: None if v is None or v == "" else text(v)
    if pa.types.is_floating(typ):
        return _to_float
    if pa.types.is_integer(typ):
        return lambda v: None if v is None or v == "" else int(float(v))
    if pa.types.is_date(typ):
        return lambda v: None if v is None or v == "" else parse_date(text(v))
    if pa.types.is_time(typ):
        return lambda v: None if v is None or v == "" else parse_time(text(v))
    raise TypeError(f"no conversion to {typ}")


def _to_float(v: Any) -> float | None:
    if v is None or v == "":
        return None
    f = float(v)
    return f if math.isfinite(f) else None


#: (column name, tag, is a list column, is a text column, value conversion)
_PLAN = tuple(
    (c.name, tag, pa.types.is_list(c.type), pa.types.is_string(c.type),
     _scalar_for(c.type.value_type if pa.types.is_list(c.type) else c.type))
    for c, tag in COLUMN_TAGS)


#: Entries the conversion memo holds before it starts over (bounds a worker's memory).
MEMO_ENTRIES = 1 << 14
#: Longer values are converted every time (rarely repeated; bounds the memo's memory).
MEMO_VALUE_CHARS = 256
#: ``{(tag, vr, *texts) or (tag, vr, number class, *numbers): (typed value, valid)}``:
#: the files of a series repeat most of their values. Keyed by everything the result
#: depends on (the column is one-to-one with its tag); a pure cache, shared by files.
#: Numbers are keyed with their class (1, 1.0 and True are equal keys but different
#: values) and only when none is zero (0.0 and -0.0 are equal keys, different values):
#: two equal non-zero numbers of one class are the same number. (NaN never equals itself:
#: never a hit.)
_MEMO: dict[tuple, tuple[Any, bool]] = {}


#: ``{tag: (column name, is a list column, is a text column, value conversion)}``
_BY_TAG = {tag: (name, is_list, is_text, conv) for name, tag, is_list, is_text, conv in _PLAN}
#: the record's keys, in schema order (the record starts with every column null)
_NAMES = tuple(name for name, *_ in _PLAN)
_ORDER = {name: i for i, name in enumerate(_NAMES)}


def record_from_json(header: dict) -> tuple[dict[str, Any], list[str]]:
    """Typed values of the schema's header columns, and the keywords present whose
    value could not be converted (a data-quality flag; the column is then null)."""
    rec: dict[str, Any] = dict.fromkeys(_NAMES)
    invalid: list[str] = []
    memo = _MEMO
    by_tag = _BY_TAG
    # the header's elements, each looked up once; for a long header, the columns' tags
    elements = header.items() if len(header) <= 4 * len(by_tag) else \
        [(tag, header[tag]) for tag in by_tag if tag in header]
    for tag, elem in elements:
        plan = by_tag.get(tag)
        if plan is None or not elem or not (values := elem.get("Value")):
            continue
        typed, ok = _typed(plan, tag, elem.get("vr"), values, memo)
        if ok:
            rec[plan[0]] = typed
        else:
            invalid.append(plan[0])
    if len(invalid) > 1:
        invalid.sort(key=_ORDER.__getitem__)  # in schema order, whatever the header's
    study = rec["StudyDate"]
    rec["patient_age_years"] = age_years(rec["PatientAge"], rec["PatientBirthDate"], study)
    rec["study_year"] = study.year if study else None
    return rec, invalid


def column_value(tag: str, elem: dict) -> tuple[int, Any, bool] | None:
    """The typed value of one element of a header for its column, as
    :func:`record_from_json` converts it: (the column's index in schema order, the value,
    whether it is valid), or None when the tag has no column or the element no values
    (the column is then null and not invalid). The value may be the memo's own list:
    never change it."""
    plan = _BY_TAG.get(tag)
    if plan is None or not elem or not (values := elem.get("Value")):
        return None
    typed, ok = _typed(plan, tag, elem.get("vr"), values, _MEMO, copy=False)
    return _ORDER[plan[0]], typed, ok


def _typed(plan: tuple, tag: str, vr: str | None, values: list, memo: dict,
           copy: bool = True) -> tuple[Any, bool]:
    """(typed value, valid) of an element's values for its column's ``plan``."""
    _, is_list, is_text, conv = plan
    # the memo's key (:func:`_memo_key`), the common one-value cases inline
    key: tuple | None
    if len(values) == 1:
        first = values[0]
        cls = first.__class__
        if cls is str:
            key = (tag, vr, first) if len(first) <= MEMO_VALUE_CHARS else None
        elif (cls is float or cls is int) and first:
            key = (tag, vr, cls, first)
        else:
            key = None
    else:
        key = _memo_key(tag, vr, values)
    if key is None:
        return _convert(values, vr, is_list, is_text, conv)
    hit = memo.get(key)
    if hit is None:
        hit = _convert(values, vr, is_list, is_text, conv)
        if len(memo) >= MEMO_ENTRIES:
            memo.clear()
        memo[key] = hit
    typed, ok = hit
    if copy and is_list and typed is not None:
        typed = typed.copy()  # the memo's list is never handed out
    return typed, ok


def _memo_key(tag: str, vr: str | None, values: list) -> tuple | None:
    """The memo's key for these values: all short text, or all non-zero numbers of one
    class (int or float); None when they are not memoized."""
    first = values[0]
    cls = first.__class__
    if cls is str:
        if len(values) == 1:
            return (tag, vr, first) if len(first) <= MEMO_VALUE_CHARS else None
        if all(v.__class__ is str and len(v) <= MEMO_VALUE_CHARS for v in values):
            return (tag, vr, *values)
        return None
    if cls is float or cls is int:
        if len(values) == 1:
            return (tag, vr, cls, first) if first else None
        if all(v.__class__ is cls and v for v in values):
            return (tag, vr, cls, *values)
    return None


def _convert(values: list, vr: str | None, is_list: bool, is_text: bool,
             conv: Callable[[Any], Any]) -> tuple[Any, bool]:
    """The typed value of one column from its JSON values, and whether it is valid."""
    wanted = [v for v in values if not _blank(v)]
    typed: Any
    try:
        if is_list:
            typed = [x for x in map(conv, values) if x is not None] or None
        elif is_text and len(values) > 1:
            typed = "\\".join([text(v) or "" for v in values]) or None
        else:
            typed = conv(values[0])
    except (ValueError, TypeError, OverflowError):
        typed = None
    ok = typed is not None or not wanted
    if ok and is_list and typed is not None and len(typed) < len(wanted):
        ok = False
    if ok and vr in CHECKED_VRS:
        for v in wanted:
            if not valid_string(vr, text(v) or ""):
                ok = False  # control characters, over-long values, malformed UIDs
                break
    return typed, ok


def _blank(value: Any) -> bool:
    cls = value.__class__
    if cls is str:
        return not value.strip("\x00 ")
    if cls is float or cls is int:
        return False  # the text of a number is never blank
    if value is None:
        return True
    if isinstance(value, dict):
        return not any(str(v).strip("\x00 =") for v in value.values())
    return str(value).strip("\x00 ") == ""


def convert(values: list, typ: pa.DataType, vr: str | None = None) -> Any:
    """A column value from the JSON ``Value`` list of one attribute."""
    if pa.types.is_list(typ):
        out = [scalar(v, typ.value_type, vr) for v in values]
        out = [v for v in out if v is not None]
        return out or None
    if pa.types.is_string(typ) and len(values) > 1:
        parts = [text(v, vr) or "" for v in values]
        return "\\".join(parts) or None
    return scalar(values[0], typ, vr)


def scalar(value: Any, typ: pa.DataType, vr: str | None = None) -> Any:
    if value is None or value == "":
        return None
    if pa.types.is_string(typ):
        return text(value, vr)
    if pa.types.is_floating(typ):
        f = float(value)
        return f if math.isfinite(f) else None
    if pa.types.is_integer(typ):
        return int(float(value))
    if pa.types.is_date(typ):
        return parse_date(text(value))
    if pa.types.is_time(typ):
        return parse_time(text(value))
    raise TypeError(f"no conversion to {typ}")


def text(value: Any, vr: str | None = None) -> str | None:
    if isinstance(value, dict):  # a person name: Alphabetic=Ideographic=Phonetic
        groups = [value.get(k, "") or "" for k in ("Alphabetic", "Ideographic", "Phonetic")]
        s = "=".join(groups).rstrip("=")
    else:
        s = str(value)
    s = s.strip().strip("\x00").strip()
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
