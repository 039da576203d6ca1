"""Value checks: a bad value in an otherwise good file keeps the row.

A value that cannot be converted to its column's type (a non-numeric DS, an
impossible date), a string with control characters, a string longer than its
value representation allows, or a malformed UID becomes NULL in its typed
column, and the attribute is named in the row's ``invalid_attributes``. The
raw value stays in the row's DICOM JSON.
"""

from __future__ import annotations

import re
from typing import Any

from pydicom.uid import RE_VALID_UID

#: Maximum characters per value (PS3.5 6.2); PN: per component group.
MAX_CHARS = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DT": 26, "LO": 64, "LT": 10240,
             "PN": 64, "SH": 16, "ST": 1024, "TM": 14, "UI": 64}
#: Control characters allowed in the text VRs (PS3.5 6.1.3); ESC sequences of
#: ISO 2022 are consumed by the decoder.
_TEXT_VRS = frozenset({"LT", "ST", "UT"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
#: pydicom's definition of a valid UID (``UID.is_valid``), compiled once
_VALID_UID = re.compile(RE_VALID_UID)


#: VRs whose values ``valid_string`` checks (the others are always valid)
CHECKED_VRS = frozenset(MAX_CHARS) | _TEXT_VRS | {"UC", "UR"}


def valid_string(vr: str, value: Any) -> bool:
    """False for a string value with control characters or longer than its VR allows."""
    if vr not in CHECKED_VRS:
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
    return not (vr == "UI" and not valid_uid(s))


def valid_uid(s: str) -> bool:
    """pydicom's ``UID(s).is_valid`` without building a UID object."""
    return len(s) <= 64 and _VALID_UID.match(s) is not None
