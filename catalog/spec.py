"""Declarative cohort specifications, compiled to SQL with bound parameters.

A spec is a tree: leaves are criteria on one series (modality, body part,
dates, age, sex, device, slice thickness, geometry flags, segmentation,
numeric thresholds, free text), inner nodes combine them with ``all`` (AND),
``any`` (OR) and ``not``, and ``followed_by`` expresses longitudinal cohorts
("a CT chest and then a CT chest of the same patient 90 to 400 days later").

The same spec is written in YAML (``lake cohort save NAME --spec FILE``)::

    all:
      - modality: CT
      - body_part: CHEST
      - study_date: {from: 2019-01-01, to: 2022-12-31}
      - age: {min: 18}
      - slice_thickness: {max: 1.25}
      - followed_by:
          within_days: [90, 400]
          spec: {all: [{modality: CT}, {body_part: CHEST}]}

or with the Python builder, which produces the same dict::

    from catalog.spec import where
    spec = where.modality("CT") & where.body_part("CHEST") & where.age(min=18)

The result grain is always the series (one row of ``cohort_base`` per
SeriesInstanceUID). Every value is a bound parameter; the only identifiers
formatted into the SQL are column names, and those are checked against the
lake's schema first (:data:`NUMERIC_COLUMNS`).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from catalog.errors import SpecError
from lakehouse.schemas import SERIES

#: Columns of ``cohort_base`` a ``threshold`` criterion may name: the numeric
#: columns of the series table, plus the study's age.
NUMERIC_COLUMNS: frozenset[str] = frozenset(
    c.name for c in SERIES.columns if str(c.type) in ("double", "int64", "int32")
) | {"patient_age_years"}

#: Leaf criteria: name -> what its value is.
LEAVES = {
    "modality": "a modality or a list of them (CT, MR, ...)",
    "body_part": "a BodyPartExamined value or a list of them",
    "sex": "M, F or O",
    "manufacturer": "a manufacturer or a list of them (exact, case-insensitive)",
    "model": "a ManufacturerModelName or a list of them (exact, case-insensitive)",
    "study_date": "{from: YYYY-MM-DD, to: YYYY-MM-DD} (inclusive, either may be left out)",
    "age": "{min: years, max: years} (inclusive)",
    "slice_thickness": "{min: mm, max: mm} (every slice of the series within the range)",
    "geometry": "a list of flags: single_orientation, single_dimensions, even_spacing",
    "has_segmentation": "true or false: the study holds a SEG series",
    "threshold": "{column: NAME, min: x, max: y} on a numeric series column",
    "text": "a substring matched case-insensitively in the study or series description",
    "followed_by": "{within_days: [lo, hi], spec: {...}}: the same patient has a series "
                   "of another study matching spec, lo to hi days after this one",
}
COMBINATORS = ("all", "any", "not")
GEOMETRY_FLAGS = {
    "single_orientation": "s.distinct_orientations = 1",
    "single_dimensions": "s.distinct_dimensions = 1",
    "even_spacing": "s.uneven_spacing = false",
}

@dataclass
class CompiledSpec:
    """SQL selecting the cohort's series, and the parameters to bind."""

    sql: str
    params: list[Any]


