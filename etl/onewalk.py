"""One walk over the element headers: the safety checks and the DICOM JSON together.

:func:`etl.safety.check` walks every element header of a file to bound it (lengths
against the bytes there, nesting depth, the element size limit, where the pixel
data starts), then :func:`etl.rawjson.to_json` walks the same headers again to
decode the values. :func:`walk` does both in one pass over the header: each
element header is read once, checked exactly as the safety walk checks it (the
same tests, in the same order, with the same reason codes and messages), then
decoded exactly as the raw JSON walk decodes it. From the Pixel Data element on
(pixel fragments, trailing elements) the safety walker itself goes on: there is
no JSON to build there.

Where the two walks would part ways — anything the raw JSON walk leaves to
pydicom (big endian, deflate, no transfer syntax, UN and unknown VRs, odd
numbers, character sets of their own in sequence items, ...), an implicit VR
element inside an explicit data set (tolerated by the safety walk), or a
malformed structure the two walks read differently — this walk gives up and the
two separate walks run instead, so the outcome is always theirs: the same
:class:`~etl.safety.Layout`, the same JSON, the same :class:`FileRejected` or
:class:`~etl.safety.NeedMore`. ``tests/etl/test_onewalk.py`` compares the two
over the whole test corpus, truncated copies and header-only reads included.
"""

from __future__ import annotations

from typing import Any

from pydicom.datadict import DicomDictionary

from etl import rawjson, safety
from etl.errors import FileRejected
from etl.rawjson import (
    _BINARY,
    _EXPLICIT_HEADER,
    _IMPLICIT_HEADER,
    _KEYS,
    _MEMO,
    _MISSING,
    _NOT_MEMOIZED,
    _SPECIFIC_CHARSET,
    _U32,
    _VR_TEXT,
    MEMO_VALUE_BYTES,
)
from etl.safety import (
    DEFLATED_LE,
    EXPLICIT_BE,
    IMPLICIT_LE,
    ITEM,
    ITEM_END,
    MAX_ELEMENT,
    PIXEL_DATA,
    SEQ_END,
    UNDEFINED,
    Layout,
    NeedMore,
)

#: ``{VR bytes: VR}`` of the VRs with a 2-byte and with a 4-byte length in explicit VR
#: encoding (UN is left out: its values go to pydicom)
_SHORT_VR = {vr: text for vr, text in _VR_TEXT.items() if vr not in safety.LONG_VRS}
_LONG_VR = {vr: text for vr, text in _VR_TEXT.items() if vr in safety.LONG_VRS}
_ITEM_GROUP = ITEM >> 16
#: VRs of a Pixel Data element in explicit VR encoding (a 4-byte length)
_PIXEL_VRS = (b"OB", b"OW")


#: ``{(explicit VR, codec): {element bytes: (JSON key, its JSON element)}}``: the
#: elements the walk decoded and memoized (as ``rawjson._MEMO``), keyed by their whole
#: bytes (tag, VR, length and value: everything their JSON depends on, with the encoding
#: and the character set's codec), so a repeated element is one slice and one lookup.
#: Only elements that pass every check of the walk the same way wherever they are (no
#: item delimiters, no Pixel Data, no Specific Character Set, no sequences, values of at
#: most ``MEMO_VALUE_BYTES``) are kept; each table holds ``rawjson.MEMO_ENTRIES`` at most,
#: and there are at most ``MEMO_TABLES`` tables (all start over when one more is needed).
_ELEMENTS: dict[tuple[bool, str], dict[bytes, tuple[str, dict]]] = {}
MEMO_TABLES = 4


class _ItemMemo(dict[tuple, tuple[dict, int]]):
    """``{(item bytes, explicit VR, codec, bulk threshold, depth, max depth): (its JSON,
    its elements)}``, with the bytes of the items it holds (``held``)."""

    def __init__(self) -> None:
        super().__init__()
        self.held = 0

    def clear(self) -> None:
        super().clear()
        self.held = 0


