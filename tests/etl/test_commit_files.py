"""Commits with few large files: the rows of small partitions are held back for the next
commit (``IngestConfig.hold_share``), and the vault rows of their files with them."""

from __future__ import annotations

import pyarrow as pa
import pytest

from catalog import open_lake
from etl import ingest
from etl.jobs import hold_back
from lakehouse import Lake
from tests.conftest import fast_config


def _rows(parts: list[tuple[str, int, int]]) -> pa.Table:
    """Instances rows in runs: (Modality, study_year, rows) per run, UIDs numbered."""
    mods, years, uids, texts = [], [], [], []
    for mod, year, n in parts:
        for _ in range(n):
            uids.append(f"1.2.{len(uids)}")
            mods.append(mod)
            years.append(year)
            texts.append("x" * 10)
    return pa.table({"SOPInstanceUID": uids, "Modality": mods,
                     "study_year": pa.array(years, pa.int32()), "dicom_json": texts})


def test_hold_back_holds_the_smallest_partitions_that_fit():
    # a wave of CT 2020, MR 2020, DX 2021 and US 2019 rows, then a second wave with more
    # rows of CT 2020 and DX 2021: CT has 5 rows, MR 3, DX 2, US 1
    rows = _rows([("CT", 2020, 3), ("MR", 2020, 3), ("DX", 2021, 1), ("US", 2019, 1),
                  ("CT", 2020, 2), ("DX", 2021, 1)])
    write, held = hold_back(rows, max_rows=3, max_bytes=10**6)
    # US (1 row) and DX (2 rows) fit in 3 rows; MR (3 more) does not
    assert held.column("SOPInstanceUID").to_pylist() == ["1.2.6", "1.2.10", "1.2.7"]
    assert held.column("Modality").to_pylist() == ["DX", "DX", "US"]
    assert write.column("SOPInstanceUID").to_pylist() == [
        "1.2.0", "1.2.1", "1.2.2", "1.2.3", "1.2.4", "1.2.5", "1.2.8", "1.2.9"]
    # the held rows are a copy: they keep no buffer of the wave alive
    assert held.column("dicom_json").num_chunks == 1


def test_hold_back_bounds_and_edges():
    rows = _rows([("CT", 2020, 5), ("MR", 2020, 3), ("DX", 2021, 2), ("US", 2019, 1)])
    # the DICOM JSON bound: 10 bytes a row; 25 bytes hold US (10), not DX too (30)
    write, held = hold_back(rows, max_rows=100, max_bytes=25)
    assert held.column("Modality").to_pylist() == ["US"]
    assert write.num_rows == 10
    _, held = hold_back(rows, max_rows=0, max_bytes=10**6)
    assert held.num_rows == 0
    # every partition would fit: nothing is held (a commit always writes something)
    write, held = hold_back(rows, max_rows=100, max_bytes=10**6)
    assert (write.num_rows, held.num_rows) == (11, 0)
    # null partition values are a partition of their own
    nulls = _rows([("CT", 2020, 4), ("OT", None, 1)])
    nulls = nulls.set_column(1, "Modality", pa.array(["CT"] * 4 + [None], pa.string()))
    write, held = hold_back(nulls, max_rows=2, max_bytes=10**6)
    assert held.column("SOPInstanceUID").to_pylist() == ["1.2.4"]
    assert write.num_rows == 4


def _files_per_partition(lake: Lake) -> dict[tuple, int]:
    actions = pa.table(lake.open_delta("instances").get_add_actions(flatten=True))
    out: dict[tuple, int] = {}
    for key in zip(actions.column("partition.Modality").to_pylist(),
                   actions.column("partition.study_year").to_pylist(), strict=True):
        out[key] = out.get(key, 0) + 1
    return out


@pytest.fixture(scope="module")
def two_lakes(archive, tmp_path_factory):
    """The sample archive ingested with a commit every 40 rows, without and with rows
    held back."""
    out = {}
    for share in (0.0, 0.25):
        path = tmp_path_factory.mktemp("hold") / f"lake-{share}"
        lake = Lake.create(path, profile="identified")
        summary = ingest(lake, archive[0], fast_config(flush_rows=40, batch_files=16,
                                                       batches_per_worker=1,
                                                       hold_share=share))
        out[share] = (path, lake, summary)
    return out


def test_held_rows_give_fewer_files_and_the_same_lake(two_lakes, archive):
    (p0, lake0, s0), (p1, lake1, s1) = two_lakes[0.0], two_lakes[0.25]
    assert s0.outcomes == s1.outcomes == archive[1].outcomes
    # the sample archive: 293 instances in 22 partitions, mostly in runs of one series. A
    # commit every 40 rows writes 29 files either way: the partitions of at most 11 rows
    # (held back, 10 rows at a time) each end in one file, where three of them had two
    # files without holding back; three large partitions get a file more (more commits)
    per0, per1 = _files_per_partition(lake0), _files_per_partition(lake1)
    assert (sum(per0.values()), sum(per1.values())) == (29, 29)
    t = lake1.open_delta("instances").to_pyarrow_table(columns=["Modality", "study_year"])
    rows: dict[tuple, int] = {}
    for key in zip(t.column(0).to_pylist(), t.column(1).to_pylist(), strict=True):
        rows[key] = rows.get(key, 0) + 1
    assert len(per1) == 22
    small = [k for k in per1 if rows[k] <= 11]
    assert len(small) == 15
    assert all(per1[k] == 1 for k in small)
    assert sorted(k for k in small if per0[k] == 2) == [("CR", 2024), ("CT", 2019), ("NM", 2022)]
    assert sorted(k for k in per1 if per1[k] > per0[k]) == [("CT", 2020), ("CT", 2022),
                                                           ("MR", 2021)]
    for table in ("instances", "files"):
        with open_lake(p0, vault=True) as a, open_lake(p1, vault=True) as b:
            cols = "SOPInstanceUID, file_sha256" if table == "instances" else \
                "path, outcome, SOPInstanceUID"
            q = f"SELECT {cols} FROM {table} ORDER BY ALL"
            assert a.con.execute(q).fetchall() == b.con.execute(q).fetchall(), table


def test_no_snapshot_calls_a_file_ingested_before_its_instance_is_committed(two_lakes):
    """The crash-safety invariant: a run killed after any commit reads again every file
    whose instance is not committed (its vault row says ingested only with it)."""
    path, lake, _ = two_lakes[0.25]
    numbers = lake.snapshot_numbers()
    assert len(numbers) >= 4  # several commits of this run
    held_back = 0
    for n in numbers:
        with open_lake(path, snapshot=n, vault=True) as c:
            missing = c.con.execute(
                "SELECT count(*) FROM files f WHERE f.outcome = 'ingested' AND NOT EXISTS "
                "(SELECT 1 FROM instances i WHERE i.SOPInstanceUID = f.SOPInstanceUID)"
            ).fetchone()[0]
            assert missing == 0, n
            files, instances = c.con.execute(
                "SELECT (SELECT count(*) FROM files WHERE outcome = 'ingested'), "
                "(SELECT count(*) FROM instances)").fetchone()
            assert files == instances, n
            held_back += 1
    assert held_back == len(numbers)