def load(path: Path | str) -> dict:
    """Read a YAML (or JSON) spec file and validate it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read spec file {path}: {exc.strerror}; check the path") \
            from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where_ = f" line {mark.line + 1}" if mark is not None else ""
        raise SpecError(f"{path}{where_} is not valid YAML; fix the file") from None
    return normalize(data)


def normalize(spec: Any) -> dict:
    """Validate ``spec`` and return it in canonical form (JSON types, sorted keys).

    Dates become ISO strings so that a saved spec reads back equal.
    """
    if isinstance(spec, Spec):
        spec = spec.to_dict()
    return json.loads(json.dumps(_check(spec, "spec"), default=_jsonable, sort_keys=True))


def _jsonable(v: Any) -> str:
    if isinstance(v, dt.date):
        return v.isoformat()
    raise TypeError(f"not JSON: {v!r}")


def _check(node: Any, where_: str) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise SpecError(f"{where_}: expected a mapping with exactly one key, one of "
                        f"{', '.join((*COMBINATORS, *LEAVES))}; got {_short(node)}")
    (key, value), = node.items()
    if key in ("all", "any"):
        if not isinstance(value, list) or not value:
            raise SpecError(f"{where_}.{key}: expected a non-empty list of criteria")
        return {key: [_check(v, f"{where_}.{key}[{i}]") for i, v in enumerate(value)]}
    if key == "not":
        return {key: _check(value, f"{where_}.not")}
    if key not in LEAVES:
        raise SpecError(f"{where_}: unknown criterion {key!r}; use one of "
                        f"{', '.join((*COMBINATORS, *LEAVES))}")
    _check_leaf(key, value, f"{where_}.{key}")
    if key == "followed_by":
        value = {"within_days": list(value["within_days"]),
                 "spec": _check(value["spec"], f"{where_}.followed_by.spec")}
    return {key: value}


def _check_leaf(key: str, value: Any, where_: str) -> None:
    def fail(expected: str) -> SpecError:
        return SpecError(f"{where_}: expected {expected}, got {_short(value)}")

    if key in ("modality", "body_part", "manufacturer", "model"):
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) and v for v in values):
            raise fail(LEAVES[key])
    elif key == "sex":
        if value not in ("M", "F", "O"):
            raise fail(LEAVES[key])
    elif key == "text":
        if not isinstance(value, str) or not value:
            raise fail(LEAVES[key])
    elif key == "has_segmentation":
        if not isinstance(value, bool):
            raise fail(LEAVES[key])
    elif key == "geometry":
        flags = value if isinstance(value, list) else [value]
        if not flags or any(f not in GEOMETRY_FLAGS for f in flags):
            raise fail(LEAVES[key])
    elif key == "study_date":
        if not isinstance(value, dict) or not value or set(value) - {"from", "to"}:
            raise fail(LEAVES[key])
        for bound in value.values():
            _date(bound, where_)
    elif key in ("age", "slice_thickness"):
        _range(value, where_, LEAVES[key])
    elif key == "threshold":
        if not isinstance(value, dict) or "column" not in value:
            raise fail(LEAVES[key])
        if value["column"] not in NUMERIC_COLUMNS:
            raise SpecError(f"{where_}: unknown numeric column {value['column']!r}; use one of "
                            f"{', '.join(sorted(NUMERIC_COLUMNS))}")
        _range({k: v for k, v in value.items() if k != "column"}, where_, LEAVES[key])
    elif key == "followed_by":
        if not isinstance(value, dict) or set(value) != {"within_days", "spec"}:
            raise fail(LEAVES[key])
        days = value["within_days"]
        if (not isinstance(days, list) or len(days) != 2
                or not all(isinstance(d, int) and not isinstance(d, bool) for d in days)
                or not 0 <= days[0] <= days[1]):
            raise fail("within_days: [lo, hi] with integers 0 <= lo <= hi")


def _range(value: Any, where_: str, expected: str) -> None:
    if (not isinstance(value, dict) or not value or set(value) - {"min", "max"}
            or not all(isinstance(v, int | float) and not isinstance(v, bool)
                       for v in value.values())):
        raise SpecError(f"{where_}: expected {expected}, got {_short(value)}")
    if "min" in value and "max" in value and value["min"] > value["max"]:
        raise SpecError(f"{where_}: min {value['min']} is greater than max {value['max']}")


def iso_date(value: Any) -> dt.date:
    """A date from a date, a datetime or a ``YYYY-MM-DD`` string; ValueError otherwise."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(str(value))


