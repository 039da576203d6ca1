"""De-identification policy, applied to the DICOM JSON model (PS3.18 F.2).

One policy for everything that leaves the vault: the research tables are
extracted from the filtered JSON, and de-identified DICOM copies (cohort
export) are rebuilt from it, so tables and copies always agree.

Based on DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile
with the Retain Longitudinal Temporal Information with Modified Dates,
Retain Patient Characteristics, Retain Device Identity and Retain Institution
Identity options, and an allow-list instead of a block-list:

- only attributes of ``lakehouse.schemas`` (typed columns and
  ``HEADER_ALLOWLIST``) are kept, at every sequence depth; private attributes
  only when ``(creator, element)`` is in the private allow-list;
- person names (VR PN) are never kept;
- PatientID (with IssuerOfPatientID), AccessionNumber and StudyID become keyed
  pseudonyms;
- every UID that identifies an instance (not SOP classes, transfer syntaxes
  or other well-known DICOM UIDs) becomes a keyed ``2.25.`` UID;
- dates (DA, and the date part of DT) move back by the patient's offset;
  times of day are kept;
- ages above 89 become 90 (PatientAge ``090Y``); birth dates are dropped;
- descriptions and labels are kept, minus any token equal to an identifier of
  the same header (name parts, IDs, accession, birth date).
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from lakehouse.privacy import Pseudonymizer, fingerprint
from lakehouse.schemas import header_allowlist

PSEUDONYMIZED = {"PatientID": "PatientID", "AccessionNumber": "AccessionNumber",
                 "StudyID": "StudyID"}
#: UI attributes that name a kind of thing, not an instance: never remapped.
CLASS_UIDS = {"SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID",
              "TransferSyntaxUID", "CodingSchemeUID", "ContextGroupExtensionCreatorUID",
              "MappingResourceUID", "AffectedSOPClassUID", "RequestedSOPClassUID",
              "ImplementationClassUID", "RelatedGeneralSOPClassUID",
              "OriginalSpecializedSOPClassUID"}
#: Free text kept because cohorts need it, cleaned of the header's identifiers.
CLEANED_TEXT = {"StudyDescription", "SeriesDescription", "ProtocolName", "SegmentLabel",
                "ROIName", "ContentLabel", "StructureSetLabel", "SegmentAlgorithmName"}
_TOKEN = re.compile(r"[\w.\-/]+", re.UNICODE)
_NAME_SEPARATORS = re.compile(r"[\^=]")
#: last hex digits of odd numbers (the group of a private tag is odd)
_ODD_HEX = frozenset("13579BDFbdf")
_SPACES = re.compile(r"\s{2,}")
#: Characters no text VR allows (PS3.5 6.1: of the C0 controls only TAB, LF, FF, CR and
#: ESC, never DEL); NUL only as the padding at a value's end. A value holding one is not
#: text: in a damaged file it is typically an element whose length was made too long,
#: which ran on over the elements after it (names, identifiers) as raw bytes.
_NOT_TEXT = re.compile("[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")


def _tag(keyword: str) -> str:
    from pydicom.datadict import tag_for_keyword

    t = tag_for_keyword(keyword)
    if t is None:
        raise ValueError(f"unknown DICOM keyword {keyword!r} in the allow-list")
    return f"{t:08X}"


# The tags the policy names itself (PS3.6; ``tests/privacy/test_deid.py`` checks them
# against pydicom's dictionary). Written out, not looked up: the ingest's driver makes a
# policy only to hand it to its workers, and so never loads pydicom (0.2 s) for it.
_PID_TAG = "00100020"  # PatientID
_ISSUER_TAG = "00100021"  # IssuerOfPatientID
_NAME_TAG = "00100010"  # PatientName
_BIRTH_TAG = "00100030"  # PatientBirthDate
_AGE_TAG = "00101010"  # PatientAge
_STUDY_UID_TAG = "0020000D"  # StudyInstanceUID
_ACCESSION_TAG = "00080050"  # AccessionNumber
_STUDY_ID_TAG = "00200010"  # StudyID
_OTHER_IDS_TAG = "00101000"  # OtherPatientIDs
_IDENTIFIER_TAGS = {_PID_TAG: "PatientID", _ACCESSION_TAG: "AccessionNumber",
                    _STUDY_ID_TAG: "StudyID"}
#: identifiers whose words are removed from the cleaned free text
_ID_TOKEN_TAGS = (_PID_TAG, _ACCESSION_TAG, _STUDY_ID_TAG, _OTHER_IDS_TAG, _ISSUER_TAG)


@dataclass(frozen=True)
class PrivateTag:
    """A private attribute to keep: its creator string and element byte (0x00-0xFF)."""

    group: int
    creator: str
    element: int


def private_tag(item: dict) -> PrivateTag:
    """A private allow-list entry from configuration (``group``, ``creator``, ``element``)."""
    try:
        group = int(str(item["group"]), 0)
        element = int(str(item["element"]), 0)
        creator = str(item["creator"]).strip()
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"private allow-list entry {item!r} needs group, creator and "
                         f"element (e.g. 0x0019, GEMS_ACQU_01, 0x23): {exc}") from None
    if group % 2 == 0 or not 0 <= element <= 0xFF or not creator:
        raise ValueError(f"private allow-list entry {item!r}: the group must be odd and the "
                         "element the low byte (0x00-0xFF) of the private element")
    return PrivateTag(group, creator, element)


@dataclass
class PatientContext:
    """What the policy needs to know about the header's patient."""

    patient_key: str
    offset_days: int
    identifier_tokens: set[str] = field(default_factory=set)
    #: cleaned free text of this context, by original value (filled by the policy)
    cleaned: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass
