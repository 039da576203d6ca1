"""A quarantined file that is fixed and ingested again becomes a row; its entry is resolved."""

from __future__ import annotations

from catalog import open_lake
from etl import ingest
from lakehouse import Lake
from tests.conftest import fast_config
from tests.etl import corpus


def test_a_fixed_file_is_ingested_and_its_quarantine_entry_resolved(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    uid = corpus._Uids()
    (src / "good.dcm").write_bytes(corpus.part10(corpus.base(uid)))
    fixed = corpus.part10(corpus.base(uid))
    (src / "broken.dcm").write_bytes(fixed[:-20])
    (src / "still_broken.dcm").write_bytes(b"")
    lake = Lake.create(tmp_path / "lake")
    first = ingest(lake, src, fast_config())
    assert first.quarantine_reasons == {"truncated": 1, "empty_file": 1}

    (src / "broken.dcm").write_bytes(fixed)  # the whole file, copied again from the PACS
    second = ingest(lake, src, fast_config())
    assert second.files_unchanged == 2 and second.outcomes["ingested"] == 1
    with open_lake(tmp_path / "lake") as c:
        rows = sorted(c.con.execute(
            "SELECT reason, ingest_run_id, resolved_by_run_id, resolved_at IS NOT NULL "
            "FROM quarantine").fetchall())
        assert c.counts()["instances"] == 2
    assert rows == [("empty_file", first.run_id, None, False),
                    ("truncated", first.run_id, second.run_id, True)]
    third = ingest(lake, src, fast_config())  # nothing changed: nothing resolved twice
    assert third.files_unchanged == 3
    with open_lake(tmp_path / "lake") as c:
        assert c.con.execute("SELECT count(*) FROM quarantine WHERE resolved_by_run_id IS NOT "
                             "NULL").fetchall() == [(1,)]
