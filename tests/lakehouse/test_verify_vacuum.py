"""lake verify (data files vs the commit log, sources vs file_sha256) and lake vacuum."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from etl import ingest
from lakehouse import Lake, layout
from lakehouse.errors import SnapshotNotFoundError
from lakehouse.optimize import optimize
from lakehouse.vacuum import CohortFileError, vacuum
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


def _quarantine_runs(lake: Lake, runs: int) -> None:
    for i in range(runs):
        with lake.writer(f"r{i}") as w:
            w.append("quarantine", pa.table({"reason": [f"run {i}"]}))
            w.publish()


def _pin(lake: Lake, name: str, snapshot: int) -> None:
    """A saved cohort's file as far as the lake knows it: the snapshot it pins."""
    folder = layout.cohorts_dir(lake.root)
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({"name": name, "snapshot": snapshot}))


def test_expired_snapshots_free_the_files_only_they_reference(small_lake):
    """Three runs add a quarantine file each (snapshots b+1 to b+3), compaction rewrites
    them into one (b+4); a cohort pins snapshot b+2. Expiring everything old keeps
    snapshots b+2 and b+4: of the three runs' files, only the third is deleted."""
    lake, _ = small_lake
    b = lake.snapshot().number
    before = set(_data_files(lake, "quarantine"))
    _quarantine_runs(lake, 3)
    runs = sorted(set(_data_files(lake, "quarantine")) - before,
                  key=lambda p: pq.read_table(p).column("reason")[0].as_py())
    assert len(runs) == 3
    optimize(lake, ["quarantine"])
    (compacted,) = set(_data_files(lake, "quarantine")) - before - set(runs)
    assert lake.snapshot_numbers() == list(range(b + 5))
    _pin(lake, "chest_ct", b + 2)
    rows = {n: lake.read("quarantine", lake.snapshot(n)).num_rows for n in (b + 2, b + 4)}
    assert rows == {b + 2: 2, b + 4: 3}
    expired = [*range(b + 2), b + 3]
    quarantine = layout.table_path(lake.root, "quarantine")

    dry = vacuum(lake, retention_hours=0, dry_run=True, expire_days=0)
    assert (dry.expired, dry.pinned) == (expired, {b + 2: ["chest_ct"]})
    assert [quarantine / p for p in dry.removed["quarantine"]] == [runs[2]]
    assert lake.snapshot_numbers() == list(range(b + 5)) and runs[2].exists()

    young = vacuum(lake, retention_hours=0, expire_days=30)
    assert (young.expired, young.pinned, young.removed) == ([], {}, {})

    report = vacuum(lake, retention_hours=0, expire_days=0)
    assert (report.expired, report.pinned) == (expired, {b + 2: ["chest_ct"]})
    assert report.removed == dry.removed and report.bytes_removed == dry.bytes_removed
    assert lake.snapshot_numbers() == [b + 2, b + 4]
    assert [p.exists() for p in (*runs, compacted)] == [True, True, False, True]
    assert {n: lake.read("quarantine", lake.snapshot(n)).num_rows for n in rows} == rows
    for n in lake.table_names():  # both kept snapshots read whole
        lake.read(n, lake.snapshot(b + 2))
        lake.read(n)
    assert verify(lake).ok
    with pytest.raises(SnapshotNotFoundError, match=rf"^snapshot {b + 3} is no longer kept "
                       r"\(`lake vacuum --expire-days` expired it\); 2 snapshots are kept, "
                       rf"the latest is {b + 4}$"):
        lake.snapshot(b + 3)
    _quarantine_runs(lake, 1)  # the next run publishes the next number
    assert lake.snapshot_numbers() == [b + 2, b + 4, b + 5]


