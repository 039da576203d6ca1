"""The fast path: DICOM JSON (PS3.18 F.2) straight from the bytes of a header.

pydicom builds a Python object per element and converts every value through
several layers; for the common case (little endian, explicit or implicit VR,
a single-byte or UTF-8 character set) this module walks the raw elements once
and produces the same JSON dict pydicom's ``Dataset.to_json_dict`` gives (the
tests compare them over every file of the corpus). Anything unusual returns
``None`` and the caller falls back to pydicom: big endian, deflate, ISO 2022
and other multi-byte character sets, ambiguous or unknown VRs, UN values,
malformed numbers, nested character sets.
"""

from __future__ import annotations

import base64
import re
import struct
import warnings
from typing import Any

from pydicom.charset import TEXT_VR_DELIMS, convert_encodings, decode_bytes
from pydicom.datadict import DicomDictionary

from etl.safety import (
    DEFLATED_LE,
    EXPLICIT_BE,
    IMPLICIT_LE,
    ITEM,
    ITEM_END,
    LONG_VRS,
    PIXEL_DATA,
    SEQ_END,
    UNDEFINED,
    VALID_VRS,
    Layout,
)

#: character sets the fast path decodes itself (pydicom's Python codec names)
#: (single-byte ISO 8859 parts, UTF-8 and GB18030: no ISO 2022 code extensions)
CHARSETS = {None: "latin_1", "": "latin_1", "ISO_IR 6": "latin_1", "ISO_IR 100": "latin_1",
            "ISO_IR 101": "iso8859_2", "ISO_IR 109": "iso8859_3", "ISO_IR 110": "iso8859_4",
            "ISO_IR 144": "iso8859_5", "ISO_IR 127": "iso8859_6", "ISO_IR 126": "iso8859_7",
            "ISO_IR 138": "iso8859_8", "ISO_IR 148": "iso8859_9", "ISO_IR 203": "iso8859_15",
            "ISO_IR 166": "tis_620", "ISO_IR 192": "utf_8", "GB18030": "gb18030",
            "GBK": "gbk"}
_BINARY = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
_STRUCT = {"FL": "f", "FD": "d", "SL": "i", "SS": "h", "UL": "I", "US": "H", "SV": "q",
           "UV": "Q"}
_TEXT_SPLIT = frozenset({"LO", "SH", "UC"})
_TEXT_SINGLE = frozenset({"LT", "ST", "UT"})
_ASCII_SPLIT = frozenset({"AS", "CS", "DA", "DT", "TM"})
_SPECIFIC_CHARSET = 0x00080005
#: the characters of a decimal string the fast path converts itself
_DS_CHARS = re.compile(r"[0-9.+\-eE]+")
#: element headers: explicit VR (group, element, VR, 2-byte length), implicit VR
#: (group, element, 4-byte length); a 4-byte length
_EXPLICIT_HEADER = struct.Struct("<HH2sH").unpack_from
_IMPLICIT_HEADER = struct.Struct("<HHI").unpack_from
_U32 = struct.Struct("<I").unpack_from
#: Entries the element memo holds before it starts over (bounds a worker's memory).
MEMO_ENTRIES = 1 << 14
#: Longer values are decoded every time (rarely repeated; bounds the memo's memory).
MEMO_VALUE_BYTES = 256
#: ``{(VR, value bytes, codec): the element's "Value" list or None}``: the files of a
#: series repeat most of their values; decoding one is a pure function of these three.
#: Binary values (and their bulk-data threshold) and person names (dict values) are not
#: memoized, so a memoized element is ``{"vr": VR}`` plus, when it has one, its values.
_MEMO: dict[tuple[str, bytes, str], list | None] = {}
_MISSING: Any = object()
_NOT_MEMOIZED = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "PN"})
#: ``{VR bytes: VR}`` and ``{tag: "GGGGEEEE"}`` (the JSON key), built as they are met
#: (UN is left out: its values go to pydicom)
_VR_TEXT = {vr: vr.decode() for vr in VALID_VRS if vr != b"UN"}
_KEYS: dict[int, str] = {}
#: ISO 2022 terms (code extensions), decoded with pydicom's decoder
ISO2022 = frozenset({"", "ISO 2022 IR 6", "ISO 2022 IR 13", "ISO 2022 IR 87",
                     "ISO 2022 IR 159", "ISO 2022 IR 149", "ISO 2022 IR 58",
                     "ISO 2022 IR 100", "ISO 2022 IR 101", "ISO 2022 IR 109",
                     "ISO 2022 IR 110", "ISO 2022 IR 126", "ISO 2022 IR 127",
                     "ISO 2022 IR 138", "ISO 2022 IR 144", "ISO 2022 IR 148",
                     "ISO 2022 IR 166"})


