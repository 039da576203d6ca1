"""lake optimize: small files compacted, rows unchanged, time travel and verify intact."""

from __future__ import annotations

import json
import shutil
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from etl import ingest
from lake_cli import main
from lakehouse import Lake, layout
from lakehouse.optimize import optimize
from lakehouse.tables import add_actions
from lakehouse.vacuum import vacuum
from lakehouse.verify import verify
from tests.conftest import fast_config


def _files(lake: Lake, name: str) -> list[str]:
    return add_actions(lake.delta(name)).column("path").to_pylist()


def _rows(lake: Lake, snapshot=None) -> dict[str, list]:
    """Every table's rows, in a canonical order (files and row order may change)."""
    out = {}
    for name in lake.table_names():
        t = lake.read(name, snapshot)
        out[name] = sorted(json.dumps(r, sort_keys=True, default=str) for r in t.to_pylist())
    return out


@pytest.fixture(scope="module")
def split_lake(archive, tmp_path_factory):
    """The sample archive ingested in three runs (every third file each), so the
    partitions of instances hold several small files."""
    root = tmp_path_factory.mktemp("optimize")
    files = sorted(p for p in archive[0].rglob("*") if p.is_file() and not p.is_symlink())
    lake = Lake.create(root / "lake", profile="identified")
    for i in range(3):
        part = root / f"part{i}"
        for f in files[i::3]:
            dest = part / f.relative_to(archive[0])
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
        ingest(lake, part, fast_config(compact_files=0))  # the runs' own compaction off
    return root / "lake"


def test_optimize_compacts_without_changing_a_row(split_lake, tmp_path):
    path = tmp_path / "lake"
    shutil.copytree(split_lake, path)
    lake = Lake.open(path)
    before_snap = lake.snapshot()
    before = _rows(lake)
    files_before = {n: len(_files(lake, n)) for n in lake.table_names()}
    assert files_before["instances"] > len(lake.read("instances").group_by(
        ["Modality", "study_year"]).aggregate([]))  # several files per partition

    report = optimize(lake)
    assert report.snapshot == before_snap.number + 1
    res = report.tables["instances"]
    files_after = {n: len(_files(lake, n)) for n in lake.table_names()}
    assert res.files_before == files_before["instances"]
    assert res.files_after == files_after["instances"] < files_before["instances"]
    partitions = len(lake.read("instances").group_by(["Modality", "study_year"]).aggregate([]))
    assert files_after["instances"] == partitions  # one file per partition now
    assert _rows(lake) == before  # the same rows, every table
    assert _rows(lake, before_snap) == before  # and time travel still reads its own files
    assert verify(lake).problems == []  # new files checksummed in the commit log
    # provenance: the new files name the optimize run
    new = _files(lake, "instances")[0]
    meta = pq.read_metadata(layout.table_path(path, "instances") / unquote(new)).metadata
    assert meta[b"lake.run_id"] == report.run_id.encode()
    # the replaced files stay while an older snapshot references them
    assert vacuum(lake, retention_hours=0).removed == {}
    assert _rows(lake, before_snap) == before
    # nothing left to do: no new snapshot
    again = optimize(lake)
    assert again.snapshot is None and again.tables["instances"].rewritten == 0


