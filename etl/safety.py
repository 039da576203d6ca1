"""Look before parsing: sniff the format, walk the element structure, bound it.

pydicom reads a truncated file without complaint and will try to allocate
whatever length an element declares. So before pydicom sees a file, this
module walks its elements (tags and lengths only, no value decoding), checks
every length against the bytes that are really there, limits the nesting
depth, and finds where the pixel data starts so that only the header is
handed to pydicom. On the fast path (:mod:`etl.onewalk`) the same checks run in
the same pass as the decoding of the values; this walk stays the reference they
are tested against, and decides every file that pass hands back.
"""

from __future__ import annotations

import functools
import struct
import zlib
from dataclasses import dataclass

from pydicom import config
from pydicom.uid import UID

from etl.errors import FileRejected

PREAMBLE = 128
MAGIC = b"DICM"

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

# VRs with a 2-byte reserved field and a 4-byte length in explicit VR encoding
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC",
                      b"UN", b"UR", b"UT", b"UV"})
VALID_VRS = LONG_VRS | frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL",
                                  b"FD", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL", b"SS",
                                  b"ST", b"TM", b"UI", b"UL", b"US"})
UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQ_END = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
#: A deflated data set is inflated to at most this many bytes.
MAX_INFLATED = 1 << 30
#: No element may declare a value longer than this (``element_too_large``), whether or
#: not the file holds it: nothing is ever allocated from a length field.
MAX_ELEMENT = 1 << 30


class NeedMore(Exception):
    """The walk needs bytes beyond the partial buffer it was given (header-only reads):
    read at least up to ``offset`` and call :func:`check` again."""

    def __init__(self, offset: int):
        super().__init__(offset)
        self.offset = offset


@dataclass(frozen=True, slots=True)
class Layout:
    """What the walk learnt about a file."""

    #: ``part10`` (preamble + DICM) or ``raw`` (a bare data set, no file meta).
    kind: str
    transfer_syntax: str | None
    #: Offset where the data set (after the file meta) starts.
    dataset_offset: int
    #: Offset of the Pixel Data element (the end of the header), or the file size.
    header_end: int
    #: True when the data set is deflated (the walk ran on the inflated bytes).
    deflated: bool = False
    elements: int = 0
    #: MediaStorageSOPClassUID of the file meta, when present.
    media_storage_sop_class: str | None = None


def sniff(buf: bytes) -> str:
    """``part10``, ``raw`` or ``not_dicom`` from the first bytes of a file."""
    if len(buf) >= PREAMBLE + 4 and buf[PREAMBLE:PREAMBLE + 4] == MAGIC:
        return "part10"
    if len(buf) >= 8:
        group = struct.unpack_from("<H", buf, 0)[0]
        if group in (0x0002, 0x0008) and (buf[4:6] in VALID_VRS or _plausible_implicit(buf)):
            return "raw"
        if struct.unpack_from(">H", buf, 0)[0] == 0x0008 and buf[4:6] in VALID_VRS:
            return "raw"  # explicit VR big endian without file meta
    return "not_dicom"


def _plausible_implicit(buf: bytes) -> bool:
    length = struct.unpack_from("<I", buf, 4)[0]
    return length < len(buf) or length == UNDEFINED


def check(buf: bytes, max_depth: int = 64, file_size: int | None = None) -> Layout:
    """Walk the whole element structure of ``buf`` (a complete file).

    With ``file_size`` larger than ``len(buf)``, ``buf`` is the start of the file
    (a header-only read): lengths are checked against the file size, and a Pixel
    Data element of defined length that runs to the end of the file is accepted
    without its bytes. Whenever the walk needs bytes the buffer lacks it raises
    :class:`NeedMore`. Raises :class:`FileRejected` (``not_dicom``, ``truncated``,
    ``too_deep``).
    """
    kind, size, pos, ts, media = begin(buf, file_size)
    avail = len(buf)
    dataset_offset = pos
    if ts == DEFLATED_LE:
        if avail < size:
            raise NeedMore(size)  # inflating needs every byte
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            body = inflater.decompress(buf[pos:], MAX_INFLATED)
        except zlib.error as exc:
            raise FileRejected("truncated", f"deflated data set is corrupt: {exc}") from None
        if inflater.unconsumed_tail:
            raise FileRejected("truncated", "deflated data set inflates beyond 1 GiB")
        walker = _Walker(body, 0, explicit=True, little=True, max_depth=max_depth)
        walker.walk_dataset(0, len(body), depth=0, top=True)
        return Layout(kind, ts, dataset_offset, size, deflated=True, elements=walker.count,
                      media_storage_sop_class=media)
    if ts is None:  # no transfer syntax given: guess the encoding from the first element
        explicit = len(buf) >= pos + 6 and buf[pos + 4:pos + 6] in VALID_VRS
        little = not (struct.unpack_from("<H", buf, pos)[0] not in (0x0002, 0x0008)
                      and struct.unpack_from(">H", buf, pos)[0] in (0x0002, 0x0008))
    else:
        explicit = ts != IMPLICIT_LE
        little = ts != EXPLICIT_BE
    walker = _Walker(buf, pos, explicit=explicit, little=little, max_depth=max_depth,
                     size=size)
    walker.walk_dataset(pos, size, depth=0, top=True)
    header_end = walker.pixel_offset if walker.pixel_offset is not None else size
    return Layout(kind, ts, dataset_offset, header_end, elements=walker.count,
                  media_storage_sop_class=media)


