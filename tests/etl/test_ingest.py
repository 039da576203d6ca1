"""The generated archive ingested once (conftest), checked against its ground truth."""

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from pydicom.data import get_testdata_file

from catalog import open_lake
from etl import ingest
from lakehouse import Lake
from tests.conftest import fast_config

OUTCOMES = ("ingested", "duplicate", "conflict", "skipped", "quarantined")


def test_every_file_has_exactly_one_outcome(built_lake, truth):
    _, s = built_lake
    assert s.files_seen == truth.files_total
    assert s.outcomes == truth.outcomes
    assert sum(s.outcomes.values()) == s.files_seen
    assert s.quarantine_reasons == truth.quarantine_reasons
    assert s.skipped_reasons == truth.skipped_reasons
    assert s.scheduler == "processes" and s.workers == 2


def test_table_row_counts(cat, truth):
    counts = cat.counts()
    for name in ("instances", "series", "studies", "patients", "quarantine", "conflicts"):
        assert counts[name] == truth.tables[name], name
    assert counts["ingest_runs"] == 1


def test_ingest_runs_records_the_outcomes(cat, truth):
    row = cat.df("SELECT * FROM ingest_runs").iloc[0]
    assert row["status"] == "completed"
    assert row["files_seen"] == truth.files_total
    seen = sum(row[f"files_{o}"] for o in OUTCOMES) + row["files_unchanged"]
    assert seen == row["files_seen"]
    assert row["files_quarantined"] == truth.outcomes["quarantined"]
    assert len(row["config_hash"]) == 64


