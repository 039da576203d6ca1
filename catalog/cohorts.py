"""Saved cohorts: a definition pinned to a lake snapshot, with a hash of its result.

A cohort is defined by SQL (any query returning one row per series, with a
``SeriesInstanceUID`` column, or one row per study, with ``StudyInstanceUID``
and no ``SeriesInstanceUID``) or by a declarative spec (:mod:`catalog.spec`).

Saving runs the definition at the lake's latest snapshot and writes
``_lake/cohorts/NAME.json`` (atomically: temp file + rename) with the
definition, the snapshot number, the row count and two SHA-256 hashes: of the
sorted member ids and of the sorted rows. Reopening runs the definition again
at the saved snapshot (Delta time travel), checks the hash, and can compare
with what the latest snapshot gives now.

>>> from catalog import cohorts
>>> saved = cohorts.save("lake", "chest_ct", spec={"modality": "CT"})  # doctest: +SKIP
>>> cohort = cohorts.open_cohort("lake", "chest_ct")                    # doctest: +SKIP
>>> cohort.rows()       # exactly the rows of the saved snapshot         # doctest: +SKIP
>>> cohort.drift()      # what the latest snapshot would add or remove   # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from catalog import spec as specs
from catalog.connect import Catalog
from catalog.errors import (
    CohortExistsError,
    CohortIntegrityError,
    CohortNameError,
    CohortNotFoundError,
    CohortQueryError,
)
from lakehouse import layout
from lakehouse.provenance import code_version
from lakehouse.tables import Lake

log = logging.getLogger(__name__)

COHORTS_DIR = layout.COHORTS
FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SERIES_KEY = "SeriesInstanceUID"
STUDY_KEY = "StudyInstanceUID"


@dataclass(frozen=True)
class Definition:
    """What a cohort is: SQL text, or a declarative spec (canonical dict)."""

    sql: str | None = None
    spec: dict | None = None

    def __post_init__(self) -> None:
        if (self.sql is None) == (self.spec is None):
            raise CohortQueryError("give exactly one of sql or spec")
        if self.sql is not None and not self.sql.strip():
            raise CohortQueryError("the SQL text is empty")

    @classmethod
    def of(cls, sql: str | None = None, spec: Any = None) -> Definition:
        return cls(sql=sql, spec=None if spec is None else specs.normalize(spec))

    @property
    def kind(self) -> str:
        return "sql" if self.sql is not None else "spec"

    def query(self) -> tuple[str, list[Any]]:
        if self.sql is not None:
            return self.sql, []
        compiled = specs.compile_spec(self.spec)
        return compiled.sql, compiled.params

    def to_dict(self) -> dict:
        return {"kind": self.kind, "sql": self.sql, "spec": self.spec}

    @classmethod
    def from_dict(cls, d: dict) -> Definition:
        return cls(sql=d.get("sql"), spec=d.get("spec"))


@dataclass(frozen=True)
class Result:
    """The rows of a cohort at one snapshot, sorted by the key, and their hashes."""

    rows: pa.Table
    grain: str
    key: str
    snapshot: int
    members_sha256: str
    rows_sha256: str

    @property
    def members(self) -> list[str]:
        return self.rows.column(self.key).to_pylist()


@dataclass(frozen=True)
class SavedCohort:
    """The content of ``_lake/cohorts/NAME.json``."""

    name: str
    definition: Definition
    snapshot: int
    grain: str
    key: str
    row_count: int
    columns: list[str]
    members_sha256: str
    rows_sha256: str
    created_at: str
    code_version: str
    description: str = ""
    format_version: int = FORMAT_VERSION
    lake_labels: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["definition"] = self.definition.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SavedCohort:
        known = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in known}
        kw["definition"] = Definition.from_dict(d["definition"])
        return cls(**kw)


@dataclass(frozen=True)
class Diff:
    """Members in ``b`` and not in ``a`` (added), in ``a`` and not ``b`` (removed)."""

    a: str
    b: str
    grain: str
    added: list[str]
    removed: list[str]
    unchanged: int
    #: same members but rows differ (e.g. a series gained instances)
    rows_changed: bool

    @property
    def same(self) -> bool:
        return not self.added and not self.removed and not self.rows_changed

    def to_dict(self) -> dict:
        return {**asdict(self), "same": self.same}


# --- running a definition ------------------------------------------------------------

def run(cat: Catalog, definition: Definition) -> Result:
    """Run ``definition`` on the catalog's snapshot; rows sorted by their key."""
    sql, params = definition.query()
    table = cat.arrow(sql, params or None)
    names = table.column_names
    if SERIES_KEY in names:
        grain, key = "series", SERIES_KEY
    elif STUDY_KEY in names:
        grain, key = "study", STUDY_KEY
    else:
        raise CohortQueryError(
            f"the query returns columns {', '.join(names) or '(none)'}; a cohort needs one row "
            f"per series (a {SERIES_KEY} column) or per study (a {STUDY_KEY} column)")
    if len(set(names)) != len(names):
        raise CohortQueryError("the query returns two columns of the same name; alias them")
    col = table.column(key)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
            or pa.types.is_string_view(col.type)):
        raise CohortQueryError(
            f"the query's {key} column is {col.type}, not text: select the lake's {key} "
            f"(a UID string) from series or studies")
    if col.null_count:
        raise CohortQueryError(f"{col.null_count} rows have no {key}; filter them out")
    distinct = pc.count_distinct(col).as_py()
    if distinct != table.num_rows:
        raise CohortQueryError(
            f"the query returns {table.num_rows} rows for {distinct} distinct {key} values; "
            f"a cohort has one row per {grain}: add DISTINCT or GROUP BY {key}")
    table = table.sort_by([(key, "ascending")])
    return Result(table, grain, key, cat.snapshot.number, _members_hash(table.column(key)),
                  _rows_hash(table))


