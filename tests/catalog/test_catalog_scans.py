"""How the catalog reads a snapshot's Parquet files: one schema (no per-query schema merge)
or several (merged by name), and tables kept in memory for a session."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest

from catalog import cohorts, open_lake
from catalog.spec import where
from lakehouse import Lake
from lakehouse.errors import UnknownTableError


def test_files_written_with_an_older_schema_are_read_by_column_name(built_lake, tmp_path):
    dest = tmp_path / "lake"
    shutil.copytree(built_lake[0], dest, symlinks=True)
    lake = Lake.open(dest)
    files = lake.delta("series", lake.snapshot()).file_uris()
    assert len(files) > 1
    with open_lake(dest) as cat:
        assert cat.con.execute(schemas_sql(), {"files": files}).fetchall() == [(1,)]
        before = cat.arrow("SELECT * FROM series ORDER BY SeriesInstanceUID")
    # one file as an older writer would have left it: without two columns, in another order
    old = pq.read_table(files[0])
    n_old = old.num_rows
    old = old.drop_columns(["SeriesTime", "kvp_max"])
    pq.write_table(old.select(list(reversed(old.column_names))), files[0])
    with open_lake(dest) as cat:
        assert cat.con.execute(schemas_sql(), {"files": files}).fetchall() == [(2,)]
        after = cat.arrow("SELECT * FROM series ORDER BY SeriesInstanceUID")
        assert after.column_names == before.column_names and after.num_rows == before.num_rows
        for name in before.column_names:
            if name in ("SeriesTime", "kvp_max"):
                assert after.column(name).null_count >= n_old
            else:
                assert after.column(name).equals(before.column(name)), name


def schemas_sql() -> str:
    """The catalog's count of distinct schemas among Parquet files."""
    from importlib import resources

    return resources.files("lakehouse").joinpath("sql", "parquet_schemas.sql").read_text()


def test_cached_tables_give_the_same_rows_from_memory(built_lake):
    spec = where.modality("CT", "MR") & ~where.age(min=60)
    with open_lake(built_lake[0]) as cat:
        rows = cohorts.run(cat, cohorts.Definition.of(spec=spec)).rows
        members = cohorts.members(cat, spec)
        counts = cat.counts()
        assert cohorts.cache_base(cat) == counts["series"] + counts["studies"]
        memory = {r[0] for r in cat.con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE temporary").fetchall()}
        assert memory == {"_mem_series", "_mem_studies", "_cohort_base_cache"}
        assert cohorts.run(cat, cohorts.Definition.of(spec=spec)).rows.equals(rows)
        assert cohorts.members(cat, spec) == members and members
        assert cat.counts() == counts
        with pytest.raises(UnknownTableError, match="nope"):
            cat.cache("nope")
