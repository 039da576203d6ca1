"""A batch of files in, one Arrow table out, column by column.

:func:`etl.extract.extract_batch` reads a batch file by file: each file's header is
walked, decoded, filtered and converted element by element in Python, then written
as JSON. Yet the files of a series repeat most of their elements byte for byte.
:func:`read_batch` therefore

1. reads every file's first bytes (with whole-file checksums, all of them, hashed as
   they are read: only the first bytes are kept);
2. walks the element headers of the whole batch in compiled code
   (:mod:`etl.batchwalk`);
3. gathers the batch's elements as one Arrow binary column (each element's bytes,
   prefixed by its encoding) and dictionary-encodes it: each *distinct* element is
   decoded once (:mod:`etl.rawjson`'s decoding, its JSON text written by orjson, its
   typed column value by :mod:`etl.record`), and remembered across batches;
4. in research lakes, de-identifies each distinct element once per patient context
   with the policy's own filter (:meth:`lakehouse.deid.Policy._filter`);
5. assembles the batch's columns with Arrow: each file's DICOM JSON text is its
   elements' JSON texts joined, each typed column a ``take`` of the distinct values.

Every file the walk does not call clean, and every file with an element whose
decoding is not plain (a value pydicom must decode, a ``null`` in the JSON text, an
ISO 2022 character set, a private attribute under a private allow-list, ...), is read
down the per-file path (:func:`etl.extract.read_one`), which decides exactly as it
always did. The rows are the same either way: ``tests/etl/test_batchread.py``
compares every column of every row with the per-file path over the whole test corpus.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from etl import batchwalk, onewalk, rawjson
from etl.config import IngestConfig
from etl.discover import FoundFile
from etl.headers import (
    _AGE,
    _BIRTH,
    DICOMDIR_SOP_CLASS,
    DIRECTORY_RECORD_SEQUENCE,
    HEAD_BYTES,
    UID_TAGS,
    _read_rest,
)
from etl.headers import _STUDY_DATE as _STUDY_DATE_TAG
from etl.headers import _first as header_first
from etl.quality import valid_uid
from etl.record import _BY_TAG, _NAMES, age_years, column_value, parse_date
from lakehouse import deid
from lakehouse.deid import Policy
from lakehouse.privacy import fingerprint

log = logging.getLogger(__name__)

_CHARSET_TAG = 0x00080005
_DIRECTORY_RECORDS = int(DIRECTORY_RECORD_SEQUENCE, 16)
#: JSON keys by tag, and VR texts by their 16-bit code
_KEYS: dict[int, str] = {}
_VR_TEXT = {vr[0] | (vr[1] << 8): text for vr, text in rawjson._VR_TEXT.items()}
#: the columns whose values the ingest needs from every file
_COL = {name: i for i, name in enumerate(_NAMES)}
_UID_COLS = {keyword: _COL[keyword] for keyword in UID_TAGS}
_UID_COL_SET = frozenset(_UID_COLS.values())
_AGE_COLS = (_COL["PatientAge"], _COL["PatientBirthDate"], _COL["StudyDate"])
_STUDY_DATE = _COL["StudyDate"]

#: Distinct elements a process remembers before it starts over (bounds its memory).
MEMO_ENTRIES = 1 << 15


class _Unit:
    """One distinct element (its bytes, in one encoding) decoded: what a file with it
    gets in its JSON text and in its column."""

    __slots__ = ("col", "elem", "first", "fragment", "good", "key", "kind", "mkey", "ok",
                 "plain", "tokens", "typed", "uid")

    def __init__(self, key: str, elem: dict | None, fragment: bytes | None):
        self.key = key
        #: its DICOM JSON element (None: left out as bulk data)
        self.elem = elem
        #: its ``"GGGGEEEE":{...}`` text (None: the file goes down the per-file path)
        self.fragment = fragment
        #: False when a file with it must go down the per-file path
        self.plain = fragment is not None or elem is None
        #: its column (schema order; -1: none, or no values), its typed value and whether
        #: that is valid (``_PENDING`` until a file's column needs it: :func:`_resolve`)
        self.col = -1
        self.typed: Any = None
        self.ok = True
        #: the first value's text (``headers._first``), for the required UIDs
        self.first: str | None = None
        #: what the de-identification filter does with it (``_kind``; -1: not yet known)
        self.kind = -1
        #: its key in ``_Memos.units``
        self.mkey = b""
        #: a required UID's column with a valid first value (set by :func:`_remember`)
        self.good = False
        #: the words of its text values (cleaned free text: :func:`_patient_part`)
        self.tokens: frozenset[str] | None = None
        #: its one value, when it is a UI element of one plain UID (:func:`_uid_unit`)
        self.uid: str | None = None


class _Memos(threading.local):
    """What the batches of one thread remember (a thread's own: the ``threads``
    scheduler runs batches side by side in one process)."""

    def __init__(self) -> None:
        #: ``{class byte + element bytes: _Unit}``
        self.units: dict[bytes, _Unit] = {}
        #: ``{(explicit, codec, bulk, max_depth): class byte}``: everything an element's
        #: decoding depends on besides its bytes (the first byte of its memo key); the
        #: codec is a Python codec name, or a tuple of them for ISO 2022 code extensions
        self.classes: dict[tuple, int] = {}
        #: the same, by class byte
        self.by_byte: list[tuple] = []
        #: ``{(key fingerprint, unit key[, what of the patient it depends on]): (filtered
        #: unit or None, its id pairs)}`` (research lakes; :func:`_patient_part`)
        self.filtered: dict[tuple, tuple[_Unit | None, tuple]] = {}
        #: ``{(key fingerprint, unit key of each context element): patient context}``
        self.contexts: dict[tuple, deid.PatientContext] = {}

    def clear(self) -> None:
        self.units.clear()
        self.classes.clear()
        self.by_byte.clear()
        self.filtered.clear()
        self.contexts.clear()

    def cls(self, explicit: bool, codec: str | tuple[str, ...], bulk: int,
            max_depth: int) -> int | None:
        """The class byte of an encoding and codec (None when a byte has none left)."""
        key = (explicit, codec, bulk, max_depth)
        cls = self.classes.get(key)
        if cls is None:
            if len(self.by_byte) >= 256:
                return None
            cls = self.classes[key] = len(self.by_byte)
            self.by_byte.append(key)
        return cls


_MEMOS = _Memos()


def clear_memos() -> None:
    """Forget the distinct elements this thread decoded and filtered (a cold start)."""
    _MEMOS.clear()


#: The first read of a file's header: most headers end well within it (a CT slice's
#: Pixel Data starts 1.5-6 KB in). A file whose Pixel Data tag is not in it is read on
#: to ``HEAD_BYTES`` (:func:`head_of`). Against a first read of ``HEAD_BYTES`` (32 KB), a
#: worker spends 5-10 us less CPU per CT slice (of about 50): the kernel's copy into the
#: buffer, and the batch buffer's copy of it.
FIRST_BYTES = 8 * 1024
#: Pixel Data's tag as the batch walk reads it (little endian), and the bytes of the
#: element header that follow its tag (explicit VR, a 4-byte length)
_PIXEL_TAG = b"\xe0\x7f\x10\x00"
_AFTER_TAG = 8


def _pixels_seen(buf: bytes) -> bool:
    """Whether Pixel Data's tag, and the rest of its element header, are in the first
    ``FIRST_BYTES`` of ``buf``: the header then ends there. Seen within a value instead
    (its bytes by chance), the walk finds it needs more and says so (``MORE``): the file
    goes to the per-file path, which reads on as far as it needs."""
    return buf.find(_PIXEL_TAG, 0, FIRST_BYTES - _AFTER_TAG) >= 0


def head_of(data: bytes) -> bytes:
    """The first bytes of a file (``data``, all of them or at least ``HEAD_BYTES``) that
    the batch path walks: ``FIRST_BYTES``, or ``HEAD_BYTES`` when Pixel Data is not
    seen in those (:func:`_pixels_seen`). :func:`read_batch` reads the same bytes."""
    return data[:FIRST_BYTES] if _pixels_seen(data) else data[:HEAD_BYTES]


def read_batch(files: Sequence[FoundFile], config: IngestConfig, run_id: str,
               policy: Policy | None, schema: pa.Schema) -> tuple[list[int], pa.Table]:
    """The rows (``schema``: ``etl.extract.BATCH_SCHEMA``) of the files of ``files`` the
    batch path reads, and their positions in ``files``; the other files are left to the
    per-file path (their rows are not here)."""
    full = config.checksum == "full"
    bufs: list[bytes] = []
    digests: list[str] = []  # whole-file checksums: each file's, taken as it is read
    sizes: list[int] = []
    index: list[int] = []  # the files read here
    for i, f in enumerate(files):
        if f.error is not None:
            continue
        try:
            fd = os.open(f.path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                if full:
                    buf = _read_rest(fd, size)
                    size = len(buf)
                    digests.append(hashlib.sha256(buf).hexdigest())
                    buf = head_of(buf)
                else:
                    buf = os.read(fd, FIRST_BYTES)
                    if len(buf) == FIRST_BYTES and size > FIRST_BYTES \
                            and not _pixels_seen(buf):
                        buf += os.read(fd, HEAD_BYTES - FIRST_BYTES)
            finally:
                os.close(fd)
        except OSError:
            continue  # the per-file path says what went wrong
        bufs.append(buf)
        sizes.append(size)
        index.append(i)
    if not bufs:
        return [], schema.empty_table()
    return _fast_rows(files, index, bufs, digests if full else None, sizes, config, run_id,
                      policy, schema)


def _fast_rows(files, index, bufs, whole_digests, sizes, config, run_id, policy,
               schema: pa.Schema) -> tuple[list[int], pa.Table]:
    """(the positions in ``files`` of the files the batch path reads, their rows)."""
    memos = _MEMOS
    if len(memos.by_byte) > 128:  # between batches: every class byte may be given anew
        memos.clear()
    w = batchwalk.walk(bufs, sizes)
    nb = len(bufs)
    ok = w.status == batchwalk.CLEAN
    for j in np.flatnonzero(ok).tolist():
        path = files[index[j]].path
        if (path[-8:].upper() == "DICOMDIR" and os.path.basename(path).upper() == "DICOMDIR") \
                or w.media[j] == DICOMDIR_SOP_CLASS:
            ok[j] = False
    counts = np.diff(w.first)
    file_of = np.repeat(np.arange(nb), counts)
    # a directory record sequence makes a file a DICOMDIR, whatever its name and class
    ok[file_of[w.tag == _DIRECTORY_RECORDS]] = False
    bulk = (config.bulk_data_threshold // 4) * 3
    # --- each element's class: its encoding and character set, then its memo key
    charset_at = np.full(nb, np.iinfo(np.int64).max, dtype=np.int64)
    depth = config.max_depth
    default = {True: memos.cls(True, "latin_1", bulk, depth) or 0,
               False: memos.cls(False, "latin_1", bulk, depth) or 0}
    cls_of_file = np.where(w.explicit, default[True], default[False]).astype(np.uint8)
    for e in np.flatnonzero(w.tag == _CHARSET_TAG).tolist():
        j = int(file_of[e])
        raw = w.data[w.start[e]:w.stop[e]].tobytes()
        try:
            codec = rawjson._Reader(b"", True, bulk).charset(raw)
        except Exception:
            ok[j] = False
            continue
        cls = memos.cls(bool(w.explicit[j]),
                        codec if isinstance(codec, str) else tuple(codec), bulk, depth)
        if cls is None:
            ok[j] = False
            continue
        cls_of_file[j] = cls
        charset_at[j] = e
    el_cls = cls_of_file[file_of]
    before = np.arange(len(file_of)) < charset_at[file_of]
    if before.any():
        el_cls = el_cls.copy()
        el_cls[before] = np.where(w.explicit[file_of[before]], default[True], default[False])
    codes, rep = _distinct(w.data, w.at, w.stop, el_cls)
    raw = w.raw
    distinct = [_PREFIX[c] + raw[a:b] for c, a, b in
                zip(el_cls[rep].tolist(), w.at[rep].tolist(), w.stop[rep].tolist(), strict=True)]
    if len(memos.units) + len(distinct) > MEMO_ENTRIES:
        memos.units.clear()
    units: list[_Unit] = []
    for u, key in enumerate(distinct):
        unit = memos.units.get(key)
        if unit is None:
            e = int(rep[u])
            tag = int(w.tag[e])
            unit = _decode(key, memos.by_byte[key[0]], tag, int(w.vr[e]),
                           int(w.start[e] - w.at[e]))
            # a SOPInstanceUID is one file's own: never met again, not remembered
            remembered = tag != _SOP_INSTANCE_TAG
            _remember(unit, key if remembered else b"")
            if remembered:
                memos.units[key] = unit
        units.append(unit)
    # per unit: plain, its column, a valid required UID
    nu = len(units)
    plain = np.fromiter((u.plain for u in units), dtype=np.bool_, count=nu)
    cols = np.fromiter((u.col for u in units), dtype=np.int64, count=nu)
    good = np.fromiter((u.good for u in units), dtype=np.bool_, count=nu)
    if not plain.all():
        ok[np.unique(file_of[~plain[codes]])] = False
    # --- the required UIDs, present and valid, as the per-file path checks them
    el_cols = cols[codes]
    el_good = good[codes]
    for c in _UID_COLS.values():
        has = np.zeros(nb, dtype=np.bool_)
        has[file_of[(el_cols == c) & el_good]] = True
        ok &= has
    # --- research lakes: each distinct element de-identified once per patient context
    id_pairs: _IdPairs | None = None
    uid_units = units
    if policy is not None:
        cand = ok[file_of]
        bad, final, units, id_pairs = _deidentify(units, w.tag, codes, file_of, cand, nb,
                                                  policy)
        ok &= ~bad
        keep_el = ok[file_of] & (final >= 0)
        f_codes = final[keep_el]
    else:
        keep_el = ok[file_of]
        f_codes = codes[keep_el]
    fast = np.flatnonzero(ok)
    if not len(fast):
        return [], schema.empty_table()
    cols = np.fromiter((u.col for u in units), dtype=np.int64, count=len(units))
    rank = np.cumsum(ok) - 1  # a fast file's row
    f_row = rank[file_of[keep_el]]
    nf = len(fast)
    matrix = np.full((nf, len(_NAMES)), -1, dtype=np.int64)
    has_col = cols[f_codes] >= 0
    matrix[f_row[has_col], cols[f_codes][has_col]] = f_codes[has_col]
    used = np.unique(matrix[matrix >= 0])
    _resolve(units, used)
    columns: dict[str, pa.Array] = {}
    column_arrays = _typed_columns(units, cols, used, matrix, schema)
    columns.update(column_arrays)
    # the required UIDs: their first value's text, as the per-file path sets them
    for keyword, c in _UID_COLS.items():
        firsts = [units[u].first if u >= 0 else None for u in matrix[:, c].tolist()]
        columns[keyword] = pa.array(firsts, pa.string())
    invalid = _invalid(units, used, matrix)
    columns["invalid_attributes"] = pa.array(invalid, schema.field(
        "invalid_attributes").type)
    # patient_age_years and study_year, from the typed values
    ages = []
    memo: dict[tuple, Any] = {}
    for a, b, s in matrix[:, _AGE_COLS].tolist():
        got = memo.get((a, b, s))
        if got is None and (a, b, s) not in memo:
            got = memo[(a, b, s)] = age_years(*(_value(units, x) for x in (a, b, s)))
        ages.append(got)
    if policy is not None:  # the age of the original header, capped at 90
        ages = _original_ages(uid_units, w.tag, codes, file_of, ok)
        columns["SOPClassUID"] = pa.array(
            [None if u < 0 else uid_units[u].first for u in
             _by_tag(w.tag, codes, file_of, ok, (_SOP_CLASS_TAG,))[:, 0].tolist()], pa.string())
    columns["patient_age_years"] = pa.array(ages, pa.float64())
    years = [None if (d := _value(units, x)) is None else d.year
             for x in matrix[:, _STUDY_DATE].tolist()]
    columns["study_year"] = pa.array(years, pa.int32())
    columns["dicom_json"] = _json_texts(units, f_codes, f_row, nf)
    columns["TransferSyntaxUID"] = pa.array([w.transfer_syntax[j] for j in fast.tolist()],
                                            pa.string())
    id_type = schema.field("id_map").type
    columns["id_map"] = pa.nulls(nf, id_type) if id_pairs is None else \
        id_pairs.column(ok, id_type)
    # --- the file's own columns
    positions = [index[j] for j in fast.tolist()]
    header_end = w.header_end[fast].tolist()
    digests, covered = [], []
    for j, end in zip(fast.tolist(), header_end, strict=True):
        if whole_digests is not None:
            covered.append(sizes[j])
            digests.append(whole_digests[j])
        else:
            covered.append(end)
            digests.append(hashlib.sha256(memoryview(bufs[j])[:end]).hexdigest())
    chosen = [files[i] for i in positions]
    columns["path"] = pa.array([f.path for f in chosen], pa.string())
    columns["mtime_ns"] = pa.array([f.mtime_ns for f in chosen], pa.int64())
    columns["status"] = pa.array(["ok"] * nf, pa.string())
    columns["reason"] = pa.nulls(nf, pa.string())
    columns["message"] = pa.nulls(nf, pa.string())
    columns["file_size"] = pa.array([sizes[j] for j in fast.tolist()], pa.int64())
    columns["file_sha256"] = pa.array(digests if policy is None else
                                      [policy.p.file_digest(d) for d in digests], pa.string())
    columns["source_sha256"] = pa.array(digests, pa.string())
    columns["ingest_run_id"] = pa.array([run_id] * nf, pa.string())
    columns["checksum_bytes"] = pa.array(covered, pa.int64())
    table = pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)
    return positions, table


def _typed_columns(units: list[_Unit], all_cols: np.ndarray, used: np.ndarray,
                   matrix: np.ndarray, schema: pa.Schema) -> dict[str, pa.Array]:
    """Each header column: the typed values of its distinct elements that the batch's
    files use (``used``: resolved), taken per file."""
    out = {}
    cols = np.full(len(units), -1, dtype=np.int64)
    cols[used] = all_cols[used]
    order = np.argsort(cols, kind="stable")
    bounds = np.searchsorted(cols[order], np.arange(len(_NAMES) + 1))
    slot = np.empty(len(units), dtype=np.int64)
    slot[order] = np.arange(len(units)) - bounds[np.clip(cols[order], 0, None)]
    for c, name in enumerate(_NAMES):
        typ = schema.field(name).type
        members = order[bounds[c]:bounds[c + 1]]
        idx = matrix[:, c]
        present = idx >= 0
        if not len(members) or not present.any():
            out[name] = pa.nulls(len(idx), typ)
            continue
        values = pa.array([unit.typed if (unit := units[u]).ok else None
                           for u in members.tolist()], typ)
        where = slot[np.where(present, idx, 0)]
        out[name] = values.take(pa.array(where, mask=~present))
    return out


def _value(units: list[_Unit], u: int) -> Any:
    """The column value a file gets from unit ``u`` (-1: none): None when invalid."""
    if u < 0:
        return None
    unit = units[u]
    return unit.typed if unit.ok and unit.typed is not _PENDING else None


def _invalid(units: list[_Unit], used: np.ndarray,
             matrix: np.ndarray) -> list[list[str] | None]:
    """Each file's columns whose value is invalid (None: none is)."""
    bad = np.zeros(len(units), dtype=np.bool_)
    bad[used] = [not units[u].ok for u in used.tolist()]
    # (units no file uses here may be pending: their flag is never read)
    flags = (matrix >= 0) & bad[np.where(matrix >= 0, matrix, 0)]
    out: list[list[str] | None] = [None] * len(matrix)
    for row in np.flatnonzero(flags.any(axis=1)).tolist():
        out[row] = [_NAMES[c] for c in np.flatnonzero(flags[row]).tolist()]
    return out


