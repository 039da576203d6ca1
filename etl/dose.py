"""CT Radiation Dose SR (TID 10011) content to rows: a pure function, JSON in, rows out.

``events(header)`` takes the DICOM JSON of one instance (PS3.18 F.2, the
``dicom_json`` column of ``instances``) and returns one row per CT irradiation
event (each ``CT Acquisition`` container): acquisition protocol, target
region, acquisition type, irradiation event UID, mean CTDIvol, DLP and the
CTDIw phantom type, plus the report's accumulated DLP (``CT Dose Length
Product Total``). It reads only coded concepts, numeric values and UIDs (text
only for the protocol), so it works the same on identified and research lakes.

Anything that is not a CT dose report gives no rows; a report with a value
missing or unreadable gives that value as None, never an exception.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

#: SOP classes that can carry a TID 10011 report
DOSE_SR_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
)

# DICOM JSON tags
CONTENT_SEQUENCE = "0040A730"
CONCEPT_NAME = "0040A043"
CONCEPT_CODE = "0040A168"
MEASURED_VALUE = "0040A300"
NUMERIC_VALUE = "0040A30A"
UNITS = "004008EA"
TEXT_VALUE = "0040A160"
UID_VALUE = "0040A124"
CODE_VALUE = "00080100"
CODING_SCHEME = "00080102"
CODE_MEANING = "00080104"

# concepts (DCM scheme)
XRAY_DOSE_REPORT = "113701"
ACCUMULATED = "113811"  # CT Accumulated Dose Data
DLP_TOTAL = "113813"  # CT Dose Length Product Total
ACQUISITION = "113819"  # CT Acquisition
PROTOCOL = "125203"  # Acquisition Protocol
TARGET_REGION = "123014"
ACQUISITION_TYPE = "113820"
EVENT_UID = "113769"  # Irradiation Event UID
CT_DOSE = "113829"
CTDIVOL = "113830"  # Mean CTDIvol
PHANTOM = "113835"  # CTDIw Phantom Type
DLP = "113838"

#: the keys of every row ``events`` returns (the dose_events columns it fills)
FIELDS = ("event_index", "IrradiationEventUID", "acquisition_protocol", "target_region",
          "acquisition_type", "phantom_type", "CTDIvol", "DLP", "accumulated_DLP")


def is_ct_dose_report(header: dict[str, Any]) -> bool:
    """True when the document title is X-Ray Radiation Dose Report and it has CT content."""
    if _concept(header) != XRAY_DOSE_REPORT:
        return False
    return any(_concept(item) == ACQUISITION or _concept(item) == ACCUMULATED
               for item in _children(header))


def events(header: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per CT Acquisition of a TID 10011 report (keys: :data:`FIELDS`)."""
    if not isinstance(header, dict) or _concept(header) != XRAY_DOSE_REPORT:
        return []
    items = [(_concept(item), item) for item in _children(header)]
    if not any(c in (ACQUISITION, ACCUMULATED) for c, _ in items):
        return []
    accumulated = None
    for concept, item in items:
        if concept == ACCUMULATED:  # the last one counts
            accumulated = _measured(_index(item).get(DLP_TOTAL))
    rows: list[dict[str, Any]] = []
    for concept, item in items:
        if concept != ACQUISITION:
            continue
        # each item's children by concept, looked up once (the first of a concept counts)
        first = _index(item)
        dose = _index(first.get(CT_DOSE, {}))
        phantom = _coded(dose.get(PHANTOM))
        region = _coded(first.get(TARGET_REGION))
        acq_type = _coded(first.get(ACQUISITION_TYPE))
        event_uid, protocol = first.get(EVENT_UID), first.get(PROTOCOL)
        rows.append({
            "event_index": len(rows) + 1,
            "IrradiationEventUID": None if event_uid is None
            else _text(_values(event_uid, UID_VALUE)),
            "acquisition_protocol": None if protocol is None
            else _text(_values(protocol, TEXT_VALUE)),
            "target_region": region[2] if region else None,
            "acquisition_type": acq_type[2] if acq_type else None,
            "phantom_type": phantom[2] if phantom else None,
            "CTDIvol": _measured(dose.get(CTDIVOL)),
            "DLP": _measured(dose.get(DLP)),
            "accumulated_DLP": accumulated,
        })
    return rows


def _index(item: Any) -> dict[str, dict[str, Any]]:
    """The children of ``item`` by concept: the first child of each concept."""
    first: dict[str, dict[str, Any]] = {}
    for child in _children(item):
        concept = _concept(child)
        if concept is not None and concept not in first:
            first[concept] = child
    return first


def _coded(child: dict[str, Any] | None) -> tuple[str, str | None, str | None] | None:
    """The coded value of a CODE content item (None: no item)."""
    return None if child is None else _code(child, CONCEPT_CODE)


def _measured(child: dict[str, Any] | None) -> float | None:
    """The number of a NUM content item (None: no item, or no readable number)."""
    if child is None:
        return None
    measured = _values(child, MEASURED_VALUE)
    if not measured:
        return None
    return _number(_values(measured[0], NUMERIC_VALUE))


# --- DICOM JSON helpers -------------------------------------------------------

def _values(obj: Any, tag: str) -> list[Any]:
    if not isinstance(obj, dict):
        return []
    element = obj.get(tag)
    if not isinstance(element, dict):
        return []
    value = element.get("Value")
    return value if isinstance(value, list) else []


def _children(item: Any) -> Iterator[dict[str, Any]]:
    for child in _values(item, CONTENT_SEQUENCE):
        if isinstance(child, dict):
            yield child


def _code(item: Any, tag: str) -> tuple[str, str | None, str | None] | None:
    """(CodeValue, CodingSchemeDesignator, CodeMeaning) of the first item of a code sequence."""
    seq = _values(item, tag)
    if not seq or not isinstance(seq[0], dict):
        return None
    value = _text(_values(seq[0], CODE_VALUE))
    if value is None:
        return None
    return value, _text(_values(seq[0], CODING_SCHEME)), _text(_values(seq[0], CODE_MEANING))


def _concept(item: Any) -> str | None:
    """The CodeValue of the item's concept name (what :func:`_code` gives first)."""
    seq = _values(item, CONCEPT_NAME)
    if not seq or not isinstance(seq[0], dict):
        return None
    return _text(_values(seq[0], CODE_VALUE))


def _text(values: list[Any]) -> str | None:
    if not values or values[0] is None:
        return None
    text = str(values[0]).strip()
    return text or None


def _number(values: list[Any]) -> float | None:
    if not values or values[0] is None or isinstance(values[0], bool):
        return None
    try:
        number = float(values[0])
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
