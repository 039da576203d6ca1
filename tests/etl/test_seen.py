"""The driver's in-memory indexes of what the lake holds (etl.seen), and ingests that
depend on them across flushes and runs."""

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pydicom.data import get_testdata_file

from catalog import open_lake
from etl import ingest, seen
from lakehouse import Lake
from tests.conftest import fast_config


def u64(*values):
    return np.array(values, dtype=np.uint64)


def test_key_index_present_and_match():
    index = seen.KeyIndex()
    index.add(u64(5, 1, 9), u64(50, 10, 90))
    index.add(u64(7), u64(70))
    present, match = index.lookup(u64(1, 9, 7, 7, 3, 2**64 - 1), u64(10, 91, 70, 0, 30, 0))
    assert present.tolist() == [True, True, True, True, False, False]
    assert match.tolist() == [True, False, True, False, False, False]
    assert len(index) == 4


def test_key_index_repeated_keys_and_merged_chunks():
    index = seen.KeyIndex()
    for k in range(seen.MAX_CHUNKS + 3):  # more chunks than kept: merged into one
        index.add(u64(100, k), u64(k, k))
    assert len(index._chunks) <= seen.MAX_CHUNKS
    assert len(index) == 2 * (seen.MAX_CHUNKS + 3)
    # key 100 is held once per chunk, with every check value 0..MAX_CHUNKS+2
    present, match = index.lookup(u64(100, 100, 3, 3), u64(4, 999, 3, 4))
    assert present.tolist() == [True, True, True, True]
    assert match.tolist() == [True, False, True, False]
    empty = seen.KeyIndex()
    assert [a.tolist() for a in empty.lookup(u64(1), u64(1))] == [[False], [False]]


def test_key_index_lookups_equal_a_dictionarys():
    """Random keys, many held more than once (in one chunk and across chunks, at either
    end of a chunk): each lookup says what a dictionary of key -> check values says."""
    rng = np.random.default_rng(7)
    index, held = seen.KeyIndex(), {}
    for _ in range(5):
        keys = rng.integers(0, 60, 40).astype(np.uint64)
        values = rng.integers(0, 4, 40).astype(np.uint64)
        index.add(keys, values)
        for k, v in zip(keys.tolist(), values.tolist(), strict=True):
            held.setdefault(k, set()).add(v)
    keys = rng.integers(0, 70, 500).astype(np.uint64)
    values = rng.integers(0, 4, 500).astype(np.uint64)
    present, match = index.lookup(keys, values)
    assert present.tolist() == [k in held for k in keys.tolist()]
    assert match.tolist() == [v in held.get(k, ()) for k, v in
                              zip(keys.tolist(), values.tolist(), strict=True)]
    assert 0 < match.sum() < present.sum() < len(keys)


def test_file_keys_match_only_the_same_path_size_and_mtime():
    """A file index row matches a found file with the same path, size and mtime, unless
    it could not be read then (io_error: tried again)."""
    index_rows = pa.table({"path": ["/a", "/b", "/c"], "file_size": [1, 2, 3],
                           "mtime_ns": [10, 20, 30], "reason": [None, "io_error", "truncated"]})
    found = pa.table({"path": ["/a", "/a", "/a", "/b", "/c", "/d"],
                      "file_size": [1, 2, 1, 2, 3, 1], "mtime_ns": [10, 10, 11, 20, 30, 10],
                      "reason": pa.nulls(6, pa.string())})
    h = seen.Hasher()
    try:
        index = seen.KeyIndex()
        index.add(*h.keys(index_rows, *seen.FILE_KEY))
        present, same = index.lookup(*h.keys(found, *seen.FILE_KEY))
    finally:
        h.close()
    assert present.tolist() == [True, True, True, True, True, False]
    assert same.tolist() == [True, False, False, False, True, False]


