"""The element walk of a whole batch of headers, in compiled code (numba).

:mod:`etl.onewalk` walks one file's element headers in Python: about a third of a
worker's CPU per file. This module walks the headers of every file of a batch in one
call of compiled code and returns the top-level elements of all of them as flat
arrays (where each starts, where its value starts and stops, its tag and VR), for
:mod:`etl.batchread` to decode the distinct ones and assemble rows column by column.

It only says **clean** where :func:`etl.onewalk.walk` would walk the file on its fast
path to a header without any doubt, and with the same element spans: a Part 10 file
(preamble, ``DICM``, a well-formed file meta) in explicit or implicit VR little endian
or an encapsulated transfer syntax, every element header inside the buffer, ascending
tags, no sequences, no UN or unknown VRs, no item delimiters, no undefined lengths, no
length beyond the element limit, and either native Pixel Data of a defined length
ending the file or a data set that ends exactly at the end of the file. Anything else
gets a non-zero status, and :mod:`etl.batchread` reads that file down the per-file
path, which decides exactly as it always did (rejections, ``NeedMore``, sequences,
pydicom).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import numba
import numpy as np
from pydicom.datadict import DicomDictionary

from etl.safety import (
    DEFLATED_LE,
    EXPLICIT_BE,
    IMPLICIT_LE,
    LONG_VRS,
    MAX_ELEMENT,
    VALID_VRS,
    _is_transfer_syntax,
)

#: status codes: why a file is not clean (0: clean)
CLEAN = 0
NOT_PART10 = 1      # no preamble and DICM (raw data sets, not DICOM, short files)
META = 2            # the file meta is not plain (bad VR, length, truncation)
SYNTAX = 3          # no, unknown, big endian or deflated transfer syntax
MORE = 4            # the walk needs bytes beyond the buffer (a header-only read)
STRUCTURE = 5       # anything the per-file walk decides (truncation, padding, limits)
VR = 6              # UN, unknown VRs, implicit VRs not in the dictionary, private implicit
SEQUENCE = 7        # a sequence or an undefined length
ORDER = 8           # tags not in ascending order (a repeated tag)
PIXELS = 9          # Pixel Data that is not native, of a defined length, ending the file
REASONS = {NOT_PART10: "not a Part 10 file", META: "file meta", SYNTAX: "transfer syntax",
           MORE: "needs more bytes", STRUCTURE: "structure", VR: "VR", SEQUENCE: "sequence",
           ORDER: "tag order", PIXELS: "pixel data"}

_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
#: nesting of sequences and items the walk follows to find a sequence's end (deeper:
#: the per-file walk, which applies the configured limit)
_MAX_NESTING = 32


def jit(func):
    """``numba.njit`` with the compiled code cached on disk (next to the module, or, when
    the process may not write there, in a folder of the user's own: without a cache
    each worker process would compile for seconds); without the GIL."""
    try:
        return numba.njit(cache=True, nogil=True)(func)
    except RuntimeError:  # "no locator available": the module's folder is read-only
        numba.config.CACHE_DIR = os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
            "imaging-lakehouse", "numba")
        try:
            return numba.njit(cache=True, nogil=True)(func)
        except (RuntimeError, OSError):  # no writable folder at all: compiled per process
            return numba.njit(cache=False, nogil=True)(func)


@contextlib.contextmanager
def lean_cache_loads():
    """Within it, numba loads a function's compiled code from its cache without first
    installing every implementation its code generator knows.

    numba's ``Cache.load_overload`` refreshes the target context before each load. At a
    process's first load, that imports and installs all of numba's registries of typing
    and lowering implementations: 0.2-0.4 CPU-s, the largest part of numba's cost in the
    workers' fork server (``etl.preload``). Cached machine code needs none of them, only
    numba's runtime (the memory functions its arrays call), which is initialized here as
    the refresh would. A cache miss compiles as always: numba's compiler refreshes both
    contexts itself before it compiles. Leaving restores numba's own ``load_overload``, so
    later loads (in the workers forked from the server, say) refresh as before. If numba's
    internals are not as this expects, nothing is changed."""
    try:
        from numba.core.caching import Cache
        from numba.core.runtime import rtsys

        original = Cache.__dict__["load_overload"]
        load, guard = Cache._load_overload, Cache._guard_against_spurious_io_errors
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def load_overload(self, sig, target_context):
        rtsys.initialize(target_context)
        with guard(self):
            return load(self, sig, target_context)

    Cache.load_overload = load_overload
    try:
        yield
    finally:
        Cache.load_overload = original


def _vr_code(vr: bytes) -> int:
    return vr[0] | (vr[1] << 8)


#: VR classes by the VR's two bytes as a little-endian 16-bit number: 0 not a VR,
#: 1 a 2-byte length, 2 a 4-byte length, 3 UN, 4 SQ
_VR_CLASS = np.zeros(1 << 16, dtype=np.int8)
for _vr in VALID_VRS:
    _VR_CLASS[_vr_code(_vr)] = 2 if _vr in LONG_VRS else 1
_VR_CLASS[_vr_code(b"UN")] = 3
_VR_CLASS[_vr_code(b"SQ")] = 4
_OB, _OW, _SQ = _vr_code(b"OB"), _vr_code(b"OW"), _vr_code(b"SQ")


def _dictionary() -> tuple[np.ndarray, np.ndarray]:
    """Sorted tags of pydicom's dictionary and their VR codes (0 for UN, ``or`` VRs)."""
    tags = np.array(sorted(DicomDictionary), dtype=np.uint32)
    vrs = np.zeros(len(tags), dtype=np.uint16)
    for i, tag in enumerate(tags):
        vr = DicomDictionary[int(tag)][0]
        if len(vr) == 2 and vr != "UN":
            vrs[i] = _vr_code(vr.encode())
    return tags, vrs