class _Fallback(Exception):
    """This header needs pydicom."""


def to_json(buf: bytes, layout: Layout, bulk_data_threshold: int = 1024) -> dict | None:
    """The DICOM JSON dict of the header in ``buf`` (up to ``layout.header_end``), without
    bulk data; None when the fast path does not apply."""
    ts = layout.transfer_syntax
    if layout.deflated or ts in (EXPLICIT_BE, DEFLATED_LE):
        return None
    if ts is None and layout.kind == "raw":
        return None
    explicit = ts != IMPLICIT_LE
    try:
        reader = _Reader(buf, explicit, (bulk_data_threshold // 4) * 3)
        out, _ = reader.dataset(layout.dataset_offset, layout.header_end, top=True)
        return out
    except (_Fallback, struct.error, UnicodeDecodeError, ValueError, IndexError):
        return None


class _Reader:
    __slots__ = ("buf", "bulk", "encoding", "explicit")

    def __init__(self, buf: bytes, explicit: bool, bulk: int):
        self.buf = buf
        self.explicit = explicit
        self.bulk = bulk
        self.encoding: str | list[str] = "latin_1"

    def dataset(self, pos: int, end: int, top: bool = False) -> tuple[dict, int]:
        buf = self.buf
        size = len(buf)
        out: dict = {}
        explicit = self.explicit
        memo = _MEMO
        while pos < end:
            if pos + 8 > size:
                if top and not buf[pos:].strip(b"\x00"):
                    return out, size
                raise _Fallback
            if explicit:
                group, elem, vr_bytes, length = _EXPLICIT_HEADER(buf, pos)
                tag = (group << 16) | elem
                if tag == ITEM_END:
                    return out, pos + 8
                if top and tag == PIXEL_DATA:
                    return out, pos
                vr = _VR_TEXT.get(vr_bytes)
                if vr is None:
                    raise _Fallback
                if vr_bytes in LONG_VRS:
                    length = _U32(buf, pos + 8)[0]
                    start = pos + 12
                else:
                    start = pos + 8
            else:
                group, elem, length = _IMPLICIT_HEADER(buf, pos)
                tag = (group << 16) | elem
                if tag == ITEM_END:
                    return out, pos + 8
                if top and tag == PIXEL_DATA:
                    return out, pos
                if group % 2 == 1:
                    raise _Fallback  # private VRs are not in the dictionary
                entry = DicomDictionary.get(tag)
                if entry is None:
                    raise _Fallback
                vr = entry[0]
                if vr == "UN" or " or " in vr:
                    raise _Fallback
                start = pos + 8
            key = _KEYS.get(tag)
            if key is None:
                key = _KEYS[tag] = f"{tag:08X}"
            if vr == "SQ":
                items, pos = self.sequence(start, length)
                out[key] = {"vr": "SQ", "Value": items}
                continue
            if length == UNDEFINED:
                raise _Fallback
            raw = buf[start:start + length]
            pos = start + length
            if tag == _SPECIFIC_CHARSET:
                if not top:
                    raise _Fallback  # a character set of its own inside a sequence item
                self.encoding = self.charset(raw)
            encoding = self.encoding
            if vr in _NOT_MEMOIZED or length > MEMO_VALUE_BYTES or encoding.__class__ is not str:
                out[key] = self.element(vr, raw)
                continue
            mkey = (vr, raw, encoding)
            values = memo.get(mkey, _MISSING)
            if values is _MISSING:
                values = self.element(vr, raw).get("Value")
                if len(memo) >= MEMO_ENTRIES:
                    memo.clear()
                memo[mkey] = values
            # a new element each time: the memo's value list is never handed out
            out[key] = {"vr": vr} if values is None else {"vr": vr, "Value": values.copy()}
        return out, pos

    def charset(self, raw: bytes) -> str | list[str]:
        """A Python codec for single-byte, UTF-8 and GB18030 sets; pydicom's list of
        encodings for ISO 2022 code extensions (decoded with pydicom's own decoder)."""
        value = raw.decode("latin_1").rstrip(" \x00")
        if "\\" not in value and value.strip() in CHARSETS:
            return CHARSETS[value.strip()]
        terms = value.split("\\")
        if not all(t.strip() in ISO2022 for t in terms):
            raise _Fallback
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # any doubt: pydicom's full path decides
            try:
                return convert_encodings(terms)
            except Exception:
                raise _Fallback from None

    def decode(self, raw: bytes) -> str:
        if isinstance(self.encoding, str):
            return raw.decode(self.encoding)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                return decode_bytes(raw, self.encoding, TEXT_VR_DELIMS)
            except Exception:
                raise _Fallback from None

    def sequence(self, start: int, length: int) -> tuple[list, int]:
        buf = self.buf
        items = []
        end = None if length == UNDEFINED else start + length
        pos = start
        while end is None or pos < end:
            tag = (struct.unpack_from("<HH", buf, pos)[0] << 16) | struct.unpack_from(
                "<HH", buf, pos)[1]
            ilen = struct.unpack_from("<I", buf, pos + 4)[0]
            if tag == SEQ_END:
                pos += 8
                break
            if tag != ITEM:
                raise _Fallback
            istart = pos + 8
            if ilen == UNDEFINED:
                item, pos = self.dataset(istart, len(buf))
            else:
                item, _ = self.dataset(istart, istart + ilen)
                pos = istart + ilen
            items.append(item)
        return items, pos

    def element(self, vr: str, raw: bytes) -> dict:
        if not raw:
            return {"vr": vr}
        if vr in _BINARY:
            if len(raw) > self.bulk:
                return {"vr": vr, "BulkDataURI": ""}
            return {"vr": vr, "InlineBinary": base64.b64encode(raw).decode()}
        if vr in _STRUCT:
            code = _STRUCT[vr]
            n = len(raw) // struct.calcsize(code)
            if n * struct.calcsize(code) != len(raw):
                raise _Fallback
            values = list(struct.unpack(f"<{n}{code}", raw))
            if vr in ("FL", "FD"):
                return {"vr": vr, "Value": [float(v) for v in values]}
            return {"vr": vr, "Value": values}
        if vr == "AT":
            if len(raw) % 4:
                raise _Fallback
            vals = struct.unpack(f"<{len(raw) // 2}H", raw)
            return {"vr": vr, "Value": [f"{vals[i]:04X}{vals[i + 1]:04X}"
                                        for i in range(0, len(vals), 2)]}
        if vr == "PN":
            text = self.decode(raw.rstrip(b"\x00 "))
            if not text:
                return {"vr": vr}
            return {"vr": vr, "Value": [_person_name(v) for v in text.split("\\")]}
        if vr in _TEXT_SPLIT:
            text = self.decode(raw)
            values = [v.rstrip("\x00 ") for v in text.split("\\")]
            if len(values) == 1 and not values[0]:
                return {"vr": vr}
            return {"vr": vr, "Value": values}
        if vr in _TEXT_SINGLE:
            text = self.decode(raw).rstrip("\x00 ")
            return {"vr": vr, "Value": [text]} if text else {"vr": vr}
        if vr == "UI":
            values = raw.decode("latin_1").rstrip("\x00 ").split("\\")
            if len(values) == 1 and not values[0]:
                return {"vr": vr}
            return {"vr": vr, "Value": values}
        if vr in _ASCII_SPLIT:
            values = raw.decode("latin_1").rstrip(" \x00").split("\\")
            if len(values) == 1 and not values[0]:
                return {"vr": vr}
            return {"vr": vr, "Value": values}
        if vr == "AE":
            values = [v.strip() for v in raw.decode("latin_1").split("\\")]
            if len(values) == 1 and not values[0]:
                return {"vr": vr}
            return {"vr": vr, "Value": values}
        if vr == "DS":
            values = raw.decode("latin_1").strip().rstrip("\x00").split("\\")
            if len(values) == 1 and not values[0].strip():
                return {"vr": vr}
            return {"vr": vr, "Value": [_ds(v) for v in values]}
        if vr == "IS":
            values = raw.decode("latin_1").strip().rstrip("\x00").split("\\")
            if len(values) == 1 and not values[0].strip():
                return {"vr": vr}
            return {"vr": vr, "Value": [_is(v) for v in values]}
        raise _Fallback  # UR and anything else: pydicom


def _person_name(value: str) -> dict:
    comps = value.split("=")
    while len(comps) > 1 and comps[-1] == "":
        comps.pop()
    out = {"Alphabetic": comps[0]}
    if len(comps) > 1:
        out["Ideographic"] = comps[1]
    if len(comps) > 2:
        out["Phonetic"] = comps[2]
    return out


def _ds(text: str) -> float:
    s = text.strip()
    if not _DS_CHARS.fullmatch(s):
        raise _Fallback  # pydicom's own handling of odd numbers decides
    return float(s)


def _is(text: str) -> int:
    s = text.strip()
    if not s or not s.lstrip("+-").isdigit():
        raise _Fallback
    return int(s)
