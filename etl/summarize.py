"""Rebuild the summary tables (series, studies, patients) from instances.

The SQL lives in ``etl/sql/*.sql``; DuckDB runs it over the committed
``instances`` Delta version. Summaries are rebuilt whole, in one overwrite
commit per table, whenever ``instances`` changed.
"""

from __future__ import annotations

from importlib import resources

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

SUMMARY_TABLES = ("series", "studies", "patients")


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
        return out
    finally:
        con.close()
