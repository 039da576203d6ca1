"""A lake on object storage whose answers get lost: a real S3 server (moto, its own
process) behind a real HTTP proxy on loopback (:mod:`tests.faultproxy`) that forwards a
PUT, lets the store do it, and closes the connection without its answer. The client
(s3fs, deltalake) retries the PUT, and the retry of a conditional PUT is refused: the
object exists (``If-None-Match``) or its ETag changed (``If-Match``), by our own write.

What must hold: a write that was done counts as done. The writer keeps its lease, its
snapshot is published, a Delta commit retried as a second version of the same files is
that commit; the run ends as without the fault, and the lake verifies.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from catalog import open_lake
from etl import ingest
from lakehouse import Lake
from lakehouse.verify import verify
from tests.conftest import fast_config
from tests.faultproxy import FaultProxy
from tests.s3server import KEY, REGION, SECRET, moto_bucket


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    with moto_bucket(tmp_path_factory, "lakes") as server:
        yield server


class LoseAnswers:
    """A plan: lose the answer to PUTs whose path contains ``where``, at the PUTs
    numbered in ``which`` (from 1) of those, once armed."""

    def __init__(self, where: str, which: set[int] | None = None):
        self.where, self.which = where, which or {1}
        self.armed, self.seen = False, 0

    def __call__(self, path: str, n: int) -> str | None:
        if not (self.armed and path.startswith("PUT ") and self.where in path.split("?")[0]):
            return None
        self.seen += 1
        return "lost-answer" if self.seen in self.which else None


@pytest.fixture()
def proxied(moto, tmp_path, monkeypatch):
    """A function: a fault proxy in front of the moto server with the given plan; the AWS
    environment points at it (lakes' working folders in a temporary XDG_STATE_HOME)."""
    proxies = []

    def start(plan) -> FaultProxy:
        proxy = FaultProxy(moto.endpoint, plan)
        proxies.append(proxy)
        for k, v in {"AWS_ENDPOINT_URL": proxy.url, "AWS_ACCESS_KEY_ID": KEY,
                     "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": REGION,
                     "XDG_STATE_HOME": str(tmp_path / "state")}.items():
            monkeypatch.setenv(k, v)
        return proxy

    yield start
    for proxy in proxies:
        proxy.close()


def test_the_write_lease_survives_lost_answers(proxied):
    plan = LoseAnswers("_lake/write.lock", {1, 2})  # taking it, and its first renewal
    proxy = proxied(plan)
    lake = Lake.create("s3://lakes/lease", profile="identified")
    plan.armed = True
    with lake.writer("a", lease_seconds=1.5) as w:
        assert w._lock is not None
        w._lock._renew()
        w._lock.check()
        w.append("ingest_runs", pa.table({"ingest_run_id": ["a"]}))
        w.publish("by a")
    assert proxy.applied == {"lost-answer": 2}
    assert [s.run_id for s in lake.snapshots()] == [None, "a"]
    assert not lake.storage.exists("_lake/write.lock")  # released


def test_a_snapshot_whose_answer_was_lost_is_published(proxied):
    plan = LoseAnswers("_lake/snapshots/")
    proxy = proxied(plan)
    lake = Lake.create("s3://lakes/snap", profile="identified")
    plan.armed = True
    with lake.writer("a") as w:
        w.append("ingest_runs", pa.table({"ingest_run_id": ["a"]}))
        snap = w.publish("by a")
    assert proxy.applied == {"lost-answer": 1}
    assert snap.number == 1 and [s.run_id for s in lake.snapshots()] == [None, "a"]
    assert lake.read("ingest_runs").column("ingest_run_id").to_pylist() == ["a"]


@pytest.mark.slow
def test_an_ingest_whose_commits_lose_their_answers_is_whole(proxied, archive, truth):
    """Delta commits of the run lose their answers (the first instances commit, and
    later ones): deltalake commits the same files again at the next version; the run
    ends as without the fault."""
    plan = LoseAnswers("/_delta_log/0", {1, 4, 9})
    proxy = proxied(plan)
    url = "s3://lakes/commits"
    lake = Lake.create(url, profile="identified")
    plan.armed = True
    run = ingest(lake, archive[0], fast_config(flush_rows=60))
    plan.armed = False
    assert proxy.applied == {"lost-answer": 3}
    assert run.outcomes == truth.outcomes
    with open_lake(url) as cat:
        assert cat.counts()["instances"] == truth.outcomes["ingested"]
        assert cat.con.execute("SELECT count(DISTINCT SOPInstanceUID) FROM instances"
                               ).fetchone() == (truth.outcomes["ingested"],)
    assert verify(Lake.open(url)).problems == []
    # the next run finds nothing to roll back and nothing to read
    again = ingest(Lake.open(url), archive[0], fast_config())
    assert again.files_unchanged == truth.files_total


@pytest.mark.slow
def test_lake_commands_on_a_faulty_store_are_one_line_and_converge(moto, archive, truth,
                                                                      tmp_path):
    """Any exchange with the store may fail (seeded): 500, 503, a lost answer, a body cut
    short. Each `lake ingest` run meanwhile succeeds or says why in one line (warnings
    aside), without a traceback; once the store mends, the next run converges to the
    archive's lake from whatever the failed runs left."""
    import json
    import os
    import random
    import subprocess
    import sys

    rng = random.Random(2)
    armed = [False]

    def plan(path: str, n: int) -> str | None:
        if not armed[0] or rng.random() > 0.04:
            return None
        if path.startswith(("PUT", "POST", "DELETE", "HEAD")):
            return rng.choice(["500", "503", "lost-answer"] if not path.startswith("HEAD")
                              else ["500", "503"])
        return rng.choice(["500", "503", "close", "short", "lost-answer"])

    lake_cmd = [sys.executable, "-m", "lake_cli"]
    url = "s3://lakes/faulty"
    with FaultProxy(moto.endpoint, plan, seed=3) as proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url, "AWS_ACCESS_KEY_ID": KEY,
               "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": REGION,
               "XDG_STATE_HOME": str(tmp_path / "state")}

        def lake(*argv: str) -> subprocess.CompletedProcess:
            return subprocess.run([*lake_cmd, *argv], env=env, capture_output=True, text=True,
                                  timeout=600)

        ingest_argv = ("ingest", str(archive[0]), "--lake", url, "--scheduler", "threads",
                       "--no-progress", "--json")
        assert lake("init", url, "--profile", "identified").returncode == 0
        armed[0] = True
        for _ in range(5):
            done = lake(*ingest_argv)
            errors = [ln for ln in done.stderr.splitlines() if not ln.startswith("WARNING ")]
            assert "Traceback" not in done.stderr and "\x1b" not in done.stderr, done.stderr
            if done.returncode == 0:
                assert errors == [], errors
            else:
                assert len(errors) == 1 and errors[0].startswith("lake ingest: error: "), errors
        armed[0] = False
        assert sum(proxy.applied.values()) >= 10, proxy.applied
        mended = lake(*ingest_argv)
        assert mended.returncode == 0, mended.stderr
        again = lake(*ingest_argv)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["files_unchanged"] == truth.files_total
        assert lake("verify", "--lake", url).returncode == 0
        counted = lake("sql", "SELECT count(*), count(DISTINCT SOPInstanceUID) FROM instances",
                       "--lake", url, "--format", "csv")
    n = truth.outcomes["ingested"]
    assert counted.stdout.strip().splitlines()[-1] == f"{n},{n}"