def _json_texts(units: list[_Unit], codes: np.ndarray, rows: np.ndarray, nf: int) -> pa.Array:
    """Each file's DICOM JSON text: ``{`` + its elements' texts joined by commas + ``}``."""
    # the units the files use (in research lakes, about half are originals replaced by
    # their filtered units), numbered anew
    used = np.zeros(len(units), dtype=np.bool_)
    used[codes] = True
    members = [units[u] for u in np.flatnonzero(used).tolist()]
    fragments = pa.array([u.fragment if u.elem is not None else None for u in members],
                         pa.binary())
    codes = (np.cumsum(used) - 1)[codes]
    kept = np.fromiter((u.elem is not None for u in members), dtype=np.bool_,
                       count=len(members))[codes]
    codes, rows = codes[kept], rows[kept]
    offsets = np.zeros(nf + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=nf), out=offsets[1:])
    lists = pa.ListArray.from_arrays(pa.array(offsets), fragments.take(pa.array(codes)))
    joined = pc.binary_join(lists, b",")
    return pc.binary_join_element_wise(b"{", joined, b"}", b"").view(pa.string())


def _decode(key: bytes, cls: tuple, tag: int, vr_code: int, header: int) -> _Unit:
    """A distinct element (``key``: its class byte and bytes, ``cls`` what the byte
    stands for) decoded as :func:`etl.onewalk.walk` decodes it."""
    explicit, codec, bulk, max_depth = cls
    json_key = _KEYS.get(tag)
    if json_key is None:
        json_key = _KEYS[tag] = f"{tag:08X}"
    vr = _VR_TEXT.get(vr_code)
    if vr is None:
        return _Unit(json_key, {}, None)
    if vr == "SQ":
        return _sequence(key, json_key, explicit, codec, bulk, max_depth)
    if vr in _PLAIN_VRS:
        plain = _PLAIN_VALUE.fullmatch(key, 1 + header)
        if plain is not None:
            text = plain[1].decode()
            if vr == "UI":
                return _uid_unit(json_key, text)
            return _typed_unit(json_key, {"vr": vr, "Value": [text]},
                               _plain_fragment(json_key, vr, text))
    raw = key[1 + header:]
    dec = rawjson._Reader(b"", explicit, bulk)
    # ISO 2022 code extensions: pydicom's list of encodings, and its decoder
    dec.encoding = codec if isinstance(codec, str) else list(codec)
    try:
        if len(raw) > rawjson.MEMO_VALUE_BYTES or vr in rawjson._NOT_MEMOIZED \
                or not isinstance(codec, str):
            if len(raw) > bulk and vr in rawjson._BINARY:
                return _Unit(json_key, None, None)  # bulk data: left out of the JSON
            elem = dec.element(vr, raw)
        else:
            values = dec.element(vr, raw).get("Value")
            elem = {"vr": vr} if values is None else {"vr": vr, "Value": values}
        fragment = orjson.dumps({json_key: elem})[1:-1]
    except Exception:  # what the per-file walk leaves to pydicom, or orjson refuses
        return _Unit(json_key, {}, None)
    return _typed_unit(json_key, elem, None if b"null" in fragment else fragment)


