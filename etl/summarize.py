"""The derived tables (series, studies, patients, dose_events) from instances.

The SQL lives in ``etl/sql/*.sql``; DuckDB runs it over a committed
``instances`` Delta version. ``dose_events`` comes from the CT Radiation Dose
SRs among the instances, parsed by :mod:`etl.dose`.

Two ways, the same rows:

- :func:`build` summarizes a whole version (one overwrite commit per table):
  a lake's first run, or when the summary code changed (:func:`fingerprint`).
- :func:`update` summarizes only what changed between two versions: the
  series, studies and patients the new (or removed) instance rows belong to,
  from the files of the version that hold their rows; the caller puts them in
  place of the old rows (``LakeWriter.replace``). A nightly run on a large lake
  then costs what it adds, not the lake.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources

import duckdb
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from etl import dose
from lakehouse.duck import parquet_relation, readable_as_given
from lakehouse.schemas import TABLES, conform
from lakehouse.tables import Lake, add_actions

log = logging.getLogger(__name__)

SUMMARY_TABLES = ("series", "studies", "patients")
DERIVED_TABLES = (*SUMMARY_TABLES, "dose_events")
#: the key each derived table's rows are replaced by in an update
KEYS = {"series": "SeriesInstanceUID", "studies": "StudyInstanceUID",
        "patients": "PatientID", "dose_events": "StudyInstanceUID"}
#: when more than this share of the instances rows are new since the last summary, or
#: belong to a changed series or study, the summaries are rebuilt whole instead: an update
#: reads those rows once per summary and is no cheaper (bench/summaries.py: at 56 % of
#: the rows, 1.3 s against 1.2 s for a rebuild; at 1 %, 0.8 s against 1.4 s)
UPDATE_SHARE = 0.25
#: when the files holding those rows hold more than this share of all instances rows, the
#: summaries are rebuilt whole too: an update reads those files whole, which pays while
#: it summarizes fewer rows (bench/summaries.py, 100,000 files + 1 %: files with 74 % of
#: the rows read, 0.87 s against 1.43 s for a rebuild) but not once it reads every file
#: (after `lake optimize` left one file per partition: 1.5 s against 1.1 s)
READ_SHARE = 0.9


def sql(name: str) -> str:
    return resources.files("etl").joinpath("sql", f"{name}.sql").read_text(encoding="utf-8")


def fingerprint() -> str:
    """A hash of what computes the summaries (their SQL and the dose parser): summaries
    built by another version of it are rebuilt whole rather than updated."""
    h = hashlib.sha256()
    for name in (*SUMMARY_TABLES, "dose_reports"):
        h.update(sql(name).encode())
    h.update(resources.files("etl").joinpath("dose.py").read_bytes())
    return h.hexdigest()[:16]


@dataclass
class Update:
    """The rows of one derived table to put in place of its rows whose ``key`` is in
    ``keys`` (a key in ``keys`` without a row in ``rows`` is removed)."""

    key: str
    keys: pa.Array
    rows: pa.Table


def _connect(lake: Lake) -> tuple[duckdb.DuckDBPyConnection, str]:
    """A DuckDB connection that can read the lake's files, and the lake's root for
    :func:`lakehouse.duck.parquet_relation`."""
    con = duckdb.connect()
    con.execute("SET threads TO 2")
    # the summary SQL scans each instances file several times (series twice, studies four
    # times): its footer is parsed once (a lake's files never change; on small files the
    # footers were a third of each scan, 15-20 % of a rebuild)
    con.execute("SET parquet_metadata_cache = true")
    fs = lake.storage.duckdb_filesystem()
    if fs is not None:
        con.register_filesystem(fs)
    return con, "/" if lake.local else lake.storage.uri("") + "/"


def _register(con: duckdb.DuckDBPyConnection, lake: Lake, home: str, table: str,
              dt: DeltaTable, view: str, files: list[str] | None = None) -> set[str]:
    """``dt`` (a version of ``table``; only ``files`` of it when given) as the view ``view``
    on ``con``; returns its columns."""
    found = parquet_relation(con, dt, TABLES[table], lake.profile, home, files)
    if found is not None:
        rel, present = found
        rel.create_view(view)
        return present
    dataset = lake.arrow_dataset(table, dt)
    con.register(view, dataset)
    return set(dataset.schema.names)


def _instances_view(con: duckdb.DuckDBPyConnection, present: set[str]) -> None:
    """The view ``instances`` (what the summary SQL reads) over ``instances_ds``."""
    missing = "" if "PatientName" in present else ", CAST(NULL AS VARCHAR) AS PatientName"
    con.execute(f"CREATE VIEW instances AS SELECT * EXCLUDE (dicom_json){missing} "
                "FROM instances_ds")


def build(lake: Lake, instances: DeltaTable, rows: pa.Table | None = None
          ) -> dict[str, pa.Table]:
    """Summary tables computed from a version of ``instances`` of ``lake``.

    DuckDB reads the version's Parquet files itself where it can
    (:func:`lakehouse.duck.parquet_relation`), through a pyarrow dataset otherwise.
    ``rows``: every row of that version, when the caller still holds them (the ingest run
    that wrote all of them, in one commit): DuckDB reads them in memory instead, as they
    were written (``conform``), without decoding the files again (the summaries of a
    20,000-file first run in half the time). Ignored when the version has another number
    of rows.
    """
    con, home = _connect(lake)
    try:
        if rows is not None and rows.num_rows != row_count(instances):
            log.debug("summaries: the rows given are not the version's; its files are read")
            rows = None
        if rows is None:
            present = _register(con, lake, home, "instances", instances, "instances_ds")
        else:
            rows = conform(TABLES["instances"], rows, lake.profile)
            con.from_arrow(rows).create_view("instances_ds")
            present = set(rows.column_names)
        _instances_view(con, present)
        out = {}
        with ThreadPoolExecutor(1, thread_name_prefix="dose") as pool:
            events = _dose_events_meanwhile(pool, con)
            for name in SUMMARY_TABLES:
                table = con.sql(sql(name)).to_arrow_table()
                out[name] = table
                if name == "studies":
                    con.register("studies", table)
            out["dose_events"] = events.result()
        return out
    finally:
        con.close()


@functools.cache
def _columns_read(profile: str) -> tuple[str, ...]:
    """The columns of ``instances`` that the summary SQL names (from its text: a column
    it starts to use is kept without a change here)."""
    text = " ".join(sql(name) for name in (*SUMMARY_TABLES, "dose_reports"))
    return tuple(f.name for f in TABLES["instances"].storage_schema(profile)
                 if re.search(rf"\b{re.escape(f.name)}\b", text))


def summary_rows(rows: pa.Table, profile: str) -> pa.Table:
    """What :func:`build` reads of instances ``rows``: the columns the summary SQL names,
    the DICOM JSON only of the dose reports (a fifth of the rows' size: 700-870 bytes a
    row). Given to :func:`build` for all the rows of a version, it summarizes as from the
    whole rows."""
    rows = rows.select([c for c in _columns_read(profile) if c in rows.column_names])
    if "dicom_json" not in rows.column_names:
        return rows
    reports = pc.is_in(rows.column("SOPClassUID"),
                       value_set=pa.array(sorted(dose.DOSE_SR_CLASSES), pa.string()))
    wanted = reports.to_numpy(zero_copy_only=False).astype(bool)
    # chunk by chunk, the reports' values copied (``if_else`` sized its result as the
    # whole column; a ``take`` of the column first joined its chunks in one copy)
    json, parts, start = rows.column("dicom_json"), [], 0
    for chunk in json.chunks:
        keep = wanted[start:start + len(chunk)]
        start += len(chunk)
        parts.append(chunk.take(pa.array(np.arange(len(chunk)), mask=~keep)) if keep.any()
                     else pa.nulls(len(chunk), json.type))
    return rows.set_column(rows.schema.get_field_index("dicom_json"), "dicom_json",
                           pa.chunked_array(parts, json.type))


def row_count(dt: DeltaTable) -> int | None:
    """The rows of the version ``dt`` (None when its log does not say)."""
    records = add_actions(dt).column("num_records")
    return None if records.null_count else pc.sum(records).as_py() or 0


def _files(dt: DeltaTable) -> dict[str, tuple[str, int]] | None:
    """Each file of the version ``dt``: its path in the table -> (URI, rows); None when the
    version does not say how many rows a file has."""
    actions = add_actions(dt)
    out = {}
    for path, rows, uri in zip(actions.column("path").to_pylist(),
                               actions.column("num_records").to_pylist(), dt.file_uris(),
                               strict=True):
        if rows is None or not uri.endswith(path):
            return None
        out[path] = (uri, rows)
    return out


def update(lake: Lake, before: DeltaTable, after: DeltaTable,
           studies: DeltaTable) -> dict[str, Update] | None:
    """What changes in the derived tables from the ``before`` to the ``after`` version of
    ``instances``, given ``studies`` (the studies summary of ``before``); None when the
    tables are better rebuilt whole with :func:`build`: many rows are new or belong to a
    changed series or study (``UPDATE_SHARE``), a removed file can no longer be read, a
    changed row has no series or study UID, or the files cannot be read by DuckDB
    directly.

    The rows of a series, a study or a patient depend only on the instances of that
    series, of that study, and on the studies of that patient (``etl/sql``): the changed
    ones are those of the instance rows added or removed, plus the patients the changed
    studies belonged to before.
    """
    before_files, after_files = _files(before), _files(after)
    if before_files is None or after_files is None:
        return None
    added = {p: n for p, n in after_files.items() if p not in before_files}
    most = UPDATE_SHARE * sum(n for _, n in after_files.values())
    moved, only_moved = _moves(lake, before.version(), after.version())
    if only_moved:  # compacted only (``lake optimize``): the same rows in other files
        return {}
    # rows moved (compacted) are compared row by row: no cheaper than a rebuild for many
    # rows (bench/summaries.py --optimize: 2.5 s against 1.9 s for the whole table)
    if sum(n for p, (_, n) in before_files.items() if p not in after_files) > most \
            or (not moved and sum(n for _, n in added.values()) > most):
        return None
    new = [u for u, _ in added.values()]
    gone = [u for p, (u, _) in before_files.items() if p not in after_files]
    con, home = _connect(lake)
    try:
        if not new and not gone:
            return {}
        if not readable_as_given(new + gone, home):
            return None
        try:
            changed = _changed_keys(con, new, gone, moved)
        except duckdb.IOException:  # a removed file no longer there (vacuumed)
            log.info("summaries: a removed instances file is gone; rebuilt whole")
            return None
        if moved and sum(changed.column("rows").to_pylist()) > most:
            return None
        changed = changed.drop_columns(["rows"])
        if changed.column("SeriesInstanceUID").null_count \
                or changed.column("StudyInstanceUID").null_count:
            return None
        # a table, not a registered view: the dose reports' cursor sees it too
        con.register("changed_rows", changed)
        con.execute("CREATE TABLE changed AS SELECT * FROM changed_rows")
        # the files of ``after`` holding a row of a changed series or study
        found = parquet_relation(con, after, TABLES["instances"], lake.profile, home,
                                 filename=True)
        if found is None:
            return None
        found[0].create_view("instances_all")
        touched = con.execute(sql("summary_files")).fetchall()
        if sum(n for _, n in touched) > most:
            return None  # many rows would be summarized again: rebuilt whole, in one pass
        hit = [f for f, _ in touched]
        rows_in = dict(after_files.values())
        if sum(rows_in.get(f, 0) for f in hit) > READ_SHARE * sum(rows_in.values()):
            return None  # the files holding them are most of the table: read it once
        # instances_ds: only the rows of the changed series and studies (dose reports too)
        present = _register(con, lake, home, "instances", after, "instances_hit", hit)
        con.execute("CREATE VIEW instances_ds AS SELECT * FROM instances_hit "
                    "WHERE SeriesInstanceUID IN (SELECT SeriesInstanceUID FROM changed) "
                    "OR StudyInstanceUID IN (SELECT StudyInstanceUID FROM changed)")
        _instances_view(con, present)
        keys = {k: pc.unique(changed.column(k)) for k in
                ("SeriesInstanceUID", "StudyInstanceUID")}
        out = {}
        with ThreadPoolExecutor(1, thread_name_prefix="dose") as pool:
            pending = _dose_events_meanwhile(pool, con)
            for name in ("series", "studies"):
                rows = con.sql(sql(name)).to_arrow_table()
                key = KEYS[name]
                out[name] = Update(key, keys[key], rows.filter(
                    pc.is_in(rows.column(key), value_set=keys[key])))
            events = pending.result()
        out["dose_events"] = Update("StudyInstanceUID", keys["StudyInstanceUID"], events.filter(
            pc.is_in(events.column("StudyInstanceUID"), value_set=keys["StudyInstanceUID"])))
        # patients: from their studies, the old rows of the unchanged ones and the new rows
        _register(con, lake, home, "studies", studies, "studies_ds")
        con.register("new_studies", out["studies"].rows)
        con.execute(sql("summary_studies"))
        patients = con.sql("SELECT PatientID FROM changed_patients").to_arrow_table()
        rows = con.sql(sql("patients")).to_arrow_table()
        out["patients"] = Update("PatientID", patients.column("PatientID"), rows)
        return {name: out[name] for name in DERIVED_TABLES}
    finally:
        con.close()


def _moves(lake: Lake, before: int, after: int) -> tuple[bool, bool]:
    """``(moved, only_moved)`` of the commits of ``instances`` from version ``before`` to
    ``after``. ``moved``: some of them only move rows (every action ``dataChange`` false,
    as ``lake optimize`` compacts) and the others only add files. Then a row in an added
    file may be an old row in a new place, and the changed rows are told by comparing
    rows, not files. ``only_moved``: every commit that adds or removes a file only moves
    rows: no row changed. Both false when a commit cannot be read (its log cleaned up):
    every row of the files added or removed then counts as changed, which is always right,
    only slower."""
    kinds = lake.commit_kinds("instances", before, after)
    if None in kinds or "changed" in kinds:  # rows removed or rewritten: the files tell
        return False, False
    moved = "moved" in kinds
    return moved, moved and "added" not in kinds


#: the columns of an instances row the changed keys are found from: the instance, the run
#: that added it, and the keys its summaries are grouped by
_ROW_IDENTITY = "SOPInstanceUID, ingest_run_id, SeriesInstanceUID, StudyInstanceUID, PatientID"


def _changed_keys(con: duckdb.DuckDBPyConnection, new: list[str], gone: list[str],
                  moved: bool) -> pa.Table:
    """The series, study and patient keys of the instance rows in the files ``new`` (added)
    and ``gone`` (removed), with the number of such rows (``rows``). When rows may only
    have ``moved`` between files, a row found in both is not a change
    (``etl/sql/summary_changes.sql``)."""
    for view, files in (("rows_new", new), ("rows_gone", gone)):
        if files:
            rows = con.sql(f"SELECT {_ROW_IDENTITY} FROM read_parquet($files, "
                           "union_by_name = true)", params={"files": files}).to_arrow_table()
        else:
            rows = pa.table({c: pa.array([], pa.string()) for c in _ROW_IDENTITY.split(", ")})
        con.register(view, rows)
    return con.sql(sql("summary_changes"), params={"moved": moved}).to_arrow_table()


def _dose_events_meanwhile(pool: ThreadPoolExecutor,
                           con: duckdb.DuckDBPyConnection) -> Future[pa.Table]:
    """:func:`dose_events` in ``pool``, on a cursor of its own: the dose reports are parsed
    in Python while DuckDB computes the other summaries (which release the GIL). A cursor
    does not see what was registered on ``con`` (a pyarrow dataset ``instances_ds``, when
    DuckDB cannot read the files itself): then they are parsed here, first."""
    cursor = con.cursor()
    try:
        cursor.execute("SELECT 1 FROM instances_ds LIMIT 0")
    except duckdb.CatalogException:
        cursor.close()
        done: Future[pa.Table] = Future()
        done.set_result(dose_events(con))
        return done

    def parse() -> pa.Table:
        try:
            return dose_events(cursor)
        finally:
            cursor.close()

    return pool.submit(parse)


def _parse(text: str) -> object:
    """A DICOM JSON text (orjson; the standard library for what orjson refuses, such as
    an integer beyond 64 bits). Raises ValueError when neither parses it."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def dose_events(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """The ``dose_events`` rows of the dose reports in ``instances_ds`` (registered on ``con``)."""
    reports = con.execute(sql("dose_reports"), {"classes": list(dose.DOSE_SR_CLASSES)})
    rows = []
    while batch := reports.fetchmany(1000):
        for study, series, sop, patient, date, text in batch:
            try:
                header = _parse(text) if text else None
            except ValueError:
                log.warning("dose report %s: its DICOM JSON does not parse; skipped", sop)
                continue
            for event in dose.events(header) if isinstance(header, dict) else []:
                rows.append({"StudyInstanceUID": study, "SeriesInstanceUID": series,
                             "SOPInstanceUID": sop, "PatientID": patient, "StudyDate": date,
                             **event})
    schema = TABLES["dose_events"].schema()
    return pa.Table.from_pylist(rows, schema=schema)
