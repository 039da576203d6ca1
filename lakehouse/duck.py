"""A Delta table version as a DuckDB relation read by DuckDB's own Parquet reader.

DuckDB reads the version's Parquet files itself: in parallel, with column and
row-group pruning, without holding every file's footer in memory at once.
That is several times faster than scanning the same files through a pyarrow
dataset. Used by the catalog (its tables) and by the ETL (the summaries).
"""

from __future__ import annotations

import atexit
import os
import re
import threading
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


_SHARED: duckdb.DuckDBPyConnection | None = None
_SHARED_LOCK = threading.Lock()


def shared_cursor() -> duckdb.DuckDBPyConnection:
    """A new connection to this process's own in-memory DuckDB database: 0.4 ms, against
    18 ms for a database of its own (``duckdb.connect()``), which each of a listener's
    batches paid. The database is shared: what a connection creates must be temporary or
    in a schema of its own, and its settings are every connection's. Close it after
    use."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = duckdb.connect()
            atexit.register(_close_shared)  # its threads stopped before the interpreter's
        return _SHARED.cursor()


def _close_shared() -> None:
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is not None:
            _SHARED.close()
            _SHARED = None


#: The schema of each local Parquet file read here, by (path, size, modification time):
#: asked of DuckDB once per process (a listener's batches, a notebook's catalogs), not
#: at every relation (the footers of the 109 ``instances`` files of a 100,000-instance
#: lake: 20-28 ms each time). Each distinct schema is held once; cleared when it would
#: hold more than SCHEMA_CACHE files (about 25 MB).
_SCHEMAS: dict[tuple[str, int, int], str] = {}
_DISTINCT: dict[str, str] = {}
SCHEMA_CACHE = 100_000


def schema_count(con: duckdb.DuckDBPyConnection, files: list[str], local: bool) -> int:
    """How many different schemas (column names and types, in any order) the Parquet
    ``files`` have; those of local files remembered (:data:`_SCHEMAS`)."""
    if not local:
        return len({s for _, s in con.execute(_sql("parquet_schemas"),
                                               {"files": files}).fetchall()})
    try:
        stats = [os.stat(f) for f in files]
    except OSError:  # a file gone: DuckDB says which, as it reads them
        return schema_count(con, files, local=False)
    keys = [(f, st.st_size, st.st_mtime_ns) for f, st in zip(files, stats, strict=True)]
    todo = [k for k in keys if k not in _SCHEMAS]
    if todo:
        found = dict(con.execute(_sql("parquet_schemas"),
                                 {"files": [f for f, _, _ in todo]}).fetchall())
        if any(f not in found for f, _, _ in todo):  # named otherwise: not remembered
            return schema_count(con, files, local=False)
        if len(_SCHEMAS) + len(todo) > SCHEMA_CACHE:
            _SCHEMAS.clear()
            _DISTINCT.clear()
        _SCHEMAS.update((k, _DISTINCT.setdefault(found[k[0]], found[k[0]])) for k in todo)
    return len({_SCHEMAS[k] for k in keys})


def readable_as_given(files: list[str], home: str) -> bool:
    """Whether DuckDB reads exactly ``files`` when given their paths: all below ``home``
    (the lake's root, ``/`` for a local lake); none holding a partition value the writer
    had to percent-encode in its folder name (a hostile Modality such as ``../x``: only the
    Delta log has it verbatim); none holding a glob wildcard, which DuckDB would expand
    (a lake in a folder ``lake[1]`` read the files of ``lake1``)."""
    return all(f.startswith(home) and not _NOT_AS_GIVEN.search(f) for f in files)


#: what in a path keeps DuckDB from reading it as given (see :func:`readable_as_given`)
_NOT_AS_GIVEN = re.compile(r"[%*?\[]")


def parquet_relation(con: duckdb.DuckDBPyConnection, dt: DeltaTable, spec: TableSpec,
                     profile: str, home: str, files: list[str] | None = None,
                     filename: bool = False
                     ) -> tuple[duckdb.DuckDBPyRelation, set[str]] | None:
    """The rows of ``dt`` (a version of the table ``spec``; only its ``files`` when given,
    a subset of ``dt.file_uris()``) as a relation on ``con``, and
    the columns it has; None when the version has no files, or files DuckDB cannot read
    by the paths given (:func:`readable_as_given`). The caller then reads the table
    through a pyarrow dataset.

    Partition values come from the Hive-style paths the writer lays out. Columns the
    files do not have (added to the schema later) are left out. With ``filename``, the
    relation also has the column ``filename``: the file each row comes from.
    """
    files = dt.file_uris() if files is None else files
    if not files or not readable_as_given(files, home):
        return None
    # union_by_name merges the files' schemas again at every query (14 ms of CPU for
    # 80 files here); only needed when the schema changed between writes
    union = len(files) > 1 and schema_count(con, files, local=home == "/") > 1
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