def _sequence(key: bytes, json_key: str, explicit: bool, codec: str | tuple[str, ...],
              bulk: int, max_depth: int) -> _Unit:
    """A sequence, decoded and checked by the per-file walk over its element's bytes
    (nested sequences, items, character sets, depth and all): anything it would not
    decode on its own fast path sends the file down the per-file path."""
    data = key[1:]
    walker = onewalk._Walk(data, explicit, bulk, len(data), max_depth, shared=True)
    walker.dec.encoding = codec if isinstance(codec, str) else list(codec)
    try:
        header, end, closed = walker.dataset(0, len(data), 0)
        if end != len(data) or closed or list(header) != [json_key]:
            return _Unit(json_key, {}, None)
        elem = header[json_key]
        fragment = orjson.dumps({json_key: elem})[1:-1]
    except Exception:  # FileRejected, NeedMore, _Fallback, ...: the per-file path
        return _Unit(json_key, {}, None)
    return _typed_unit(json_key, elem, None if b"null" in fragment else fragment)


def _remember(unit: _Unit, key: bytes) -> None:
    """Set what the batches that meet ``unit`` again read of it: its memo key (empty: the
    unit is not remembered, nor what the filter makes of it), and whether it is a required
    UID with a valid first value."""
    unit.mkey = key
    if unit.col not in _UID_COL_SET or unit.first is None:
        unit.good = False
    elif unit.uid is not None:  # a plain UID's unit: its one value, already checked
        unit.good = unit.ok
    else:
        unit.good = valid_uid(unit.first)