#: The defined-length sequence items that walkers handing out shared JSON read whole
#: (:meth:`_Walk._item`), each of at most ``ITEM_MEMO_BYTES``; the memo starts over
#: before it holds ``rawjson.MEMO_ENTRIES`` items or ``ITEM_MEMO_TOTAL`` bytes of them
#: (their JSON takes a few times that). An item is kept only when its walk ended exactly
#: at its end (nothing outside its bytes was read).
_ITEMS = _ItemMemo()
ITEM_MEMO_BYTES = 4096
ITEM_MEMO_TOTAL = 4 << 20


def _table(explicit: bool, codec: str) -> dict[bytes, tuple[str, dict]]:
    """The memo of whole elements for this encoding and codec."""
    table = _ELEMENTS.get((explicit, codec))
    if table is None:
        if len(_ELEMENTS) >= MEMO_TABLES:
            _ELEMENTS.clear()
        table = _ELEMENTS[(explicit, codec)] = {}
    return table


def _copy(json_elem: dict) -> dict:
    """A new ``{"vr": ..., "Value": [...]}`` equal to a remembered element."""
    values = json_elem.get("Value")
    return {"vr": json_elem["vr"]} if values is None else \
        {"vr": json_elem["vr"], "Value": values.copy()}


class _Fallback(Exception):
    """The two separate walks decide this file."""