def test_studies_per_modality_and_year(cat, truth):
    got = dict(cat.con.execute("SELECT Modality, count(*) FROM studies GROUP BY 1").fetchall())
    assert got == truth.studies_by_modality
    rows = cat.con.execute(
        "SELECT Modality, year(StudyDate), count(*) FROM studies GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    assert [list(r) for r in rows] == sorted(truth.studies_by_modality_year)
    inst = dict(cat.con.execute("SELECT Modality, count(*) FROM instances GROUP BY 1").fetchall())
    assert inst == truth.instances_by_modality


def test_quarantine_reasons(cat, truth):
    got = dict(cat.con.execute("SELECT reason, count(*) FROM quarantine GROUP BY 1").fetchall())
    assert got == truth.quarantine_reasons
    # research-zone quarantine rows carry no path
    assert "path" not in cat.table("quarantine").columns


def test_vault_file_index_has_the_expected_outcome_per_path(built_lake, archive, truth):
    with open_lake(built_lake[0], vault=True) as c:
        rows = c.con.execute("SELECT path, outcome, reason FROM files").fetchall()
    root = str(archive[0])
    got = {os.path.relpath(p, root): o for p, o, _ in rows}
    assert got == truth.files
    reasons = {os.path.relpath(p, root): r for p, o, r in rows
               if o in ("quarantined", "skipped")}
    assert reasons == truth.bad_files


def test_non_ascii_names_are_decoded(cat, truth):
    assert len(truth.names) >= 8
    for pid, name in truth.names.items():
        got = cat.con.execute("SELECT DISTINCT PatientName FROM instances WHERE PatientID = ?",
                              [pid]).fetchall()
        assert got == [(name,)], pid


def test_the_conflict_keeps_the_first_version(cat, truth):
    (row,) = cat.df("SELECT * FROM conflicts").to_dict("records")
    assert row["SOPInstanceUID"] == truth.conflict["sop_instance_uid"]
    assert list(row["differing_keywords"]) == ["SeriesDescription"]
    kept = cat.con.execute("SELECT file_sha256, SeriesDescription FROM instances "
                           "WHERE SOPInstanceUID = ?", [row["SOPInstanceUID"]]).fetchall()
    assert kept == [(row["kept_sha256"], kept[0][1])]
    assert not kept[0][1].endswith("(corrected)")


def test_summaries_agree_with_instances(cat, truth):
    bad = cat.con.execute("""
        SELECT s.SeriesInstanceUID FROM series s
        JOIN (SELECT SeriesInstanceUID, count(*) n, sum(file_size) b FROM instances GROUP BY 1) i
          USING (SeriesInstanceUID)
        WHERE s.instanceCount <> i.n OR abs(s.series_size_MB - i.b / 1e6) > 1e-9
    """).fetchall()
    assert bad == []
    counts = dict(cat.con.execute(
        "SELECT SeriesInstanceUID, instanceCount FROM series").fetchall())
    assert counts == truth.series_instance_counts
    sizes = dict(cat.con.execute(
        "SELECT SeriesInstanceUID, round(series_size_MB * 1e6) FROM series").fetchall())
    assert sizes == {k: float(v) for k, v in truth.series_size_bytes.items()}
    mismatch = cat.con.execute("""
        SELECT st.StudyInstanceUID FROM studies st
        JOIN (SELECT StudyInstanceUID, count(*) n, count(DISTINCT SeriesInstanceUID) ns
              FROM instances GROUP BY 1) i USING (StudyInstanceUID)
        WHERE st.instance_count <> i.n OR st.series_count <> i.ns
    """).fetchall()
    assert mismatch == []
    pat = cat.con.execute("""
        SELECT sum(study_count), sum(instance_count) FROM patients
    """).fetchall()[0]
    assert pat == (truth.tables["studies"], truth.tables["instances"])


def test_ct_series_geometry_is_regular(cat):
    rows = cat.con.execute("""
        SELECT distinct_orientations, distinct_dimensions, uneven_spacing,
               distinct_positions = instanceCount
        FROM series WHERE Modality = 'CT' AND instanceCount > 2
          AND SeriesDescription NOT ILIKE '%scout%' AND SeriesDescription NOT ILIKE '%localizer%'
    """).fetchall()
    assert rows and all(r == (1, 1, False, True) for r in rows)


def test_typed_columns(cat):
    types = dict(cat.con.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_name = 'instances'").fetchall())
    assert types["StudyDate"] == "DATE"
    assert types["StudyTime"] == "TIME"
    assert types["SliceThickness"] == "DOUBLE"
    assert types["Rows"] == "BIGINT"
    assert types["PixelSpacing"] == "DOUBLE[]"
    assert types["ImageType"] == "VARCHAR[]"


def test_rerun_is_a_noop_and_new_files_add_only_their_rows(lake_copy, archive, tmp_path):
    lake = Lake.open(lake_copy)
    files_before = sorted(p for p in (lake_copy / "research").rglob("*.parquet"))
    s = ingest(lake, archive[0], fast_config())
    assert s.files_unchanged == s.files_seen and sum(s.outcomes.values()) == 0
    files_after = sorted(p for p in (lake_copy / "research").rglob("*.parquet")
                         if "ingest_runs" not in str(p))
    assert files_after == [p for p in files_before if "ingest_runs" not in str(p)]
    with open_lake(lake_copy) as c:
        assert c.counts()["ingest_runs"] == 2
        before = c.counts()

    # a second source folder: two new pydicom files and one copy of a known instance
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), extra / "ct.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), extra / "mr")
    known = next(Path(archive[0]).rglob("*.dcm"))
    shutil.copy(known, extra / "zz_copy.dcm")
    s = ingest(lake, extra, fast_config())
    assert (s.outcomes["ingested"], s.outcomes["duplicate"]) == (2, 1)
    with open_lake(lake_copy) as c:
        after = c.counts()
        assert after["instances"] == before["instances"] + 2
        assert after["studies"] == before["studies"] + 2
        assert after["conflicts"] == before["conflicts"]


def test_a_run_killed_before_publishing_leaves_the_snapshot_and_converges(lake_copy, tmp_path):
    lake = Lake.open(lake_copy)
    before = open_lake(lake_copy).counts()
    with lake.writer("dying") as w:  # commits but never publishes: what a kill -9 leaves
        w.append("instances", pa.table({"SOPInstanceUID": ["9.9.9"], "Modality": ["CT"]}))
    assert open_lake(lake_copy).counts() == before
    src = tmp_path / "one"
    src.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "ct.dcm")
    ingest(lake, src, fast_config())
    with open_lake(lake_copy) as c:
        assert c.counts()["instances"] == before["instances"] + 1
        assert c.con.execute("SELECT count(*) FROM instances WHERE SOPInstanceUID = '9.9.9'"
                             ).fetchall() == [(0,)]