def cache_base(cat: Catalog) -> int:
    """Keep what cohort specs read in memory for the rest of this catalog session: the
    ``series`` and ``studies`` tables (:meth:`Catalog.cache`, for members queries) and
    ``cohort_base``, their join (for the rows of a cohort).

    The catalog is pinned to one snapshot, so the copies cannot go stale. Worth it
    when a session (a notebook, a benchmark) runs many cohort queries: each then
    scans memory instead of decoding the Parquet files. Returns the rows of
    ``series`` and ``studies`` cached.
    """
    rows = cat.cache("series", "studies")
    cat.con.execute("CREATE OR REPLACE TEMP TABLE _cohort_base_cache AS "
                    "SELECT * FROM cohort_base")
    cat.con.execute("CREATE OR REPLACE VIEW cohort_base AS SELECT * FROM _cohort_base_cache")
    return rows


def members(cat: Catalog, spec: Any) -> list[str]:
    """The SeriesInstanceUIDs a spec selects on the catalog's snapshot, sorted.

    Cheaper than :func:`run` when only the members are needed: the spec is compiled
    to a query on ``series`` alone (``compile_spec(spec, members=True)``).
    """
    compiled = specs.compile_spec(spec, members=True)
    uids = cat.arrow(compiled.sql, compiled.params).column(SERIES_KEY)
    return uids.take(pc.sort_indices(uids)).to_pylist()


