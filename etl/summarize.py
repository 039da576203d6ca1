"""Rebuild the derived tables (series, studies, patients, dose_events) from instances.

The SQL lives in ``etl/sql/*.sql``; DuckDB runs it over the committed
``instances`` Delta version. Summaries are rebuilt whole, in one overwrite
commit per table, whenever ``instances`` changed. ``dose_events`` comes from
the CT Radiation Dose SRs among the instances, parsed by :mod:`etl.dose`.
"""

from __future__ import annotations

import json
import logging
from importlib import resources

import duckdb
import pyarrow as pa
from deltalake import DeltaTable

from etl import dose
from lakehouse.duck import parquet_relation
from lakehouse.schemas import TABLES
from lakehouse.tables import Lake

log = logging.getLogger(__name__)

SUMMARY_TABLES = ("series", "studies", "patients")
DERIVED_TABLES = (*SUMMARY_TABLES, "dose_events")


def sql(name: str) -> str:
    return resources.files("etl").joinpath("sql", f"{name}.sql").read_text(encoding="utf-8")


def build(lake: Lake, instances: DeltaTable) -> dict[str, pa.Table]:
    """Summary tables computed from a version of ``instances`` of ``lake``.

    DuckDB reads the version's Parquet files itself where it can
    (:func:`lakehouse.duck.parquet_relation`), through a pyarrow dataset otherwise.
    """
    con = duckdb.connect()
    try:
        con.execute("SET threads TO 2")
        fs = lake.storage.duckdb_filesystem()
        if fs is not None:
            con.register_filesystem(fs)
        home = "/" if lake.local else lake.storage.uri("") + "/"
        found = parquet_relation(con, instances, TABLES["instances"], lake.profile, home)
        if found is not None:
            rel, present = found
            rel.create_view("instances_ds")
        else:
            dataset = instances.to_pyarrow_dataset()
            con.register("instances_ds", dataset)
            present = set(dataset.schema.names)
        missing = "" if "PatientName" in present else ", CAST(NULL AS VARCHAR) AS PatientName"
        con.execute(f"CREATE VIEW instances AS SELECT * EXCLUDE (dicom_json){missing} "
                    "FROM instances_ds")
        out = {}
        for name in SUMMARY_TABLES:
            table = con.sql(sql(name)).to_arrow_table()
            out[name] = table
            if name == "studies":
                con.register("studies", table)
        out["dose_events"] = dose_events(con)
        return out
    finally:
        con.close()


def dose_events(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """The ``dose_events`` rows of the dose reports in ``instances_ds`` (registered on ``con``)."""
    reports = con.execute(sql("dose_reports"), {"classes": list(dose.DOSE_SR_CLASSES)})
    rows = []
    while batch := reports.fetchmany(1000):
        for study, series, sop, patient, date, text in batch:
            try:
                header = json.loads(text) if text else None
            except ValueError:
                log.warning("dose report %s: its DICOM JSON does not parse; skipped", sop)
                continue
            for event in dose.events(header) if isinstance(header, dict) else []:
                rows.append({"StudyInstanceUID": study, "SeriesInstanceUID": series,
                             "SOPInstanceUID": sop, "PatientID": patient, "StudyDate": date,
                             **event})
    schema = TABLES["dose_events"].schema()
    return pa.Table.from_pylist(rows, schema=schema)