class Deidentified:
    """A filtered header and the original ↔ pseudonym pairs it used (for the vault)."""

    json: dict
    mapping: list[tuple[str, str, str]]  # (kind, original, pseudonym)
    offset_days: int


#: What the filter does with an allowed public tag (after the VR decides on PN, SQ,
#: UI, DA and DT): keep it, pseudonymize it, keep it as a class UID, cap an age,
#: clean free text.
_KEEP, _PSEUDONYM, _CLASS, _AGE, _CLEAN = range(5)


def _action(tag: str, classes: set[str], cleaned: set[str]) -> int:
    if tag in _IDENTIFIER_TAGS:
        return _PSEUDONYM
    if tag in classes:
        return _CLASS
    if tag == _AGE_TAG:
        return _AGE
    if tag in cleaned:
        return _CLEAN
    return _KEEP


@functools.cache
def tag_actions() -> dict[str, int]:
    """``{tag: action}`` for every allowed public tag; a tag not in it is dropped. Made
    when a policy first filters (pydicom's dictionary names the tags of the allow-list)."""
    from pydicom.datadict import tag_for_keyword

    classes = {_tag(k) for k in CLASS_UIDS if tag_for_keyword(k) is not None}
    cleaned = {_tag(k) for k in CLEANED_TEXT if tag_for_keyword(k) is not None}
    return {tag: _action(tag, classes, cleaned)
            for tag in sorted(_tag(k) for k in header_allowlist())}


@functools.cache
def well_known_uids() -> frozenset[str]:
    """The UIDs DICOM itself defines (PS3.6 Annex A), never remapped."""
    from pydicom._uid_dict import UID_dictionary

    return frozenset(UID_dictionary)


@functools.cache
def remapped_uid_tags() -> frozenset[str]:
    """The allowed public tags whose UI values the filter remaps, each value by
    :meth:`Policy.research_uid` (all but the identifiers and the class UIDs)."""
    return frozenset(tag for tag, action in tag_actions().items()
                     if action not in (_PSEUDONYM, _CLASS) and tag[3] not in _ODD_HEX)


