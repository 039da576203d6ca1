"""Declarative cohort specifications, compiled to SQL with bound parameters.

A spec is a tree: leaves are criteria on one series (modality, body part,
dates, age, sex, device, slice thickness, geometry flags, segmentation,
numeric thresholds, radiomics feature thresholds, free text), inner nodes
combine them with ``all`` (AND),
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
lake's schema first (:data:`NUMERIC_COLUMNS`). Feature names are checked
against the lake's ``radiomics_features`` by :func:`check_against` (which
``catalog.cohorts.save`` calls), since which features exist depends on what
``lake features`` computed.
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from catalog.errors import SpecError
from lakehouse.schemas import SERIES

if TYPE_CHECKING:
    from catalog.connect import Catalog

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
    "feature": "{name: CLASS_NAME (e.g. firstorder_Mean, wavelet-LLH_glcm_Contrast), min: x, "
               "max: y, segment: label or number, params: hash or parameter file, scope: series "
               "or study}: a radiomics feature of a segment of the series within the range",
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

#: Feature classes of ``radiomics_features.feature_class`` (the lake's extractor,
#: ``etl.radiomics.FEATURE_CLASSES``; a test keeps the two equal).
FEATURE_CLASSES = ("firstorder", "shape", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
FEATURE_KEYS = {"name", "class", "min", "max", "segment", "params", "scope"}
_FEATURE_NAME = re.compile(r"^[A-Za-z0-9]+$")
#: a pyradiomics image type prefix of feature_class: log-sigma-1-0-mm-3D, wavelet-LLH
_IMAGE_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*$")
_HASH = re.compile(r"^[0-9a-f]{64}$")


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
    return normalize(data, base=path.parent)


def normalize(spec: Any, base: Path | str | None = None) -> dict:
    """Validate ``spec`` and return it in canonical form (JSON types, sorted keys).

    Dates become ISO strings so that a saved spec reads back equal; a feature
    criterion's ``class_name`` is split into ``class`` and ``name``, and a
    parameter file it names is replaced by the file's parameter hash (read
    relative to ``base``, default the working folder), so the saved spec does not
    depend on the file.
    """
    if isinstance(spec, Spec):
        spec = spec.to_dict()
    checked = _check(spec, "spec", Path(base) if base is not None else None)
    return json.loads(json.dumps(checked, default=_jsonable, sort_keys=True))


def _jsonable(v: Any) -> str:
    if isinstance(v, dt.date):
        return v.isoformat()
    raise TypeError(f"not JSON: {v!r}")


def _check(node: Any, where_: str, base: Path | None) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise SpecError(f"{where_}: expected a mapping with exactly one key, one of "
                        f"{', '.join((*COMBINATORS, *LEAVES))}; got {_short(node)}")
    (key, value), = node.items()
    if key in ("all", "any"):
        if not isinstance(value, list) or not value:
            raise SpecError(f"{where_}.{key}: expected a non-empty list of criteria")
        return {key: [_check(v, f"{where_}.{key}[{i}]", base) for i, v in enumerate(value)]}
    if key == "not":
        return {key: _check(value, f"{where_}.not", base)}
    if key not in LEAVES:
        raise SpecError(f"{where_}: unknown criterion {key!r}; use one of "
                        f"{', '.join((*COMBINATORS, *LEAVES))}")
    if key == "feature":
        return {key: _check_feature(value, f"{where_}.feature", base)}
    _check_leaf(key, value, f"{where_}.{key}")
    if key == "followed_by":
        value = {"within_days": list(value["within_days"]),
                 "spec": _check(value["spec"], f"{where_}.followed_by.spec", base)}
    return {key: value}


def _check_feature(value: Any, where_: str, base: Path | None) -> dict:
    """The canonical feature criterion: class and name apart, params as a hash."""
    if not isinstance(value, dict) or "name" not in value or set(value) - FEATURE_KEYS:
        raise SpecError(f"{where_}: expected {LEAVES['feature']}, got {_short(value)}")
    name, cls = value["name"], value.get("class")
    if not isinstance(name, str) or (cls is not None and not isinstance(cls, str)):
        raise SpecError(f"{where_}: name and class are text, got {_short(value)}")
    if cls is None:
        cls, _, name = name.rpartition("_")
    elif name.startswith(f"{cls}_"):
        name = name[len(cls) + 1:]
    image, _, base_class = cls.rpartition("_")
    if base_class not in FEATURE_CLASSES or (image and not _IMAGE_TYPE.match(image)):
        what = f"unknown feature class {cls!r} in" if cls else "no feature class in"
        raise SpecError(f"{where_}: {what} {value['name']!r}; name a "
                        f"feature as CLASS_NAME (e.g. firstorder_Mean), on a filtered image "
                        f"IMAGETYPE_CLASS_NAME (e.g. wavelet-LLH_glcm_Contrast), with CLASS one "
                        f"of {', '.join(FEATURE_CLASSES)}")
    if not _FEATURE_NAME.match(name):
        raise SpecError(f"{where_}: {value['name']!r} is not a feature name; use CLASS_NAME as "
                        "the radiomics_wide columns are named (e.g. firstorder_Mean)")
    out: dict[str, Any] = {"class": cls, "name": name}
    bounds = {k: value[k] for k in ("min", "max") if k in value}
    if not bounds:
        raise SpecError(f"{where_}: give min, max or both (a feature threshold)")
    _range(bounds, where_, "min and max numbers")
    out.update(bounds)
    if "segment" in value:
        seg = value["segment"]
        if isinstance(seg, bool) or not ((isinstance(seg, str) and seg)
                                          or (isinstance(seg, int) and seg >= 0)):
            raise SpecError(f"{where_}.segment: expected a segment label (text) or number, "
                            f"got {_short(seg)}")
        out["segment"] = seg
    if "params" in value:
        out["params"] = _params_hash(value["params"], f"{where_}.params", base)
    scope = value.get("scope", "series")
    if scope not in ("series", "study"):
        raise SpecError(f"{where_}.scope: expected series or study, got {_short(scope)}")
    if scope == "study":
        out["scope"] = scope
    return out


def params_hash(data: Any) -> str:
    """The ``param_hash`` of radiomics parameters: SHA-256 of their canonical JSON (as the
    features job computes it from the parameter file's content)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _params_hash(value: Any, where_: str, base: Path | None) -> str:
    if isinstance(value, str) and _HASH.match(value):
        return value
    if not isinstance(value, str) or not value:
        raise SpecError(f"{where_}: expected a parameter hash (64 hex digits) or a parameter "
                        f"file, got {_short(value)}")
    path = Path(value)
    if base is not None and not path.is_absolute():
        path = base / path
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"{where_}: {value!r} is neither a parameter hash (64 hex digits) nor "
                        f"a readable parameter file ({path}: {exc.strerror}); give the "
                        "radiomics_features.param_hash or the file `lake features --params` "
                        "used") from None
    except yaml.YAMLError:
        raise SpecError(f"{where_}: the parameter file {path} is not valid YAML") from None
    if not isinstance(data, dict):
        raise SpecError(f"{where_}: the parameter file {path} is not a mapping")
    try:
        return params_hash(data)
    except (TypeError, ValueError):
        raise SpecError(f"{where_}: the parameter file {path} holds values that are not "
                        "JSON (dates, ...); it is not a radiomics parameter file") from None


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

