"""A run compacts the partitions its runs have filled with small files
(``IngestConfig.compact_files``): the same rows as a lake never compacted, fewer files,
snapshots and summaries intact."""

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from etl import ingest, jobs
from lake_cli import main
from lakehouse import Lake
from lakehouse.tables import add_actions, written_by
from lakehouse.verify import verify
from tests.conftest import NIGHTS, fast_config


def small_files(lake: Lake, name: str, leave: str = "") -> Counter:
    """Files under the run's compaction size, per partition of ``name``; not those the
    run ``leave`` wrote."""
    adds = add_actions(lake.delta(name)).to_pylist()
    return Counter(tuple(v for k, v in sorted(a.items()) if k.startswith("partition."))
                   for a in adds if a["size_bytes"] < jobs.COMPACT_SMALL_BYTES
                   and not (leave and written_by(a["path"], leave)))


def excess(lake: Lake, name: str, leave: str = "") -> int:
    """The small files of ``name`` beyond one per partition (what compaction takes away);
    not those the run ``leave`` wrote."""
    return sum(n - 1 for n in small_files(lake, name, leave).values())


def every_row(lake: Lake, snapshot=None) -> dict[str, list[str]]:
    """The rows of every table but the run log, in a canonical order, the columns naming
    a run or a moment left out (files and row order change with compaction)."""
    out = {}
    for name in lake.table_names():
        if name == "ingest_runs":
            continue
        t = lake.read(name, snapshot)
        t = t.drop_columns([f.name for f in t.schema if "run_id" in f.name
                            or pa.types.is_timestamp(f.type)])
        out[name] = sorted(json.dumps(r, sort_keys=True, default=str) for r in t.to_pylist())
    return out


def test_runs_compact_what_they_leave_small(nightly, tmp_path):
    compacted = Lake.create(tmp_path / "compacted", profile="identified")
    plain = Lake.create(tmp_path / "plain", profile="identified")
    runs, snapshots = [], []
    for part in nightly:
        run = ingest(compacted, part, fast_config(compact_files=3))
        runs.append(run)
        ingest(plain, part, fast_config(compact_files=0))
        snapshots.append((compacted.snapshot(), every_row(compacted)))
        for name in compacted.table_names():
            # the files of earlier runs: one per partition once compacted, else fewer than
            # 3 beyond one (the run's own files are left as it wrote them)
            left = excess(compacted, name, leave=run.run_id)
            assert left == 0 if name in run.compacted else left < 3, name
    # a first run compacts nothing (its own files); the runs after it had work to do
    assert runs[0].compacted == {}
    assert excess(plain, "instances") >= 3 * (NIGHTS - 1)
    assert [r.compacted.get("instances") is not None for r in runs[1:]].count(True) >= 1
    assert all(r.compacted.get("ingest_runs") is None for r in runs)  # 4 files: 3 beyond one
    assert len(compacted.delta("ingest_runs").file_uris()) == NIGHTS
    # the files each compaction took away are those missing from the compacted lake
    gone = sum(a - b for r in runs for t, (a, b) in r.compacted.items() if t == "instances")
    assert len(compacted.delta("instances").file_uris()) == \
        len(plain.delta("instances").file_uris()) - gone
    # the same rows as the lake never compacted, and every snapshot reads its own rows
    assert every_row(compacted) == every_row(plain)
    for snap, rows in snapshots:
        assert every_row(compacted, snap) == rows
    assert verify(compacted).problems == []
    # the summaries are those of the compacted instances: a run with nothing new finds
    # them current (no comparison of moved rows)
    snap = compacted.snapshot()
    assert snap.extra["summaries_from"] == snap.versions["instances"]
    assert ingest(compacted, nightly[-1], fast_config(compact_files=3)).summaries == "current"


def test_a_first_run_does_not_look_at_tables_that_were_empty(nightly, tmp_path, monkeypatch):
    """Every table of a new lake is empty at version 0: its first run holds only its own
    files, which it leaves as written, so no table is opened again to look for files to
    compact. The next run looks at each table it wrote, and at the run log."""
    looked: list[list[str]] = []

    def spy(w, name, *args, **kwargs):
        looked[-1].append(name)
        return compact(w, name, *args, **kwargs)

    compact = jobs.compact
    monkeypatch.setattr(jobs, "compact", spy)
    lake = Lake.create(tmp_path / "lake", profile="identified")
    versions = []
    for part in nightly[:2]:
        looked.append([])
        ingest(lake, part, fast_config(compact_files=1))
        versions.append(lake.snapshot().versions)
    assert looked[0] == []
    assert all(versions[0][n] > 0 for n in  # what the first run wrote, unlooked at
               ("instances", "files", "series", "studies", "ingest_runs"))
    written = {n for n, v in versions[1].items() if v != versions[0][n]} - {"ingest_runs"}
    assert {"instances", "files", "series", "studies"} <= written
    assert sorted(looked[1]) == sorted(written | {"ingest_runs"})


