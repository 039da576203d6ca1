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
import pyarrow.dataset as ds

from etl import dose
from lakehouse.schemas import TABLES

log = logging.getLogger(__name__)

SUMMARY_TABLES = ("series", "studies", "patients")
DERIVED_TABLES = (*SUMMARY_TABLES, "dose_events")


def sql(name: str) -> str:
    return resources.files("etl").joinpath("sql", f"{name}.sql").read_text(encoding="utf-8")


def build(instances: ds.Dataset) -> dict[str, pa.Table]:
    """Summary tables computed from an ``instances`` dataset (storage schema)."""
    con = duckdb.connect()
    try:
        con.execute("SET threads TO 2")
        con.register("instances_ds", instances)
        missing = "" if "PatientName" in instances.schema.names else \
            ", CAST(NULL AS VARCHAR) AS PatientName"
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