_DICT_TAGS, _DICT_VRS = _dictionary()


@jit
def _u16(data, p):
    return np.uint32(data[p]) | (np.uint32(data[p + 1]) << np.uint32(8))


@jit
def _u32(data, p):
    return (np.uint32(data[p]) | (np.uint32(data[p + 1]) << np.uint32(8))
            | (np.uint32(data[p + 2]) << np.uint32(16)) | (np.uint32(data[p + 3]) << np.uint32(24)))


@jit
def _meta(data, offsets, status, spans, dataset):
    """The file meta of every file: DICM, then group 0002 elements in explicit VR; the
    spans of the transfer syntax and media storage SOP class values; the data set
    offset. Files that are not plain get a status."""
    vr_class = _VR_CLASS
    for f in range(len(offsets) - 1):
        base, n = offsets[f], offsets[f + 1] - offsets[f]
        spans[f, 0] = spans[f, 1] = spans[f, 2] = spans[f, 3] = -1
        if n < 132 or data[base + 128] != 68 or data[base + 129] != 73 \
                or data[base + 130] != 67 or data[base + 131] != 77:
            status[f] = NOT_PART10
            continue
        pos = 132
        while pos + 8 <= n:
            p = base + pos
            group = _u16(data, p)
            if group != 2:
                break
            elem = _u16(data, p + 2)
            cls = vr_class[_u16(data, p + 4)]
            if cls == 2 or cls == 3 or cls == 4:
                if pos + 12 > n:
                    status[f] = META
                    break
                length = np.int64(_u32(data, p + 8))
                start = pos + 12
            elif cls == 1:
                length = np.int64(_u16(data, p + 6))
                start = pos + 8
            else:
                status[f] = META
                break
            if length > MAX_ELEMENT or start + length > n:
                status[f] = META
                break
            if elem == 0x10:
                spans[f, 0] = start
                spans[f, 1] = start + length
            elif elem == 0x02:
                spans[f, 2] = start
                spans[f, 3] = start + length
            pos = start + length
        dataset[f] = pos


@jit
def _dict_vr(tags, vrs, tag):
    lo, hi = 0, len(tags)
    while lo < hi:
        mid = (lo + hi) >> 1
        if tags[mid] < tag:
            lo = mid + 1
        else:
            hi = mid
    if lo < len(tags) and tags[lo] == tag:
        return vrs[lo]
    return np.uint16(0)


