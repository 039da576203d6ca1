"""A file that kills its worker process does not end the run or lose its batch."""

from __future__ import annotations

from catalog import open_lake
from etl import IngestConfig, ingest
from lakehouse import Lake
from tests.etl import corpus


def test_a_worker_crash_quarantines_only_the_poisoned_file(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    uid = corpus._Uids()
    names = [f"f{i:02d}.dcm" for i in range(9)]
    names.insert(5, "f04_poison_crash.dcm")
    for name in names:
        (src / name).write_bytes(corpus.part10(corpus.base(uid)))
    # spawned workers inherit the environment: reading this file calls os._exit in the worker
    monkeypatch.setenv("LAKE_TEST_CRASH_MARKER", "poison_crash")
    lake = Lake.create(tmp_path / "lake")
    s = ingest(lake, src, IngestConfig(scheduler="processes", workers=2, batch_files=4))
    assert s.outcomes["ingested"] == 9 and s.outcomes["quarantined"] == 1
    assert s.quarantine_reasons == {"worker_crash": 1}
    with open_lake(tmp_path / "lake", vault=True) as c:
        rows = dict(c.con.execute("SELECT path, reason FROM files").fetchall())
        assert c.counts()["instances"] == 9
    assert rows == {str(src / n): ("worker_crash" if "poison" in n else None) for n in names}
