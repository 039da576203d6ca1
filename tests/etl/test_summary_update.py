"""Summaries updated for what a run changed (etl.summarize.update, LakeWriter.replace)
give the rows a whole rebuild gives, and touch only the files that hold changed rows."""

import shutil
from pathlib import Path

import pydicom
import pytest

from catalog import open_lake
from etl import ingest, jobs, summarize
from lakehouse import Lake
from lakehouse.optimize import optimize
from lakehouse.schemas import TABLES, conform
from tests.conftest import fast_config

#: the derived tables, and their columns that name the run that wrote a row
DERIVED = {"series": ["first_ingest_run_id", "last_ingest_run_id"], "studies": [],
           "patients": [], "dose_events": []}


def rows(table, name: str, profile: str) -> list[tuple]:
    """The rows of ``table`` in the storage schema of ``name``, run columns left out,
    sorted."""
    table = conform(TABLES[name], table, profile).drop_columns(DERIVED[name])
    return sorted((tuple(r.values()) for r in table.to_pylist()), key=repr)


def derived(path: Path) -> dict[str, list[tuple]]:
    """Every row of the derived tables of the lake at ``path``."""
    lake = Lake.open(path)
    return {name: rows(lake.read(name), name, lake.profile) for name in DERIVED}


def last_mode(location, table: str) -> str:
    """The write mode of the last commit of ``table``: Append for an update (rows replaced),
    Overwrite for a whole rebuild."""
    return Lake.open(location).open_delta(table).history(1)[0]["operationParameters"]["mode"]


def changed_rows(path: Path, held: list[Path]) -> dict[str, int]:
    """How many rows of each derived table belong to the series, studies and patients of
    the instances read from the files ``held`` (found through the vault's file index)."""
    with open_lake(path, vault=True) as cat:
        cat.con.execute("CREATE TEMP TABLE held AS SELECT DISTINCT i.SeriesInstanceUID, "
                        "i.StudyInstanceUID, i.PatientID FROM files f JOIN instances i "
                        "USING (SOPInstanceUID) WHERE list_contains(?, f.path)",
                        [[str(p) for p in held]])
        return {name: cat.con.execute(
            f"SELECT count(*) FROM {name} WHERE {key} IN (SELECT {key} FROM held)"
        ).fetchall()[0][0] for name, key in summarize.KEYS.items()}


