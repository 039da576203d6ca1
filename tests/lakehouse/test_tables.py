import datetime as dt
import json
import os
import pickle
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from lakehouse import Lake, NoLakeError
from lakehouse.errors import LakeBusyError, LakeExistsError, SnapshotNotFoundError
from lakehouse.layout import lock_path, table_path
from lakehouse.schemas import TABLES, conform
from lakehouse.tables import CHECKPOINT_EVERY, add_actions


def test_create_makes_every_table_and_snapshot_zero(tmp_path):
    lake = Lake.create(tmp_path / "lk")
    snap = lake.snapshot()
    assert snap.number == 0
    assert set(snap.versions) == set(TABLES)
    assert all(lake.count(t) == 0 for t in TABLES)
    assert (tmp_path / "lk" / "vault").stat().st_mode & 0o777 == 0o700


def test_create_refuses_existing_lake_and_open_refuses_missing(tmp_path):
    Lake.create(tmp_path / "lk")
    with pytest.raises(LakeExistsError):
        Lake.create(tmp_path / "lk")
    with pytest.raises(NoLakeError, match="lake init"):
        Lake.open(tmp_path / "nothing")


def test_writes_are_invisible_until_published(tmp_path):
    lake = Lake.create(tmp_path / "lk")
    with lake.writer("r1") as w:
        w.append("quarantine", pa.table({"reason": ["empty_file"], "file_size": [0]}))
        assert lake.count("quarantine") == 0  # readers still on snapshot 0
        snap = w.publish("one row")
    assert snap.number == 1
    assert lake.count("quarantine") == 1
    assert lake.count("quarantine", lake.snapshot(0)) == 0
    with pytest.raises(SnapshotNotFoundError):
        lake.snapshot(7)


def test_a_local_commit_reads_only_its_own_commit_file(tmp_path, monkeypatch):
    """A commit checks its version holds this run's commit; on object storage it also
    looks for a repeat of it at the next version (a retry after a lost answer), which a
    local commit (a rename) cannot have."""
    lake = Lake.create(tmp_path / "lk")
    read: list[tuple[str, int]] = []
    actions = Lake.commit_actions

    def counted(self, name, version):
        read.append((name, version))
        return actions(self, name, version)

    monkeypatch.setattr(Lake, "commit_actions", counted)
    with lake.writer("r1") as w:
        w.append("quarantine", pa.table({"reason": ["a"]}))
        w.append("quarantine", pa.table({"reason": ["b"]}))
        w.publish()
    assert read == [("quarantine", 1), ("quarantine", 2)]


def test_unpublished_commits_are_rolled_back_by_the_next_writer(tmp_path):
    lake = Lake.create(tmp_path / "lk")
    with lake.writer("r1") as w:
        w.append("quarantine", pa.table({"reason": ["a"]}))
        w.publish()
    with lake.writer("r2") as w:  # dies before publishing
        w.append("quarantine", pa.table({"reason": ["b", "c"]}))
    path = str(table_path(lake.root, "quarantine"))
    assert DeltaTable(path).to_pyarrow_table().num_rows == 3  # the log has it...
    with lake.writer("r3") as w:  # ...until the next writer starts
        assert DeltaTable(path).to_pyarrow_table().column("reason").to_pylist() == ["a"]
        w.publish()
    assert lake.read("quarantine").column("reason").to_pylist() == ["a"]


def test_tables_are_checkpointed_every_ten_commits_and_keep_every_version(tmp_path):
    assert CHECKPOINT_EVERY == 10
    lake = Lake.create(tmp_path / "lk")
    log_dir = table_path(lake.root, "quarantine") / "_delta_log"
    long_ago = time.time() - 90 * 86400  # past deltalake's 30 days of log retention
    with lake.writer("r1") as w:
        for i in range(23):
            w.append("quarantine", pa.table({"reason": [f"r{i}"]}))
            w.publish(f"commit {i + 1}")
            for f in log_dir.glob("*.json"):  # every commit so far as if months old
                os.utime(f, (long_ago, long_ago))
    checkpoints = sorted(int(f.name[:20]) for f in log_dir.glob("*.checkpoint.parquet"))
    assert checkpoints == [10, 20]
    assert json.loads((log_dir / "_last_checkpoint").read_text())["version"] == 20
    # no commit was cleaned up: every version, before and after the checkpoints, opens
    assert sorted(int(f.name[:20]) for f in log_dir.glob("*.json")) == list(range(24))
    assert [lake.count("quarantine", lake.snapshot(n)) for n in range(24)] == list(range(24))
    assert sorted(lake.read("quarantine").column("reason").to_pylist()) == \
        sorted(f"r{i}" for i in range(23))
    # a rollback is a commit too: its version is checkpointed at a multiple of ten
    with lake.writer("r2") as w:
        for i in range(6):
            w.append("quarantine", pa.table({"reason": [f"lost{i}"]}))  # 24-29, unpublished
    with lake.writer("r3") as w:  # restores version 23's files as version 30
        assert w.versions["quarantine"] == 30
    assert 30 in [int(f.name[:20]) for f in log_dir.glob("*.checkpoint.parquet")]
    assert lake.count("quarantine") == 23