#: the columns of ``cohort_base`` that come from ``studies`` (the rest are ``series``')
STUDY_COLUMNS = frozenset({"patient_age_years", "AccessionNumber"})


def compile_spec(spec: Any, members: bool = False) -> CompiledSpec:
    """The SQL of a spec, with ``?`` parameters.

    By default the cohort's rows: ``SELECT s.* FROM cohort_base s WHERE ...
    ORDER BY s.SeriesInstanceUID`` (every column of ``cohort_base``). With
    ``members=True`` only the matching ``SeriesInstanceUID`` values, in no
    particular order: the same series, selected from ``series`` alone, with the
    study's age as a semi-join on ``studies`` where a criterion needs it, so that
    a query which needs no study column never joins the two tables.
    """
    spec = normalize(spec)
    params: list[Any] = []
    source = "series" if members else "cohort_base"
    cond = _Compiler(params, source).sql(spec, "s", depth=0)
    if members:
        sql = f"SELECT s.SeriesInstanceUID FROM series s WHERE {cond}"
    else:
        sql = f"SELECT s.* FROM cohort_base s WHERE {cond} ORDER BY s.SeriesInstanceUID"
    return CompiledSpec(sql, params)


def _in(column: str, values: list[str], params: list[Any], upper: bool = False) -> str:
    if upper:
        params.extend(v.upper() for v in values)
        return f"upper({column}) IN ({', '.join('?' for _ in values)})"
    params.extend(values)
    return f"{column} IN ({', '.join('?' for _ in values)})"


