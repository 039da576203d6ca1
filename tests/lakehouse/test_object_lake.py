"""A lake on S3-compatible object storage: a real moto server on loopback, in a process of
its own (tests/s3server.py), reached through the standard AWS environment variables."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from catalog import open_lake
from etl import ingest
from lake_cli import main
from lakehouse import Lake, audit
from lakehouse.errors import LakeBusyError
from lakehouse.schemas import TABLES, conform
from lakehouse.storage import LeaseHeldError, LockLostError, open_storage
from lakehouse.tables import ConcurrentWriteError
from lakehouse.vacuum import vacuum
from lakehouse.verify import verify
from tests.conftest import fast_config
from tests.etl.cluster import RUN_COLUMNS, lake_content
from tests.etl.test_compaction import every_row
from tests.s3server import moto_missing, run_moto

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto server with a ``lakes`` bucket; the AWS environment points at it, and lakes'
    local working folders are in a temporary XDG_STATE_HOME (both restored afterwards)."""
    why = moto_missing()
    if why:
        pytest.skip(why)
    with run_moto(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        env = {**server.env, "XDG_STATE_HOME": str(tmp_path_factory.mktemp("state-home"))}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            server.create_bucket("lakes")
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def key_hash(location) -> tuple[int, str]:
    """(rows, sha256) of the key columns of every instance, in SOPInstanceUID order."""
    with open_lake(location) as cat:
        rows = cat.con.execute(
            "SELECT SOPInstanceUID, SeriesInstanceUID, StudyInstanceUID, PatientID, Modality, "
            "file_sha256 FROM instances ORDER BY SOPInstanceUID").fetchall()
    return len(rows), hashlib.sha256(json.dumps(rows).encode()).hexdigest()


@pytest.mark.slow
def test_cli_lake_on_s3_equals_the_local_lake(s3, archive, truth, built_lake, capsys):
    url = "s3://lakes/site"
    assert main(["init", url, "--profile", "identified"]) == 0
    assert f"created identified lake at {url}" in capsys.readouterr().out
    argv = ["ingest", str(archive[0]), "--lake", url, "--scheduler", "threads", "--workers",
            "2", "--json", "--no-progress"]
    assert main(argv) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["files_seen"] == truth.files_total and run["outcomes"] == truth.outcomes
    assert run["quarantine_reasons"] == truth.quarantine_reasons

    # the same rows as the same archive in a local lake (file index included: same paths)
    ours, local = lake_content(open_storage(url)), lake_content(built_lake[0])
    for name in RUN_COLUMNS:
        assert ours[name] == local[name], name
    local_keys = key_hash(built_lake[0])
    assert key_hash(url) == local_keys and local_keys[0] == truth.outcomes["ingested"]

    assert main(["sql", "SELECT Modality, count(*) AS n FROM instances GROUP BY 1 ORDER BY 1",
                 "--lake", url, "--format", "json"]) == 0
    by_modality = json.loads(capsys.readouterr().out)
    with open_lake(built_lake[0]) as cat:
        expected = cat.con.execute("SELECT Modality, count(*) FROM instances GROUP BY 1 "
                                   "ORDER BY 1").fetchall()
    assert [(r["Modality"], r["n"]) for r in by_modality] == expected

    assert main(["status", "--lake", url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["lake"] == url and status["snapshot"] == run["snapshot"]
    assert status["tables"]["instances"] == truth.outcomes["ingested"]
    assert status["tables"]["quarantine"] == truth.outcomes["quarantined"]

    # a rerun on the unchanged archive reads nothing and adds no rows
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["files_unchanged"] == truth.files_total
    assert sum(again["outcomes"].values()) == 0
    assert again["snapshot"] == run["snapshot"] + 1
    assert key_hash(url) == local_keys

    # DuckDB read the data files itself, through the registered fsspec filesystem
    with open_lake(url) as cat:
        assert cat.con.filesystem_is_registered("s3")
        plan = cat.con.execute("EXPLAIN SELECT count(*) FROM instances").fetchall()
        assert "READ_PARQUET" in str(plan).upper() or "PARQUET_SCAN" in str(plan).upper()
    # every query is audited, in the lake's bucket (one object per record)
    assert [e["action"] for e in audit.read(Lake.open(url))] == ["sql"]


def test_one_writer_at_a_time(s3):
    lake = Lake.create("s3://lakes/locks", profile="identified")
    other = Lake.open("s3://lakes/locks")
    with lake.writer("a", lease_seconds=1.5) as w:
        with pytest.raises(LeaseHeldError, match=r"holds the write lease on s3://lakes/locks"):
            other.writer("b").__enter__()
        time.sleep(2.5)  # longer than the lease: the renewals keep it
        with pytest.raises(LakeBusyError):
            other.writer("b").__enter__()
        w.publish("by a")
    assert not lake.storage.exists("_lake/write.lock")  # released
    with other.writer("b") as w2:
        w2.publish("by b")
    assert [s.run_id for s in lake.snapshots()] == [None, "a", "b"]


def test_a_stalled_writer_loses_its_lease(s3):
    lake = Lake.create("s3://lakes/stall", profile="identified")
    w = lake.writer("slow", lease_seconds=1.0).__enter__()
    try:
        lock = w._lock
        assert lock is not None
        lock._stop.set()  # the renewals stop, as in a process paused longer than its lease
        assert lock._thread is not None
        lock._thread.join()
        time.sleep(1.2)
        with lake.writer("fast") as w2:  # the lease expired: taken over
            w2.publish("fast")
        with pytest.raises(LockLostError, match="lost"):
            w.append("ingest_runs", pa.table({"ingest_run_id": ["slow"]}))
        with pytest.raises(LockLostError):
            w.publish("slow")
    finally:
        w.__exit__(None, None, None)
    assert [s.run_id for s in lake.snapshots()] == [None, "fast"]
    assert lake.count("ingest_runs") == 0


def test_a_writer_that_missed_its_lease_expiry_publishes_nothing(s3):
    """The window no lease closes: a writer paused after its last check. Its commit lands
    after the other writer's; it notices (the commit is not the version it expected) and
    cannot publish (the snapshot number it would take exists)."""
    lake = Lake.create("s3://lakes/window", profile="identified")
    w = lake.writer("paused", lease_seconds=1.0).__enter__()
    try:
        assert w._lock is not None
        w._lock._stop.set()
        time.sleep(1.2)
        with lake.writer("other") as w2:
            w2.append("ingest_runs", pa.table({"ingest_run_id": ["other"]}))
            w2.publish("other")
        w._lock.check = lambda: None  # it checked just before it was paused
        with pytest.raises(ConcurrentWriteError, match="another writer wrote version 1 of "
                                                       "ingest_runs"):
            w.append("ingest_runs", pa.table({"ingest_run_id": ["paused"]}))
        with pytest.raises(ConcurrentWriteError):
            w.publish("paused")
    finally:
        w.__exit__(None, None, None)
    assert [s.run_id for s in lake.snapshots()] == [None, "other"]
    assert lake.read("ingest_runs").column("ingest_run_id").to_pylist() == ["other"]
    with lake.writer("next") as w3:  # rolls the paused writer's commit back
        assert w3.dataset("ingest_runs").count_rows() == 1
        w3.publish("next")


_WRITER = """
import sys, time
import pyarrow as pa
from lakehouse import Lake
lake = Lake.open(sys.argv[1])
w = lake.writer("killed", lease_seconds=float(sys.argv[2])).__enter__()
w.append("ingest_runs", pa.table({"ingest_run_id": ["killed-1", "killed-2"]}))
print("committed", flush=True)
time.sleep(600)
"""


def test_a_killed_writer_is_invisible_and_the_next_one_converges(s3, tmp_path):
    url = "s3://lakes/crash"
    lake = Lake.create(url, profile="identified")
    with lake.writer("first") as w:
        w.append("ingest_runs", pa.table({"ingest_run_id": ["first"]}))
        w.publish("first")
    published = lake.snapshot()
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, url, "3"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "committed", proc.stderr
        killed_at = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # committed to Delta, never published: readers do not see it
    assert lake.open_delta("ingest_runs").version() == published.versions["ingest_runs"] + 1
    assert lake.snapshot() == published
    assert lake.read("ingest_runs").column("ingest_run_id").to_pylist() == ["first"]
    # its lease still runs: the next writer is told who holds it and until when
    with pytest.raises(LeaseHeldError, match="wait for it to finish, or, if it died"):
        lake.writer("next").__enter__()
    time.sleep(max(0.0, 3.2 - (time.monotonic() - killed_at)))
    with lake.writer("next") as w:  # takes the expired lease over, rolls the commit back
        assert w.dataset("ingest_runs").count_rows() == 1
        w.append("ingest_runs", pa.table({"ingest_run_id": ["next"]}))
        w.publish("next")
    assert sorted(lake.read("ingest_runs").column("ingest_run_id").to_pylist()) == \
        ["first", "next"]
    # the killed run's data file is referenced by no snapshot: vacuum removes it
    report = vacuum(lake, retention_hours=0)
    assert [p.split("-")[1] for p in report.removed["ingest_runs"]] == ["killed"]
    assert sum(len(v) for v in report.removed.values()) == 1
    assert sorted(lake.read("ingest_runs").column("ingest_run_id").to_pylist()) == \
        ["first", "next"]


def test_summaries_updated_on_s3_equal_one_local_run(s3, archive, tmp_path, monkeypatch):
    """A second run on an S3 lake updates its summaries (rows replaced through fsspec,
    changed files read by DuckDB over S3) to what one run on a local lake builds."""
    from etl import summarize
    from tests.etl.test_summary_update import (
        DERIVED,
        derived,
        last_mode,
        put_back,
        split_archive,
    )

    monkeypatch.setattr(summarize, "UPDATE_SHARE", 1.0)  # update however much changed
    monkeypatch.setattr(summarize, "READ_SHARE", 1.0)
    src = tmp_path / "pacs" / "archive"
    split_archive(archive[0], src)
    url = "s3://lakes/updated"
    lake = Lake.create(url, profile="identified")
    ingest(lake, src, fast_config())
    put_back(src)
    ingest(lake, src, fast_config())
    one = Lake.create(tmp_path / "one", profile="identified")
    ingest(one, src, fast_config())
    assert derived(url) == derived(tmp_path / "one")
    assert [last_mode(url, t) for t in DERIVED] == ["Append"] * len(DERIVED)


@pytest.mark.slow  # about 30 s: six ingests, three of them to S3
def test_runs_compact_on_s3_as_on_a_local_lake(s3, nightly, tmp_path):
    """A run's compaction on object storage (files read, rewritten and removed through
    fsspec) leaves what it leaves on a local lake: the same files per table, the same
    rows, every earlier snapshot reading its own."""
    url = "s3://lakes/compacting"
    lake = Lake.create(url, profile="identified")
    local = Lake.create(tmp_path / "local", profile="identified")
    runs, snapshots = [], []
    for part in nightly[:3]:
        runs.append(ingest(lake, part, fast_config(compact_files=1)))
        local_run = ingest(local, part, fast_config(compact_files=1))
        assert runs[-1].compacted == local_run.compacted
        snapshots.append((lake.snapshot(), every_row(lake)))
    # the second run finds one file per partition left by the first; the third, two
    assert runs[1].compacted.get("instances") is None and runs[2].compacted["instances"]
    assert {n: len(lake.delta(n).file_uris()) for n in lake.table_names()} == \
        {n: len(local.delta(n).file_uris()) for n in local.table_names()}
    assert every_row(lake) == every_row(local)
    for snap, rows in snapshots:
        assert every_row(lake, snap) == rows
    assert verify(lake).problems == []


def test_errors_are_one_line(s3, tmp_path, capsys):
    code = main(["init", "s3://no-such-bucket/lake"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "bucket 'no-such-bucket' does not exist" in err
    code = main(["status", "--lake", "s3://lakes/nothing-here"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "no lake at s3://lakes/nothing-here" in err
    os.environ["LAKE_STORAGE_OPTIONS"] = str(tmp_path / "missing.json")
    try:
        code = main(["status", "--lake", "s3://lakes/site"])
    finally:
        del os.environ["LAKE_STORAGE_OPTIONS"]
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "cannot read storage options" in err
    Lake.create("s3://lakes/twice", profile="identified")
    code = main(["init", "s3://lakes/twice", "--profile", "identified"])
    err = capsys.readouterr().err
    assert code == 1 and "a lake already exists at s3://lakes/twice" in err


@pytest.mark.slow
def test_research_lake_on_s3_keeps_its_key_outside(s3, archive, truth, tmp_path):
    key = tmp_path / "site.key"
    url = "s3://lakes/research"
    lake = Lake.create(url, key_file=key)
    local = Lake.create(tmp_path / "local", key_file=key)
    for target in (lake, local):
        s = ingest(target, archive[0], fast_config(scheduler="threads", workers=2),
                   key_file=key)
        assert s.outcomes == truth.outcomes
    # the same pseudonymized rows (same key), vault tables included
    ours, theirs = lake_content(lake.storage), lake_content(local.root)
    for name in RUN_COLUMNS:
        assert ours[name] == theirs[name], name
    with open_lake(url, vault=True) as cat, open_lake(local.root, vault=True) as ref:
        q = "SELECT kind, pseudonym, original FROM identifiers ORDER BY ALL"
        assert cat.con.execute(q).fetchall() == ref.con.execute(q).fetchall()
        assert cat.con.execute("SELECT count(*) FROM identifiers").fetchone()[0] > 0
    # the key never went into the bucket (only its fingerprint, in the manifest)
    secret = key.read_text().strip()
    fs = lake.storage.fs
    objects = fs.find("lakes/research")
    assert len(objects) > 50
    for path in objects:
        body = fs.cat_file(path)
        assert secret.encode() not in body and bytes.fromhex(secret) not in body, path


@pytest.mark.slow
def test_s3_source_into_s3_lake(s3, archive, truth, built_lake, capsys):
    fs = open_storage("s3://lakes/x").fs
    s3.create_bucket("pacs")
    fs.put(str(archive[0]) + "/", "pacs/archive/", recursive=True)
    url = "s3://lakes/from-s3"
    assert main(["init", url, "--profile", "identified"]) == 0
    capsys.readouterr()
    argv = ["ingest", "s3://pacs/archive", "--lake", url, "--scheduler", "threads",
            "--workers", "2", "--json", "--no-progress"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fetched"] == truth.files_total and out["run"]["outcomes"] == truth.outcomes
    ours, local = lake_content(open_storage(url)), lake_content(built_lake[0])
    for name in RUN_COLUMNS:
        if name != "files":  # staged copies have other paths
            assert ours[name] == local[name], name
    # what was fetched is remembered in the lake (another machine continues from it)
    assert out["state_file"].startswith(f"{url}/vault/sources/")
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["already_fetched"], again["fetched"]) == (truth.files_total, 0)

    # integrity checks read the objects
    assert main(["verify", "--lake", url]) == 0
    capsys.readouterr()
    lake = Lake.open(url)
    adds = lake.delta("instances").get_add_actions(flatten=True).column("path").to_pylist()
    victim = f"research/instances/{adds[0]}"
    body = bytearray(lake.storage.read_bytes(victim))
    body[100] ^= 0xFF
    lake.storage.write_bytes(victim, bytes(body))
    assert main(["verify", "--lake", url]) == 1
    assert f"instances: {adds[0]}: checksum" in capsys.readouterr().out


def test_storage_options_file_instead_of_the_environment(s3, tmp_path, capsys, monkeypatch):
    """The options file alone reaches the server: the environment points at a closed port,
    so any request made without the file's options fails."""
    opts = tmp_path / "s3.json"
    opts.write_text(json.dumps(s3.options))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    monkeypatch.setenv("LAKE_STORAGE_OPTIONS", str(opts))
    url = "s3://lakes/by-file"
    assert main(["init", url, "--profile", "identified"]) == 0
    capsys.readouterr()
    lake = Lake.open(url, storage_options=s3.options)
    with lake.writer("w") as w:
        w.append("ingest_runs", pa.table({"ingest_run_id": ["w"], "status": ["completed"]}))
        w.publish("w")
    assert main(["sql", "SELECT ingest_run_id, status FROM ingest_runs", "--lake", url,
                 "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"ingest_run_id": "w",
                                                     "status": "completed"}]
    assert main(["status", "--lake", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["snapshot"] == 1


@pytest.mark.slow
def test_optimize_and_verify_on_s3(s3, capsys):
    url = "s3://lakes/optimize"
    lake = Lake.create(url, profile="identified")
    for i in range(12):
        with lake.writer(f"r{i}") as w:
            w.append("ingest_runs", pa.table({"ingest_run_id": [f"r{i}"]}))
            w.publish()
    assert len(lake.delta("ingest_runs").file_uris()) == 12
    assert main(["optimize", "--lake", url]) == 0
    assert "rewrote 12 small files as 1" in capsys.readouterr().out
    assert len(lake.delta("ingest_runs").file_uris()) == 1
    assert sorted(lake.read("ingest_runs").column("ingest_run_id").to_pylist()) == \
        sorted(f"r{i}" for i in range(12))
    assert main(["verify", "--lake", url]) == 0
    assert capsys.readouterr().out.splitlines() == ["snapshot 13: 1 data files checked", "ok"]
    # old snapshots expire, but for the one a cohort pins; the file only snapshot 12 had
    # goes, and the log files before the checkpoint at version 10 (snapshot 11 reads 11)
    lake.storage.write_bytes("_lake/cohorts/early.json", b'{"snapshot": 11}')
    assert main(["vacuum", "--expire-days", "0", "--retention-hours", "0", "--lake", url]) == 0
    expired, removed, log_removed = capsys.readouterr().out.splitlines()
    assert expired == ("expired 12 snapshots published more than 0 days ago (0-10, 12); "
                       "kept 1 older ones that saved cohorts pin (early)")
    assert removed.startswith("removed 1 unreferenced files (")
    assert log_removed == "removed 10 commit-log files no kept snapshot needs (ingest_runs)"
    assert lake.snapshot_numbers() == [11, 13]
    assert sorted(lake.storage.listdir("research/ingest_runs/_delta_log")) == \
        [f"{10:020d}.checkpoint.parquet", *(f"{v:020d}.json" for v in (10, 11, 12, 13)),
         "_last_checkpoint"]
    assert sorted(lake.read("ingest_runs", lake.snapshot(11)).column("ingest_run_id")
                  .to_pylist()) == sorted(f"r{i}" for i in range(11))
    assert main(["verify", "--lake", url]) == 0  # the checksums carried
    assert capsys.readouterr().out.splitlines() == ["snapshot 13: 1 data files checked", "ok"]
    report = verify(lake, lake.snapshot(11))
    assert (report.ok, report.files_checked, report.files_without_checksum) == (True, 11, 0)


def test_tables_are_read_by_arrow_s3_and_a_reading_process_exits_cleanly(s3, monkeypatch):
    """An object-store lake's tables are read through Arrow's own S3 client (endpoint and
    keys from the environment, or from storage options), with the rows deltalake's file
    system gives; and a process that read one exits with 0 (deltalake's Python file
    system aborted most such processes at exit)."""
    import pyarrow.fs as pafs

    lake = Lake.create("s3://lakes/arrow-fs", profile="identified")
    rows = [{"SOPInstanceUID": f"1.2.{i}", "StudyInstanceUID": "1.2",
             "SeriesInstanceUID": "1.2.3", "Modality": ["CT", "MR", None][i % 3],
             "study_year": 2020, "dicom_json": "{}"} for i in range(30)]
    with lake.writer("run") as w:
        w.append("instances", conform(TABLES["instances"], pa.Table.from_pylist(rows),
                                      lake.profile))
        w.publish("rows")
    lake = Lake.open("s3://lakes/arrow-fs")
    dataset = lake.dataset("instances")
    assert isinstance(dataset.filesystem, pafs.SubTreeFileSystem)
    assert isinstance(dataset.filesystem.base_fs, pafs.S3FileSystem)
    columns = ["SOPInstanceUID", "Modality"]
    key = [("SOPInstanceUID", "ascending")]
    theirs = lake.delta("instances").to_pyarrow_dataset().to_table(columns=columns)
    assert dataset.to_table(columns=columns).sort_by(key).to_pylist() == \
        theirs.sort_by(key).to_pylist()
    code = ("import sys\nfrom lakehouse import Lake\n"
            "print(Lake.open(sys.argv[1]).read('instances').num_rows)\n")
    for _ in range(3):
        run = subprocess.run([sys.executable, "-c", code, "s3://lakes/arrow-fs"],
                             capture_output=True, text=True, timeout=120, cwd=REPO)
        assert (run.returncode, run.stdout.strip()) == (0, "30"), run.stderr[-500:]
    # the same lake by storage options alone, the environment's endpoint and keys gone
    for name in s3.env:
        monkeypatch.delenv(name)
    by_options = Lake.open("s3://lakes/arrow-fs", storage_options=s3.options)
    assert by_options.read("instances", columns=columns).sort_by(key).to_pylist() == \
        theirs.sort_by(key).to_pylist()
