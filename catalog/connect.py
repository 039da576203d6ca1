"""DuckDB over one committed lake snapshot.

An in-memory DuckDB connection gets one view per table, reading the Delta
version pinned by the lake snapshot (so queries never see a run in progress,
and no database file is locked), with TIME columns cast back from their ISO
string storage. Analytics views from ``catalog/views/*.sql`` are added on top.
A lake on object storage is read the same way, DuckDB reading its files
through the lake's fsspec filesystem (``con.register_filesystem``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa

from catalog.config import CatalogConfig
from catalog.errors import QueryError
from lakehouse.duck import parquet_relation, sql_type
from lakehouse.errors import UnknownTableError
from lakehouse.schemas import RESEARCH, TABLES, VAULT, TableSpec
from lakehouse.storage import Storage
from lakehouse.tables import Lake, Snapshot

if TYPE_CHECKING:  # pandas only for df(): a catalog that never asks for one never loads it
    import pandas as pd

log = logging.getLogger(__name__)

_MISSING_TABLE = re.compile(r"Table with name (\S+) does not exist")
#: DuckDB types of the Arrow types partition columns may have
class Catalog:
    """The lake as SQL. ``Catalog(path)`` or :func:`open_lake`; close when done."""

    def __init__(self, lake: Lake | Path | str | Storage, snapshot: int | None = None,
                 config: CatalogConfig | None = None):
        self.lake = lake if isinstance(lake, Lake) else Lake.open(lake)
        self.config = config or CatalogConfig()
        #: the numbers of the snapshots kept when the catalog was opened, oldest first
        self.kept_snapshots: list[int] = self.lake.snapshot_numbers()
        self.snapshot: Snapshot = self.lake.snapshot(snapshot, numbers=self.kept_snapshots)
        self.con = duckdb.connect(":memory:")
        # a library does not draw on stderr (in Jupyter the setting may be refused)
        with contextlib.suppress(duckdb.Error):
            self.con.execute("SET enable_progress_bar = false")
        if self.config.threads:
            self.con.execute(f"SET threads TO {int(self.config.threads)}")
        if self.config.memory_limit:
            self.con.execute("SET memory_limit = ?", [self.config.memory_limit])
        # keep the Parquet footers read once: every query binds the views again, and a
        # snapshot's files never change (a Delta commit writes new files)
        self.con.execute("SET parquet_metadata_cache = true")
        self._tables: list[str] = []
        #: the data files of each table attached (of this snapshot's version)
        self.data_files: dict[str, int] = {}
        fs = self.lake.storage.duckdb_filesystem()
        if fs is not None:
            self.con.register_filesystem(fs)
        self._attach_tables()
        self._views: list[str] = []
        self._create_views()
        self._settle_legacy_kinds()

    # -- setup -------------------------------------------------------------------
    def _attach_tables(self) -> None:
        zones = (RESEARCH, VAULT) if self.config.vault else (RESEARCH,)
        for name, spec in TABLES.items():
            if spec.zone not in zones:
                continue
            raw = f"_delta_{name}"
            present: set[str] | None = None
            if name not in self.snapshot.versions:
                # a table added after this lake was created: empty until written
                present = self._attach_empty(raw, spec)
                self.data_files[name] = 0
            else:
                present = self._attach_parquet(raw, name, spec)
            if present is None:
                dataset = self.lake.dataset(name, self.snapshot)
                self.con.register(raw, dataset)
                present = set(dataset.schema.names)
            casts = [f'CAST("{c}" AS TIME) AS "{c}"' for c in spec.time_columns(self.lake.profile)
                     if c in present]
            select = f"* REPLACE ({', '.join(casts)})" if casts else "*"
            select += self._missing_columns(present, spec)
            self.con.execute(f'CREATE VIEW "{name}" AS SELECT {select} FROM "{raw}"')
            self._tables.append(name)

    def _missing_columns(self, present: set[str], spec: TableSpec) -> str:
        """``, NULL AS "c"`` for each declared column the table's files do not have (a
        column added to the schema after the table was last written), typed as declared,
        so that views and macros can rely on the declared schema of every lake."""
        schema = spec.schema(self.lake.profile)
        missing = [f for f in schema if f.name not in present]
        return "".join(f", {c}" for c in self._typed_nulls(pa.schema(missing))) \
            if missing else ""

    def _typed_nulls(self, schema: pa.Schema) -> list[str]:
        """``CAST(NULL AS type) AS "name"`` for each field of ``schema``, typed as DuckDB
        reads the Arrow type (:func:`lakehouse.duck.sql_type`; for a type it does not
        know, DuckDB's own reading of an empty table, which loads pandas)."""
        types = [sql_type(f.type) for f in schema]
        if None in types:
            declared = self.con.from_arrow(schema.empty_table())
            types = list(map(str, declared.types))
        return [f'CAST(NULL AS {typ}) AS "{f.name}"' for f, typ in zip(schema, types, strict=True)]

    def _attach_empty(self, raw: str, spec: TableSpec) -> set[str]:
        """``raw`` as a view of no rows with the table's storage columns (a table not
        written yet, or a version without files)."""
        schema = spec.storage_schema(self.lake.profile)
        columns = ", ".join(self._typed_nulls(schema))
        self.con.execute(f'CREATE VIEW "{raw}" AS SELECT {columns} WHERE false')
        return set(schema.names)

    def _attach_parquet(self, raw: str, name: str, spec: TableSpec) -> set[str] | None:
        """Scan the snapshot's Parquet files with DuckDB's own reader (see
        :func:`lakehouse.duck.parquet_relation`: local files, and the files of a lake on
        object storage through the registered fsspec filesystem). Returns the columns
        attached, or None when the table has to be read through a pyarrow dataset."""
        home = "/" if self.lake.local else self.lake.storage.uri("") + "/"
        dt = self.lake.delta(name, self.snapshot)
        files = dt.file_uris()
        self.data_files[name] = len(files)
        if not files:
            return self._attach_empty(raw, spec)
        found = parquet_relation(self.con, dt, spec, self.lake.profile, home, files)
        if found is None:
            return None
        rel, attached = found
        rel.create_view(raw)
        return attached

    def _create_views(self) -> None:
        folder = resources.files("catalog").joinpath("views")
        for entry in sorted(folder.iterdir(), key=lambda p: p.name):
            if entry.name.endswith(".sql"):
                self.con.execute(entry.read_text(encoding="utf-8"))
        # every view and table the files created (not the files' names: one file may
        # define several views, table macros and working tables)
        created = self.con.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal AND schema_name = 'main' "
            "UNION SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main' "
            "ORDER BY 1").fetchall()
        self._views = [name for (name,) in created
                       if name not in self._tables and not name.startswith("_delta_")]

    def _settle_legacy_kinds(self) -> None:
        """When every study has ``instance_kinds`` (any lake summarized since the column
        exists), the view ``legacy_kind_instances`` (the instances of the studies without
        it, which the repeat-exam exclusions test instead) has no rows: it becomes a view of
        no rows with the same columns, so that every repeat-exam query no longer binds the
        ``instances`` files (~10-20 ms per query for a lake of 480 files) nor scans them.
        The catalog reads one snapshot, so this holds for its whole session. The test
        costs the Parquet footers only: no row group has a null ``instance_kinds``."""
        if "legacy_kind_instances" not in self._views:
            return
        try:
            (nulls,) = self.con.execute(
                "SELECT count(*) FROM studies WHERE instance_kinds IS NULL").fetchall()[0]
            if nulls:
                return
            # the same columns and types, no rows (identifiers and types from the view)
            view = self.con.table("legacy_kind_instances")
            columns, types = view.columns, view.types
        except duckdb.Error as exc:  # unreadable files: the queries will say so
            log.warning("catalog: legacy_kind_instances kept as is: %s", _first_line(exc))
            return
        empty = ", ".join(f'CAST(NULL AS {typ}) AS "{col}"'
                          for col, typ in zip(columns, types, strict=True))
        self.con.execute(f"CREATE OR REPLACE VIEW legacy_kind_instances AS "
                         f"SELECT {empty} WHERE false")

    # -- queries -------------------------------------------------------------------
    @property
    def tables(self) -> list[str]:
        return list(self._tables)

    @property
    def views(self) -> list[str]:
        return list(self._views)

    def relation(self, sql: str, params: list | dict | None = None) -> duckdb.DuckDBPyRelation:
        try:
            return self.con.sql(sql, params=params)
        except duckdb.CatalogException as exc:
            m = _MISSING_TABLE.search(str(exc))
            if m:
                raise UnknownTableError(m.group(1).strip('"'),
                                        self._tables + self._views) from None
            raise QueryError(_first_line(exc)) from None
        except duckdb.Error as exc:
            raise QueryError(_first_line(exc)) from None

    def arrow(self, sql: str, params: list | dict | None = None) -> pa.Table:
        rel = self.relation(sql, params)
        if rel is None:  # a statement without a result (SET, CREATE VIEW, ...)
            return pa.table({})
        try:
            return rel.to_arrow_table()
        except duckdb.Error as exc:
            raise QueryError(_first_line(exc)) from None

    def df(self, sql: str, params: list | dict | None = None) -> pd.DataFrame:
        return self.arrow(sql, params).to_pandas()

    def table(self, name: str) -> duckdb.DuckDBPyRelation:
        if name not in self._tables and name not in self._views:
            raise UnknownTableError(name, self._tables + self._views)
        return self.con.table(name)

    def cache(self, *names: str) -> int:
        """Keep lake tables in DuckDB memory for the rest of this session.

        The table's view then reads an in-memory copy instead of decoding the
        snapshot's Parquet files on every query; views over it (``cohort_base``,
        ...) follow. The catalog is pinned to one snapshot, so the copy cannot go
        stale. Worth it when a session runs many queries on the same tables; costs
        memory (about the decoded size of the tables). Returns the rows cached.
        """
        rows = 0
        for name in names:
            if name not in self._tables:
                raise UnknownTableError(name, self._tables)
            mem = f"_mem_{name}"
            # identifiers checked against the tables the catalog attached above
            self.con.execute(f'CREATE OR REPLACE TEMP TABLE "{mem}" AS SELECT * FROM "{name}"')
            self.con.execute(f'CREATE OR REPLACE VIEW "{name}" AS SELECT * FROM "{mem}"')
            rows += self.con.execute(f'SELECT count(*) FROM "{mem}"').fetchall()[0][0]
        return rows

    def counts(self) -> dict[str, int]:
        return {t: self.con.execute(f'SELECT count(*) FROM "{t}"').fetchall()[0][0]
                for t in self._tables}

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Catalog({self.lake.location!r}, snapshot={self.snapshot.number}, "
                f"profile={self.lake.profile!r})")


def open_lake(path: Path | str | Storage, snapshot: int | None = None, *, vault: bool = False,
              threads: int | None = None, storage_options: dict | None = None) -> Catalog:
    """Open the lake at ``path`` (a folder or ``s3://bucket/prefix``; ``storage_options``:
    fsspec options of the object store) for SQL, at its latest (or a given) snapshot."""
    lake = Lake.open(path, storage_options)
    return Catalog(lake, snapshot, CatalogConfig(threads=threads, vault=vault))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