class _Compiler:
    """Conditions on alias ``a`` of ``source`` (``cohort_base``, or ``series`` alone)."""

    def __init__(self, params: list[Any], source: str):
        self.params = params
        self.source = source

    def study(self, a: str, column: str, value: dict) -> str:
        """A range on a column of ``studies``: direct on cohort_base, a semi-join on series."""
        if self.source == "cohort_base":
            return _between(f'{a}."{column}"', f'{a}."{column}"', value, self.params)
        cond = _between(f'st."{column}"', f'st."{column}"', value, self.params)
        return f"{a}.StudyInstanceUID IN (SELECT st.StudyInstanceUID FROM studies st WHERE {cond})"

    def sql(self, node: dict, a: str, depth: int) -> str:
        params = self.params
        (key, value), = node.items()
        if key == "all":
            return "(" + " AND ".join(self.sql(n, a, depth) for n in value) + ")"
        if key == "any":
            return "(" + " OR ".join(self.sql(n, a, depth) for n in value) + ")"
        if key == "not":
            # a NULL attribute does not match the criterion, so NOT matches it
            return f"(({self.sql(value, a, depth)}) IS NOT TRUE)"
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
            exists = (f"EXISTS (SELECT 1 FROM series seg WHERE seg.StudyInstanceUID = "
                      f"{a}.StudyInstanceUID AND seg.Modality = 'SEG')")
            return exists if value else f"NOT {exists}"
        if key == "geometry":
            return "(" + " AND ".join(GEOMETRY_FLAGS[f].replace("s.", f"{a}.")
                                      for f in values) + ")"
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
            return self.study(a, "patient_age_years", value)
        if key == "slice_thickness":
            return _between(f"{a}.slice_thickness_min", f"{a}.slice_thickness_max", value,
                            params)
        if key == "threshold":
            col = value["column"]
            if col not in NUMERIC_COLUMNS:  # normalize() checked it; never format an unknown
                raise SpecError(f"unknown numeric column {col!r}")
            if col in STUDY_COLUMNS:
                return self.study(a, col, value)
            return _between(f'{a}."{col}"', f'{a}."{col}"', value, params)
        if key == "feature":
            return self.feature(a, value)
        if key == "followed_by":
            lo, hi = value["within_days"]
            b = f"f{depth + 1}"
            inner = self.sql(value["spec"], b, depth + 1)
            params.extend([lo, hi])
            return (f"EXISTS (SELECT 1 FROM {self.source} {b} WHERE {b}.PatientID = "
                    f"{a}.PatientID AND {b}.StudyInstanceUID <> {a}.StudyInstanceUID AND "
                    f"{inner} AND date_diff('day', {a}.StudyDate, {b}.StudyDate) "
                    f"BETWEEN ? AND ?)")
        raise SpecError(f"unknown criterion {key!r}")  # unreachable after normalize()

    def feature(self, a: str, value: dict) -> str:
        """Series (or studies) with a segment whose feature value is within the range.

        A NaN value passes no threshold (DuckDB orders NaN above every number)."""
        params = self.params
        params.extend([value["class"], value["name"]])
        parts = ["rf.feature_class = ?", "rf.feature_name = ?"]
        if "segment" in value:
            seg = value["segment"]
            if isinstance(seg, int):
                parts.append("rf.segment_number = ?")
                params.append(seg)
            else:
                parts.append("upper(rf.segment_label) = ?")
                params.append(seg.upper())
        if "params" in value:
            parts.append("rf.param_hash = ?")
            params.append(value["params"])
        parts.append("NOT isnan(rf.value)")
        parts.append(_between("rf.value", "rf.value", value, params)[1:-1])
        passing = ("SELECT rf.SeriesInstanceUID FROM radiomics_features rf WHERE "
                   + " AND ".join(parts))
        if value.get("scope") == "study":
            return (f"{a}.StudyInstanceUID IN (SELECT fs.StudyInstanceUID FROM series fs "
                    f"WHERE fs.SeriesInstanceUID IN ({passing}))")
        return f"{a}.SeriesInstanceUID IN ({passing})"


def _between(low_col: str, high_col: str, value: dict, params: list[Any]) -> str:
    parts = []
    if "min" in value:
        params.append(value["min"])
        parts.append(f"{low_col} >= ?")
    if "max" in value:
        params.append(value["max"])
        parts.append(f"{high_col} <= ?")
    return "(" + " AND ".join(parts) + ")"


