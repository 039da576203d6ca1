"""Quality reports: utilization, repeat exams, retakes and CT dose, parameterised.

The definitions are SQL macros in ``catalog/views/*.sql``; this module calls
them with bound parameters (dates, windows, matching keys and grouping columns
are values, never text pasted into SQL) after checking every column name
against the columns of the relation it applies to, so a typo is a clear
:class:`~catalog.errors.ReportError`, not an empty result.

Every rate has its drill-down: :func:`repeat_pairs` behind :func:`repeat_rates`,
:func:`retakes` behind :func:`retake_rates`, :func:`dose_studies` behind
:func:`dose_summary`, :func:`utilization_studies` behind :func:`utilization`.

>>> from catalog import open_lake, reports
>>> with open_lake("lake") as cat:                                   # doctest: +SKIP
...     reports.repeat_rates(cat, by=["Modality", "month"]).to_pandas()
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import math
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from catalog.connect import Catalog
from catalog.errors import QueryError, ReportError
from catalog.spec import iso_date

log = logging.getLogger(__name__)

KINDS = ("utilization", "repeats", "retakes", "dose")

#: default grouping of each report
DEFAULT_BY: dict[str, tuple[str, ...]] = {
    "utilization": ("month", "Modality"),
    "repeats": ("Modality",),
    "retakes": ("StationName",),
    "dose": ("BodyPartExamined",),
}

#: the relation whose columns a report may be grouped or filtered by
_GROUPABLE = {
    "utilization": "utilization_studies",
    "repeats": "repeat_exams",
    "retakes": "retake_studies",
    "dose": "dose_by_study",
}

DRL_COLUMNS = ("body_region", "protocol", "CTDIvol_mGy", "DLP_mGycm", "note")
DRL_SCHEMA = pa.schema([
    pa.field("body_region", pa.string()),
    pa.field("protocol", pa.string()),
    pa.field("CTDIvol_mGy", pa.float64()),
    pa.field("DLP_mGycm", pa.float64()),
    pa.field("note", pa.string()),
])


@dataclass(frozen=True)
class RepeatDefinition:
    """What counts as a repeat exam (DESIGN.md "Repeat exam (default)")."""

    #: a study repeats an earlier one at most this many calendar days before it
    window_days: int = 30
    #: columns of ``utilization_studies`` that must be equal (PatientID always is), e.g.
    #: add ``ProtocolName`` (alias ``protocol``) or ``StudyDescription`` (``description``)
    match: tuple[str, ...] = ("Modality", "BodyPartExamined")
    #: images that do not make a study an exam
    exclude_localizers: bool = True
    exclude_derived: bool = True
    exclude_secondary: bool = True
    exclude_non_image: bool = True

    def params(self) -> dict[str, object]:
        return {"window_days": self.window_days, "match": list(self.match),
                "exclude_localizers": self.exclude_localizers,
                "exclude_derived": self.exclude_derived,
                "exclude_secondary": self.exclude_secondary,
                "exclude_non_image": self.exclude_non_image}


DEFAULT_REPEATS = RepeatDefinition()

#: short names accepted as repeat-matching keys, and the column each stands for
MATCH_ALIASES = {"protocol": "ProtocolName", "description": "StudyDescription"}

_REPEAT_ARGS = ("window_days := $window_days, match := $match, "
                "exclude_localizers := $exclude_localizers, exclude_derived := $exclude_derived, "
                "exclude_secondary := $exclude_secondary, exclude_non_image := $exclude_non_image")
_RANGE_ARGS = "date_from := $date_from, date_to := $date_to"

#: the macro calls behind each function (the SQL itself is in catalog/views/*.sql)
_CALLS = {
    "utilization": f"FROM utilization_grouped($group_cols, {_RANGE_ARGS})",
    "utilization_studies": "FROM utilization_studies WHERE StudyDate IS NOT NULL AND "
                           "($date_from IS NULL OR StudyDate >= $date_from) AND "
                           "($date_to IS NULL OR StudyDate <= $date_to) "
                           "ORDER BY StudyDate, StudyTime, StudyInstanceUID",
    "workload": f"FROM workload_for({_RANGE_ARGS})",
    "repeat_exams": f"FROM repeat_exams_for({_REPEAT_ARGS})",
    "repeat_rates": f"FROM repeat_rates_for($group_cols, {_RANGE_ARGS}, {_REPEAT_ARGS})",
    "repeat_pairs": f"FROM repeat_pairs_for({_RANGE_ARGS}, {_REPEAT_ARGS})",
    "retake_rates": f"FROM retake_rates_for($group_cols, {_RANGE_ARGS})",
    "retakes": f"FROM retakes_for({_RANGE_ARGS})",
    "dose_summary": f"FROM dose_summary_for($group_cols, {_RANGE_ARGS})",
    "dose_studies": f"FROM dose_studies_for({_RANGE_ARGS})",
    "dose_vs_drl": f"FROM dose_vs_drl_for({_RANGE_ARGS})",
}


@dataclass(frozen=True)
class Filter:
    """``column = value`` on a report's rows (compared as text, e.g. month=2024-01-01)."""

    column: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Filter:
        column, sep, value = text.partition("=")
        if not sep or not column.strip():
            raise ReportError(f"filter {text!r} is not COLUMN=VALUE (e.g. Modality=CT)")
        return cls(column.strip(), value.strip())