def begin(buf: bytes, file_size: int | None = None) -> tuple[str, int, int, str | None,
                                                             str | None]:
    """The checks of :func:`check` before the data set: sniff the format, walk the file
    meta, check the transfer syntax. Returns the kind, the size the walk checks lengths
    against (the file's), the data set offset, the transfer syntax and the media storage
    SOP class. Raises :class:`FileRejected` as :func:`check` does."""
    kind = sniff(buf)
    if kind == "not_dicom":
        raise FileRejected("not_dicom", "no DICM magic and no DICOM data set at the start")
    size = len(buf)
    if file_size is not None and file_size > size:
        size = file_size
    ts: str | None = None
    media: str | None = None
    if kind == "part10":
        pos, ts, media = _walk_meta(buf, PREAMBLE + 4)
    else:
        pos = 0
        if struct.unpack_from("<H", buf, 0)[0] == 0x0002:
            pos, ts, media = _walk_meta(buf, 0)
    if ts is not None and not _is_transfer_syntax(ts):
        raise FileRejected("unsupported_transfer_syntax",
                           f"transfer syntax {ts[:70]!r} is not a known DICOM transfer syntax")
    return kind, size, pos, ts, media


@functools.lru_cache(maxsize=256)
def _is_transfer_syntax(ts: str) -> bool:
    # not validated: pydicom would warn with the raw value, which a damaged file meta
    # fills with the header's bytes (names, identifiers) up to the next element
    return UID(ts, validation_mode=config.IGNORE).is_transfer_syntax


def _walk_meta(buf: bytes, pos: int) -> tuple[int, str | None, str | None]:
    """Walk the group 0002 file meta (always explicit VR little endian); return the data
    set offset, the transfer syntax and the media storage SOP class."""
    size = len(buf)
    ts = media = None
    while pos + 8 <= size:
        group, elem = struct.unpack_from("<HH", buf, pos)
        if group != 0x0002:
            break
        vr = buf[pos + 4:pos + 6]
        if vr in LONG_VRS:
            if pos + 12 > size:
                raise FileRejected("truncated", "file ends inside a file meta element header")
            length = struct.unpack_from("<I", buf, pos + 8)[0]
            start = pos + 12
        elif vr in VALID_VRS:
            length = struct.unpack_from("<H", buf, pos + 6)[0]
            start = pos + 8
        else:
            raise FileRejected("not_dicom", f"file meta element (0002,{elem:04X}) has no valid VR")
        if length != UNDEFINED:
            _bound(length, (0x0002 << 16) | elem)
        if length == UNDEFINED or start + length > size:
            raise FileRejected("truncated", f"file meta element (0002,{elem:04X}) declares "
                               f"{length} bytes, {size - start} remain")
        if elem == 0x0010:
            ts = buf[start:start + length].decode("ascii", "replace").strip("\x00 ")
        elif elem == 0x0002:
            media = buf[start:start + length].decode("ascii", "replace").strip("\x00 ")
        pos = start + length
    else:
        if pos < size:
            raise FileRejected("truncated", "file ends inside the file meta")
    if pos >= size:
        raise FileRejected("truncated", "file ends after the file meta: no data set")
    return pos, ts, media


def _bound(length: int, tag: int) -> None:
    if length > MAX_ELEMENT:
        raise FileRejected("element_too_large",
                           f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) declares {length} "
                           f"bytes, more than the {MAX_ELEMENT}-byte limit")