#: the bytes of most UI, DA and TM elements: one value of digits and dots, padded (its
#: text is then the digits and dots, in any character set: :mod:`etl.rawjson` decodes
#: these VRs as latin-1, strips the padding and splits the values at backslashes), so
#: their DICOM JSON is written at once
_PLAIN_VALUE = re.compile(rb"([0-9.]+)[\x00 ]*")
_PLAIN_VRS = frozenset({"UI", "DA", "TM"})


def _plain_fragment(key: str, vr: str, text: str) -> bytes:
    """The JSON text of an element of one value of digits and dots (nothing to escape)."""
    return b'"%s":{"vr":"%s","Value":["%s"]}' % (key.encode(), vr.encode(), text.encode())


def _uid_unit(key: str, uid: str) -> _Unit:
    """The unit of a UI element whose one value ``uid`` is digits and dots, as
    :func:`_typed_unit` and :func:`_resolve` make it from its decoded element, without the
    JSON writer and the column's conversion (the column's value is the text itself,
    valid when it is a valid UID: :func:`etl.quality.valid_string`)."""
    unit = _typed_unit(key, {"vr": "UI", "Value": [uid]}, _plain_fragment(key, "UI", uid))
    unit.uid = uid
    if unit.typed is _PENDING:
        unit.typed, unit.ok = uid, valid_uid(uid)
    return unit