def _date(value: Any, where_: str) -> dt.date:
    try:
        return iso_date(value)
    except ValueError:
        raise SpecError(f"{where_}: expected a date YYYY-MM-DD, got {_short(value)}") from None


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


# --- compilation -------------------------------------------------------------------

def compile_spec(spec: Any) -> CompiledSpec:
    """The SQL of a spec: ``SELECT s.* FROM cohort_base s WHERE ...`` with ``?`` parameters."""
    spec = normalize(spec)
    params: list[Any] = []
    cond = _sql(spec, "s", params, depth=0)
    sql = f"SELECT s.* FROM cohort_base s WHERE {cond} ORDER BY s.SeriesInstanceUID"
    return CompiledSpec(sql, params)


def _in(column: str, values: list[str], params: list[Any], upper: bool = False) -> str:
    if upper:
        params.extend(v.upper() for v in values)
        return f"upper({column}) IN ({', '.join('?' for _ in values)})"
    params.extend(values)
    return f"{column} IN ({', '.join('?' for _ in values)})"


def _sql(node: dict, a: str, params: list[Any], depth: int) -> str:
    (key, value), = node.items()
    if key == "all":
        return "(" + " AND ".join(_sql(n, a, params, depth) for n in value) + ")"
    if key == "any":
        return "(" + " OR ".join(_sql(n, a, params, depth) for n in value) + ")"
    if key == "not":
        # a NULL attribute does not match the criterion, so NOT matches it
        return f"(({_sql(value, a, params, depth)}) IS NOT TRUE)"
    values = value if isinstance(value, list) else [value]
    if key == "modality":
        return _in(f"{a}.Modality", values, params)
    if key == "body_part":
        return _in(f"{a}.BodyPartExamined", values, params, upper=True)
    if key == "manufacturer":
        return _in(f"{a}.Manufacturer", values, params, upper=True)
    if key == "model":
        return _in(f"{a}.ManufacturerModelName", values, params, upper=True)
    if key == "sex":
        params.append(value)
        return f"{a}.PatientSex = ?"
    if key == "text":
        params.extend([value, value])
        return (f"(contains(lower({a}.StudyDescription), lower(?)) "
                f"OR contains(lower({a}.SeriesDescription), lower(?)))")
    if key == "has_segmentation":
        exists = (f"EXISTS (SELECT 1 FROM cohort_base seg WHERE seg.StudyInstanceUID = "
                  f"{a}.StudyInstanceUID AND seg.Modality = 'SEG')")
        return exists if value else f"NOT {exists}"
    if key == "geometry":
        return "(" + " AND ".join(GEOMETRY_FLAGS[f].replace("s.", f"{a}.") for f in values) + ")"
    if key == "study_date":
        parts = []
        if "from" in value:
            params.append(_date(value["from"], key))
            parts.append(f"{a}.StudyDate >= ?")
        if "to" in value:
            params.append(_date(value["to"], key))
            parts.append(f"{a}.StudyDate <= ?")
        return "(" + " AND ".join(parts) + ")"
    if key == "age":
        return _between(f"{a}.patient_age_years", f"{a}.patient_age_years", value, params)
    if key == "slice_thickness":
        return _between(f"{a}.slice_thickness_min", f"{a}.slice_thickness_max", value, params)
    if key == "threshold":
        col = value["column"]
        if col not in NUMERIC_COLUMNS:  # normalize() checked it; never format an unknown name
            raise SpecError(f"unknown numeric column {col!r}")
        return _between(f'{a}."{col}"', f'{a}."{col}"', value, params)
    if key == "followed_by":
        lo, hi = value["within_days"]
        b = f"f{depth + 1}"
        inner = _sql(value["spec"], b, params, depth + 1)
        params.extend([lo, hi])
        return (f"EXISTS (SELECT 1 FROM cohort_base {b} WHERE {b}.PatientID = {a}.PatientID "
                f"AND {b}.StudyInstanceUID <> {a}.StudyInstanceUID AND {inner} "
                f"AND date_diff('day', {a}.StudyDate, {b}.StudyDate) "
                f"BETWEEN ? AND ?)")
    raise SpecError(f"unknown criterion {key!r}")  # unreachable after normalize()