def test_table_keys_read_by_duckdb_equal_the_datasets(lake_copy):
    """The indexes' keys of a table version, read by DuckDB from its Parquet files, are
    those read through the pyarrow dataset (the reference, and the path of lakes on object
    storage); a version DuckDB does not read as it is (a partition value quoted in its
    folder name) goes through the dataset."""
    import datetime as dt

    lake = Lake.open(lake_copy)
    with lake.writer("pairs") as w:
        w.append("identifiers", pa.table({"kind": ["UID", "PatientID", "UID"],
                                          "pseudonym": ["2.25.1", "p1", "2.25.2"],
                                          "original": ["1.2.3", "MRN1", "1.2.4"]}))
        w.append("instances", pa.table({
            "SOPInstanceUID": ["9.9"], "file_sha256": ["ab"], "Modality": ["O T"],
            "study_year": [2024], "StudyDate": [dt.date(2024, 5, 1)]}))
        w.publish()
    h = seen.Hasher()
    read_by = []
    real_keys = h.keys

    def spying_keys(source, *args, **kwargs):
        read_by.append(type(source).__name__)
        return real_keys(source, *args, **kwargs)

    h.keys = spying_keys
    try:
        for name, key in (("files", seen.FILE_KEY), ("instances", seen.INSTANCE_KEY),
                          ("identifiers", seen.PAIR_KEY)):
            version = lake.delta(name)
            read_by.clear()
            got = h.table_keys(lake, name, version, *key)
            assert read_by == (["FileSystemDataset"] if name == "instances" else []), name
            want = real_keys(lake.arrow_dataset(name, version), *key)
            order = np.lexsort((got[1], got[0]))
            ref = np.lexsort((want[1], want[0]))
            assert len(got[0]) == lake.count(name) > 0
            assert np.array_equal(got[0][order], want[0][ref]), name
            assert np.array_equal(got[1][order], want[1][ref]), name
        # without the quoted partition, DuckDB reads the instances too
        older = lake.delta("instances", lake.snapshot(lake.snapshot().number - 1))
        read_by.clear()
        got = h.table_keys(lake, "instances", older, *seen.INSTANCE_KEY)
        want = real_keys(lake.arrow_dataset("instances", older), *seen.INSTANCE_KEY)
        assert read_by == [] and sorted(got[0].tolist()) == sorted(want[0].tolist())
    finally:
        h.close()


def _outcomes(lake_dir):
    with open_lake(lake_dir, vault=True) as c:
        files = dict(c.con.execute("SELECT path, outcome FROM files").fetchall())
        pairs = c.con.execute("SELECT count(*), count(DISTINCT (kind, pseudonym)) "
                      "FROM identifiers").fetchall()[0]
        counts = c.counts()
    return files, pairs, counts


def test_many_flushes_and_two_runs_give_the_same_lake_as_one_run(archive, tmp_path):
    """Research lakes committed every few rows: every duplicate and conflict is found (its
    first copy committed by an earlier flush or run), the vault holds each pseudonym once,
    and a lake built in two runs is the lake built in one."""
    src = tmp_path / "pacs"
    shutil.copytree(archive[0], src)
    key = tmp_path / "lake.key"  # one key: the same pseudonyms in both lakes
    tiny = fast_config(flush_rows=7, batch_files=5, batches_per_worker=1)
    one = Lake.create(tmp_path / "one", key_file=key)
    s_one = ingest(one, src, tiny, key_file=key)  # one run, a commit every 7 instances

    two = Lake.create(tmp_path / "two", key_file=key)
    first = ingest(two, src / "archive", tiny, key_file=key)  # the first folder in walk order
    assert first.outcomes["ingested"] > 0
    second = ingest(two, src, tiny, key_file=key)  # the rest: what the first run read is unchanged
    assert second.files_unchanged == first.files_seen

    files_one, pairs_one, counts_one = _outcomes(tmp_path / "one")
    files_two, pairs_two, counts_two = _outcomes(tmp_path / "two")
    assert files_two == files_one
    assert pairs_two[0] == pairs_two[1] == pairs_one[0] == pairs_one[1]
    for name in ("instances", "series", "studies", "patients", "conflicts", "quarantine"):
        assert counts_two[name] == counts_one[name], name
    for k in s_one.outcomes:
        assert first.outcomes[k] + second.outcomes[k] == s_one.outcomes[k], k
    # the generator's ground truth: found although each first copy was committed earlier
    assert s_one.outcomes == archive[1].outcomes
    assert (s_one.outcomes["duplicate"], s_one.outcomes["conflict"]) == (3, 1)


def test_a_conflicting_copy_in_another_partition_is_still_a_conflict(lake_copy, archive,
                                                                      tmp_path):
    """The exact lookup tries the new copy's partition first: a copy whose StudyDate (so
    study_year) changed is found in its old partition by the second pass."""
    import pydicom

    original = next(p for p in sorted(Path(archive[0], "archive").rglob("*.dcm")))
    ds = pydicom.dcmread(original)
    year = int(ds.StudyDate[:4])
    ds.StudyDate = f"{year - 7}{ds.StudyDate[4:]}"
    ds.Modality = "OT" if ds.Modality != "OT" else "CT"
    src = tmp_path / "corrected"
    src.mkdir()
    ds.save_as(src / "copy.dcm")
    lake = Lake.open(lake_copy)
    before = open_lake(lake_copy).counts()
    s = ingest(lake, src, fast_config())
    assert s.outcomes["conflict"] == 1 and s.outcomes["ingested"] == 0
    with open_lake(lake_copy) as c:
        after = c.counts()
        assert after["instances"] == before["instances"]
        assert after["conflicts"] == before["conflicts"] + 1
        diff = c.con.execute("SELECT differing_keywords FROM conflicts "
                             "ORDER BY detected_at DESC LIMIT 1").fetchall()[0][0]
        assert {"Modality", "StudyDate"} <= set(diff)