#: VRs an element of a ``_KEEP`` tag is kept with as it is (when it has values; else
#: as ``{"vr": VR}``): all but PN, SQ, UI, DA and DT, which the filter changes
_PLAIN_VRS = frozenset({"AE", "AS", "AT", "CS", "DS", "FD", "FL", "IS", "LO", "LT", "OB",
                        "OD", "OF", "OL", "OV", "OW", "SH", "SL", "SS", "ST", "SV", "TM", "UC",
                        "UL", "UN", "UR", "US", "UT", "UV"})
#: the header values the patient context is computed from (its cache key)
_CONTEXT_TAGS = (*_ID_TOKEN_TAGS, _NAME_TAG, _BIRTH_TAG, _STUDY_UID_TAG)
#: Entries a memo table holds before it starts over (bounds a worker's memory).
MEMO_ENTRIES = 1 << 14
#: Longer values are never memoized (rarely repeated; bounds the memos' memory).
MEMO_VALUE_CHARS = 256
#: Keys whose memos a process keeps at once (all start over when one more is needed).
MEMO_KEYS = 4
#: ``{key fingerprint: (identifiers, UIDs, dates, contexts)}``: the memos of this
#: process's policies, shared by every policy with the same key. A Dask task carries
#: its own unpickled copy of the policy, so without this each batch of a worker started
#: with empty memos and recomputed the pseudonyms, UIDs, dates and contexts of the
#: series the batch before it had already seen. Every memo is keyed by the complete
#: input of a function of the key alone (the private allow-list plays no part), so
#: copies with one key may share them.
_MEMOS: dict[str, tuple[dict, dict, dict, dict]] = {}


def clear_memos() -> None:
    """Forget what every policy of this process memoized (a cold start, for tests and
    benchmarks), existing policies included."""
    for memos in _MEMOS.values():
        for memo in memos:
            memo.clear()
    _MEMOS.clear()


