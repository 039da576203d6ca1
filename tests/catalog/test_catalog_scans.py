"""How the catalog reads a snapshot's Parquet files: one schema (no per-query schema merge)
or several (merged by name), and tables kept in memory for a session."""

from __future__ import annotations

import shutil
import subprocess
import sys

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog import cohorts, open_lake
from catalog.spec import where
from lakehouse import Lake
from lakehouse.duck import schema_count, sql_type
from lakehouse.errors import UnknownTableError
from lakehouse.schemas import TABLES


def test_files_written_with_an_older_schema_are_read_by_column_name(built_lake, tmp_path):
    dest = tmp_path / "lake"
    shutil.copytree(built_lake[0], dest, symlinks=True)
    lake = Lake.open(dest)
    files = lake.delta("series", lake.snapshot()).file_uris()
    assert len(files) > 1
    with open_lake(dest) as cat:
        assert schema_count(cat.con, files, local=True) == 1
        before = cat.arrow("SELECT * FROM series ORDER BY SeriesInstanceUID")
    # one file as an older writer would have left it: without two columns, in another order
    old = pq.read_table(files[0])
    n_old = old.num_rows
    old = old.drop_columns(["SeriesTime", "kvp_max"])
    pq.write_table(old.select(list(reversed(old.column_names))), files[0])
    with open_lake(dest) as cat:
        # the file's schema asked again: it is not the one remembered for its path
        assert schema_count(cat.con, files, local=True) == 2
        assert schema_count(cat.con, files, local=False) == 2
        after = cat.arrow("SELECT * FROM series ORDER BY SeriesInstanceUID")
        assert after.column_names == before.column_names and after.num_rows == before.num_rows
        for name in before.column_names:
            if name in ("SeriesTime", "kvp_max"):
                assert after.column(name).null_count >= n_old
            else:
                assert after.column(name).equals(before.column(name)), name


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


@pytest.mark.parametrize("profile", ["identified", "research"])
def test_sql_types_of_the_schemas_are_duckdbs_own(profile):
    """The catalog types empty tables and missing columns without registering Arrow data
    (which loads pandas): its types are those DuckDB gives the same Arrow columns."""
    con = duckdb.connect()
    for spec in TABLES.values():
        for schema in (spec.schema(profile), spec.storage_schema(profile)):
            rel = con.from_arrow(schema.empty_table())
            assert [sql_type(f.type) for f in schema] == list(map(str, rel.types)), spec.name
    assert sql_type(pa.map_(pa.string(), pa.string())) is None


def test_tables_without_files_and_columns_no_file_has(built_lake, tmp_path):
    dest = tmp_path / "lake"
    shutil.copytree(built_lake[0], dest, symlinks=True)
    lake = Lake.open(dest)
    with open_lake(dest) as cat:
        declared = {name: dict(zip(cat.table(name).columns, map(str, cat.table(name).types),
                                   strict=True)) for name in cat.tables}
        n_series = cat.counts()["series"]
    assert declared["series"]["SeriesTime"] == "TIME" and declared["series"]["kvp_max"] == "DOUBLE"
    assert declared["image_stats"]  # a table no run wrote: no files
    assert not lake.delta("image_stats", lake.snapshot()).file_uris()
    # every series file as an older writer left it, without two columns
    for path in lake.delta("series", lake.snapshot()).file_uris():
        pq.write_table(pq.read_table(path).drop_columns(["SeriesTime", "kvp_max"]), path)
    with open_lake(dest) as cat:
        for name in cat.tables:
            rel = cat.table(name)
            assert dict(zip(rel.columns, map(str, rel.types), strict=True)) == declared[name]
        assert cat.con.execute("SELECT count(*), count(SeriesTime), count(kvp_max) "
                               "FROM series").fetchall() == [(n_series, 0, 0)]
        assert cat.counts()["image_stats"] == 0


@pytest.mark.parametrize("command", [["report", "repeats", "--format", "csv"],
                                     ["report", "dose", "--studies"], ["status"]])
def test_reports_and_status_from_the_command_line_load_neither_pandas_nor_pydicom(
        built_lake, command):
    argv = ["lake", *command, "--lake", str(built_lake[0])]
    code = ("import sys, lake_cli\n"
            f"sys.argv = {argv!r}\n"
            "assert lake_cli.main() in (0, None)\n"
            "print(sorted(m for m in ('pandas', 'pydicom', 'pyarrow.dataset') "
            "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines()[-1] == "[]"


def test_a_lake_in_a_folder_named_like_a_glob_pattern_reads_its_own_files(tmp_path):
    """DuckDB expands wildcards in the paths it is given: the catalog of a lake in ``lk*``
    with a copy in ``lk-copy`` beside it read every row twice. Such paths are read
    through a pyarrow dataset instead (``lakehouse.duck.readable_as_given``)."""
    import datetime as dt

    from lakehouse.duck import readable_as_given

    lake = Lake.create(tmp_path / "lk*", profile="identified")
    with lake.writer("r1") as w:
        w.append("studies", pa.table({
            "StudyInstanceUID": ["a1", "a2"], "Modality": ["CT"] * 2, "study_year": [2024] * 2,
            "StudyDate": [dt.date(2024, 5, 1)] * 2, "instance_count": [1] * 2}))
        w.publish()
    shutil.copytree(tmp_path / "lk*", tmp_path / "lk-copy", symlinks=True)
    assert not readable_as_given(Lake.open(tmp_path / "lk*").delta("studies").file_uris(), "/")
    assert readable_as_given(Lake.open(tmp_path / "lk-copy").delta("studies").file_uris(), "/")
    for folder in ("lk*", "lk-copy"):
        with open_lake(tmp_path / folder) as cat:
            got = cat.con.execute("SELECT StudyInstanceUID FROM studies ORDER BY 1").fetchall()
        assert got == [("a1",), ("a2",)], folder