@jit
def _sequence_end(data, base, pos, avail):
    """The end of the explicit VR sequence of undefined length whose value starts at
    ``pos`` (just past its delimitation item), or -1 when its structure is not plain:
    items of either length, elements of a plain VR or nested sequences inside them.
    Only the end is found here; the sequence's value is checked and decoded by the
    per-file walk (:class:`etl.onewalk._Walk`) of the element's bytes alone."""
    vr_class = _VR_CLASS
    modes = np.zeros(_MAX_NESTING, dtype=np.int8)  # 0: in a sequence, 1: in an item
    depth = 1
    while True:
        if pos + 8 > avail:
            return -1
        p = base + pos
        group = _u16(data, p)
        elem = _u16(data, p + 2)
        if modes[depth - 1] == 0:
            if group != 0xFFFE:
                return -1
            length = np.int64(_u32(data, p + 4))
            if elem == 0xE0DD:
                pos += 8
                depth -= 1
                if depth == 0:
                    return pos
            elif elem == 0xE000:
                if length == _UNDEFINED:
                    if depth >= _MAX_NESTING:
                        return -1
                    modes[depth] = 1
                    depth += 1
                    pos += 8
                elif length > MAX_ELEMENT or pos + 8 + length > avail:
                    return -1
                else:
                    pos += 8 + length
            else:
                return -1
            continue
        if group == 0xFFFE:
            if elem != 0xE00D:
                return -1
            pos += 8
            depth -= 1
            continue
        cls = vr_class[_u16(data, p + 4)]
        if cls == 1:
            length = np.int64(_u16(data, p + 6))
            start = pos + 8
        elif cls == 2 or cls == 4:
            if pos + 12 > avail:
                return -1
            length = np.int64(_u32(data, p + 8))
            start = pos + 12
        else:
            return -1
        if length == _UNDEFINED:
            if cls != 4 or depth >= _MAX_NESTING:
                return -1
            modes[depth] = 0
            depth += 1
            pos = start
            continue
        if length > MAX_ELEMENT or start + length > avail:
            return -1
        pos = start + length


@jit
def _walk(data, offsets, sizes, explicit, status, dataset, header_end, first,
          el_at, el_start, el_stop, el_tag, el_vr, dict_tags, dict_vrs):
    """The top-level elements of every file whose status is still clean. Returns the
    number of elements written, or -1 when the element arrays are too small."""
    vr_class = _VR_CLASS
    cap = len(el_at)
    e = 0
    for f in range(len(offsets) - 1):
        first[f] = e
        if status[f] != CLEAN:
            continue
        base, avail, size = offsets[f], offsets[f + 1] - offsets[f], sizes[f]
        partial = avail < size
        pos = dataset[f]
        e0 = e
        last = np.int64(-1)
        end = size
        ok = CLEAN
        pixel = np.int64(-1)
        while pos < size:
            if pos + 12 > avail and (partial or pos + 8 > size):
                ok = MORE if partial else STRUCTURE
                break
            p = base + pos
            stop = np.int64(-1)
            tag = np.int64((_u16(data, p) << np.uint32(16)) | _u16(data, p + 2))
            if tag <= last:
                ok = ORDER
                break
            last = tag
            if (tag >> 16) == 0xFFFE:
                ok = STRUCTURE
                break
            if tag == _PIXEL_DATA:
                if pos + 12 > avail:
                    ok = PIXELS
                    break
                vr = _u16(data, p + 4)
                if explicit[f] and vr != _OB and vr != _OW:
                    ok = PIXELS
                    break
                start = pos + 12 if explicit[f] else pos + 8
                length = np.int64(_u32(data, base + start - 4))
                if length > MAX_ELEMENT or start + length != size:
                    ok = PIXELS
                    break
                pixel = pos
                break
            if explicit[f]:
                vr = _u16(data, p + 4)
                cls = vr_class[vr]
                if cls == 1:
                    length = np.int64(_u16(data, p + 6))
                    start = pos + 8
                elif cls == 2:
                    if pos + 12 > size:
                        ok = STRUCTURE
                        break
                    length = np.int64(_u32(data, p + 8))
                    start = pos + 12
                elif cls == 4:  # a sequence: one element, decoded by the per-file walk
                    if pos + 12 > avail:
                        ok = MORE if partial else STRUCTURE
                        break
                    length = np.int64(_u32(data, p + 8))
                    start = pos + 12
                    if length == _UNDEFINED:
                        stop = _sequence_end(data, base, start, avail)
                        if stop < 0:
                            ok = SEQUENCE
                            break
                else:
                    ok = VR
                    break
            else:
                if (tag >> 16) & 1:
                    ok = VR
                    break
                vr = _dict_vr(dict_tags, dict_vrs, np.uint32(tag))
                if vr == 0:
                    ok = VR
                    break
                if vr == _SQ:
                    ok = SEQUENCE
                    break
                length = np.int64(_u32(data, p + 4))
                start = pos + 8
            if stop < 0:  # (an undefined-length sequence has its end already)
                if length == _UNDEFINED:
                    ok = SEQUENCE
                    break
                if length > MAX_ELEMENT:
                    ok = STRUCTURE
                    break
                stop = start + length
                if stop > size:
                    ok = STRUCTURE
                    break
                if stop > avail:
                    ok = MORE
                    break
            if e >= cap:
                return -1
            el_at[e] = base + pos
            el_start[e] = base + start
            el_stop[e] = base + stop
            el_tag[e] = tag
            el_vr[e] = vr
            e += 1
            pos = stop
        if ok == CLEAN and pixel < 0 and pos != end:
            ok = STRUCTURE
        status[f] = ok
        if ok != CLEAN:
            e = e0
            continue
        header_end[f] = pixel if pixel >= 0 else size
    first[len(offsets) - 1] = e
    return e