def test_a_writer_opens_each_table_once_and_reads_it_on_after_each_commit(tmp_path,
                                                                         monkeypatch):
    """After each of its commits (appends, an overwrite, a replace, a compaction, the
    tenth commit's checkpoint) a writer's table is the object it committed with, read on
    to the new version, not opened again; its files are those of the version opened
    afresh. If reading on fails, the table is opened afresh when next used."""
    from lakehouse.optimize import compact

    lake = Lake.create(tmp_path / "lk", profile="identified")
    opened: list[str] = []
    open_delta = Lake.open_delta

    def counting(self, name, version=None):
        opened.append(name)
        return open_delta(self, name, version)

    monkeypatch.setattr(Lake, "open_delta", counting)
    day = dt.date(2024, 5, 1)

    def studies(uids, modality):
        return pa.table({"StudyInstanceUID": uids, "Modality": [modality] * len(uids),
                         "study_year": [2024] * len(uids), "StudyDate": [day] * len(uids)})

    def same_as_opened_afresh(w, name):
        fresh = DeltaTable(str(table_path(lake.root, name)), version=w.versions[name])
        mine = w.current(name)
        assert mine.version() == w.versions[name] == fresh.version()
        assert sorted(mine.file_uris()) == sorted(fresh.file_uris())
        return mine

    with lake.writer("r1") as w:
        opened.clear()
        table = None
        for i in range(12):  # the tenth commit is checkpointed
            w.append("studies", studies([f"{i}.1", f"{i}.2"], ["CT", "MR"][i % 2]))
            now = same_as_opened_afresh(w, "studies")
            assert table is None or now is table
            table = now
        w.replace("studies", "StudyInstanceUID", pa.array(["0.1"]), studies(["0.1"], "US"))
        assert same_as_opened_afresh(w, "studies") is table
        assert compact(w, "studies").rewritten == 12  # six small files in each of CT, MR
        assert same_as_opened_afresh(w, "studies") is table
        w.overwrite("quarantine", pa.table({"reason": ["a", "b"]}))
        quarantine = same_as_opened_afresh(w, "quarantine")
        assert opened == ["studies", "quarantine"]
        # reading on fails: the next use opens the table again, at the commit's version
        monkeypatch.setattr(DeltaTable, "load_as_version", lambda *a, **k: 1 / 0)
        w.append("quarantine", pa.table({"reason": ["c"]}))
        assert same_as_opened_afresh(w, "quarantine") is not quarantine
        assert opened == ["studies", "quarantine", "quarantine"]
        w.publish()
    assert sorted(lake.read("quarantine").column("reason").to_pylist()) == ["a", "b", "c"]
    assert lake.count("studies") == 24


def test_partial_files_of_a_writer_that_died_are_removed_by_the_next(tmp_path):
    """A writer that dies (no clean release) may leave partial ``.staging-*`` files in
    table folders; the next writer removes them. After a clean release the next writer
    does not look for them (a walk of every table folder: it grows with the lake)."""
    lake = Lake.create(tmp_path / "lk")
    folder = table_path(lake.root, "quarantine") / "reason=x"
    folder.mkdir()
    partial = folder / ".staging-part-0.parquet.0123.tmp"
    code = ("import os, sys\n"
            "from lakehouse import Lake\n"
            "w = Lake.open(sys.argv[1]).writer('dies')\n"
            "w.__enter__()\n"
            "open(sys.argv[2], 'wb').write(b'half a file')\n"
            "os._exit(9)\n")
    r = subprocess.run([sys.executable, "-c", code, str(lake.root), str(partial)])
    assert r.returncode == 9 and partial.exists()
    assert lock_path(lake.root).read_text() == ""  # emptied when taken, never released
    with lake.writer("next") as w:
        assert not partial.exists()
        w.append("quarantine", pa.table({"reason": ["a"]}))
        w.publish()
    assert lock_path(lake.root).read_text() == "released clean\n"
    # released clean: the next writer takes the folders as they are
    partial.write_bytes(b"put here by hand")
    with lake.writer("after") as w:
        assert partial.exists()
    # a writer that failed, but whose process lived on, left no partial file either
    with pytest.raises(RuntimeError), lake.writer("fails"):
        raise RuntimeError("the run failed")
    assert lock_path(lake.root).read_text() == "released clean\n"
    # a lake whose lock file says nothing (made before the marker, or a writer died)
    lock_path(lake.root).write_text("")
    with lake.writer("old") as w:
        assert not partial.exists()