def _typed_unit(key: str, elem: dict, fragment: bytes | None) -> _Unit:
    """A unit with its column (its value converted when needed) and, for the required
    UIDs, its first value."""
    unit = _Unit(key, elem, fragment)
    col = _COLUMN_OF.get(key)
    if col is not None and elem and elem.get("Value"):
        unit.col, unit.typed = col, _PENDING
    if key in _UID_KEYS:
        unit.first = header_first({key: elem}, key)
    return unit


def _filter_one(unit: _Unit, ctx, issuer: int, units: list[_Unit],
                policy: Policy) -> tuple[_Unit | None, tuple]:
    """One element through the policy's filter, as :meth:`Policy.apply` filters it in
    a whole header: (its filtered unit, None when dropped, ``_BAD`` when the batch path
    cannot write it; the id pairs it used)."""
    mapping: list[tuple[str, str, str]] = []
    key = unit.key
    if unit.uid is not None and key in deid.remapped_uid_tags():
        # the filter's own rule for the one value (Policy._filter's UI branch)
        return _uid_unit(key, policy.research_uid(unit.uid, mapping)), tuple(mapping)
    try:
        out = policy._filter({key: unit.elem}, ctx, mapping, 0)
        if key == deid._PID_TAG:  # Policy.apply: the PatientID with its issuer
            pid = deid._first(unit.elem)
            if pid:
                if key not in out:
                    return _BAD, ()  # apply would add it at the end of the header
                iss = deid._first(units[issuer].elem) if issuer >= 0 else None
                out[key] = {"vr": "LO", "Value": [policy._identifier("PatientID", pid, iss)]}
        if not out:
            return None, tuple(mapping)
        fragment = orjson.dumps(out)[1:-1]
    except Exception:  # whatever it is, the per-file path decides
        return _BAD, ()
    if b"null" in fragment:
        return _BAD, ()
    return _typed_unit(key, out[key], fragment), tuple(mapping)