def _members_hash(col: pa.ChunkedArray) -> str:
    h = hashlib.sha256()
    for v in col.to_pylist():
        h.update(v.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _rows_hash(table: pa.Table) -> str:
    """SHA-256 of the rows as JSON lines (sorted keys): independent of Arrow versions."""
    h = hashlib.sha256()
    h.update(json.dumps(table.column_names).encode("utf-8"))
    for batch in table.to_batches(max_chunksize=65_536):
        for row in batch.to_pylist():
            h.update(b"\n")
            h.update(json.dumps(row, sort_keys=True, default=_plain,
                                ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def _plain(v: Any) -> Any:
    if isinstance(v, dt.date | dt.time | dt.datetime):
        return v.isoformat()
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, bytes):
        return v.hex()
    return str(v)


# --- the store -------------------------------------------------------------------------

def cohorts_dir(lake: Lake) -> Path:
    """The cohorts folder of a local lake."""
    return layout.meta_dir(lake.root) / COHORTS_DIR


#: the cohorts folder relative to the lake's location (any storage)
_COHORTS = f"{layout.META_DIR}/{COHORTS_DIR}"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise CohortNameError(str(name))
    return name


def _path(lake: Lake, name: str) -> str:
    """A saved cohort's file, relative to the lake's location."""
    return f"{_COHORTS}/{check_name(name)}.json"


def _lake(lake: Lake | Path | str) -> Lake:
    return lake if isinstance(lake, Lake) else Lake.open(lake)


def names(lake: Lake | Path | str) -> list[str]:
    stems = (n[:-len(".json")] for n in _lake(lake).storage.listdir(_COHORTS)
             if n.endswith(".json"))
    return sorted(s for s in stems if _NAME.match(s))


def save(lake: Lake | Path | str, name: str, *, sql: str | None = None, spec: Any = None,
         description: str = "", replace: bool = False, snapshot: int | None = None
         ) -> SavedCohort:
    """Run the definition at the latest (or a given) snapshot and save it as ``name``."""
    lake = _lake(lake)
    path = _path(lake, name)
    if lake.storage.exists(path) and not replace:
        raise CohortExistsError(name)
    definition = Definition.of(sql=sql, spec=spec)
    with Catalog(lake, snapshot) as cat:
        if definition.spec is not None:
            specs.check_against(cat, definition.spec)
        result = run(cat, definition)
    saved = SavedCohort(
        name=name, definition=definition, snapshot=result.snapshot, grain=result.grain,
        key=result.key, row_count=result.rows.num_rows, columns=result.rows.column_names,
        members_sha256=result.members_sha256, rows_sha256=result.rows_sha256,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        code_version=code_version(), description=description,
        lake_labels=dict(lake.config.labels))
    lake.storage.makedirs(_COHORTS)
    body = json.dumps(saved.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    lake.storage.write_bytes(path, body.encode("utf-8"))
    log.info("saved cohort %s: %d %s rows at snapshot %d", name, saved.row_count,
             saved.grain, saved.snapshot)
    return saved


def load(lake: Lake | Path | str, name: str) -> SavedCohort:
    lake = _lake(lake)
    path = _path(lake, name)
    try:
        data = json.loads(lake.storage.read_text(path))
    except FileNotFoundError:
        raise CohortNotFoundError(name, names(lake)) from None
    except (OSError, ValueError) as exc:
        raise CohortQueryError(f"cannot read {path}: {exc}; restore the file or save the "
                               "cohort again") from None
    return SavedCohort.from_dict(data)


def delete(lake: Lake | Path | str, name: str) -> None:
    lake = _lake(lake)
    path = _path(lake, name)
    if not lake.storage.exists(path):
        raise CohortNotFoundError(name, names(lake))
    lake.storage.remove(path)


# --- reopening ---------------------------------------------------------------------------

class Cohort:
    """A saved cohort, reopened: its rows at the saved snapshot, and drift since."""

    def __init__(self, lake: Lake, saved: SavedCohort):
        self.lake = lake
        self.saved = saved

    @property
    def name(self) -> str:
        return self.saved.name

    def result(self, verify: bool = True) -> Result:
        """The result at the saved snapshot; checks it against the saved hashes."""
        with Catalog(self.lake, self.saved.snapshot) as cat:
            result = run(cat, self.saved.definition)
        if verify and result.rows_sha256 != self.saved.rows_sha256:
            raise CohortIntegrityError(self.name, self.saved.snapshot, self.saved.rows_sha256,
                                       result.rows_sha256)
        return result

    def rows(self) -> pa.Table:
        return self.result().rows

    def current(self) -> Result:
        """What the definition gives at the lake's latest snapshot."""
        with Catalog(self.lake) as cat:
            return run(cat, self.saved.definition)

    def drift(self) -> Diff:
        """Saved result versus the latest snapshot (no query when nothing was published)."""
        now = self.current()
        return _diff(f"{self.name}@{self.saved.snapshot}", f"latest@{now.snapshot}",
                     self.result(), now)

    def catalog(self) -> Catalog:
        """A catalog opened at the cohort's snapshot (close it when done)."""
        return Catalog(self.lake, self.saved.snapshot)

    def __repr__(self) -> str:
        s = self.saved
        return (f"Cohort({s.name!r}, {s.row_count} {s.grain} rows at snapshot {s.snapshot}, "
                f"{s.definition.kind})")


def open_cohort(lake: Lake | Path | str, name: str) -> Cohort:
    lake = _lake(lake)
    return Cohort(lake, load(lake, name))


def diff(lake: Lake | Path | str, a: str, b: str | None = None) -> Diff:
    """Members of saved cohort ``a`` versus saved cohort ``b`` (default: ``a`` now)."""
    lake = _lake(lake)
    first = open_cohort(lake, a)
    if b is None:
        return first.drift()
    second = open_cohort(lake, b)
    return _diff(a, b, first.result(), second.result())


def _diff(a: str, b: str, ra: Result, rb: Result) -> Diff:
    if ra.grain != rb.grain:
        raise CohortQueryError(f"{a} is one row per {ra.grain}, {b} one row per {rb.grain}; "
                               "compare cohorts of the same grain")
    ma, mb = set(ra.members), set(rb.members)
    same_members = ma == mb
    return Diff(a, b, ra.grain, sorted(mb - ma), sorted(ma - mb), len(ma & mb),
                rows_changed=same_members and ra.rows_sha256 != rb.rows_sha256)


__all__ = ["Cohort", "Definition", "Diff", "Result", "SavedCohort", "cache_base", "delete",
           "diff", "load", "members", "names", "open_cohort", "run", "save"]