class Policy:
    """The de-identification policy with a key. Picklable.

    A policy memoizes what it computes from header values (pseudonyms, remapped
    UIDs, shifted dates, patient contexts, cleaned text): the files of one series
    or study repeat most of them. Every memo is keyed by the complete input of the
    computation, so a value never leaks from one patient's file into another's;
    the memos are bounded (:data:`MEMO_ENTRIES`), not pickled, and shared by the
    policies of one process that have the same key (:data:`_MEMOS`).
    """

    def __init__(self, pseudonymizer: Pseudonymizer,
                 private_allowlist: Iterable[PrivateTag] = ()):
        self.p = pseudonymizer
        self.private = {(pt.group, pt.creator.strip(), pt.element) for pt in private_allowlist}
        self._reset_memos()

    def _reset_memos(self) -> None:
        """Take this process's memos for the policy's key (new ones if it has none)."""
        fp = fingerprint(self.p.key)
        memos = _MEMOS.get(fp)
        if memos is None:
            if len(_MEMOS) >= MEMO_KEYS:
                _MEMOS.clear()
            memos = _MEMOS[fp] = ({}, {}, {}, {})
        self._ids: dict[tuple[str, str, str | None], str] = memos[0]
        self._uids: dict[str, str] = memos[1]
        self._dates: dict[tuple[str, int], str | None] = memos[2]
        self._contexts: dict[tuple, PatientContext] = memos[3]

    def __getstate__(self) -> dict:
        return {"p": self.p, "private": self.private}

    def __setstate__(self, state: dict) -> None:
        self.p = state["p"]
        self.private = state["private"]
        self._reset_memos()

    # -- memoized keyed functions -----------------------------------------------
    def _identifier(self, kind: str, value: str, issuer: str | None = None) -> str:
        """``Pseudonymizer.patient_id(value, issuer)`` for PatientID, ``identifier`` else."""
        if len(value) > MEMO_VALUE_CHARS:
            return (self.p.patient_id(value, issuer) if kind == "PatientID"
                    else self.p.identifier(kind, value))
        key = (kind, value, issuer)
        ps = self._ids.get(key)
        if ps is None:
            ps = (self.p.patient_id(value, issuer) if kind == "PatientID"
                  else self.p.identifier(kind, value))
            if len(self._ids) >= MEMO_ENTRIES:
                self._ids.clear()
            self._ids[key] = ps
        return ps

    def research_uid(self, value: Any, mapping: list) -> Any:
        """One value of a UI element whose tag :func:`remapped_uid_tags` names, as the
        filter writes it: a keyed ``2.25.`` UID (its pair added to ``mapping``), or the
        value as it is when it is empty or a UID DICOM itself defines."""
        s = str(value) if value is not None else ""
        if not s or s in well_known_uids():
            return value
        u = self._uid(s)
        mapping.append(("UID", s, u))
        return u

    def _uid(self, uid: str) -> str:
        if len(uid) > MEMO_VALUE_CHARS:
            return self.p.uid(uid)
        u = self._uids.get(uid)
        if u is None:
            u = self.p.uid(uid)
            if len(self._uids) >= MEMO_ENTRIES:
                self._uids.clear()
            self._uids[uid] = u
        return u

    def _shift_da(self, value, offset: int):
        if value.__class__ is not str or len(value) > MEMO_VALUE_CHARS:
            return _shift_da(value, offset)
        key = (value, offset)
        try:
            return self._dates[key]
        except KeyError:
            shifted = self._dates[key] = _shift_da(value, offset)
            if len(self._dates) > MEMO_ENTRIES:
                self._dates.clear()
            return shifted

    def _shift_dt(self, value, offset: int):
        s = str(value or "").strip()
        if len(s) < 8:
            return None
        shifted = self._shift_da(s[:8], offset)
        return shifted + s[8:] if shifted else None

    # -- context -------------------------------------------------------------
    def context(self, header: dict) -> PatientContext:
        try:
            key = tuple(map(_memo_key, map(header.get, _CONTEXT_TAGS)))
            ctx = self._contexts.get(key)
        except (TypeError, ValueError):  # an unhashable or long value: no memo
            return self._context(header)
        if ctx is None:
            ctx = self._context(header)
            if len(self._contexts) >= MEMO_ENTRIES:
                self._contexts.clear()
            self._contexts[key] = ctx
        return ctx

    def _context(self, header: dict) -> PatientContext:
        pid = _first(header.get(_PID_TAG))
        issuer = _first(header.get(_ISSUER_TAG))
        patient_key = f"{issuer or ''}\x1e{pid}" if pid else ""
        offset = self.p.date_offset_days(patient_key) if pid else \
            self.p.date_offset_days("study\x1e" + (_first(header.get(_STUDY_UID_TAG)) or ""))
        tokens: set[str] = set()
        for tag in _ID_TOKEN_TAGS:
            for v in _values(header.get(tag)):
                tokens |= _tokens(str(v))
        for v in _values(header.get(_NAME_TAG)):
            if isinstance(v, dict):
                for part in v.values():
                    tokens |= _tokens(_NAME_SEPARATORS.sub(" ", str(part)))
            else:
                tokens |= _tokens(_NAME_SEPARATORS.sub(" ", str(v)))
        for v in _values(header.get(_BIRTH_TAG)):
            tokens |= _date_tokens(str(v))
        return PatientContext(patient_key, offset, {t for t in tokens if len(t) >= 2})

    # -- filtering -----------------------------------------------------------
    def apply(self, header: dict) -> Deidentified:
        ctx = self.context(header)
        mapping: list[tuple[str, str, str]] = []
        out = self._filter(header, ctx, mapping, depth=0)
        pid = _first(header.get(_PID_TAG))
        if pid:
            pseudo = self._identifier("PatientID", pid, _first(header.get(_ISSUER_TAG)))
            out[_PID_TAG] = {"vr": "LO", "Value": [pseudo]}
        return Deidentified(out, mapping, ctx.offset_days)

    def _filter(self, ds: dict, ctx: PatientContext, mapping: list, depth: int) -> dict:
        # what an element's result reads of ``ctx`` is :meth:`patient_part`'s: keep the two
        # in step (the batch reader remembers filtered elements under it)
        out: dict = {}
        creators = _private_creators(ds) if self.private else {}
        actions, plain, odd = tag_actions(), _PLAIN_VRS, _ODD_HEX
        for tag, elem in ds.items():
            if tag[3] in odd:  # an odd group: a private attribute
                if not self._private_allowed(tag, int(tag[:4], 16), creators):
                    continue
                values = elem.get("Value")
                out[tag] = {"vr": elem.get("vr")} if values and _garbled(values) else elem
                continue
            action = actions.get(tag)
            if action is None:
                continue
            vr = elem.get("vr")
            values = elem.get("Value")
            if values is not None and vr != "SQ" and _garbled(values):
                # not text, so no value of its VR: none is kept, whatever the action
                out[tag] = {"vr": vr} if vr else {}
                continue
            if action == _KEEP and vr in plain:  # most elements: kept as they are
                out[tag] = elem if values is not None else {"vr": vr}
                continue
            if vr == "PN":
                continue
            if values is None:
                out[tag] = {"vr": vr} if vr else {}
                continue
            if vr == "SQ":
                items = [self._filter(item, ctx, mapping, depth + 1) if isinstance(item, dict)
                         else item for item in values]
                out[tag] = {"vr": vr, "Value": items}
            elif action == _PSEUDONYM:
                kind = _IDENTIFIER_TAGS[tag]
                new = []
                for v in values:
                    if v in (None, ""):
                        new.append(v)
                        continue
                    s = str(v)
                    ps = self._identifier(kind, s)
                    mapping.append((kind, s, ps))
                    new.append(ps)
                out[tag] = {"vr": vr, "Value": new}
            elif vr == "UI":
                if action == _CLASS:
                    out[tag] = elem
                    continue
                out[tag] = {"vr": vr, "Value": [self.research_uid(v, mapping) for v in values]}
            elif vr == "DA":
                offset = ctx.offset_days
                out[tag] = {"vr": vr, "Value": [self._shift_da(v, offset) for v in values]}
            elif vr == "DT":
                offset = ctx.offset_days
                out[tag] = {"vr": vr, "Value": [self._shift_dt(v, offset) for v in values]}
            elif action == _AGE:
                out[tag] = {"vr": vr, "Value": [_cap_age(v) for v in values]}
            elif action == _CLEAN:
                out[tag] = {"vr": vr, "Value": [_clean_memo(v, ctx) for v in values]}
            else:
                out[tag] = elem
        out.pop(_ISSUER_TAG, None)
        return out

    @staticmethod
    def patient_part(tag: str, elem: dict | None, ctx: PatientContext, issuer: str | None,
                     words: Callable[[], frozenset[str]]) -> tuple | None:
        """What of the patient :meth:`_filter` reads when it filters the one element
        ``elem`` of ``tag`` (with :meth:`apply`'s PatientID, whose pseudonym takes the
        header's ``issuer``), following its branches: the date offset for a date, the
        issuer for the PatientID, for cleaned free text the patient's identifier words
        it contains (``words``: the words of its text values) and whether the patient
        has any; ``()`` for nothing; None for all of it (a sequence, filtered item by
        item). Two patients that agree on it get the same filtered element, so a
        filtered element may be remembered under it. Keep in step with :meth:`_filter`."""
        if not elem:
            return ()
        vr = elem.get("vr")
        if vr == "SQ":
            return None
        if tag == _PID_TAG:
            return (0, issuer)
        values = elem.get("Value")
        action = tag_actions().get(tag)
        if vr in ("DA", "DT"):
            return () if action == _PSEUDONYM or values is None else (1, ctx.offset_days)
        if action == _CLEAN and vr != "PN" and values:
            have = ctx.identifier_tokens
            return (2, bool(have), words() & have)
        return ()

    def _private_allowed(self, tag: str, group: int, creators: dict[tuple[int, int], str]) -> bool:
        if not self.private:
            return False
        elem = int(tag[4:], 16)
        if elem < 0x1000:  # private creator elements themselves: kept if one of theirs is
            creator = creators.get((group, elem))
            return any(g == group and c == creator for g, c, _ in self.private)
        creator = creators.get((group, elem >> 8))
        return creator is not None and (group, creator, elem & 0xFF) in self.private