def _original_ages(units: list[_Unit], tags: np.ndarray, codes: np.ndarray,
                   file_of: np.ndarray, ok: np.ndarray) -> list[float | None]:
    """``patient_age_years`` of research lakes: from the original header's PatientAge,
    else its birth and study dates (:func:`etl.headers._deidentified_record`), at most
    90."""
    wanted = (int(_AGE, 16), int(_BIRTH, 16), int(_STUDY_DATE_TAG, 16))
    keys = (_AGE, _BIRTH, _STUDY_DATE_TAG)

    def first(u: int, k: int) -> str | None:
        if u < 0 or units[u].elem is None:
            return None
        return header_first({keys[k]: units[u].elem}, keys[k])

    memo: dict[tuple, float | None] = {}
    out = []
    for row in map(tuple, _by_tag(tags, codes, file_of, ok, wanted).tolist()):
        if row not in memo:
            age = first(row[0], 0)
            years = age_years(age, None, None)
            if years is None:
                years = age_years(age, parse_date(first(row[1], 1)),
                                  parse_date(first(row[2], 2)))
            memo[row] = None if years is None else min(years, 90.0)
        out.append(memo[row])
    return out


_UID_KEYS = frozenset(UID_TAGS.values())
#: ``{JSON key: column index}`` of the header columns
_COLUMN_OF = {tag: _COL[name] for tag, (name, *_) in _BY_TAG.items()}
_PENDING: Any = object()


def _resolve(units: list[_Unit], used: np.ndarray) -> None:
    """Convert the column values of the units ``used`` by the batch's files."""
    for u in used.tolist():
        unit = units[u]
        if unit.typed is _PENDING:
            got = column_value(unit.key, unit.elem)
            # (a unit has a column only with values, so there is always one)
            unit.typed, unit.ok = (None, True) if got is None else got[1:]


_SOP_CLASS_TAG = int(UID_TAGS["SOPClassUID"], 16)
#: SOPInstanceUID, whose element is each file's own: its units and filtered units are not
#: remembered (a memo of them would only fill up, and start over sooner)
_SOP_INSTANCE_TAG = int(UID_TAGS["SOPInstanceUID"], 16)


def _by_tag(tags: np.ndarray, codes: np.ndarray, file_of: np.ndarray, ok: np.ndarray,
            wanted: tuple[int, ...]) -> np.ndarray:
    """For each file with ``ok``, the unit of each ``wanted`` tag (-1: absent)."""
    rank = np.cumsum(ok) - 1
    out = np.full((int(ok.sum()), len(wanted)), -1, dtype=np.int64)
    for k, tag in enumerate(wanted):
        sel = (tags == tag) & ok[file_of]
        out[rank[file_of[sel]], k] = codes[sel]
    return out


# --- research lakes ---------------------------------------------------------------

#: what the policy's filter does with a distinct element (``_Unit.kind``)
_SAME, _DROP, _PRIVATE, _CALL, _CALL_CTX = range(5)
_CONTEXT_TAGS = tuple(int(t, 16) for t in deid._CONTEXT_TAGS)
_ISSUER_AT = deid._CONTEXT_TAGS.index(deid._ISSUER_TAG)
_BAD = _Unit("", {}, None)  # a filtered element the batch path does not write