def test_a_cohort_saved_at_a_snapshot_while_it_expires_keeps_it(small_lake, monkeypatch):
    """`lake cohort save --snapshot N` does not wait for the writer: a cohort pinned to a
    snapshot that vacuum is expiring, saved between the two, keeps it."""
    lake, _ = small_lake
    _quarantine_runs(lake, 2)
    remove = type(lake.storage).remove

    def save_meanwhile(storage, rel):
        remove(storage, rel)
        if rel.endswith(f"{lake.snapshot_numbers()[-1] - 1:010d}.json"):
            _pin(lake, "late", lake.snapshot_numbers()[-1] - 1)

    monkeypatch.setattr(type(lake.storage), "remove", save_meanwhile)
    b = lake.snapshot().number
    report = vacuum(lake, retention_hours=0, expire_days=0)
    assert report.expired == [*range(b - 1)] and lake.snapshot_numbers() == [b - 1, b]
    assert lake.snapshot(b - 1).versions["quarantine"] == 1


def test_an_unreadable_cohort_file_expires_nothing(small_lake):
    lake, _ = small_lake
    _quarantine_runs(lake, 1)
    folder = layout.cohorts_dir(lake.root)
    folder.mkdir()
    (folder / "broken.json").write_text("{not json")
    with pytest.raises(CohortFileError, match=r"broken.json \(JSONDecodeError\), so the "
                       r"snapshot it pins is not known and no snapshot was expired"):
        vacuum(lake, retention_hours=0, expire_days=0)
    assert lake.snapshot_numbers() == [0, 1, 2, 3]


def _states(lake: Lake, name: str) -> dict[int, set[str]]:
    """The reference: deltalake's state of each version of ``name``, loaded whole."""
    from urllib.parse import unquote

    out = {}
    for v in range(lake.open_delta(name).version() + 1):
        paths = lake.open_delta(name, v).get_add_actions(flatten=True).column("path")
        out[v] = {q for p in paths.to_pylist() for q in (p, unquote(p))}
    return out


def test_referenced_files_replayed_from_the_log_equal_each_versions_state(small_lake):
    """Runs, compaction and a partition value that must be quoted; subsets of the
    versions against deltalake's state of each; then with the commits before a
    checkpoint gone (log clean-up): the state of the next version is loaded instead."""
    from itertools import combinations

    from lakehouse.tables import CHECKPOINT_EVERY, commit_file
    from lakehouse.vacuum import referenced_files

    lake, _ = small_lake
    for i in range(CHECKPOINT_EVERY):
        with lake.writer(f"m{i}") as w:
            w.append("instances", pa.table({"SOPInstanceUID": [f"9.{i}"],
                                            "Modality": [["CT", "C T/%x ä", "MR"][i % 3]]}))
            w.publish()
    optimize(lake, ["instances"], small_bytes=2**30)
    with lake.writer("last") as w:
        w.append("instances", pa.table({"SOPInstanceUID": ["9.99"], "Modality": ["MR"]}))
        w.publish()
    states = _states(lake, "instances")
    last = max(states)
    assert last > CHECKPOINT_EVERY and len({frozenset(s) for s in states.values()}) > 10

    def reference(versions) -> set[str]:
        return set().union(*(states[v] for v in versions))

    for k in (1, 2, 3):
        for versions in combinations(range(last + 1), k):
            if k < 3 or versions[0] % 3 == 0:
                assert referenced_files(lake, "instances", set(versions), []) == \
                    reference(versions), versions
    for v in range(1, CHECKPOINT_EVERY):  # as the log clean-up leaves it
        (lake.root / commit_file("instances", v)).unlink()
    later = {0, *range(CHECKPOINT_EVERY, last + 1)}
    assert referenced_files(lake, "instances", later, []) == reference(later)