def _memo_key(elem: dict | None):
    """A hashable form of an element's values (raises TypeError when there is none,
    ValueError when it is too long to be worth memoizing)."""
    if not elem:
        return None
    values = elem.get("Value")
    if not values:
        return ()
    if len(values) == 1:  # the common cases, as below
        value = values[0]
        if value.__class__ is str:
            if len(value) > MEMO_VALUE_CHARS:
                raise ValueError("too long to memoize")
            return (value,)
        if value.__class__ is dict:  # a person name's component groups
            items = tuple(value.items())
            for _, part in items:
                if len(str(part)) > MEMO_VALUE_CHARS:
                    raise ValueError("too long to memoize")
            return (items,)
    if len(values) > 8 or any(_long(v) for v in values):
        raise ValueError("too long to memoize")
    return tuple(tuple(v.items()) if isinstance(v, dict) else v for v in values)


def _garbled(values: list) -> bool:
    """Whether a text value among ``values`` holds a character no text VR allows. A value
    list holds one type (text, numbers or a person name's groups), so the first value
    that is not text ends the search: a ContourData of thousands of numbers is not read."""
    for v in values:
        if v.__class__ is str:
            if _NOT_TEXT.search(v) and _NOT_TEXT.search(v.rstrip("\x00")):
                return True
        elif v is not None:
            return False
    return False