def split_archive(archive_root: Path, dst: Path) -> list[Path]:
    """The archive's plain folder copied to ``dst``, minus (moved to ``dst``/../later) a
    tenth of its files in a row (whole series and studies), every 4th file (late images of
    series the first run has) and one CT dose report."""
    shutil.copytree(archive_root / "archive", dst)
    files = sorted(dst.rglob("*.dcm"))
    dose = [p for p in files if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR"]
    n = len(files)
    held = sorted(set(files[n // 2:n // 2 + n // 10]) | set(files[::4]) | {dose[-1]})
    later = dst.parent / "later"
    for p in held:
        target = later / p.relative_to(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        p.rename(target)
    return held


def put_back(dst: Path) -> None:
    later = dst.parent / "later"
    for p in sorted(later.rglob("*.dcm")):
        p.rename(dst / p.relative_to(later))


@pytest.mark.parametrize(("profile", "shares", "how"), [
    ("identified", (1.0, 1.0), "updated"), ("research", (1.0, 1.0), "updated"),
    ("identified", None, "rebuilt"), ("identified", (1.0, 0.0), "rebuilt")])
def test_a_second_run_updates_the_summaries_to_what_one_run_builds(
        archive, tmp_path, monkeypatch, profile, shares, how):
    """Updated (UPDATE_SHARE and READ_SHARE 1: however much changed or must be read), the
    summaries are what one run builds; with the default UPDATE_SHARE, this many rows of
    changed series and studies (most of this small archive) make the run rebuild them
    whole, with the same rows; so does a READ_SHARE the files to read exceed."""
    if shares is not None:
        monkeypatch.setattr(summarize, "UPDATE_SHARE", shares[0])
        monkeypatch.setattr(summarize, "READ_SHARE", shares[1])
    src = tmp_path / "pacs" / "archive"
    held = split_archive(archive[0], src)
    key = tmp_path / "lake.key"
    kw = {"key_file": key} if profile == "research" else {}

    two = Lake.create(tmp_path / "two", profile=profile, **kw)
    first = ingest(two, src, fast_config(), **kw)
    put_back(src)
    second = ingest(two, src, fast_config(), **kw)
    assert second.outcomes["ingested"] == len(held)
    assert (first.summaries, second.summaries) == ("rebuilt", how)
    if how == "updated":
        assert second.summary_rows == changed_rows(tmp_path / "two", held)

    one = Lake.create(tmp_path / "one", profile=profile, **kw)
    whole = ingest(one, src, fast_config(), **kw)
    assert first.outcomes["ingested"] + len(held) == whole.outcomes["ingested"]
    assert derived(tmp_path / "two") == derived(tmp_path / "one")
    # an update replaces rows (an append with removes); a rebuild overwrites the tables
    for table in DERIVED:
        assert last_mode(tmp_path / "two", table) == \
            {"updated": "Append", "rebuilt": "Overwrite"}[how], table


def test_a_study_moving_to_another_patient_updates_both_patients(lake_copy):
    """A new instance of an existing study under a PatientID that sorts first: the study's
    PatientID (the smallest of its instances) changes, so the old patient loses the study
    and the new patient gains it."""
    with open_lake(lake_copy, vault=True) as cat:
        study, old_patient, old_count = cat.con.execute(
            "SELECT s.StudyInstanceUID, s.PatientID, p.study_count FROM studies s "
            "JOIN patients p USING (PatientID) ORDER BY s.StudyInstanceUID LIMIT 1").fetchall()[0]
        path = cat.con.execute("SELECT path FROM files f JOIN instances i USING "
                               "(SOPInstanceUID) WHERE i.StudyInstanceUID = ? ORDER BY path "
                               "LIMIT 1", [study]).fetchall()
    ds = pydicom.dcmread(path[0][0])
    ds.PatientID = "0000000"
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    src = lake_copy.parent / "moved"
    src.mkdir()
    ds.save_as(src / "moved.dcm")
    lake = Lake.open(lake_copy)
    assert ingest(lake, src, fast_config()).outcomes["ingested"] == 1
    with open_lake(lake_copy) as cat:
        patients = dict(cat.con.execute(
            "SELECT PatientID, study_count FROM patients WHERE PatientID IN (?, ?)",
            ["0000000", old_patient]).fetchall())
        moved = cat.con.execute("SELECT PatientID FROM studies WHERE StudyInstanceUID = ?",
                                [study]).fetchall()
    assert moved == [("0000000",)]
    assert patients == ({"0000000": 1} if old_count == 1 else
                        {"0000000": 1, old_patient: old_count - 1})
    # every derived table as a whole rebuild of this instances version gives it
    rebuilt = summarize.build(lake, lake.open_delta("instances"))
    for name, lake_rows in derived(lake_copy).items():
        assert lake_rows == rows(rebuilt[name], name, "identified"), name
    assert last_mode(lake_copy, "patients") == "Append"


def test_update_after_compaction_and_when_the_code_changed(archive, tmp_path, monkeypatch):
    """Rows `lake optimize` moved into new files are not changes: the update after it
    writes the rows of what the run added only; summaries built by other summary code are
    rebuilt whole."""
    src = tmp_path / "pacs" / "archive"
    held = split_archive(archive[0], src)
    two = Lake.create(tmp_path / "two", profile="identified")
    # small batches and commits: many small files for optimize to compact
    ingest(two, src, fast_config(batch_files=8, batches_per_worker=1, flush_rows=20,
                       compact_files=0))
    before = Lake.open(tmp_path / "two").open_delta("instances").version()
    optimize(two)
    assert Lake.open(tmp_path / "two").open_delta("instances").version() > before  # compacted
    put_back(src)
    monkeypatch.setattr(summarize, "UPDATE_SHARE", 1.0)  # update however much changed
    monkeypatch.setattr(summarize, "READ_SHARE", 1.0)
    second = ingest(two, src, fast_config())
    assert second.summaries == "updated" and last_mode(tmp_path / "two", "studies") == "Append"
    assert second.summary_rows == changed_rows(tmp_path / "two", held)
    one = Lake.create(tmp_path / "one", profile="identified")
    ingest(one, src, fast_config())
    assert derived(tmp_path / "two") == derived(tmp_path / "one")

    # other summary code: a run with nothing new rebuilds the summaries whole, once
    monkeypatch.setattr(summarize, "fingerprint", lambda: "other")
    noop = ingest(two, src, fast_config())
    assert sum(noop.outcomes.values()) == 0 and noop.summaries == "rebuilt"
    assert last_mode(tmp_path / "two", "studies") == "Overwrite"
    version = Lake.open(tmp_path / "two").open_delta("studies").version()
    assert ingest(two, src, fast_config()).summaries == "current"
    assert Lake.open(tmp_path / "two").open_delta("studies").version() == version
    with open_lake(tmp_path / "two") as cat:
        assert [r[0] for r in cat.con.execute(
            "SELECT summaries FROM ingest_runs ORDER BY started_at").fetchall()] == \
            ["rebuilt", "updated", "rebuilt", "current"]
    assert derived(tmp_path / "two") == derived(tmp_path / "one")


def test_a_run_after_compaction_alone_keeps_the_summaries(archive, tmp_path):
    """`lake optimize` only moves rows: the next run, with nothing new, finds nothing
    changed in them (no rebuild, no summary commit), and the one after is current."""
    path = tmp_path / "lake"
    # small batches and commits: many small files for optimize to compact
    ingest(Lake.create(path, profile="identified"), archive[0],
           fast_config(batch_files=8, batches_per_worker=1, flush_rows=20,
                       compact_files=0))
    before = derived(path)
    studies = Lake.open(path).open_delta("studies").version()
    assert optimize(Lake.open(path), tables=["instances"]).tables["instances"].rewritten
    noop = ingest(Lake.open(path), archive[0], fast_config())
    assert sum(noop.outcomes.values()) == 0
    assert (noop.summaries, noop.summary_rows) == ("updated", {})
    assert Lake.open(path).open_delta("studies").version() == studies
    assert derived(path) == before
    assert ingest(Lake.open(path), archive[0], fast_config()).summaries == "current"


def test_instance_rows_removed_are_summarized_away(lake_copy):
    """Rows removed from instances (LakeWriter.replace with no new rows: the files holding
    them rewritten without them) leave the summaries at the next run: the series is gone,
    its study and patient counted without it."""
    import pyarrow as pa

    lake = Lake.open(lake_copy)
    with open_lake(lake_copy) as cat:
        series, study, count = cat.con.execute(
            "SELECT SeriesInstanceUID, StudyInstanceUID, instanceCount FROM series "
            "WHERE StudyInstanceUID IN (SELECT StudyInstanceUID FROM studies "
            "WHERE series_count > 1) ORDER BY SeriesInstanceUID LIMIT 1").fetchall()[0]
        before = cat.con.execute("SELECT series_count, instance_count FROM studies "
                                 "WHERE StudyInstanceUID = ?", [study]).fetchall()[0]
        files = len(lake.open_delta("instances").file_uris())
    with lake.writer("remove-series") as w:
        empty = lake.read("instances").schema.empty_table()
        w.replace("instances", "SeriesInstanceUID", pa.array([series]), empty)
        removed = pa.table(w.current("instances").get_add_actions(flatten=True)).num_rows
        w.publish("a series removed")
    assert removed == files  # one file rewritten without the series' rows, none added
    assert lake.read("instances", filter=pa.compute.field("SeriesInstanceUID") == series
                     ).num_rows == 0
    (lake_copy.parent / "nothing-new").mkdir()
    assert sum(ingest(lake, lake_copy.parent / "nothing-new", fast_config()).outcomes.values()) \
        == 0
    with open_lake(lake_copy) as cat:
        assert cat.con.execute("SELECT count(*) FROM series WHERE SeriesInstanceUID = ?",
                               [series]).fetchall() == [(0,)]
        assert cat.con.execute("SELECT series_count, instance_count FROM studies "
                               "WHERE StudyInstanceUID = ?", [study]).fetchall() == \
            [(before[0] - 1, before[1] - count)]
    rebuilt = summarize.build(lake, lake.open_delta("instances"))
    for name, lake_rows in derived(lake_copy).items():
        assert lake_rows == rows(rebuilt[name], name, "identified"), name


def test_dose_reports_parsed_beside_the_queries_or_first_through_a_dataset(
        built_lake, monkeypatch):
    """The dose reports are parsed on a thread of their own while DuckDB computes the
    other summaries; when DuckDB reads ``instances`` through a registered pyarrow dataset
    (which the dose thread's cursor cannot see), they are parsed first, on the caller's
    thread. Both give the rows of the lake's own (ingest-built) dose_events."""
    import threading

    lake = Lake.open(built_lake[0])
    threads: list[str] = []
    parse = summarize.dose_events

    def spy(con):
        threads.append(threading.current_thread().name)
        return parse(con)

    monkeypatch.setattr(summarize, "dose_events", spy)
    beside = summarize.build(lake, lake.open_delta("instances"))
    monkeypatch.setattr(summarize, "parquet_relation", lambda *a, **k: None)
    first = summarize.build(lake, lake.open_delta("instances"))
    assert threads[0].startswith("dose") and threads[1] == threading.main_thread().name
    expected = rows(lake.read("dose_events"), "dose_events", lake.profile)
    assert len(expected) > 3
    for built in (beside, first):
        assert rows(built["dose_events"], "dose_events", lake.profile) == expected


@pytest.mark.parametrize("profile", ["identified", "research"])
def test_a_first_run_summarizes_its_rows_in_memory_as_from_its_files(archive, tmp_path,
                                                                     monkeypatch, profile):
    """A run into a lake without instances keeps what the summaries read of the rows it
    commits (in one commit or several) and gives them to ``summarize.build``, which reads
    them in memory instead of decoding the files just written: the summaries are the rows
    a build from the files gives. Rows that are not all of the version's (another count:
    a lake that had instances before the run) are not used; nor are a run's rows past
    ``SUMMARY_ROWS_BYTES`` (the files are read)."""
    calls: list[int | None] = []
    real = summarize.build

    def spy(lake, instances, rows=None):
        calls.append(None if rows is None else rows.num_rows)
        return real(lake, instances, rows)

    monkeypatch.setattr(summarize, "build", spy)
    key = tmp_path / "lake.key" if profile == "research" else None
    lake = Lake.create(tmp_path / "lake", profile=profile, key_file=key)
    s = ingest(lake, archive[0], fast_config(), key_file=key)
    assert calls == [s.outcomes["ingested"]] and s.summaries == "rebuilt"
    lake = Lake.open(tmp_path / "lake")
    version = lake.open_delta("instances")
    from_files = real(lake, version)
    assert derived(tmp_path / "lake") == {
        name: rows(from_files[name], name, profile) for name in DERIVED}
    # rows that are not all of the version's: its files are read
    some = lake.read("instances").slice(0, 10)
    assert {n: t.num_rows for n, t in real(lake, version, some).items()} == {
        n: t.num_rows for n, t in from_files.items()}

    # several commits of instances in one run (a small flush_rows): all of them kept
    calls.clear()
    again = Lake.create(tmp_path / "again", profile=profile, key_file=key)
    several = fast_config(batch_files=16, batches_per_worker=1, flush_rows=100, hold_share=0)
    kept: list[int] = []  # the bytes kept of each commit
    real_rows = summarize.summary_rows

    def summary_rows(rows, profile):
        out = real_rows(rows, profile)
        kept.append(out.nbytes)
        return out

    monkeypatch.setattr(summarize, "summary_rows", summary_rows)
    s = ingest(again, archive[0], several, key_file=key)
    assert calls == [s.outcomes["ingested"]] and s.summaries == "rebuilt"
    assert Lake.open(tmp_path / "again").snapshot().versions["instances"] >= 3
    assert derived(tmp_path / "again") == derived(tmp_path / "lake")

    # more than SUMMARY_ROWS_BYTES of them: the files are read
    calls.clear()
    assert len(kept) >= 3
    monkeypatch.setattr(jobs, "SUMMARY_ROWS_BYTES", kept[0])  # past it at the 2nd commit
    kept.clear()
    third = Lake.create(tmp_path / "third", profile=profile, key_file=key)
    s = ingest(third, archive[0], several, key_file=key)
    assert calls == [None] and s.summaries == "rebuilt" and len(kept) == 2
    assert derived(tmp_path / "third") == derived(tmp_path / "lake")

    # a lake with instances before the run (summaries rebuilt: another code's): its rows
    # are not all of the version's, and are not kept
    calls.clear()
    with Lake.open(tmp_path / "third").writer("old-code") as w:
        w.extra["summaries_code"] = "another"
        w.publish(note="summaries of another code")
    (tmp_path / "more").mkdir()
    ds = pydicom.dcmread(sorted((archive[0] / "archive").rglob("*.dcm"))[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "more" / "new.dcm")
    s = ingest(Lake.open(tmp_path / "third"), tmp_path / "more", fast_config(), key_file=key)
    assert s.outcomes["ingested"] == 1 and s.summaries == "rebuilt" and calls == [None]


def test_a_first_run_builds_its_summaries_during_its_last_commit(archive, tmp_path,
                                                                monkeypatch):
    """The summaries of a first run are built in a thread of their own while the run's
    last commit goes on: the build here waits until the commit has written the ``files``
    rows, which the run's own thread writes after starting it (built after the commit, as
    before, it would find them written and run in the run's thread)."""
    import threading

    from lakehouse.tables import LakeWriter

    files_written = threading.Event()
    seen: list[tuple[str, bool]] = []
    real_build, real_append = summarize.build, LakeWriter.append

    def build(lake, instances, rows=None):
        seen.append((threading.current_thread().name, files_written.wait(timeout=60)))
        return real_build(lake, instances, rows)

    def append(self, name, data, param_hash=""):
        out = real_append(self, name, data, param_hash)
        if name == "files":
            files_written.set()
        return out

    monkeypatch.setattr(summarize, "build", build)
    monkeypatch.setattr(LakeWriter, "append", append)
    lake = Lake.create(tmp_path / "lake", profile="identified")
    s = ingest(lake, archive[0], fast_config())
    assert seen == [("lake-summaries", True)] and s.summaries == "rebuilt"
    assert derived(tmp_path / "lake") == {
        name: rows(t, name, "identified")
        for name, t in real_build(Lake.open(tmp_path / "lake"),
                                  Lake.open(tmp_path / "lake").open_delta("instances")).items()}


def test_a_last_commit_that_fails_drops_the_summaries_built_meanwhile(archive, tmp_path,
                                                                     monkeypatch):
    """A run whose last commit fails after the summaries' build started writes no summary
    (the run failed; its snapshot has no summaries of instances it did not publish), and
    the next run builds them; a build that fails fails the run."""
    from lakehouse.tables import LakeWriter

    real_append = LakeWriter.append

    def append(self, name, data, param_hash=""):
        if name == "files":
            raise OSError("disk full (test)")
        return real_append(self, name, data, param_hash)

    monkeypatch.setattr(LakeWriter, "append", append)
    lake = Lake.create(tmp_path / "lake", profile="identified")
    with pytest.raises(OSError, match="disk full"):
        ingest(lake, archive[0], fast_config())
    lake = Lake.open(tmp_path / "lake")
    assert lake.count("series") == 0 and lake.count("files") == 0
    assert lake.read("ingest_runs").column("status").to_pylist() == ["failed"]

    # its instances were published with the failed run (the next one finds their files
    # again, as duplicates): the next run builds their summaries, from the files
    assert lake.count("instances") > 0
    monkeypatch.setattr(LakeWriter, "append", real_append)
    s = ingest(lake, archive[0], fast_config())
    assert s.summaries == "rebuilt" and s.outcomes["duplicate"] > 0
    lake = Lake.open(tmp_path / "lake")
    assert lake.count("series") > 0
    assert derived(tmp_path / "lake") == {
        name: rows(t, name, "identified")
        for name, t in summarize.build(lake, lake.open_delta("instances")).items()}

    def broken(lake, instances, rows=None):
        raise RuntimeError("summaries (test)")

    monkeypatch.setattr(summarize, "build", broken)
    with pytest.raises(RuntimeError, match="summaries"):
        ingest(Lake.create(tmp_path / "other", profile="identified"), archive[0],
               fast_config())
