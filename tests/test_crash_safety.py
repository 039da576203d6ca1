"""kill -9 at random moments, concurrent readers, two ingests at once (``pytest -m slow``).

Real processes: the ingest runs in its own process group and is killed with
SIGKILL (its Dask workers with it); readers are separate processes querying
through DuckDB.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from deltalake import DeltaTable

from catalog import open_lake
from lakehouse import Lake, layout
from lakehouse.vacuum import vacuum
from lakehouse.verify import verify
from synth import generate_archive

pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[1]
TRIALS = 24
#: Columns naming the run or the moment (``*ingest_run_id``, ``*_at``) legitimately differ.
VOLATILE = ("ingest_run_id", "_at")


def _driver(src: Path, lake: Path, scheduler: str = "synchronous") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.ingest_driver", str(src), str(lake),
                             scheduler, "40", "16"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def _run(src: Path, lake: Path) -> dict:
    p = _driver(src, lake)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()[-2000:]
    return json.loads(out)


def _content(lake: Lake, name: str) -> Counter:
    """The table as a multiset of rows, run ids and timestamps left out."""
    t = lake.read(name)
    keep = [c for c in t.column_names if not c.endswith(VOLATILE)]
    return Counter(json.dumps(r, sort_keys=True, default=str)
                   for r in t.select(keep).to_pylist())


def _log_commits(lake: Path) -> int:
    return sum(len(os.listdir(p)) for p in lake.glob("*/*/_delta_log"))


def _check_snapshot_whole(lake_dir: Path, seen: dict[int, dict[str, int]]) -> dict[str, int]:
    lake = Lake.open(lake_dir)
    snap = lake.snapshot()
    counts = {n: lake.read(n, snap).num_rows for n in lake.table_names()}
    if snap.number in seen:
        assert seen[snap.number] == counts, f"snapshot {snap.number} changed"
    seen[snap.number] = counts
    files = lake.read("files", snap, columns=["outcome"]).column("outcome").to_pylist()
    outcomes = Counter(files)
    # instances, quarantine and the file index are published together, or not at all
    assert counts["instances"] == outcomes["ingested"]
    assert counts["quarantine"] == outcomes["quarantined"]
    assert counts["conflicts"] == outcomes["conflict"]
    with open_lake(lake_dir) as c:  # a DuckDB reader sees exactly the same
        assert c.counts() == {n: counts[n] for n in c.counts()}
    report = verify(lake, snap)
    assert report.ok, report.problems  # nothing torn, nothing missing, nothing orphaned visible
    return counts


def test_kill_9_at_random_moments_converges_to_a_clean_run(tmp_path, monkeypatch):
    src = tmp_path / "pacs"
    truth = generate_archive(src, seed=1, preset="test")
    clean = tmp_path / "clean"
    key = tmp_path / "lake.key"  # one key: the same pseudonyms in every lake, comparable
    Lake.create(clean, key_file=key)
    monkeypatch.setenv("LAKE_KEY_FILE", str(key))  # for the ingest processes
    t0 = time.monotonic()
    _run(src, clean)
    clean_seconds = time.monotonic() - t0

    rng = random.Random(20261128)
    kills = during_commit = unpublished = finished = lost = duplicated = 0
    rounds = 0
    while kills < TRIALS:
        # a round: kill the ingest of one lake again and again until a run completes,
        # then compare the lake with the clean run's
        rounds += 1
        lake_dir = tmp_path / f"lake{rounds}"
        Lake.create(lake_dir, key_file=key)
        seen: dict[int, dict[str, int]] = {}
        while True:
            n = kills + finished
            # every third run uses Dask's process pool: the kill takes its workers too
            p = _driver(src, lake_dir, "processes" if n % 3 == 2 else "synchronous")
            if n % 2:  # right after the k-th new Delta commit
                start, k = _log_commits(lake_dir), rng.randint(1, 6)
                while p.poll() is None and _log_commits(lake_dir) < start + k:
                    time.sleep(0.002)
                during_commit += p.poll() is None
            else:  # at a random moment of the run
                time.sleep(rng.uniform(0.3, clean_seconds))
            killed = p.poll() is None
            if killed:
                os.killpg(p.pid, signal.SIGKILL)
                kills += 1
            else:
                finished += 1
            p.communicate()
            assert killed or p.returncode == 0
            lake = Lake.open(lake_dir)
            snap = lake.snapshot()
            unpublished += any(
                DeltaTable(str(layout.table_path(lake_dir, n))).version() > v
                for n, v in snap.versions.items())
            _check_snapshot_whole(lake_dir, seen)
            if not killed:
                break
        counts = _check_snapshot_whole(lake_dir, seen)
        a, b = Lake.open(lake_dir), Lake.open(clean)
        for name in a.table_names():
            if name == "ingest_runs":
                continue
            got, want = _content(a, name), _content(b, name)
            lost += sum((want - got).values())
            duplicated += sum((got - want).values())
        sops = a.read("instances", columns=["SOPInstanceUID"]).column(0).to_pylist()
        assert len(sops) == len(set(sops)) == truth.tables["instances"] == counts["instances"]
        # the orphans the kills left are never visible, and vacuum removes them
        vacuum(a, retention_hours=0)
        assert verify(a).ok
        assert _content(a, "instances") == _content(b, "instances")
    print(f"\nkill -9 trials: {kills} kills in {rounds} rounds ({during_commit} right after a "
          f"Delta commit, {unpublished} left unpublished Delta commits), {finished} runs "
          f"completed; rows lost {lost}, rows duplicated {duplicated}")
    assert during_commit >= 8 and unpublished >= 5
    assert lost == 0 and duplicated == 0


READER = r"""
import json, sys, time
from pathlib import Path
from catalog import open_lake
lake, stop, out = sys.argv[1], Path(sys.argv[2]), open(sys.argv[3], "w")
while not stop.exists():
    try:
        with open_lake(lake) as c:
            n = c.snapshot.number
            row = c.con.execute(
                "SELECT (SELECT count(*) FROM instances), (SELECT count(*) FROM quarantine), "
                "(SELECT count(*) FROM studies), "
                "(SELECT count(DISTINCT SOPInstanceUID) FROM instances)").fetchone()
        out.write(json.dumps({"snapshot": n, "counts": list(row)}) + "\n")
    except Exception as exc:
        out.write(json.dumps({"error": repr(exc)}) + "\n")
    out.flush()