def test_one_writer_at_a_time(tmp_path):
    lake = Lake.create(tmp_path / "lk")
    with lake.writer("r1"), pytest.raises(LakeBusyError), lake.writer("r2"):
        pass


def test_time_columns_round_trip_and_partitions_are_safe(tmp_path):
    lake = Lake.create(tmp_path / "lk")
    data = pa.table({
        "SOPInstanceUID": ["1.2", "1.3", "1.4"],
        "Modality": ["CT", "../../evil", None],
        "study_year": pa.array([2020, 2021, None], pa.int32()),
        "StudyTime": pa.array([dt.time(14, 30, 1, 5), None, dt.time(0, 0)]),
        "PixelSpacing": pa.array([[0.5, 0.5], None, [1.0, 2.0]]),
    })
    with lake.writer("r1") as w:
        w.append("instances", data)
        w.publish()
    got = lake.read("instances", columns=["SOPInstanceUID", "Modality", "StudyTime",
                                          "PixelSpacing"]).sort_by("SOPInstanceUID")
    assert got.column("Modality").to_pylist() == ["CT", "../../evil", None]
    assert got.column("StudyTime").to_pylist() == ["14:30:01.000005", None, "00:00:00.000000"]
    assert got.column("PixelSpacing").to_pylist() == [[0.5, 0.5], None, [1.0, 2.0]]
    from catalog import open_lake

    with open_lake(tmp_path / "lk") as cat:  # the views show the values verbatim too
        assert cat.con.execute("SELECT Modality, study_year FROM instances ORDER BY "
                               "SOPInstanceUID").fetchall() == [
            ("CT", 2020), ("../../evil", 2021), (None, None)]
    files = list((tmp_path / "lk" / "research" / "instances").rglob("*.parquet"))
    assert len(files) == 3
    assert all(str(f.resolve()).startswith(str((tmp_path / "lk").resolve())) for f in files)


def test_every_parquet_file_carries_provenance(tmp_path):
    lake = Lake.create(tmp_path / "lk")
    with lake.writer("run-42") as w:
        w.append("ingest_runs", pa.table({"ingest_run_id": ["run-42"]}), param_hash="abc")
        w.publish()
    (f,) = (tmp_path / "lk" / "research" / "ingest_runs").glob("*.parquet")
    meta = pq.read_metadata(f).metadata
    assert meta[b"lake.run_id"] == b"run-42"
    assert meta[b"lake.table"] == b"ingest_runs"
    assert meta[b"lake.param_hash"] == b"abc"
    assert meta[b"lake.schema_version"] == b"1"


def test_conform_fills_missing_columns_and_drops_unknown():
    t = conform(TABLES["quarantine"], pa.table({"reason": ["x"], "bogus": [1]}), "identified")
    assert t.column_names == TABLES["quarantine"].column_names()
    assert t.column("file_size").to_pylist() == [None]


def test_research_profile_schema_has_no_identified_only_columns():
    names = TABLES["instances"].column_names("research")
    assert "PatientName" not in names and "PatientBirthDate" not in names
    assert "PatientName" in TABLES["instances"].column_names("identified")


def test_errors_pickle_with_their_data(tmp_path):
    err = pickle.loads(pickle.dumps(NoLakeError(tmp_path)))
    assert err.path == str(tmp_path) and "lake init" in str(err)


