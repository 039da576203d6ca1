"""lake verify (data files vs the commit log, sources vs file_sha256) and lake vacuum."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from etl import ingest
from lakehouse import Lake, layout
from lakehouse.vacuum import vacuum
from lakehouse.verify import verify
from tests.conftest import fast_config
from tests.etl import corpus


@pytest.fixture()
def small_lake(tmp_path) -> tuple[Lake, Path]:
    src = tmp_path / "src"
    src.mkdir()
    uid = corpus._Uids()
    for i in range(4):
        (src / f"f{i}.dcm").write_bytes(corpus.part10(corpus.base(uid)))
    lake = Lake.create(tmp_path / "lake")
    ingest(lake, src, fast_config())
    return lake, src


def _data_files(lake: Lake, table: str) -> list[Path]:
    root = layout.table_path(lake.root, table)
    return sorted(p for p in root.rglob("*.parquet") if "_delta_log" not in p.parts)


def test_a_clean_lake_verifies(small_lake):
    lake, _ = small_lake
    r = verify(lake, sources=True)
    assert r.ok, r.problems
    assert r.files_without_checksum == 0
    assert r.files_checked == sum(len(lake.delta(n).file_uris()) for n in lake.table_names())
    assert r.sources_checked == 4


def test_a_flipped_byte_and_a_truncated_file_are_reported(small_lake):
    lake, _ = small_lake
    flipped, = _data_files(lake, "instances")
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    cut = _data_files(lake, "files")[0]
    cut.write_bytes(cut.read_bytes()[:-100])
    r = verify(lake)
    got = sorted((p.table, Path(p.path).name, p.kind) for p in r.problems)
    assert got == [("files", cut.name, "size"), ("instances", flipped.name, "checksum")]
    out = subprocess.run([sys.executable, "-m", "lake_cli", "verify", "--lake", str(lake.root)],
                         capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert out.returncode == 1
    assert f"instances: {flipped.relative_to(lake.root / 'research' / 'instances')}: checksum" \
        in out.stdout
    assert "2 problems" in out.stdout


def test_changed_and_missing_sources_are_reported(small_lake):
    lake, src = small_lake
    (src / "f1.dcm").write_bytes((src / "f1.dcm").read_bytes() + b"\x00\x00")
    (src / "f2.dcm").unlink()
    r = verify(lake, sources=True)
    assert sorted((Path(p.path).name, p.kind) for p in r.problems) == [
        ("f1.dcm", "source_changed"), ("f2.dcm", "source_missing")]
    assert all(p.table == "source" for p in r.problems)


def test_vacuum_removes_only_orphans_older_than_the_retention(small_lake):
    lake, _ = small_lake
    before = {n: lake.read(n).num_rows for n in lake.table_names()}
    with lake.writer("killed") as w:  # commits, never publishes: what a kill -9 leaves
        w.append("quarantine", pa.table({"reason": ["x"]}))
        w.append("instances", pa.table({"SOPInstanceUID": ["9.9"], "Modality": ["CT"]}))
    orphans = set(_data_files(lake, "quarantine") + _data_files(lake, "instances"))
    r = vacuum(lake, retention_hours=1)
    assert r.removed == {} and r.kept_recent == 2
    r = vacuum(lake, retention_hours=0)
    removed = {layout.table_path(lake.root, t) / p for t, ps in r.removed.items() for p in ps}
    assert len(removed) == 2 and removed <= orphans
    assert all(not p.exists() for p in removed)
    assert {n: lake.read(n).num_rows for n in lake.table_names()} == before
    assert verify(lake).ok
    # every snapshot (time travel) still reads whole
    for snap in lake.snapshots():
        for n in lake.table_names():
            lake.read(n, snap)