def test_dry_run_and_cli(split_lake, tmp_path, capsys):
    path = tmp_path / "lake"
    shutil.copytree(split_lake, path)
    lake = Lake.open(path)
    n = lake.snapshot().number
    dry = optimize(lake, dry_run=True)
    assert dry.snapshot is None and lake.snapshot().number == n
    assert dry.tables["instances"].rewritten > 0
    assert main(["optimize", "--lake", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["snapshot"] == n + 1
    assert out["tables"]["instances"]["files_after"] == dry.tables["instances"].files_after
    # lake status shows the data files of every table, as the optimize left them
    assert main(["status", "--lake", str(path), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["table_files"] == {n: len(_files(lake, n)) for n in status["tables"]}
    assert status["table_files"]["instances"] == dry.tables["instances"].files_after
    assert status["table_files"]["image_stats"] == 0
    assert main(["status", "--lake", str(path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  instances "))
    assert line.split()[1:] == [f"{status['tables']['instances']:,}",
                                str(dry.tables["instances"].files_after)]
    assert main(["optimize", "--lake", str(path), "--table", "nope"]) == 1
    assert "unknown table" in capsys.readouterr().err


def test_partition_values_survive(split_lake, tmp_path):
    """Null partitions (undated studies) and typed partition columns come back as they were."""
    path = tmp_path / "lake"
    shutil.copytree(split_lake, path)
    lake = Lake.open(path)
    key = ["Modality", "study_year"]
    counts = lake.read("instances").group_by(key).aggregate([([], "count_all")])
    optimize(lake, tables=["instances"])
    after = lake.read("instances").group_by(key).aggregate([([], "count_all")])
    assert after.sort_by([(k, "ascending") for k in key]).equals(
        counts.sort_by([(k, "ascending") for k in key]))
    assert lake.read("instances").schema.field("study_year").type == pa.int32()


def test_a_quoted_partition_is_compacted_without_duplicates(tmp_path):
    """A partition value quoted in its folder name (``Modality=O%20T%2F%25``): the files
    compacted are removed by the same commit (deltalake gives their paths encoded once
    more; a remove action must name them as their add action did)."""
    import datetime as dt

    lake = Lake.create(tmp_path / "lk", profile="identified")
    with lake.writer("r1") as w:
        for uid in ("1", "2", "3"):
            w.append("studies", pa.table({
                "StudyInstanceUID": [uid], "Modality": ["O T/%"], "study_year": [2024],
                "StudyDate": [dt.date(2024, 5, 1)], "instance_count": [1]}))
        w.publish()
    assert len(_files(lake, "studies")) == 3
    report = optimize(lake, tables=["studies"])
    assert report.tables["studies"].rewritten == 3
    assert len(_files(lake, "studies")) == 1
    assert sorted(lake.read("studies").column("StudyInstanceUID").to_pylist()) == ["1", "2", "3"]
    assert not verify(lake).problems


def test_tiers_leave_a_file_much_larger_than_the_smaller_ones_together(monkeypatch):
    """A run's compaction (``tiered``): files from the smallest, each joining while it is
    at most twice the group so far (or small enough to rewrite for little), up to the
    target size; a group keeps the files' order; a file alone is left alone."""
    from lakehouse import optimize
    from lakehouse.optimize import _groups

    def _tiers(files: list[dict], target: int) -> list[list[dict]]:
        return _groups(files, target, tiered=True)

    files = [{"path": f"f{i}", "size_bytes": s} for i, s in enumerate([10, 10, 1000])]
    assert len(_tiers(files, 10_000)[0]) == 3  # 1000 bytes: rewritten for little
    monkeypatch.setattr(optimize, "TIER_FREE_BYTES", 0)

    def groups(sizes: list[int], target: int = 10_000) -> list[list[str]]:
        files = [{"path": f"f{i}", "size_bytes": s} for i, s in enumerate(sizes)]
        return [[f["path"] for f in g] for g in _tiers(files, target)]

    assert groups([10, 10, 1000, 10, 10]) == [["f0", "f1", "f3", "f4"]]  # not the 1000
    assert groups([100, 10, 12, 30]) == [["f0", "f1", "f2", "f3"]]  # 10, 22, 52: then 100
    assert groups([10, 25]) == []  # 25 is more than twice 10
    assert groups([10, 25, 26]) == [["f1", "f2"]]
    assert groups([10, 10, 10, 10], target=25) == [["f0", "f1"], ["f2", "f3"]]
    assert groups([5000, 5000, 5000], target=10_000) == [["f0", "f1"]]
    assert groups([]) == [] and groups([7]) == []
    # every file rewritten at least grows by half: the largest of a group is at most two
    # thirds of it (so a row is rewritten a few times in its life, not at every compaction)
    import random

    rng = random.Random(7)
    for _ in range(300):
        sizes = [int(rng.lognormvariate(8, 2)) + 1 for _ in range(rng.randint(2, 30))]
        for g in _tiers([{"path": str(i), "size_bytes": s} for i, s in enumerate(sizes)],
                        1 << 40):
            sizes_of = [f["size_bytes"] for f in g]
            assert 3 * max(sizes_of) <= 2 * sum(sizes_of), sizes_of