# --- checking against a lake ---------------------------------------------------------

def features(spec: Any) -> list[dict]:
    """The feature criteria of a spec (canonical form), in the order they appear."""
    found: list[dict] = []

    def walk(node: Any) -> None:
        (key, value), = node.items()
        if key in ("all", "any"):
            for n in value:
                walk(n)
        elif key == "not":
            walk(value)
        elif key == "followed_by":
            walk(value["spec"])
        elif key == "feature":
            found.append(value)

    walk(normalize(spec))
    return found


def check_against(cat: Catalog, spec: Any) -> None:
    """Raise :class:`SpecError` when a feature criterion names a feature, segment or
    parameter set of which the catalog's snapshot has no ``radiomics_features`` row.

    Which features exist depends on what ``lake features`` computed (and with which
    parameters), so this is checked against the lake when a cohort is defined (saved),
    not when a saved one is reopened; a criterion that names nothing the lake holds
    would otherwise silently select no series.
    """
    leaves = features(spec)
    if not leaves:
        return
    sql = resources.files("catalog").joinpath("sql", "feature_inventory.sql").read_text(
        encoding="utf-8")
    rows = cat.arrow(sql).to_pylist()
    snap = cat.snapshot.number
    if not rows:
        raise SpecError(f"the spec selects on radiomics features, but radiomics_features has "
                        f"no rows at lake snapshot {snap}; run `lake features` first")
    for leaf in leaves:
        full = f"{leaf['class']}_{leaf['name']}"
        have = [r for r in rows if (r["feature_class"], r["feature_name"]) ==
                (leaf["class"], leaf["name"])]
        if not have:
            names = sorted({f"{r['feature_class']}_{r['feature_name']}" for r in rows})
            close = difflib.get_close_matches(full, names, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise SpecError(f"feature {full} is not in radiomics_features at lake snapshot "
                            f"{snap}; {hint}the lake has {len(names)} features "
                            f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); "
                            "`lake features --params FILE` computes others")
        if "segment" in leaf:
            seg = leaf["segment"]
            have = [r for r in have if (r["segment_number"] == seg if isinstance(seg, int)
                                        else (r["segment_label"] or "").upper() == seg.upper())]
            if not have:
                segments = sorted({f"{r['segment_number']} ({r['segment_label']})"
                                   for r in rows if (r["feature_class"], r["feature_name"])
                                   == (leaf["class"], leaf["name"])})
                raise SpecError(f"feature {full}: no segment {seg!r} in radiomics_features at "
                                f"lake snapshot {snap}; segments: {', '.join(segments)} "
                                "(a label is text, a number is an integer)")
        if "params" in leaf and not any(r["param_hash"] == leaf["params"] for r in have):
            hashes = sorted({r["param_hash"] for r in have})
            raise SpecError(f"feature {full}: no values computed with parameters "
                            f"{leaf['params'][:12]}... at lake snapshot {snap}; this feature "
                            f"was computed with {', '.join(h[:12] + '...' for h in hashes)} "
                            "(radiomics_features.param_hash)")


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

    def feature(self, name: str, min: float | None = None, max: float | None = None, *,
                feature_class: str | None = None, segment: str | int | None = None,
                params: str | Path | None = None, scope: str = "series") -> Spec:
        """A radiomics feature within [min, max] on a segment of the series: ``name`` as
        the radiomics_wide columns (``firstorder_Mean``), or ``feature_class`` and the
        bare name; ``segment`` a label (text) or number; ``params`` a parameter hash
        or parameter file; ``scope="study"`` selects every series of the study."""
        node: dict[str, Any] = {"name": name, **_range_node(min, max)}
        extra = {"class": feature_class, "segment": segment,
                 "params": None if params is None else str(params)}
        node.update({k: v for k, v in extra.items() if v is not None})
        if scope != "series":
            node["scope"] = scope
        return Spec({"feature": node})


def _one_or_list(values: tuple[str, ...]) -> str | list[str]:
    return values[0] if len(values) == 1 else list(values)


where = _Where()

__all__ = ["FEATURE_CLASSES", "NUMERIC_COLUMNS", "CompiledSpec", "Spec", "check_against",
           "compile_spec", "features", "load", "normalize", "params_hash", "where"]