def _kind(unit: _Unit) -> int:
    """What :meth:`lakehouse.deid.Policy._filter` does with this element: keeps it as it
    is, drops it, must ask about a private attribute, or must be called (with the
    patient's context when the result depends on it)."""
    key, elem = unit.key, unit.elem
    if elem is None:
        return _DROP  # bulk data, not in the header
    if key[3] in deid._ODD_HEX:
        return _PRIVATE
    action = deid.tag_actions().get(key)
    if action is None or key == deid._ISSUER_TAG:  # the filter removes the issuer last
        return _DROP
    vr = elem.get("vr")
    values = elem.get("Value")
    if action == deid._KEEP and vr in deid._PLAIN_VRS and values is not None:
        return _CALL if deid._garbled(values) else _SAME  # the filter drops what is not text
    if vr in ("SQ", "DA", "DT") or action == deid._CLEAN or key == deid._PID_TAG:
        return _CALL_CTX
    return _CALL


def _patient_part(unit: _Unit, ctx: deid.PatientContext, issuer: int,
                  units: list[_Unit]) -> tuple | None:
    """:meth:`lakehouse.deid.Policy.patient_part` of an element whose filtering depends
    on the patient (``_CALL_CTX``); the words of its text are found once per unit."""

    def words() -> frozenset[str]:
        if unit.tokens is None:
            unit.tokens = deid.text_words(unit.elem or {})
        return unit.tokens

    pid = unit.key == deid._PID_TAG and issuer >= 0  # only the PatientID reads it
    return Policy.patient_part(unit.key, unit.elem, ctx,
                               deid._first(units[issuer].elem) if pid else None, words)


def _deidentify(units: list[_Unit], tags: np.ndarray, codes: np.ndarray,
                file_of: np.ndarray, cand: np.ndarray, nb: int, policy: Policy):
    """The policy's filter over the candidate files' elements: (files left to the
    per-file path, each element's filtered unit or -1, the units, each file's id pairs)."""
    units = list(units)
    nu = len(units)
    for unit in units:
        if unit.kind < 0:
            unit.kind = _kind(unit)
    kinds = np.fromiter((u.kind for u in units), dtype=np.int8, count=nu)[codes]
    bad = np.zeros(nb, dtype=np.bool_)
    private = (kinds == _PRIVATE) & cand
    if policy.private and private.any():
        bad[file_of[private]] = True  # the private allow-list needs the file's creators
    final = np.where(kinds == _SAME, codes, -1)
    # the patient contexts, one per distinct set of context elements
    rows = np.full((nb, len(_CONTEXT_TAGS)), -1, dtype=np.int64)
    for k, tag in enumerate(_CONTEXT_TAGS):
        sel = (tags == tag) & cand
        rows[file_of[sel], k] = codes[sel]
    contexts: list[tuple[deid.PatientContext, int]] = []
    distinct_rows, ctx_of = np.unique(rows, axis=0, return_inverse=True)
    ctx_of = ctx_of.reshape(-1)
    fp = fingerprint(policy.p.key)
    known = _MEMOS.contexts  # the contexts of earlier batches, by their elements
    if len(known) > MEMO_ENTRIES:
        known.clear()
    for row in distinct_rows.tolist():
        key = (fp, *[units[u].mkey if u >= 0 else b"" for u in row])
        ctx = known.get(key)
        if ctx is None:
            mini = {deid._CONTEXT_TAGS[k]: units[u].elem for k, u in enumerate(row)
                    if u >= 0 and units[u].elem is not None}
            ctx = known[key] = policy.context(mini)
        contexts.append((ctx, row[_ISSUER_AT]))
    # each distinct (element, context) the filter must see, once
    call = ((kinds == _CALL) | (kinds == _CALL_CTX)) & cand
    where = np.flatnonzero(call)
    ctx_el = np.where(kinds[where] == _CALL_CTX, ctx_of[file_of[where]], -1)
    pair = codes[where] * (len(contexts) + 1) + (ctx_el + 1)
    pairs, inverse = np.unique(pair, return_inverse=True)
    filtered_memo = _MEMOS.filtered
    if len(filtered_memo) > MEMO_ENTRIES:
        filtered_memo.clear()
    results: list[tuple[int, tuple]] = []
    for p in pairs.tolist():
        u, c = divmod(p, len(contexts) + 1)
        unit = units[u]
        if c == 0:  # an element whose filtering does not depend on the patient
            ctx, issuer = contexts[0][0], -1
            memo_key: tuple | None = (fp, unit.mkey)
        else:
            ctx, issuer = contexts[c - 1]
            part = _patient_part(unit, ctx, issuer, units)
            memo_key = None if part is None else (fp, unit.mkey, part)
        if not unit.mkey:  # a unit not remembered (one file's own)
            memo_key = None
        got = filtered_memo.get(memo_key) if memo_key else None
        if got is None:
            got = _filter_one(unit, ctx, issuer, units, policy)
            if memo_key:
                filtered_memo[memo_key] = got
        filtered, mapping = got
        if filtered is None:
            results.append((-1, mapping))
        elif filtered is _BAD:
            results.append((-2, mapping))
        else:
            units.append(filtered)
            results.append((len(units) - 1, mapping))
    result_unit = np.fromiter((r[0] for r in results), dtype=np.int64, count=len(results))
    final[where] = result_unit[inverse.reshape(-1)]
    broken = where[final[where] == -2]
    bad[file_of[broken]] = True
    final[broken] = -1
    return bad, final, units, _IdPairs.of(results, inverse.reshape(-1), file_of[where])