def walk(buf: bytes, *, max_depth: int = 64, file_size: int | None = None,
         bulk_data_threshold: int = 1024, shared: bool = False) -> tuple[Layout, dict | None]:
    """``(safety.check(buf, ...), the header's DICOM JSON)`` in one walk where it applies.

    The JSON is that of :func:`etl.rawjson.to_json` with the bulk data elements left out
    (as :func:`strip_bulk` leaves them out), or None when the fast path does not apply
    (the caller reads the header with pydicom). Raises what :func:`etl.safety.check`
    raises for ``buf``: :class:`FileRejected` or :class:`~etl.safety.NeedMore`.

    ``shared=True`` is for a caller that never changes the JSON it gets (the ingest's
    :func:`etl.headers.parse` only reads it): a remembered element is then handed out
    as the remembered ``{"vr": ..., "Value": [...]}`` object itself, shared with every
    other header it occurs in, instead of a fresh copy (a dict and a list less per
    element). Changing such a header would change the memo.
    """
    kind, size, pos, ts, media = safety.begin(buf, file_size)
    if ts is None or ts in (EXPLICIT_BE, DEFLATED_LE):
        return _two_walks(buf, max_depth, file_size, bulk_data_threshold)
    walker = _Walk(buf, ts != IMPLICIT_LE, (bulk_data_threshold // 4) * 3, size, max_depth,
                   shared)
    try:
        header = walker.dataset(pos, size, 0, True)[0]
    except (FileRejected, NeedMore):
        raise
    except Exception:  # _Fallback, or a value the raw JSON walk cannot decode: the two
        # walks, which decide as they always did (including on a RecursionError)
        return _two_walks(buf, max_depth, file_size, bulk_data_threshold)
    pixel = walker.pixel_offset
    return Layout(kind, ts, pos, size if pixel is None else pixel, elements=walker.count,
                  media_storage_sop_class=media), header


def _two_walks(buf: bytes, max_depth: int, file_size: int | None,
               bulk_data_threshold: int) -> tuple[Layout, dict | None]:
    layout = safety.check(buf, max_depth=max_depth, file_size=file_size)
    header = rawjson.to_json(buf, layout, bulk_data_threshold)
    if header is not None:
        strip_bulk(header)
    return layout, header


def strip_bulk(obj: dict) -> None:
    """Remove the elements marked as bulk data (``BulkDataURI``), in sequence items too."""
    for tag in [t for t, v in obj.items() if "BulkDataURI" in v]:
        del obj[tag]
    for v in obj.values():
        if v.get("vr") == "SQ":
            for item in v.get("Value", []) or []:
                if isinstance(item, dict):
                    strip_bulk(item)


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walk:
    """The safety walk (:class:`etl.safety._Walker`, little endian) with the raw JSON walk
    (:class:`etl.rawjson._Reader`) folded in: each method checks what its safety
    counterpart checks, in the same order, and builds what its JSON counterpart builds."""

    __slots__ = ("avail", "buf", "bulk", "count", "dec", "explicit", "max_depth", "partial",
                 "pixel_offset", "shared", "size")

    def __init__(self, buf: bytes, explicit: bool, bulk: int, size: int, max_depth: int,
                 shared: bool = False):
        self.buf = buf
        #: hand out remembered elements themselves (see :func:`walk`)
        self.shared = shared
        #: bytes in the buffer; ``size`` is the file's size (larger for a partial read)
        self.avail = len(buf)
        self.size = size
        self.partial = self.avail < size
        self.explicit = explicit
        self.bulk = bulk
        self.max_depth = max_depth
        #: value decoding (and the character set in force) of the raw JSON walk
        self.dec = rawjson._Reader(buf, explicit, bulk)
        self.count = 0
        self.pixel_offset: int | None = None

    def dataset(self, pos: int, end: int, depth: int, top: bool = False
                ) -> tuple[dict, int, bool]:
        """Elements from ``pos`` to ``end`` or an item delimiter: (their JSON, the end,
        whether an item delimiter ended them)."""
        buf, size, avail, partial = self.buf, self.size, self.avail, self.partial
        explicit, dec, bulk, memo, shared = self.explicit, self.dec, self.bulk, _MEMO, \
            self.shared
        short_vr, long_vr, keys, header = _SHORT_VR, _LONG_VR, _KEYS, (
            _EXPLICIT_HEADER if explicit else _IMPLICIT_HEADER)
        item_group, pixel_data, max_element, undefined = _ITEM_GROUP, PIXEL_DATA, \
            MAX_ELEMENT, UNDEFINED
        # the Python codec in force, None for ISO 2022 code extensions (never memoized)
        codec = dec.encoding if isinstance(dec.encoding, str) else None
        elements = None if codec is None else _table(explicit, codec)
        out: dict[str, Any] = {}
        count = 0
        vr: str | None
        key: str | None
        while pos < end:
            # --- the element header, checked as etl.safety's walk checks it
            if partial and pos + 12 > avail:
                raise NeedMore(pos + 12)
            if pos + 8 > size:
                self.count += count
                if top and not buf[pos:].strip(b"\x00"):
                    return out, size, False  # trailing zero padding
                raise FileRejected("truncated", f"file ends inside an element header at "
                                   f"offset {pos}")
            if explicit:
                group, elem, vr_bytes, length = header(buf, pos)
            else:
                group, elem, length = header(buf, pos)
            # an element met before (an 8-byte header, its value in the buffer): every
            # check below passed for these bytes and the value decoded to these values
            stop = pos + 8 + length
            if elements is not None and stop <= avail:
                hit = elements.get(buf[pos:stop])
                if hit is not None:
                    key, json_elem = hit
                    count += 1
                    out[key] = json_elem if shared else _copy(json_elem)
                    pos = stop
                    continue
            at = pos
            tag = (group << 16) | elem
            if group == item_group:
                if tag == ITEM_END:
                    self.count += count
                    return out, pos + 8, True
                if tag in (ITEM, SEQ_END):
                    raise FileRejected("truncated", f"unexpected delimiter at offset {pos}")
            if top and tag == pixel_data:
                # the end of the header. The common case, native pixel data of a defined
                # length that ends the file, passes every check of the safety walk:
                self.count += count
                if pos + 12 <= avail and (not explicit or vr_bytes in _PIXEL_VRS):
                    start = pos + 12 if explicit else pos + 8
                    length = _U32(buf, start - 4)[0]
                    if length <= max_element and start + length == size:
                        self.count += 1
                        self.pixel_offset = pos
                        return out, pos, False
                # anything else (fragments, trailing elements, ...): the safety walker
                rest = safety._Walker(buf, pos, explicit=explicit, little=True,
                                      max_depth=self.max_depth, size=size)
                rest.walk_dataset(pos, size, depth=0, top=True)
                self.count += rest.count
                self.pixel_offset = pos
                return out, pos, False
            if explicit:
                vr = short_vr.get(vr_bytes)
                if vr is not None:
                    start = pos + 8
                else:
                    vr = long_vr.get(vr_bytes)
                    if vr is None:
                        raise _Fallback  # UN, or an implicit VR element in an explicit set
                    if pos + 12 > size:
                        raise FileRejected("truncated", f"file ends inside an element header "
                                           f"at offset {pos}")
                    length = _U32(buf, pos + 8)[0]
                    start = pos + 12
            else:
                start = pos + 8
                if group & 1:
                    raise _Fallback  # private VRs are not in the dictionary
                entry = DicomDictionary.get(tag)
                if entry is None:
                    raise _Fallback
                vr = entry[0]
                if vr == "UN" or " or " in vr:
                    raise _Fallback
            count += 1
            if length > max_element and length != undefined:
                safety._bound(length, tag)
            key = keys.get(tag)
            if key is None:
                key = keys[tag] = f"{tag:08X}"
            if length == undefined:
                if vr != "SQ":
                    if explicit and tag != PIXEL_DATA:
                        raise FileRejected("truncated", f"element {_tag_text(tag)} has an "
                                           f"undefined length with VR {vr_bytes!r}")
                    raise _Fallback  # pixel fragments in an item, or an implicit non-SQ
                self.count += count
                count = 0
                items, pos = self.items(start, depth + 1)
                out[key] = {"vr": "SQ", "Value": items}
                continue
            stop = start + length
            if stop > size:
                raise FileRejected("truncated", f"element {_tag_text(tag)} declares {length} "
                                   f"bytes, {size - start} remain")
            if partial and stop > avail:
                raise NeedMore(stop)
            # --- the value, decoded as etl.rawjson decodes it
            if vr == "SQ":
                self.count += count
                count = 0
                if not explicit:
                    # the safety walk does not enter a defined-length sequence of an
                    # implicit VR data set: the raw JSON walk alone reads it
                    items, after = dec.sequence(start, length)
                    if after != stop:
                        raise _Fallback
                    for item in items:
                        strip_bulk(item)
                elif length:
                    items = self.items_defined(start, stop, depth + 1)
                else:
                    items = []
                out[key] = {"vr": "SQ", "Value": items}
                pos = stop
                continue
            raw = buf[start:stop]
            pos = stop
            if tag == _SPECIFIC_CHARSET:
                if not top:
                    raise _Fallback  # a character set of its own inside a sequence item
                dec.encoding = dec.charset(raw)
                codec = dec.encoding if isinstance(dec.encoding, str) else None
                elements = None if codec is None else _table(explicit, codec)
            if length > MEMO_VALUE_BYTES or vr in _NOT_MEMOIZED or codec is None:
                if length > bulk and vr in _BINARY:
                    continue  # bulk data: left out of the JSON
                out[key] = dec.element(vr, raw)
                continue
            mkey = (vr, raw, codec)
            values = memo.get(mkey, _MISSING)
            if values is _MISSING:
                values = dec.element(vr, raw).get("Value")
                if len(memo) >= rawjson.MEMO_ENTRIES:
                    memo.clear()
                memo[mkey] = values
            # a new element each time: the value memo's list is never handed out
            json_elem = {"vr": vr} if values is None else {"vr": vr, "Value": values.copy()}
            if start == at + 8 and group != item_group and tag != pixel_data \
                    and tag != _SPECIFIC_CHARSET and elements is not None:
                if len(elements) >= rawjson.MEMO_ENTRIES:
                    elements.clear()
                elements[buf[at:stop]] = (key, json_elem)
                if not shared:  # the memo's element is never handed out
                    json_elem = _copy(json_elem)
            out[key] = json_elem
        self.count += count
        return out, pos, False

    def _item(self, start: int, stop: int, depth: int) -> dict:
        """The JSON of the defined-length item from ``start`` to ``stop``. A walker that
        shares what it hands out remembers the items it read whole: the items of
        structured reports repeat across files (concept names, units, templates)."""
        if not self.shared or stop - start > ITEM_MEMO_BYTES or stop > self.avail \
                or not isinstance(self.dec.encoding, str):
            return self.dataset(start, stop, depth)[0]
        # everything the item's JSON and checks depend on: its bytes, the encoding, the
        # character set's codec, the bulk data threshold and the depth left
        key = (self.buf[start:stop], self.explicit, self.dec.encoding, self.bulk, depth,
               self.max_depth)
        hit = _ITEMS.get(key)
        if hit is not None:
            self.count += hit[1]
            return hit[0]
        before = self.count
        item, end, closed = self.dataset(start, stop, depth)
        if end == stop and not closed:  # read exactly its own bytes
            if len(_ITEMS) >= rawjson.MEMO_ENTRIES \
                    or _ITEMS.held + stop - start > ITEM_MEMO_TOTAL:
                _ITEMS.clear()
            _ITEMS[key] = (item, self.count - before)
            _ITEMS.held += stop - start
        return item

    def items(self, pos: int, depth: int) -> tuple[list[dict], int]:
        """Items of an undefined-length sequence (``safety._Walker.walk_items``)."""
        if depth > self.max_depth:
            raise FileRejected("too_deep", f"sequences nested deeper than {self.max_depth}")
        buf, size = self.buf, self.size
        items: list[dict] = []
        while True:
            if self.partial and pos + 8 > self.avail:
                raise NeedMore(pos + 8)
            if pos + 8 > size:
                raise FileRejected("truncated", "file ends inside a sequence")
            group, elem, length = _IMPLICIT_HEADER(buf, pos)
            item_tag = (group << 16) | elem
            if item_tag == SEQ_END:
                return items, pos + 8
            if item_tag != ITEM:
                raise FileRejected("truncated", f"expected an item tag at offset {pos}")
            start = pos + 8
            if length != UNDEFINED and length > MAX_ELEMENT:
                safety._bound(length, ITEM)
            if length == UNDEFINED:
                item, pos, _ = self.dataset(start, size, depth)
                items.append(item)
                continue
            if start + length > size:
                raise FileRejected("truncated", f"item at offset {pos} declares {length} bytes, "
                                   f"{size - start} remain")
            items.append(self._item(start, start + length, depth) if length else {})
            pos = start + length

    def items_defined(self, pos: int, end: int, depth: int) -> list[dict]:
        """Items of a defined-length sequence (``safety._Walker.walk_items_defined``)."""
        if depth > self.max_depth:
            raise FileRejected("too_deep", f"sequences nested deeper than {self.max_depth}")
        buf = self.buf
        items: list[dict] = []
        while pos < end:
            if pos + 8 > end:
                raise FileRejected("truncated", f"sequence ends inside an item header at {pos}")
            group, elem, length = _IMPLICIT_HEADER(buf, pos)
            if (group << 16) | elem != ITEM:
                raise FileRejected("truncated", f"expected an item tag at offset {pos}")
            start = pos + 8
            if length != UNDEFINED and length > MAX_ELEMENT:
                safety._bound(length, ITEM)
            if length == UNDEFINED:
                item, pos, closed = self.dataset(start, end, depth)
                if not closed:
                    raise _Fallback  # the raw JSON walk would read on past the sequence
                items.append(item)
                continue
            if start + length > end:
                raise FileRejected("truncated", f"item at offset {pos} overruns its sequence")
            items.append(self._item(start, start + length, depth) if length else {})
            pos = start + length
        return items