def test_expiry_cleans_the_log_of_what_no_kept_snapshot_needs(small_lake):
    """25 runs commit to ``quarantine``; a cohort pins the snapshot at its version 23.
    Expiring the rest removes the log files before the checkpoint at 20 (and nothing of
    the tables committed less often). The checksums of those commits move to
    ``_lake_checksums.json``: verify still checks every file (a changed byte in a file
    whose commit was cleaned is found), and the next vacuum keeps that file."""
    from lakehouse.tables import CHECKPOINT_EVERY, commit_file
    from lakehouse.vacuum import referenced_files

    lake, _ = small_lake
    assert CHECKPOINT_EVERY == 10
    _quarantine_runs(lake, 25)
    (pinned,) = [s.number for s in lake.snapshots() if s.versions["quarantine"] == 23]
    _pin(lake, "kept", pinned)
    log_dir = layout.table_path(lake.root, "quarantine") / "_delta_log"
    cleaned = sorted([f"{v:020d}.json" for v in range(20)]
                     + [f"{10:020d}.checkpoint.parquet"])
    assert set(cleaned) < {p.name for p in log_dir.iterdir()}
    before = verify(lake)
    assert before.ok and before.files_without_checksum == 0

    dry = vacuum(lake, retention_hours=0, dry_run=True, expire_days=0)
    assert dry.log_removed == {"quarantine": cleaned}
    assert all((log_dir / n).exists() for n in cleaned)

    report = vacuum(lake, retention_hours=0, expire_days=0)
    assert report.log_removed == {"quarantine": cleaned}
    assert lake.snapshot_numbers() == [pinned, lake.snapshot().number]
    assert not any((log_dir / n).exists() for n in cleaned)
    assert (log_dir / f"{20:020d}.checkpoint.parquet").exists()
    rows = {n: lake.read("quarantine", lake.snapshot(n)).num_rows
            for n in lake.snapshot_numbers()}
    assert rows == {pinned: 23, lake.snapshot().number: 25}
    for n in lake.table_names():
        lake.read(n, lake.snapshot(pinned))
    after = verify(lake)
    assert (after.ok, after.files_checked, after.files_without_checksum) == \
        (True, before.files_checked, 0)
    carried = layout.table_path(lake.root, "quarantine") / layout.CARRIED_CHECKSUMS
    sums = json.loads(carried.read_text())
    live = lake.delta("quarantine").get_add_actions(flatten=True).column("path").to_pylist()
    old = [p for p in live if p in sums]  # added by a commit now cleaned from the log
    assert old and set(sums) <= referenced_files(lake, "quarantine")

    again = vacuum(lake, retention_hours=0, expire_days=0)
    assert (again.expired, again.removed, again.log_removed) == ([], {}, {})
    assert json.loads(carried.read_text()) == sums
    _quarantine_runs(lake, 1)  # the next run commits, checkpoints and reads as before
    assert lake.read("quarantine").num_rows == 26
    assert not (lake.root / commit_file("quarantine", 0)).exists()
    target = layout.table_path(lake.root, "quarantine") / old[0]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    assert [(p.table, p.path, p.kind) for p in verify(lake).problems] == \
        [("quarantine", old[0], "checksum")]


def test_unreadable_carried_checksums_stop_the_log_clean_up(small_lake):
    """A damaged ``_lake_checksums.json`` is not overwritten (the checksums of commits
    cleaned earlier would be lost): vacuum stops with one line, the log as it was."""
    from lakehouse.vacuum import CarriedChecksumsError

    lake, _ = small_lake
    _quarantine_runs(lake, 12)
    carried = layout.table_path(lake.root, "quarantine") / layout.CARRIED_CHECKSUMS
    carried.write_text("{cut")
    log_dir = layout.table_path(lake.root, "quarantine") / "_delta_log"
    before = sorted(p.name for p in log_dir.iterdir())
    with pytest.raises(CarriedChecksumsError, match=r"_lake_checksums.json \(JSONDecodeError"
                       r"\), the checksums of commits cleaned from the log earlier, so no "
                       r"more of the log was cleaned; restore"):
        vacuum(lake, retention_hours=0, expire_days=0)
    assert sorted(p.name for p in log_dir.iterdir()) == before
    assert carried.read_text() == "{cut"
