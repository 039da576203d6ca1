"""Value checks: a bad value in an otherwise good file keeps the row.

A value that cannot be converted to its column's type (a non-numeric DS, an
impossible date), a string with control characters, a string longer than its
value representation allows, or a malformed UID becomes NULL in its typed
column, and the attribute is named in the row's ``invalid_attributes``. The
raw value stays in the row's DICOM JSON.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pyarrow as pa
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

#: Maximum characters per value (PS3.5 6.2); PN: per component group.
MAX_CHARS = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DT": 26, "LO": 64, "LT": 10240,
             "PN": 64, "SH": 16, "ST": 1024, "TM": 14, "UI": 64}
#: Control characters allowed in the text VRs (PS3.5 6.1.3); ESC sequences of
#: ISO 2022 are consumed by the decoder.
_TEXT_VRS = frozenset({"LT", "ST", "UT"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def typed_value(ds: Dataset, keyword: str, typ: pa.DataType,
                convert: Callable[[Any, pa.DataType], Any]) -> tuple[Any, bool]:
    """``(typed value or None, valid)`` of ``keyword`` in ``ds``.

    ``valid`` is False when the attribute is present with a non-blank value that
    did not survive conversion or checking; absent or empty attributes are valid.
    """
    if keyword not in ds:
        return None, True
    try:
        elem = ds.data_element(keyword)
        value = None if elem is None else elem.value
    except Exception:  # undecodable raw value
        return None, False
    if elem is None or _blank(value):
        return None, True
    try:
        typed = convert(value, typ)
    except (ValueError, TypeError, OverflowError, AttributeError):
        return None, False
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    wanted = sum(1 for v in items if not _blank(v))
    if typed is None:
        return None, False
    if pa.types.is_list(typ) and len(typed) < wanted:
        return None, False
    if any(not valid_string(elem.VR, v) for v in items if not _blank(v)):
        return None, False
    return typed, True


def valid_string(vr: str, value: Any) -> bool:
    """False for a string value with control characters or longer than its VR allows."""
    if vr not in MAX_CHARS and vr not in _TEXT_VRS and vr not in ("UC", "UR"):
        return True
    s = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    s = s.rstrip("\x00 ")
    if (_TEXT_CONTROL if vr in _TEXT_VRS else _CONTROL).search(s):
        return False
    limit = MAX_CHARS.get(vr)
    if limit is not None:
        parts = s.split("=") if vr == "PN" else [s]
        if any(len(p) > limit for p in parts):
            return False
    return not (vr == "UI" and not UID(s).is_valid)


def _blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, bytes):
        return not value.strip(b"\x00 ")
    if isinstance(value, str):
        return not value.strip("\x00 ")
    if isinstance(value, MultiValue | list | tuple):
        return all(_blank(v) for v in value)
    return str(value).strip() == ""