class _IdPairs:
    """The original <-> pseudonym pairs of a batch's files (research lakes): each file's
    pairs in the order of its elements, each pair once, as :meth:`Policy.apply` lists them
    (``etl.headers``), kept as numbers of the batch's distinct pairs."""

    def __init__(self, pairs: list[tuple[str, str, str]], file: np.ndarray,
                 number: np.ndarray):
        #: the distinct (kind, original, pseudonym) pairs
        self.pairs = pairs
        #: each file's pairs: its index in the batch, the pair's number (file by file)
        self.file, self.number = file, number

    @classmethod
    def of(cls, results: list[tuple[int, tuple]], result_of: np.ndarray,
           file_of: np.ndarray) -> _IdPairs:
        """From the filter's ``results`` (filtered unit, pairs) and, for each filtered
        element in file order, its result and its file."""
        numbers: dict[tuple, int] = {}
        pairs: list[tuple[str, str, str]] = []
        flat: list[int] = []  # the pairs of each result, as numbers, one after the other
        lengths = np.zeros(len(results), dtype=np.int64)
        for r, (_, mapping) in enumerate(results):
            for pair in mapping:
                n = numbers.get(pair)
                if n is None:
                    n = numbers[pair] = len(pairs)
                    pairs.append(pair)
                flat.append(n)
            lengths[r] = len(mapping)
        if not pairs:
            return cls(pairs, np.zeros(0, np.int64), np.zeros(0, np.int64))
        # each element's pairs, in order: its result's run of ``flat``
        counts = lengths[result_of]
        starts = (np.cumsum(lengths) - lengths)[result_of]
        total = int(counts.sum())
        within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        number = np.asarray(flat, dtype=np.int64)[np.repeat(starts, counts) + within]
        file = np.repeat(file_of, counts)
        # each pair once per file: its first place
        _, first = np.unique(file * len(pairs) + number, return_index=True)
        first.sort()
        return cls(pairs, file[first], number[first])

    def column(self, ok: np.ndarray, typ: pa.DataType) -> pa.Array:
        """The ``id_map`` column of the files with ``ok`` (in their order)."""
        rows = int(ok.sum())
        keep = ok[self.file]
        file, number = self.file[keep], self.number[keep]
        offsets = np.zeros(rows + 1, dtype=np.int32)
        np.cumsum(np.bincount((np.cumsum(ok) - 1)[file], minlength=rows), out=offsets[1:])
        kinds, originals, pseudonyms = (zip(*self.pairs, strict=True) if self.pairs
                                        else ((), (), ()))
        values = pa.StructArray.from_arrays(
            [pa.array(kinds, pa.string()), pa.array(originals, pa.string()),
             pa.array(pseudonyms, pa.string())],
            fields=list(typ.value_type)).take(pa.array(number))
        return pa.ListArray.from_arrays(pa.array(offsets), values, type=typ)


#: the class bytes, as the first byte of a memo key
_PREFIX = [bytes([c]) for c in range(256)]


@batchwalk.jit
def _distinct_into(data, at, stop, cls, codes, reps):
    """Number the distinct (class, bytes) elements in order of first appearance: each
    element's number in ``codes``, each number's first element in ``reps``; returns how
    many there are. Open addressing over FNV-1a hashes, the bytes compared on a match."""
    n = len(at)
    size = 1
    while size < 2 * n:
        size *= 2
    mask = size - 1
    slots = np.full(size, -1, dtype=np.int64)
    hashes = np.empty(n, dtype=np.uint64)
    count = 0
    for e in range(n):
        h = np.uint64(14695981039346656037) ^ np.uint64(cls[e])
        h *= np.uint64(1099511628211)
        for k in range(at[e], stop[e]):
            h ^= np.uint64(data[k])
            h *= np.uint64(1099511628211)
        hashes[e] = h
        i = np.int64(h & np.uint64(mask))
        while True:
            r = slots[i]
            if r < 0:
                slots[i] = e
                codes[e] = count
                reps[count] = e
                count += 1
                break
            if hashes[r] == h and cls[r] == cls[e] and stop[r] - at[r] == stop[e] - at[e]:
                same = True
                d = at[r] - at[e]
                for k in range(at[e], stop[e]):
                    if data[k + d] != data[k]:
                        same = False
                        break
                if same:
                    codes[e] = codes[r]
                    break
            i = (i + 1) & mask
    return count


def _distinct(data: np.ndarray, at: np.ndarray, stop: np.ndarray,
              cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each element's number, each number's first element) of the distinct elements."""
    codes = np.empty(len(at), dtype=np.int64)
    reps = np.empty(len(at), dtype=np.int64)
    count = _distinct_into(data, at, stop, cls, codes, reps)
    return codes, reps[:count]