def _long(value) -> bool:
    if value.__class__ is str:
        return len(value) > MEMO_VALUE_CHARS
    if isinstance(value, dict):  # a person name's component groups
        return any(len(str(part)) > MEMO_VALUE_CHARS for part in value.values())
    return False


def _clean_memo(value, ctx: PatientContext):
    if value.__class__ is not str or len(value) > MEMO_VALUE_CHARS:
        return _clean(value, ctx.identifier_tokens)
    memo = ctx.cleaned
    cleaned = memo.get(value)
    if cleaned is None:
        cleaned = _clean(value, ctx.identifier_tokens)
        if len(memo) >= MEMO_ENTRIES:
            memo.clear()
        memo[value] = cleaned
    return cleaned


# --- value helpers ----------------------------------------------------------

def _values(elem: dict | None) -> list:
    if not elem:
        return []
    return [v for v in elem.get("Value", []) or [] if v not in (None, "")]


def _first(elem: dict | None) -> str | None:
    vals = _values(elem)
    return str(vals[0]).strip() if vals else None


def _tokens(text: str) -> set[str]:
    return {t.lower() for t in _TOKEN.findall(text)}


def text_words(elem: dict) -> frozenset[str]:
    """The words of an element's text values, as cleaning matches them."""
    return frozenset().union(*(_tokens(v) for v in elem.get("Value") or ()
                               if isinstance(v, str)))


def _date_tokens(da: str) -> set[str]:
    d = _parse_da(da)
    if d is None:
        return {da.lower()}
    return {d.strftime(f) for f in ("%Y%m%d", "%Y-%m-%d", "%d.%m.%Y", "%m/%d/%Y", "%d/%m/%Y")}


def _clean(value, tokens: set[str]):
    if not isinstance(value, str) or not tokens:
        return value
    kept = _TOKEN.sub(lambda m: "" if m.group(0).lower() in tokens else m.group(0), value)
    kept = _SPACES.sub(" ", kept).strip(" ^-_,;")
    return kept