def test_pydicom_test_files_are_all_accounted_for(tmp_path):
    """Every file pydicom ships (its dicomdirtests tree included) gets exactly one outcome,
    in a research lake (the default profile)."""
    src = Path(get_testdata_file("CT_small.dcm")).parent
    lake = Lake.create(tmp_path / "lk")
    s = ingest(lake, src, fast_config(scheduler="threads", workers=2))
    n_files = sum(1 for p in src.rglob("*") if p.is_file())
    assert s.files_seen == n_files
    assert sum(s.outcomes.values()) == n_files
    assert s.outcomes["skipped"] == s.skipped_reasons["dicomdir"] >= 4
    assert s.quarantine_reasons["truncated"] >= 3
    assert s.outcomes["ingested"] >= 100
    with open_lake(tmp_path / "lk", vault=True) as c:
        assert c.counts()["instances"] == s.outcomes["ingested"]
        assert c.con.execute("SELECT count(*) FROM files").fetchall() == [(n_files,)]
        # the dicomdirtests tree: its DICOMDIR files are skipped, its images ingested
        rows = c.con.execute("SELECT outcome, count(*) FROM files WHERE path LIKE "
                             "'%dicomdirtests%' GROUP BY 1").fetchall()
        assert dict(rows)["skipped"] >= 3 and dict(rows)["ingested"] >= 20


def test_unreadable_source_is_a_clear_error(tmp_path):
    from etl.errors import SourceError

    lake = Lake.create(tmp_path / "lk", profile="identified")
    with pytest.raises(SourceError, match="cannot read source"):
        ingest(lake, tmp_path / "missing", fast_config())


def test_runs_set_process_settings_and_the_last_one_puts_them_back():
    """Ingest runs (in any threads) raise the youngest generation's threshold and allocate
    Arrow memory from the system allocator while they last; overlapping runs leave the
    process's own settings when the last one ends."""
    import gc

    from etl.jobs import GC_YOUNG, _run_settings

    before = gc.get_threshold()
    pool = pa.default_memory_pool()
    gc.set_threshold(900, before[1], before[2])
    try:
        first, second = _run_settings(), _run_settings()
        first.__enter__()
        assert gc.get_threshold()[0] == GC_YOUNG
        assert pa.default_memory_pool().backend_name == "system"
        second.__enter__()
        first.__exit__(None, None, None)  # the first run ends while the second goes on
        assert gc.get_threshold()[0] == GC_YOUNG
        assert pa.default_memory_pool().backend_name == "system"
        second.__exit__(None, None, None)
        assert gc.get_threshold() == (900, before[1], before[2])
        assert pa.default_memory_pool().backend_name == pool.backend_name
    finally:
        gc.set_threshold(*before)
        pa.set_memory_pool(pool)