def test_files_are_found_while_earlier_ones_are_read(archive, tmp_path, monkeypatch):
    """The walk runs one index chunk ahead of extraction (memory does not hold the whole
    archive's file list); the progress total is every file of the source, and a run with
    nothing to read starts no workers."""
    import threading

    from etl import jobs

    monkeypatch.setattr(jobs, "INDEX_CHUNK", 40)
    walked = {"n": 0}

    def counting_walk(source, stats=None, chunk=20_000, listings=None, first=None, **kw):
        for found in jobs_walk(source, stats, chunk, listings, first, **kw):
            if threading.current_thread().name != "lake-count-files":
                walked["n"] += len(found)
            yield found

    jobs_walk = jobs.walk_columns
    monkeypatch.setattr(jobs, "walk_columns", counting_walk)
    calls = []
    src = tmp_path / "pacs"
    shutil.copytree(archive[0], src)
    lake = Lake.create(tmp_path / "lake", profile="identified")
    config = fast_config(batch_files=10, batches_per_worker=1)
    s = ingest(lake, src, config,
               progress=lambda stage, done, total: calls.append((done, total, walked["n"])))
    n = archive[1].files_total
    assert s.files_seen == n == 306
    first = calls[1]  # (calls[0] is the start: nothing done yet)
    assert first[0] == 10 and first[2] <= 2 * 40 < n
    assert calls[-1][:2] == (n, n)
    assert all(done <= total for done, total, _ in calls)

    calls.clear()
    again = ingest(lake, src, config, progress=lambda *a: calls.append(a))
    assert (again.files_unchanged, again.workers, calls) == (n, 0, [])

    shutil.copy(get_testdata_file("CT_small.dcm"), src / "new.dcm")
    calls.clear()
    third = ingest(lake, src, config, progress=lambda *a: calls.append(a))
    assert (third.files_seen, third.files_unchanged, third.outcomes["ingested"]) == (n + 1, n, 1)
    assert calls[-1][1:] == (n + 1, n + 1)  # unchanged files count as done


def test_the_source_is_counted_only_for_a_progress_bar(archive, tmp_path, monkeypatch):
    """The second walk that counts the files (the progress total) runs only when a
    progress callback is given; the run is the same either way."""
    from etl import jobs

    counted = []
    real_tally = jobs.tally

    def counting_tally(source):
        counted.append(str(source))
        yield from real_tally(source)

    monkeypatch.setattr(jobs, "tally", counting_tally)
    config = fast_config(batch_files=50, batches_per_worker=1)
    quiet = ingest(Lake.create(tmp_path / "quiet", profile="identified"), archive[0], config)
    assert counted == []
    calls = []
    shown = ingest(Lake.create(tmp_path / "shown", profile="identified"), archive[0], config,
                   progress=lambda *a: calls.append(a))
    assert counted == [str(archive[0])]
    assert quiet.outcomes == shown.outcomes == archive[1].outcomes
    assert calls[-1] == ("extract", 306, 306)


def test_a_run_indexes_only_the_files_below_its_source(tmp_path, monkeypatch):
    """A run's index of files read before holds the lake's files below its source only
    (a listener's batch folder, a night's folder of a large archive; the row groups of
    other folders are left to the Parquet statistics of ``path``), and still finds every
    file there unchanged: a folder, a subfolder, a folder whose name begins with another's
    (``a`` and ``ab``), a single file."""
    import pydicom

    root = tmp_path / "archive"
    names = ["a/x1.dcm", "a/x2.dcm", "a/sub/y1.dcm", "a/sub/y2.dcm", "ab/z1.dcm",
             "ab/z2.dcm", "t.dcm"]
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        ds.SOPInstanceUID = f"1.2.3.4.{i + 1}"
        ds.save_as(root / name)
    lake = Lake.create(tmp_path / "lake", profile="identified")
    indexed: list[int] = []
    real = seen.Hasher.table_keys

    def table_keys(self, lake, name, *args, **kwargs):
        keys = real(self, lake, name, *args, **kwargs)
        if name == "files":
            indexed.append(len(keys[0]))
        return keys

    monkeypatch.setattr(seen.Hasher, "table_keys", table_keys)
    assert ingest(lake, root, fast_config()).outcomes["ingested"] == 7
    assert indexed == []  # a first run: nothing to index
    for source, n in (("a", 4), ("a/sub", 2), ("ab", 2), ("a/sub/y1.dcm", 1), ("", 7)):
        run = ingest(lake, root / source, fast_config())
        assert (run.files_seen, run.files_unchanged, indexed[-1]) == (n, n, n), source
    (root / "ab" / "z3.dcm").write_bytes((root / "ab" / "z1.dcm").read_bytes())
    run = ingest(lake, root / "ab", fast_config())
    assert (run.files_seen, run.files_unchanged, run.outcomes["duplicate"]) == (3, 2, 1)