@dataclass(frozen=True)
class ReportRequest:
    """One report, as the CLI asks for it."""

    kind: str
    by: tuple[str, ...] = ()
    date_from: dt.date | str | None = None
    date_to: dt.date | str | None = None
    #: list what is behind the figures instead of the figures
    studies: bool = False
    repeats: RepeatDefinition = DEFAULT_REPEATS
    #: DRL CSV for the dose report (None: the shipped example levels)
    drl: Path | str | None = None
    #: dose: only studies above a reference level
    exceedances: bool = False
    where: tuple[Filter, ...] = field(default_factory=tuple)


# --- validation ---------------------------------------------------------------

#: {catalog: {relation: its columns}}: binding a view that reads the instances costs a
#: tenth of a second, and a catalog's views keep their columns for its whole session
_COLUMNS: weakref.WeakKeyDictionary[Catalog, dict[str, list[str]]] = \
    weakref.WeakKeyDictionary()


def columns_of(cat: Catalog, relation: str) -> list[str]:
    known = _COLUMNS.setdefault(cat, {})
    if relation not in known:
        known[relation] = list(cat.con.table(relation).columns)
    return list(known[relation])


def _check_columns(cat: Catalog, relation: str, names: Iterable[str], what: str) -> list[str]:
    names = list(names)
    known = columns_of(cat, relation)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ReportError(f"unknown {what} column(s) {', '.join(map(repr, unknown))}; "
                          f"choose from: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ReportError(f"{what} columns repeat a name: {', '.join(names)}")
    return names


def _group_cols(cat: Catalog, kind: str, by: Sequence[str] | None) -> list[str]:
    cols = list(by) if by else list(DEFAULT_BY[kind])
    return _check_columns(cat, _GROUPABLE[kind], cols, "grouping")


def _date(value: dt.date | str | None, name: str) -> dt.date | None:
    if value is None or value == "":
        return None
    try:
        return iso_date(value)
    except ValueError:
        raise ReportError(f"{name} {value!r} is not a date; use YYYY-MM-DD") from None


def _range(date_from, date_to) -> dict[str, object]:
    start, end = _date(date_from, "--from"), _date(date_to, "--to")
    if start and end and start > end:
        raise ReportError(f"--from {start} is after --to {end}")
    return {"date_from": start, "date_to": end}


def _definition(cat: Catalog, d: RepeatDefinition) -> dict[str, object]:
    if isinstance(d.window_days, bool) or not isinstance(d.window_days, int) \
            or d.window_days < 0:
        raise ReportError(f"the repeat window must be a whole number of days >= 0, "
                          f"not {d.window_days!r}")
    if not d.match:
        raise ReportError("repeat matching needs at least one key besides PatientID "
                          "(e.g. Modality)")
    match = [MATCH_ALIASES.get(k, k) for k in d.match]
    _check_columns(cat, "utilization_studies", match, "matching")
    return {**d.params(), "match": match}


def _run(cat: Catalog, call: str, params: Mapping[str, object], first: Sequence[str] = (),
         where: Sequence[Filter] = ()) -> pa.Table:
    try:
        rel = cat.con.sql(_CALLS[call], params=dict(params))
        if where:
            unknown = [f.column for f in where if f.column not in rel.columns]
            if unknown:
                raise ReportError(f"unknown filter column(s) {', '.join(map(repr, unknown))}; "
                                  f"choose from: {', '.join(rel.columns)}")
            for f in where:
                rel = rel.filter(duckdb.ColumnExpression(f.column).cast("VARCHAR")
                                 == duckdb.ConstantExpression(f.value))
        table = rel.to_arrow_table()
    except duckdb.Error as exc:
        raise QueryError(str(exc).strip().splitlines()[0]) from None
    if first:  # the grouping columns first, in the order asked for, and sorted by them
        rest = [c for c in table.column_names if c not in first]
        table = table.select([*first, *rest])
        keys = []
        for c in first:
            if c == "weekday_name":  # Monday ... Sunday, not alphabetically
                table = table.append_column("_weekday_order", pc.index_in(
                    table.column(c), value_set=pa.array(WEEKDAYS)))
                keys.append(("_weekday_order", "ascending"))
            else:
                keys.append((c, "ascending"))
        table = table.sort_by(keys)
        if "_weekday_order" in table.column_names:
            table = table.drop_columns(["_weekday_order"])
    return table


#: ``weekday_name`` values in week order (DuckDB's ``dayname``)
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


# --- utilization --------------------------------------------------------------

def utilization(cat: Catalog, by: Sequence[str] | None = None, date_from=None, date_to=None,
                where: Sequence[Filter] = ()) -> pa.Table:
    """Studies, series and instances grouped by ``by`` (any ``utilization_studies``
    column: day, week, month, year, weekday, hour, Modality, BodyPartExamined,
    StationName, Manufacturer, ManufacturerModelName, InstitutionalDepartmentName, ...)."""
    cols = _group_cols(cat, "utilization", by)
    return _run(cat, "utilization", {"group_cols": cols, **_range(date_from, date_to)}, cols,
                where)


def utilization_studies(cat: Catalog, date_from=None, date_to=None,
                        where: Sequence[Filter] = ()) -> pa.Table:
    """The studies behind :func:`utilization` (one row each)."""
    return _run(cat, "utilization_studies", _range(date_from, date_to), where=where)


def workload(cat: Catalog, date_from=None, date_to=None) -> pa.Table:
    """Studies per ISO weekday (1 = Monday) and hour of the study start."""
    return _run(cat, "workload", _range(date_from, date_to))


# --- repeat exams -------------------------------------------------------------

def repeat_exams(cat: Catalog, definition: RepeatDefinition = DEFAULT_REPEATS) -> pa.Table:
    """One row per exam study: is it a repeat, of which prior, after how many days."""
    return _run(cat, "repeat_exams", _definition(cat, definition))


def repeat_rates(cat: Catalog, by: Sequence[str] | None = None, date_from=None, date_to=None,
                 definition: RepeatDefinition = DEFAULT_REPEATS,
                 where: Sequence[Filter] = ()) -> pa.Table:
    """Repeat rate with its Wilson 95% interval per group of ``by``."""
    cols = _group_cols(cat, "repeats", by)
    params = {"group_cols": cols, **_range(date_from, date_to), **_definition(cat, definition)}
    return _run(cat, "repeat_rates", params, cols, where)


def repeat_pairs(cat: Catalog, date_from=None, date_to=None,
                 definition: RepeatDefinition = DEFAULT_REPEATS,
                 where: Sequence[Filter] = ()) -> pa.Table:
    """The (repeat, prior) study pairs behind :func:`repeat_rates`."""
    params = {**_range(date_from, date_to), **_definition(cat, definition)}
    return _run(cat, "repeat_pairs", params, where=where)


# --- retakes ------------------------------------------------------------------

def retake_rates(cat: Catalog, by: Sequence[str] | None = None, date_from=None, date_to=None,
                 where: Sequence[Filter] = ()) -> pa.Table:
    """Retaken CR/DX/MG images / images, with a Wilson 95% interval, per group of ``by``."""
    cols = _group_cols(cat, "retakes", by)
    return _run(cat, "retake_rates", {"group_cols": cols, **_range(date_from, date_to)}, cols,
                where)


def retakes(cat: Catalog, date_from=None, date_to=None,
            where: Sequence[Filter] = ()) -> pa.Table:
    """The retaken views behind :func:`retake_rates` (study, view, images, SOP UIDs)."""
    return _run(cat, "retakes", _range(date_from, date_to), where=where)


# --- dose ---------------------------------------------------------------------

def read_drl(path: Path | str | None = None) -> pa.Table:
    """Reference levels from a CSV (see ``catalog/drl_default.csv``; None: that file)."""
    return pa.Table.from_pylist(_drl_rows(path), schema=DRL_SCHEMA)


def _drl_rows(path: Path | str | None) -> list[dict]:
    """The rows of :func:`read_drl`, checked, as Python values."""
    if path is None:
        text = resources.files("catalog").joinpath("drl_default.csv").read_text(encoding="utf-8")
        name = "drl_default.csv"
    else:
        try:
            # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark
            text = Path(path).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise ReportError(f"cannot read the DRL file {path}: {exc}") from None
        name = str(path)
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    header = [h.strip() for h in reader.fieldnames or []]
    missing = [c for c in ("body_region", "CTDIvol_mGy", "DLP_mGycm") if c not in header]
    if missing:
        raise ReportError(f"{name}: the header line lacks {', '.join(missing)}; expected "
                          f"{','.join(DRL_COLUMNS)}")
    rows = []
    for n, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        if not row.get("body_region"):
            raise ReportError(f"{name}: data row {n - 1} has no body_region")
        rows.append({
            "body_region": row["body_region"],
            "protocol": row.get("protocol") or None,
            "CTDIvol_mGy": _level(row.get("CTDIvol_mGy"), name, n - 1, "CTDIvol_mGy"),
            "DLP_mGycm": _level(row.get("DLP_mGycm"), name, n - 1, "DLP_mGycm"),
            "note": row.get("note") or None,
        })
    return rows


def _level(text: str | None, name: str, row: int, column: str) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ReportError(f"{name}: data row {row}: {column} {text!r} is not a positive number")
    return value


def load_drl(cat: Catalog, path: Path | str | None = None) -> int:
    """Replace the catalog's ``drl_levels`` with the levels of ``path`` (None: the default);
    returns how many there are."""
    rows = _drl_rows(path)
    cat.con.execute("DELETE FROM drl_levels")
    if rows:
        # as parameters (a few dozen rows): Arrow data made from Python values, or
        # registered with DuckDB, would load pandas into a command-line report
        cat.con.executemany("INSERT INTO drl_levels VALUES (?, ?, ?, ?, ?)",
                            [[r[c] for c in DRL_COLUMNS] for r in rows])
    return len(rows)


def dose_summary(cat: Catalog, by: Sequence[str] | None = None, date_from=None, date_to=None,
                 drl: Path | str | None = None, where: Sequence[Filter] = ()) -> pa.Table:
    """CTDIvol and DLP distributions per group, with the studies above a reference level."""
    cols = _group_cols(cat, "dose", by)
    load_drl(cat, drl)
    return _run(cat, "dose_summary", {"group_cols": cols, **_range(date_from, date_to)}, cols,
                where)


def dose_studies(cat: Catalog, date_from=None, date_to=None, drl: Path | str | None = None,
                 where: Sequence[Filter] = ()) -> pa.Table:
    """Every CT study's dose (report or header) with its reference level, when one applies."""
    load_drl(cat, drl)
    return _run(cat, "dose_studies", _range(date_from, date_to), where=where)


def dose_exceedances(cat: Catalog, date_from=None, date_to=None,
                     drl: Path | str | None = None, where: Sequence[Filter] = ()) -> pa.Table:
    """The CT studies whose CTDIvol or DLP is above their diagnostic reference level."""
    load_drl(cat, drl)
    table = _run(cat, "dose_vs_drl", _range(date_from, date_to), where=where)
    return table.filter(table.column("exceeds"))


# --- one entry point for the CLI ----------------------------------------------

def run(cat: Catalog, request: ReportRequest) -> pa.Table:
    """The figures of ``request`` (or, with ``studies``, what is behind them)."""
    r = request
    if r.kind not in KINDS:
        raise ReportError(f"unknown report {r.kind!r}; choose from {', '.join(KINDS)}")
    where = list(r.where)
    if r.kind == "utilization":
        if r.studies:
            return utilization_studies(cat, r.date_from, r.date_to, where)
        return utilization(cat, r.by, r.date_from, r.date_to, where)
    if r.kind == "repeats":
        if r.studies:
            return repeat_pairs(cat, r.date_from, r.date_to, r.repeats, where)
        return repeat_rates(cat, r.by, r.date_from, r.date_to, r.repeats, where)
    if r.kind == "retakes":
        if r.studies:
            return retakes(cat, r.date_from, r.date_to, where)
        return retake_rates(cat, r.by, r.date_from, r.date_to, where)
    if r.exceedances:
        return dose_exceedances(cat, r.date_from, r.date_to, r.drl, where)
    if r.studies:
        return dose_studies(cat, r.date_from, r.date_to, r.drl, where)
    return dose_summary(cat, r.by, r.date_from, r.date_to, r.drl, where)