class _RecordingRunner:
    """A synchronous runner that keeps its waves' futures: each wave is computed when
    the one before it is done, as the real runners' one wave thread does."""

    def __init__(self, real, fail_wave: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.real, self.fail_wave = real, fail_wave
        self.workers, self.description = real.workers, real.description
        self.futures: list = []
        self.started: list[int] = []
        #: the number of batches of each wave
        self.sizes: list[int] = []
        #: waves submitted while a wave before them was still being read
        self.ahead = 0
        self._thread = ThreadPoolExecutor(1)

    def _compute(self, k: int, batches):
        import time

        self.started.append(k)
        time.sleep(0.05)  # the driver gets ahead: the next wave is queued meanwhile
        if k == self.fail_wave:
            raise RuntimeError(f"wave {k} failed")
        return self.real._compute(batches)

    def submit(self, batches):
        self.ahead += any(not f.done() for f in self.futures)
        self.sizes.append(len(batches))
        f = self._thread.submit(self._compute, len(self.futures), [list(b) for b in batches])
        self.futures.append(f)
        return f

    def close(self):
        self._thread.shutdown(wait=True)
        self.real.close()


@pytest.mark.parametrize("fail_wave", [None, 1])
def test_the_next_wave_is_queued_while_one_is_read(tmp_path, archive, monkeypatch,
                                                   fail_wave):
    """The driver submits a wave before it waits for the one before (the workers never
    wait for its walk between waves); the first wave is one batch per worker (they start
    on it while the next wave is walked); every wave is read once, in order; when a wave
    fails, the run stops with its error: the wave queued behind it is cancelled (unless
    the runner had started it already) and no later wave is walked or submitted."""
    from etl import runners as runner_module

    runners: list[_RecordingRunner] = []
    real_make = runner_module.make_runner

    def make(config, run_id, policy=None):
        runners.append(_RecordingRunner(real_make(config, run_id, policy), fail_wave))
        return runners[-1]

    monkeypatch.setattr(runner_module, "make_runner", make)  # jobs imports it when reading
    lake = Lake.create(tmp_path / "lk", profile="identified")
    config = fast_config(scheduler="synchronous", batch_files=32, batches_per_worker=2)
    if fail_wave is None:
        s = ingest(lake, archive[0], config)
        (runner,) = runners
        n = len(runner.futures)
        # one worker: a first wave of one batch of 32 files, then waves of 2 batches
        assert n == 1 + -(-(s.files_seen - 32) // 64) > 3
        assert runner.sizes[:-1] == [1] + [2] * (n - 2)
        assert runner.started == list(range(n))
        assert runner.ahead == n - 1
        assert sum(s.outcomes.values()) == s.files_seen
        return
    with pytest.raises(RuntimeError, match="wave 1 failed"):
        ingest(lake, archive[0], config)
    (runner,) = runners
    assert len(runner.futures) == 3  # wave 2 was queued, no wave after it
    assert runner.started == [0, 1, 2] or runner.futures[2].cancelled()
    assert not Lake.open(tmp_path / "lk").read("instances").num_rows


@pytest.mark.parametrize(("checksum", "sizes"), [("header", [4, 4, 2]), ("full", [2] * 5)])
def test_a_batch_closes_on_the_bytes_its_worker_reads(tmp_path, monkeypatch, checksum,
                                                      sizes):
    """``batch_bytes`` counts what a worker reads of each file: the whole file when the
    lake checksums whole files, else at most its header's first 32 KB (a batch of CT
    slices is then closed by its file count, not by their pixel data)."""
    from etl import runners as runner_module

    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):  # 50,000 bytes each: not DICOM, so each is a quarantine row
        (src / f"f{i:02d}.bin").write_bytes(bytes([i]) * 50_000)
    seen: list[list[int]] = []
    real_make = runner_module.make_runner

    def make(config, run_id, policy=None):
        runner = real_make(config, run_id, policy)
        real_submit = runner.submit

        def submit(batches):
            seen.append([len(b) for b in batches])
            return real_submit(batches)

        runner.submit = submit
        return runner

    monkeypatch.setattr(runner_module, "make_runner", make)  # jobs imports it when reading
    lake = Lake.create(tmp_path / "lk", profile="identified", checksum=checksum)
    s = ingest(lake, src, fast_config(scheduler="synchronous", batch_bytes=100_000))
    assert [n for wave in seen for n in wave] == sizes
    assert s.outcomes["quarantined"] == 10