class _Walker:
    __slots__ = ("avail", "buf", "count", "explicit", "hdr_explicit", "hdr_implicit",
                 "len4", "max_depth", "partial", "pixel_offset", "size", "tag_of")

    def __init__(self, buf: bytes, start: int, *, explicit: bool, little: bool, max_depth: int,
                 size: int | None = None):
        self.buf = buf
        #: bytes in the buffer; ``size`` is the file's size (larger for a partial read)
        self.avail = len(buf)
        self.size = self.avail if size is None else size
        self.partial = self.avail < self.size
        self.explicit = explicit
        e = "<" if little else ">"
        # precompiled readers of the 8 bytes of an element header: (group, element, VR,
        # 2-byte length) for explicit VR, (group, element, 4-byte length) for implicit VR
        self.hdr_explicit = struct.Struct(e + "HH2sH").unpack_from
        self.hdr_implicit = struct.Struct(e + "HHI").unpack_from
        self.tag_of = struct.Struct(e + "HH").unpack_from
        self.len4 = struct.Struct(e + "I").unpack_from
        self.max_depth = max_depth
        self.pixel_offset: int | None = None
        self.count = 0

    def _tag(self, pos: int) -> int:
        g, e = self.tag_of(self.buf, pos)
        return (g << 16) | e

    def walk_dataset(self, pos: int, end: int, depth: int, top: bool = False) -> int:
        """Walk elements from ``pos`` to ``end`` (or an item delimiter); return the end."""
        buf, size, avail, partial = self.buf, self.size, self.avail, self.partial
        explicit, len4 = self.explicit, self.len4
        header = self.hdr_explicit if explicit else self.hdr_implicit
        while pos < end:
            if partial and pos + 12 > avail:
                raise NeedMore(pos + 12)
            if pos + 8 > size:
                if top and not buf[pos:].strip(b"\x00"):
                    return size  # trailing zero padding, as some writers leave
                raise FileRejected("truncated", f"file ends inside an element header at "
                                   f"offset {pos}")
            # the 8 header bytes are in the buffer (a partial buffer holds pos + 12)
            if explicit:
                group, elem, vr, length = header(buf, pos)
            else:
                group, elem, length = header(buf, pos)
                vr = None
            tag = (group << 16) | elem
            if tag == ITEM_END:
                return pos + 8
            if tag in (ITEM, SEQ_END):
                raise FileRejected("truncated", f"unexpected delimiter at offset {pos}")
            if vr is None:
                start = pos + 8
            elif vr in LONG_VRS:
                if pos + 12 > size:
                    raise FileRejected("truncated", f"file ends inside an element header at "
                                       f"offset {pos}")
                length = len4(buf, pos + 8)[0]
                start = pos + 12
            elif vr in VALID_VRS:
                start = pos + 8
            else:
                vr = None  # an implicit VR element inside an explicit data set (tolerated)
                length = len4(buf, pos + 4)[0]
                start = pos + 8
            self.count += 1
            if top and tag == PIXEL_DATA and self.pixel_offset is None:
                self.pixel_offset = pos
            if length > MAX_ELEMENT and length != UNDEFINED:
                _bound(length, tag)
            if partial and top and tag == PIXEL_DATA:
                if length == UNDEFINED or start + length != size:
                    raise NeedMore(size)  # fragments or trailing elements: walk them all
                return size  # native pixel data up to the end: never read
            if length == UNDEFINED:
                if tag == PIXEL_DATA or vr == b"SQ" or vr is None or vr == b"UN":
                    pos = self.walk_items(start, depth + 1, tag)
                    continue
                raise FileRejected("truncated", f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) "
                                   f"has an undefined length with VR {vr!r}")
            if start + length > size:
                raise FileRejected(
                    "truncated",
                    f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) declares {length} bytes, "
                    f"{size - start} remain",
                )
            if partial and start + length > avail:
                raise NeedMore(start + length)
            if vr == b"SQ" and length:
                self.walk_items_defined(start, start + length, depth + 1)
            pos = start + length
        return pos

    def walk_items(self, pos: int, depth: int, tag: int) -> int:
        """Items of an undefined-length sequence (or encapsulated pixel fragments)."""
        if depth > self.max_depth:
            raise FileRejected("too_deep", f"sequences nested deeper than {self.max_depth}")
        buf, size = self.buf, self.size
        while True:
            if self.partial and pos + 8 > self.avail:
                raise NeedMore(pos + 8)
            if pos + 8 > size:
                raise FileRejected("truncated", "file ends inside a sequence")
            item_tag = self._tag(pos)
            length = self.len4(buf, pos + 4)[0]
            if item_tag == SEQ_END:
                return pos + 8
            if item_tag != ITEM:
                raise FileRejected("truncated", f"expected an item tag at offset {pos}")
            start = pos + 8
            if length != UNDEFINED:
                _bound(length, ITEM)
            if length == UNDEFINED:
                if tag == PIXEL_DATA:
                    raise FileRejected("truncated", "pixel data fragment of undefined length")
                pos = self.walk_dataset(start, size, depth)
                continue
            if start + length > size:
                raise FileRejected("truncated", f"item at offset {pos} declares {length} bytes, "
                                   f"{size - start} remain")
            if tag != PIXEL_DATA and length:
                self.walk_dataset(start, start + length, depth)
            pos = start + length

    def walk_items_defined(self, pos: int, end: int, depth: int) -> None:
        if depth > self.max_depth:
            raise FileRejected("too_deep", f"sequences nested deeper than {self.max_depth}")
        buf = self.buf
        while pos < end:
            if pos + 8 > end:
                raise FileRejected("truncated", f"sequence ends inside an item header at {pos}")
            item_tag = self._tag(pos)
            length = self.len4(buf, pos + 4)[0]
            if item_tag != ITEM:
                raise FileRejected("truncated", f"expected an item tag at offset {pos}")
            start = pos + 8
            if length != UNDEFINED:
                _bound(length, ITEM)
            if length == UNDEFINED:
                pos = self.walk_dataset(start, end, depth)
                continue
            if start + length > end:
                raise FileRejected("truncated", f"item at offset {pos} overruns its sequence")
            self.walk_dataset(start, start + length, depth)
            pos = start + length