"""


def test_four_readers_see_only_committed_counts_while_an_ingest_commits(tmp_path):
    src = tmp_path / "pacs"
    generate_archive(src, seed=2, preset="test")
    lake_dir = tmp_path / "lake"
    Lake.create(lake_dir)
    stop = tmp_path / "stop"
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(lake_dir), str(stop),
                                 str(tmp_path / f"reader{i}.jsonl")], cwd=REPO)
               for i in range(4)]
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not all(  # every reader is querying
                (tmp_path / f"reader{i}.jsonl").exists()
                and (tmp_path / f"reader{i}.jsonl").stat().st_size for i in range(4)):
            time.sleep(0.1)
        _run(src, lake_dir)
        time.sleep(1)
    finally:
        stop.touch()
        for r in readers:
            r.wait(timeout=60)
    lake = Lake.open(lake_dir)
    committed = {}
    for snap in lake.snapshots():
        with open_lake(lake_dir, snapshot=snap.number) as c:
            committed[snap.number] = list(c.con.execute(
                "SELECT (SELECT count(*) FROM instances), (SELECT count(*) FROM quarantine), "
                "(SELECT count(*) FROM studies), "
                "(SELECT count(DISTINCT SOPInstanceUID) FROM instances)").fetchone())
    errors = observations = 0
    distinct = set()
    for i in range(4):
        last = -1
        for line in (tmp_path / f"reader{i}.jsonl").read_text().splitlines():
            o = json.loads(line)
            if "error" in o:
                errors += 1
                continue
            observations += 1
            assert o["counts"] == committed[o["snapshot"]]
            assert o["snapshot"] >= last  # counts only move forward, snapshot by snapshot
            last = o["snapshot"]
            distinct.add(o["snapshot"])
    print(f"\nreaders: {observations} queries, {errors} errors, {len(distinct)} distinct "
          f"snapshots seen of {len(committed)}")
    assert errors == 0 and observations >= 12 and len(distinct) >= 3


def test_two_ingests_at_once_one_refuses_clearly_and_no_commit_is_lost(tmp_path):
    srcs = []
    for seed in (3, 4):
        srcs.append(tmp_path / f"pacs{seed}")
        generate_archive(srcs[-1], seed=seed, preset="test")
    lake_dir = tmp_path / "lake"
    Lake.create(lake_dir)
    cmds = [[sys.executable, "-m", "lake_cli", "ingest", str(s), "--lake", str(lake_dir),
             "--scheduler", "synchronous", "--json"] for s in srcs]
    procs = [subprocess.Popen(c, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in cmds]
    results = [(*p.communicate(timeout=300), p.returncode) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 1], results
    refused = next(i for i, r in enumerate(results) if r[2] == 1)
    assert "another process is writing to the lake" in results[refused][1]
    assert "wait for it to finish" in results[refused][1]
    done = subprocess.run(cmds[refused], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lake = Lake.open(lake_dir)
    files = lake.read("files", columns=["path", "outcome"])
    n_files = sum(1 for s in srcs for p in s.rglob("*") if p.is_file())
    assert files.num_rows == n_files
    assert lake.read("instances").num_rows == \
        Counter(files.column("outcome").to_pylist())["ingested"]
    paths = files.column("path").to_pylist()
    for s in srcs:
        assert sum(1 for p in paths if p.startswith(f"{s}/")) == \
            sum(1 for p in s.rglob("*") if p.is_file())