def _between(low_col: str, high_col: str, value: dict, params: list[Any]) -> str:
    parts = []
    if "min" in value:
        params.append(value["min"])
        parts.append(f"{low_col} >= ?")
    if "max" in value:
        params.append(value["max"])
        parts.append(f"{high_col} <= ?")
    return "(" + " AND ".join(parts) + ")"


# --- the Python builder ------------------------------------------------------------

class Spec:
    """A spec node; combine with ``&`` (all), ``|`` (any) and ``~`` (not)."""

    def __init__(self, node: dict):
        self.node = node

    def to_dict(self) -> dict:
        return self.node

    def __and__(self, other: Spec) -> Spec:
        return Spec({"all": [*self._parts("all"), *other._parts("all")]})

    def __or__(self, other: Spec) -> Spec:
        return Spec({"any": [*self._parts("any"), *other._parts("any")]})

    def __invert__(self) -> Spec:
        return Spec({"not": self.node})

    def _parts(self, op: str) -> list[dict]:
        return list(self.node[op]) if set(self.node) == {op} else [self.node]

    def followed_by(self, later: Spec, within_days: tuple[int, int]) -> Spec:
        """This spec, and the same patient has a ``later`` series lo..hi days after."""
        return self & Spec({"followed_by": {"within_days": list(within_days),
                                            "spec": later.node}})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Spec) and normalize(self) == normalize(other)

    def __hash__(self) -> int:
        return hash(json.dumps(normalize(self), sort_keys=True))

    def __repr__(self) -> str:
        return f"Spec({self.node!r})"


def _range_node(min: float | None, max: float | None) -> dict:
    return {k: v for k, v in (("min", min), ("max", max)) if v is not None}


class _Where:
    """Builder of leaf criteria: ``where.modality("CT") & where.age(min=18)``."""

    def modality(self, *values: str) -> Spec:
        return Spec({"modality": _one_or_list(values)})

    def body_part(self, *values: str) -> Spec:
        return Spec({"body_part": _one_or_list(values)})

    def manufacturer(self, *values: str) -> Spec:
        return Spec({"manufacturer": _one_or_list(values)})

    def model(self, *values: str) -> Spec:
        return Spec({"model": _one_or_list(values)})

    def sex(self, value: str) -> Spec:
        return Spec({"sex": value})

    def text(self, value: str) -> Spec:
        return Spec({"text": value})

    def study_date(self, start: dt.date | str | None = None,
                   end: dt.date | str | None = None) -> Spec:
        node = {k: (v.isoformat() if isinstance(v, dt.date) else v)
                for k, v in (("from", start), ("to", end)) if v is not None}
        return Spec({"study_date": node})

    def age(self, min: float | None = None, max: float | None = None) -> Spec:
        return Spec({"age": _range_node(min, max)})

    def slice_thickness(self, min: float | None = None, max: float | None = None) -> Spec:
        return Spec({"slice_thickness": _range_node(min, max)})

    def geometry(self, *flags: str) -> Spec:
        return Spec({"geometry": list(flags)})

    def has_segmentation(self, value: bool = True) -> Spec:
        return Spec({"has_segmentation": value})

    def threshold(self, column: str, min: float | None = None,
                  max: float | None = None) -> Spec:
        return Spec({"threshold": {"column": column, **_range_node(min, max)}})


def _one_or_list(values: tuple[str, ...]) -> str | list[str]:
    return values[0] if len(values) == 1 else list(values)


where = _Where()

__all__ = ["NUMERIC_COLUMNS", "CompiledSpec", "Spec", "compile_spec", "load", "normalize",
           "where"]