def test_replace_rewrites_only_the_files_holding_the_keys(tmp_path):
    """LakeWriter.replace: the rows of the keys given are replaced (in whichever partition
    they were), a key without a new row is removed, files without those keys are kept as
    they are, all in one commit."""
    lake = Lake.create(tmp_path / "lk", profile="identified")
    day = dt.date(2024, 5, 1)

    def studies(uids, modality, count):
        return pa.table({"StudyInstanceUID": uids, "Modality": [modality] * len(uids),
                         "study_year": [2024] * len(uids), "StudyDate": [day] * len(uids),
                         "instance_count": [count] * len(uids)})

    with lake.writer("r1") as w:
        w.append("studies", studies(["1", "2", "3"], "CT", 1))
        w.append("studies", studies(["4", "5"], "MR", 1))
        w.append("studies", studies(["6"], "US", 1))
        w.append("studies", studies(["7", "8"], "O T/%", 1))  # a partition path quoted
        w.publish()
    files = set(lake.delta("studies").file_uris())
    with lake.writer("r2") as w:
        # study 2 now MR with 7 instances, study 5 gone, study 9 new; CT's 1 and 3 stay
        version = w.replace("studies", "StudyInstanceUID", pa.array(["2", "5", "9", "7", None]),
                            pa.concat_tables([studies(["2"], "MR", 7), studies(["9"], "US", 1)]))
        with pytest.raises(ValueError, match="partition column"):
            w.replace("studies", "Modality", pa.array(["CT"]), studies([], "CT", 1))
        w.publish()
    assert version == lake.delta("studies").version()
    rows = sorted((r["StudyInstanceUID"], r["Modality"], r["instance_count"])
                  for r in lake.read("studies").to_pylist())
    assert rows == [("1", "CT", 1), ("2", "MR", 7), ("3", "CT", 1), ("4", "MR", 1),
                    ("6", "US", 1), ("8", "O T/%", 1), ("9", "US", 1)]
    now = set(lake.delta("studies").file_uris())
    # the US file had none of the keys: the same file; the CT and MR files were rewritten
    assert len(files & now) == 1 and next(iter(files & now)).split("/")[-3] == "Modality=US"
    history = lake.delta("studies").history(1)[0]
    assert history["operationParameters"]["mode"] == "Append"


@pytest.mark.parametrize("folder, quoted, by_duckdb", [
    ("lk", False, True),      # DuckDB's Parquet reader
    ("lk", True, False),      # a percent-encoded partition folder: Arrow's scan
    ("lk[1]", False, False),  # a lake folder DuckDB would take as a glob pattern: Arrow's
])
def test_the_files_holding_the_keys_replaced(tmp_path, folder, quoted, by_duckdb):
    """LakeWriter.replace finds exactly the files holding the keys, whichever reader looks
    (DuckDB's in a local lake whose paths it can take as they are, else Arrow's), and
    replaces their rows."""
    lake = Lake.create(tmp_path / folder, profile="identified")
    day = dt.date(2024, 5, 1)

    def studies(uids, modality):
        return pa.table({"StudyInstanceUID": uids, "Modality": [modality] * len(uids),
                         "study_year": [2024] * len(uids), "StudyDate": [day] * len(uids),
                         "instance_count": [1] * len(uids)})

    with lake.writer("r1") as w:
        w.append("studies", studies(["1", "2"], "CT"))
        w.append("studies", studies(["3"], "CT"))
        w.append("studies", studies(["4", "5"], "MR"))
        w.append("studies", studies(["6", "7"], "O T/%" if quoted else "US"))
        w.publish()
    with lake.writer("r2") as w:
        found = w._holding("studies", "StudyInstanceUID", pa.array(["2", "4", "6", "nope"]))
        assert (w._con is not None) == by_duckdb
        assert sorted((f["partition.Modality"], f["num_records"]) for f, _ in found) == \
            sorted([("CT", 2), ("MR", 2), ("O T/%" if quoted else "US", 2)])
        for _, rel in found:
            assert (tmp_path / folder / "research" / "studies" / rel).is_file()
        w.replace("studies", "StudyInstanceUID", pa.array(["2", "4", "6"]),
                  studies(["4"], "CT"))
        w.publish()
    assert w._con is None  # closed with the writer
    rows = sorted((r["StudyInstanceUID"], r["Modality"]) for r in lake.read("studies").to_pylist())
    assert rows == [("1", "CT"), ("3", "CT"), ("4", "CT"), ("5", "MR"),
                    ("7", "O T/%" if quoted else "US")]