def test_indexes_kept_between_runs(tmp_path, monkeypatch):
    """Runs that share a :class:`seen.Kept` (a listener's batches) take the lake's
    instance and identifier indexes from the run before instead of scanning the tables;
    they scan again after another process added rows or after a run that failed, not
    after compaction; and every duplicate and conflict is found as without them."""
    import pydicom

    from etl.jobs import _Job
    from lakehouse.optimize import optimize

    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))

    def put(folder: str, n: int, patient: str = "P1", series: str = "1") -> Path:
        ds = template.copy()
        ds.SOPInstanceUID, ds.PatientID = f"1.2.3.4.{abs(n)}", patient
        ds.SeriesInstanceUID = f"1.2.3.5.{series}"
        if n < 0:  # another file of instance -n: a conflict
            ds.InstanceNumber = 99
        path = tmp_path / "in" / folder / f"{n}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path)
        return path.parent

    key = tmp_path / "lake.key"
    lake = Lake.create(tmp_path / "lake", key_file=key)
    scans: list[str] = []
    real = seen.Hasher.table_keys

    def table_keys(self, lake, name, *args, **kwargs):
        if name != "files":
            scans.append(name)
        return real(self, lake, name, *args, **kwargs)

    monkeypatch.setattr(seen.Hasher, "table_keys", table_keys)
    kept = seen.Kept()

    def run(folder: Path, keep: seen.Kept | None = kept) -> dict:
        scans.clear()
        return {k: v for k, v in ingest(lake, folder, fast_config(), key_file=key,
                                        kept=keep).outcomes.items() if v}

    for n in (1, 2, 3):
        b1 = put("b1", n, patient=f"P{n}")
    assert run(b1) == {"ingested": 3}
    assert sorted(scans) == ["identifiers", "instances"]  # an empty lake: kept from now
    put("b2", 4, patient="P4")
    (tmp_path / "in/b2/copy.dcm").write_bytes((b1 / "1.dcm").read_bytes())
    assert run(tmp_path / "in/b2") == {"ingested": 1, "duplicate": 1}
    assert (scans, kept.taken) == ([], 2)  # nothing scanned
    # another process adds rows: the next run scans again, and finds them
    assert run(put("b3", 5, patient="P5"), keep=None) == {"ingested": 1}
    b4 = put("b4", 6, patient="P5")
    (b4 / "copy.dcm").write_bytes((tmp_path / "in/b3/5.dcm").read_bytes())
    assert run(b4) == {"ingested": 1, "duplicate": 1}
    assert sorted(scans) == ["identifiers", "instances"]
    # compaction moves rows only: kept; a copy of a row a kept index added, and a conflict
    assert optimize(lake, small_bytes=10**9).snapshot is not None
    (tmp_path / "in/b5").mkdir()
    (tmp_path / "in/b5/copy.dcm").write_bytes((tmp_path / "in/b2/4.dcm").read_bytes())
    put("b5", -2, patient="P2")
    assert run(tmp_path / "in/b5") == {"duplicate": 1, "conflict": 1}
    assert scans == []
    # a run that fails after its commits gives nothing back: the next one scans
    broken = _Job._summarize_if_stale

    def fail(self):
        raise RuntimeError("the summaries failed")

    monkeypatch.setattr(_Job, "_summarize_if_stale", fail)
    with pytest.raises(RuntimeError, match="the summaries failed"):
        run(put("b6", 7, patient="P7"))
    monkeypatch.setattr(_Job, "_summarize_if_stale", broken)
    b7 = put("b7", 8, patient="P7")
    (b7 / "copy.dcm").write_bytes((tmp_path / "in/b6/7.dcm").read_bytes())
    assert run(b7) == {"ingested": 1, "duplicate": 1}
    assert sorted(scans) == ["identifiers", "instances"]
    # the lake: each instance once, each pseudonym once in the vault
    _, pairs, counts = _outcomes(tmp_path / "lake")
    assert counts["instances"] == 8 and counts["conflicts"] == 1
    assert pairs[0] == pairs[1]