@dataclass
class Walked:
    """Every file's outcome and the top-level elements of the clean ones."""

    #: the batch's buffers end to end (``offsets[i]:offsets[i + 1]`` is file i's), as
    #: bytes and as an array over them
    raw: bytes
    data: np.ndarray
    offsets: np.ndarray
    #: per file: 0 (clean) or why not (the codes above)
    status: np.ndarray
    explicit: np.ndarray
    #: per file: the transfer syntax and media storage SOP class (clean files)
    transfer_syntax: list
    media: list
    #: per file: where the data set starts and the header ends (Pixel Data or the size)
    dataset: np.ndarray
    header_end: np.ndarray
    #: the elements of file i are rows ``first[i]:first[i + 1]``
    first: np.ndarray
    #: per element: offsets into ``data`` of its header, its value and its end
    at: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    tag: np.ndarray
    vr: np.ndarray


def walk(buffers: list[bytes], sizes: list[int]) -> Walked:
    """Walk the headers of ``buffers`` (each a file's first bytes, or all of them;
    ``sizes`` are the files' sizes)."""
    n = len(buffers)
    lengths = np.fromiter(map(len, buffers), dtype=np.int64, count=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    raw = b"".join(buffers)
    data = np.frombuffer(raw, dtype=np.uint8)
    status = np.zeros(n, dtype=np.int8)
    spans = np.empty((n, 4), dtype=np.int64)
    dataset = np.zeros(n, dtype=np.int64)
    _meta(data, offsets, status, spans, dataset)
    explicit = np.zeros(n, dtype=np.bool_)
    syntaxes: list[str | None] = [None] * n
    medias: list[str | None] = [None] * n
    for f in np.flatnonzero(status == CLEAN).tolist():
        ts = _text(data, spans[f, 0], spans[f, 1], offsets[f])
        kind = _syntax(ts) if ts is not None else None
        if kind is None:
            status[f] = SYNTAX
            continue
        explicit[f] = kind
        syntaxes[f] = ts
        medias[f] = _text(data, spans[f, 2], spans[f, 3], offsets[f])
    sizes_a = np.maximum(np.asarray(sizes, dtype=np.int64), lengths)
    header_end = np.zeros(n, dtype=np.int64)
    first = np.zeros(n + 1, dtype=np.int64)
    cap = 160 * n + 64  # elements; more when a batch has more (rare)
    while True:
        at, start, stop = (np.empty(cap, dtype=np.int64) for _ in range(3))
        tag = np.empty(cap, dtype=np.uint32)
        vr = np.empty(cap, dtype=np.uint16)
        st = status.copy()
        count = _walk(data, offsets, sizes_a, explicit, st, dataset, header_end, first,
                      at, start, stop, tag, vr, _DICT_TAGS, _DICT_VRS)
        if count >= 0:
            break
        cap *= 4
    return Walked(raw, data, offsets, st, explicit, syntaxes, medias, dataset, header_end,
                  first, at[:count], start[:count], stop[:count], tag[:count], vr[:count])


def _text(data: np.ndarray, start: int, stop: int, base: int) -> str | None:
    """A file meta UID value as :func:`etl.safety._walk_meta` reads it."""
    if start < 0:
        return None
    return data[base + start:base + stop].tobytes().decode("ascii", "replace").strip("\x00 ")


@functools.lru_cache(maxsize=64)
def _syntax(ts: str) -> bool | None:
    """True for explicit VR little endian data sets (the encapsulated syntaxes too),
    False for implicit VR little endian, None for what the per-file walk decides."""
    if ts in (EXPLICIT_BE, DEFLATED_LE) or not _is_transfer_syntax(ts):
        return None
    return ts != IMPLICIT_LE