def test_compact_files_zero_and_the_cli(nightly, tmp_path, capsys):
    lake = tmp_path / "lake"
    assert main(["init", "--lake", str(lake), "--profile", "identified"]) == 0
    for part in nightly[:3]:
        assert main(["ingest", str(part), "--lake", str(lake), "--scheduler", "synchronous",
                     "--compact-files", "0", "--no-progress"]) == 0
    assert max(small_files(Lake.open(lake), "instances").values()) == 3
    capsys.readouterr()
    # a run that reads nothing compacts the run log once it holds enough files
    assert main(["ingest", str(nightly[0]), "--lake", str(lake), "--scheduler",
                 "synchronous", "--compact-files", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["compacted"] == {}  # 2 beyond one, not 3
    assert main(["ingest", str(nightly[0]), "--lake", str(lake), "--scheduler",
                 "synchronous", "--compact-files", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["compacted"] == {"ingest_runs": {"files": 4, "into": 1}}
    assert main(["ingest", str(nightly[3]), "--lake", str(lake), "--scheduler",
                 "synchronous", "--compact-files", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "  compacted: " in printed and "instances " in printed
    # each partition: the earlier runs' files as one, and this run's own file
    assert max(small_files(Lake.open(lake), "instances").values()) == 2
    last = Lake.open(lake).read("ingest_runs").sort_by("started_at")
    last_run = last.column("ingest_run_id")[-1].as_py()
    assert max(small_files(Lake.open(lake), "instances", leave=last_run).values()) == 1
    with pytest.raises(SystemExit):
        main(["ingest", str(nightly[0]), "--lake", str(lake), "--compact-files", "-1"])
    assert "--compact-files: expected an integer >= 0, got '-1'" in capsys.readouterr().err


def test_a_compaction_that_fails_leaves_the_run_whole(nightly, tmp_path, monkeypatch, caplog):
    lake = Lake.create(tmp_path / "lake", profile="identified")
    for part in nightly[:2]:
        ingest(lake, part, fast_config(compact_files=0))
    files = {n: len(lake.delta(n).file_uris()) for n in lake.table_names()}

    def fail(self, name, groups, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jobs.LakeWriter, "compact", fail)
    run = ingest(lake, nightly[2], fast_config(compact_files=3))
    assert run.compacted == {} and run.outcomes["ingested"] > 0
    assert "instances not compacted: [Errno 28] No space left on device" in caplog.text
    # the run's rows are published; no table lost a file
    snap = lake.snapshot()
    assert snap.number == run.snapshot
    assert all(len(lake.delta(n).file_uris()) >= files[n] for n in files)
    assert set(lake.read("ingest_runs").column("status").to_pylist()) == {"completed"}


def test_a_partitions_large_file_is_left_while_small_ones_gather(archive, tmp_path,
                                                                  monkeypatch):
    """Tiered: the small files that runs add beside a partition's large file (a first
    run's) are compacted among themselves, and the large file is left as it is (it was
    rewritten with them before: a listener's batches rewrote the lake's partitions);
    the rows are those of a lake never compacted, and ``lake optimize`` still makes
    each partition one file. (The large file here is a few hundred KB: files under
    ``TIER_FREE_BYTES``, 2 MiB, join any group, so it is set to 0.)"""
    import pydicom
    from pydicom.uid import generate_uid

    from lakehouse import optimize as optimize_module
    from lakehouse.optimize import compact, optimize

    monkeypatch.setattr(optimize_module, "TIER_FREE_BYTES", 0)

    source = next(p for p in sorted(archive[0].rglob("*.dcm"))
                  if pydicom.dcmread(p, stop_before_pixels=True).get("Modality") == "CT")
    ds = pydicom.dcmread(source)

    def copies(folder: Path, n: int) -> Path:  # new instances of the source's partition
        folder.mkdir()
        for i in range(n):
            ds.SOPInstanceUID = generate_uid()
            ds.save_as(folder / f"{i}.dcm")
        return folder

    compacted = Lake.create(tmp_path / "compacted", profile="identified")
    plain = Lake.create(tmp_path / "plain", profile="identified")
    first = copies(tmp_path / "first", 2000)
    for lake in (compacted, plain):
        ingest(lake, first, fast_config(compact_files=0))
    (large,) = add_actions(compacted.delta("instances")).to_pylist()
    runs = []
    for night in range(4):  # one new instance a night, in the large file's partition
        folder = copies(tmp_path / f"night{night}", 1)
        runs.append(ingest(compacted, folder, fast_config(compact_files=2)))
        ingest(plain, folder, fast_config(compact_files=0))
    # nights 2 and 3 found one small file beside the large one, then two: nothing to take
    # away (2 needed); night 4, three small files: merged into one, the large one left
    assert [r.compacted.get("instances") for r in runs] == [None, None, None, (3, 1)]
    after = add_actions(compacted.delta("instances")).to_pylist()
    assert large["path"] in [a["path"] for a in after]
    assert sorted(a["num_records"] for a in after) == [1, 3, 2000]
    # compacting again, as the last run did, would take nothing away
    with compacted.writer("dry-run") as w:
        again = compact(w, "instances", jobs.COMPACT_SMALL_BYTES, jobs.COMPACT_TARGET_BYTES,
                        dry_run=True, leave_run=runs[-1].run_id, tiered=True)
    assert again.rewritten == 0
    assert every_row(compacted) == every_row(plain)
    assert verify(compacted).problems == []
    optimize(compacted)
    assert every_row(compacted) == every_row(plain)
    assert [a["num_records"] for a in add_actions(compacted.delta("instances")).to_pylist()] \
        == [2004]