def test_partition_files_are_written_by_threads_with_dictionaries_where_values_repeat(
        tmp_path, monkeypatch):
    """An append of many partitions writes one file per partition (staged by a pool of
    threads). A file of at least DICTIONARY_MIN_ROWS rows has every column
    dictionary-encoded, lists included, but the DICOM JSON (every header is distinct); a
    smaller file has no dictionaries. No file has statistics of the DICOM JSON; every
    other column has them. A file of at least ZSTD_MIN_ROWS rows is compressed with zstd,
    a smaller one with Snappy, and its name says which."""
    import threading

    from lakehouse.tables import (
        DICTIONARY_MIN_ROWS,
        ZSTD_MIN_ROWS,
        LakeWriter,
        dictionary_columns,
    )

    threads: list[str] = []
    stage = LakeWriter._stage

    def spy(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return stage(self, *args, **kwargs)

    monkeypatch.setattr(LakeWriter, "_stage", spy)

    lake = Lake.create(tmp_path / "lake")
    spec = TABLES["instances"]
    small = 60  # 3 modalities x 5 years, 4 rows each; then one file of many rows
    rows = [{"SOPInstanceUID": f"1.2.{i}", "StudyInstanceUID": "1.2", "SeriesInstanceUID":
             "1.2.3", "Modality": ["CT", "MR", "US"][i % 3] if i < small else "MG",
             "study_year": 2000 + i % 5 if i < small else 2010,
             "ImageType": ["ORIGINAL", "PRIMARY"], "dicom_json": f'{{"i": {i}}}'}
            for i in range(small + DICTIONARY_MIN_ROWS)]
    data = conform(spec, pa.Table.from_pylist(rows), lake.profile)
    with lake.writer("run") as w:
        w.append("instances", data)
        w.publish()
        files = pa.table(w.current("instances").get_add_actions(flatten=True)).to_pylist()
    assert len(files) == 16
    assert ZSTD_MIN_ROWS == DICTIONARY_MIN_ROWS  # the rows below: one file of each kind
    encodings: dict[int, dict[str, set]] = {}
    codecs: dict[int, set[tuple[str, str]]] = {}
    for f in files:
        meta = pq.read_metadata(table_path(tmp_path / "lake", "instances") / f["path"])
        assert meta.num_rows in (4, DICTIONARY_MIN_ROWS)
        for c in range(meta.num_columns):
            col = meta.row_group(0).column(c)
            codecs.setdefault(meta.num_rows, set()).add(
                (col.compression, f["path"].rsplit(".", 2)[1]))
            encodings.setdefault(meta.num_rows, {}).setdefault(
                col.path_in_schema, set()).update(col.encodings)
            assert col.is_stats_set == (col.path_in_schema != "dicom_json"), col.path_in_schema
    large, tiny = encodings[DICTIONARY_MIN_ROWS], encodings[4]
    assert "RLE_DICTIONARY" not in large["dicom_json"]
    assert "RLE_DICTIONARY" in large["ImageType.list.element"]
    assert "RLE_DICTIONARY" in large["SOPInstanceUID"]
    assert set(dictionary_columns(data.schema)) - set(spec.partition_by) == \
        {c for c, e in large.items() if "RLE_DICTIONARY" in e}
    assert not any("RLE_DICTIONARY" in e for e in tiny.values())
    assert codecs == {DICTIONARY_MIN_ROWS: {("ZSTD", "zstd")}, 4: {("SNAPPY", "snappy")}}
    assert threads and all(t.startswith("stage") for t in threads)
    back = Lake.open(tmp_path / "lake").read("instances")
    assert sorted(back.column("SOPInstanceUID").to_pylist()) == sorted(r["SOPInstanceUID"]
                                                                       for r in rows)


def test_a_local_lake_is_read_by_arrow_and_its_process_exits_cleanly(tmp_path):
    """A local lake's tables are read through Arrow's own file system, with the same rows
    as deltalake's (partition values that need quoting in paths included); and a process
    that read one exits with 0. deltalake's own Python file system aborted most such
    processes at exit (``terminate called without an active exception``, 5 of 8 runs)."""
    import subprocess
    import sys

    lake = Lake.create(tmp_path / "lake", profile="identified")
    odd = ["A B/C", "é", None, "%41", "CT"]
    rows = [{"SOPInstanceUID": f"1.2.{i}", "StudyInstanceUID": "1.2",
             "SeriesInstanceUID": "1.2.3", "Modality": odd[i % len(odd)],
             "study_year": None if i % 7 == 0 else 2000 + i % 3,
             "dicom_json": "{}"} for i in range(40)]
    with lake.writer("run") as w:
        w.append("instances", conform(TABLES["instances"], pa.Table.from_pylist(rows),
                                      lake.profile))
        w.publish()
    lake = Lake.open(tmp_path / "lake")
    got = lake.read("instances", columns=["SOPInstanceUID", "Modality", "study_year"])
    theirs = lake.delta("instances").to_pyarrow_dataset().to_table(
        columns=["SOPInstanceUID", "Modality", "study_year"])
    key = [("SOPInstanceUID", "ascending")]
    assert got.sort_by(key).to_pylist() == theirs.sort_by(key).to_pylist()
    assert sorted(got.column("Modality").to_pylist(), key=repr) == \
        sorted((r["Modality"] for r in rows), key=repr)
    code = ("import sys\nfrom lakehouse import Lake\n"
            "print(Lake.open(sys.argv[1]).read('instances').num_rows)\n")
    for _ in range(4):
        run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "lake")],
                             capture_output=True, text=True, timeout=120)
        assert (run.returncode, run.stdout.strip()) == (0, "40"), run.stderr[-500:]


