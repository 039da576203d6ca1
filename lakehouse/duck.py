"""A Delta table version as a DuckDB relation read by DuckDB's own Parquet reader.

DuckDB reads the version's Parquet files itself: in parallel, with column and
row-group pruning, without holding every file's footer in memory at once.
That is several times faster than scanning the same files through a pyarrow
dataset. Used by the catalog (its tables) and by the ETL (the summaries).
"""

from __future__ import annotations

from importlib import resources

import duckdb
import pyarrow as pa
from deltalake import DeltaTable

from lakehouse.schemas import TableSpec

#: SQL types of the Arrow types the table schemas use (what DuckDB makes of each).
_SQL_TYPES = {pa.bool_(): "BOOLEAN", pa.int32(): "INTEGER", pa.int64(): "BIGINT",
              pa.float64(): "DOUBLE", pa.string(): "VARCHAR", pa.large_string(): "VARCHAR",
              pa.date32(): "DATE", pa.time64("us"): "TIME",
              pa.timestamp("us", tz="UTC"): "TIMESTAMP WITH TIME ZONE"}


def sql_type(typ: pa.DataType) -> str | None:
    """The DuckDB type of a column of Arrow type ``typ``, as DuckDB reads it from Arrow;
    None for a type not in the table schemas. Known without registering Arrow data with
    DuckDB, which loads pandas (0.3 s) in the process: a catalog opened for a CLI
    report does not need it."""
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        inner = sql_type(typ.value_type)
        return None if inner is None else f"{inner}[]"
    return _SQL_TYPES.get(typ)


def _sql(name: str) -> str:
    return resources.files("lakehouse").joinpath("sql", f"{name}.sql").read_text(
        encoding="utf-8")


def parquet_relation(con: duckdb.DuckDBPyConnection, dt: DeltaTable, spec: TableSpec,
                     profile: str, home: str, files: list[str] | None = None,
                     filename: bool = False
                     ) -> tuple[duckdb.DuckDBPyRelation, set[str]] | None:
    """The rows of ``dt`` (a version of the table ``spec``; only its ``files`` when given,
    a subset of ``dt.file_uris()``) as a relation on ``con``, and
    the columns it has; None when the version has no files, or files outside ``home``
    (the lake's root, ``/`` for a local lake), or a partition value the writer had to
    percent-encode in its folder name (a hostile Modality such as ``../x``: only the Delta
    log has it verbatim). The caller then reads the table through a pyarrow dataset.

    Partition values come from the Hive-style paths the writer lays out. Columns the
    files do not have (added to the schema later) are left out. With ``filename``, the
    relation also has the column ``filename``: the file each row comes from.
    """
    files = dt.file_uris() if files is None else files
    if not files or not all(f.startswith(home) for f in files):
        return None
    if any("%" in f for f in files):
        return None
    # union_by_name merges the files' schemas again at every query (14 ms of CPU for
    # 80 files here); only needed when the schema changed between writes
    union = len(files) > 1 and con.execute(
        _sql("parquet_schemas"), {"files": files}).fetchall()[0][0] > 1
    rel = con.read_parquet(files, hive_partitioning=True, union_by_name=union,
                           filename=filename)
    present = set(rel.columns)
    columns, attached = [], set()
    # identifiers and types from the declared schema, not user input
    for f in spec.storage_schema(profile):
        if f.name not in present:
            continue
        if f.name in spec.partition_by:  # the Hive-style folder names are text
            columns.append(f'CAST("{f.name}" AS {sql_type(f.type)}) '
                           f'AS "{f.name}"')
        else:
            columns.append(f'"{f.name}"')
        attached.add(f.name)
    if filename:
        columns.append('"filename"')
    return rel.select(", ".join(columns)), attached