def _parse_da(s) -> dt.date | None:
    s = str(s).strip().replace(".", "")
    if len(s) != 8 or not s.isdigit():
        return None
    try:
        return dt.date(int(s[:4]), int(s[4:6]), int(s[6:8]))
    except ValueError:
        return None


def _shift_da(value, offset: int):
    d = _parse_da(value) if value else None
    if d is None:
        return None  # an unparseable date cannot be shifted: dropped, never kept as is
    try:
        return (d + dt.timedelta(days=offset)).strftime("%Y%m%d")
    except OverflowError:
        return None


def _shift_dt(value, offset: int):
    s = str(value or "").strip()
    if len(s) < 8:
        return None
    shifted = _shift_da(s[:8], offset)
    return shifted + s[8:] if shifted else None


_AGE_VALUE = re.compile(r"(\d{3})([DWMY])")


def _cap_age(value):
    s = str(value or "").strip()
    m = _AGE_VALUE.fullmatch(s)
    if not m:
        return None
    n, unit = int(m[1]), m[2]
    years = n if unit == "Y" else 0
    return "090Y" if unit == "Y" and years > 89 else s


def _private_creators(ds: dict) -> dict[tuple[int, int], str]:
    out = {}
    for tag, elem in ds.items():
        group, e = int(tag[:4], 16), int(tag[4:], 16)
        if group % 2 == 1 and 0x10 <= e <= 0xFF:
            v = _first(elem)
            if v:
                out[(group, e)] = v
    return out



# --- de-identified DICOM copies ------------------------------------------------

#: Binary attributes too large for the JSON header that a copy must still carry.
_BULK_KEPT = ("PixelData", "FloatPixelData", "DoubleFloatPixelData",
              "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
              "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
              "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData")


def deidentify_dataset(ds, policy: Policy, bulk_data_threshold: int = 1024):
    """A de-identified copy of a pydicom Dataset under the same policy as the tables.

    The header is filtered through the DICOM JSON model exactly as at ingest, so
    the copy's UIDs, pseudonyms and dates are those of the research tables; pixel
    data (and palette tables) are carried over unchanged, with the transfer
    syntax of the original. PS3.15 E.1.1: Patient Identity Removed = YES and the
    de-identification method codes are added.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import UID

    def drop(_elem) -> str:
        return ""

    header = ds.to_json_dict(bulk_data_threshold=bulk_data_threshold,
                             bulk_data_element_handler=drop, suppress_invalid_tags=True)
    header = {t: v for t, v in header.items() if "BulkDataURI" not in v}
    result = policy.apply(header)
    out = Dataset.from_json(result.json)
    for keyword in _BULK_KEPT:
        if keyword in ds:
            out[keyword] = ds[keyword]
    out.PatientIdentityRemoved = "YES"
    out.LongitudinalTemporalInformationModified = "MODIFIED"
    out.DeidentificationMethod = "imaging-lakehouse research profile (PS3.15 Annex E allow-list)"
    codes = []
    for value, meaning in (("113100", "Basic Application Confidentiality Profile"),
                           ("113106", "Retain Longitudinal Temporal Information Modified "
                                      "Dates Option"),
                           ("113107", "Retain Patient Characteristics Option"),
                           ("113109", "Retain Device Identity Option"),
                           ("113112", "Retain Institution Identity Option")):
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        codes.append(item)
    out.DeidentificationMethodCodeSequence = Sequence(codes)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = out.get("SOPClassUID", "")
    meta.MediaStorageSOPInstanceUID = out.get("SOPInstanceUID", "")
    original_meta = getattr(ds, "file_meta", None)
    ts = original_meta.get("TransferSyntaxUID") if original_meta is not None else None
    meta.TransferSyntaxUID = UID(str(ts or "1.2.840.10008.1.2.1"))
    out.file_meta = meta
    return out