def test_add_actions_are_read_without_pandas(tmp_path):
    """`add_actions` gives the table `pa.table(get_add_actions())` gives, without the
    pandas import `pa.table()` makes first (0.3 s in a process that has not loaded it)."""
    lake = Lake.create(tmp_path / "lk", profile="identified")
    with lake.writer("r1") as w:
        for year in (2023, 2024, 2024):
            w.append("studies", pa.table({"StudyInstanceUID": [str(year)], "Modality": ["CT"],
                                          "study_year": [year]}))
        w.publish()
    code = (
        "import sys, json\n"
        "from lakehouse import Lake\n"
        "from lakehouse.tables import add_actions\n"
        f"t = add_actions(Lake.open({str(tmp_path / 'lk')!r}).delta('studies'))\n"
        "print(json.dumps({'pandas': 'pandas' in sys.modules, 'rows': t.num_rows,\n"
        "                  'years': sorted(t.column('partition.study_year').to_pylist())}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == {"pandas": False, "rows": 3, "years": [2023, 2024, 2024]}
    dt_ = lake.delta("studies")
    assert add_actions(dt_).equals(pa.table(dt_.get_add_actions(flatten=True)))


def test_commit_kinds_tell_what_each_commit_did_to_the_rows(tmp_path):
    """Lake.commit_kinds: rows added, the same rows moved by compaction, rows replaced,
    and a commit whose log is gone."""
    from lakehouse.optimize import compact
    from lakehouse.tables import commit_file

    lake = Lake.create(tmp_path / "lk", profile="identified")
    day = dt.date(2024, 5, 1)

    def studies(uids, count):
        return pa.table({"StudyInstanceUID": uids, "Modality": ["CT"] * len(uids),
                         "study_year": [2024] * len(uids), "StudyDate": [day] * len(uids),
                         "instance_count": [count] * len(uids)})

    with lake.writer("r1") as w:
        start = w.versions["studies"]
        w.append("studies", studies(["1", "2"], 1))
        w.append("studies", studies(["3"], 1))
        assert compact(w, "studies", small_bytes=10**9).rewritten == 2
        w.replace("studies", "StudyInstanceUID", pa.array(["2"]), studies(["2"], 5))
        end = w.versions["studies"]
        w.publish()
    assert lake.commit_kinds("studies", start, end) == ["added", "added", "moved", "changed"]
    assert lake.commit_kinds("studies", end, end) == []
    (tmp_path / "lk" / commit_file("studies", start + 3)).unlink()
    assert lake.commit_kinds("studies", start + 1, end) == ["added", None, "changed"]


def test_shared_cursors_are_connections_to_one_database():
    """lakehouse.duck.shared_cursor: each call a connection of its own (its temporary
    objects its own) to one database of the process, which outlives each of them."""
    import duckdb

    from lakehouse.duck import shared_cursor

    a, b = shared_cursor(), shared_cursor()
    a.execute("CREATE TEMP TABLE only_a AS SELECT 1 AS x")
    with pytest.raises(duckdb.CatalogException):
        b.execute("SELECT x FROM only_a")
    a.execute("CREATE TABLE seen_by_all AS SELECT 2 AS x")
    a.close()
    try:
        assert b.execute("SELECT x FROM seen_by_all").fetchall() == [(2,)]
        c = shared_cursor()
        assert c.execute("SELECT x FROM seen_by_all").fetchall() == [(2,)]
        c.close()
    finally:
        b.execute("DROP TABLE seen_by_all")
        b.close()
