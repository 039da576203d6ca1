"""Ingest on a real distributed cluster: a `dask scheduler` and two `dask worker` processes
on loopback, counts against the generator's ground truth, a worker killed mid-run."""

from __future__ import annotations

import time

import pytest

from etl import IngestConfig, ingest
from lake_cli import main
from lakehouse import Lake
from tests.etl.cluster import dask_cluster, free_port, lake_content


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with dask_cluster(tmp_path_factory.mktemp("dask")) as c:
        yield c


def test_ingest_on_a_scheduler_with_two_worker_processes(cluster, archive, truth, built_lake,
                                                         tmp_path):
    lake = Lake.create(tmp_path / "lake", profile="identified")
    s = ingest(lake, archive[0], IngestConfig(scheduler=cluster.address, batch_files=32))
    assert s.scheduler == cluster.address and s.workers == 2
    assert s.files_seen == truth.files_total
    assert s.outcomes == truth.outcomes
    assert s.quarantine_reasons == truth.quarantine_reasons
    assert s.skipped_reasons == truth.skipped_reasons
    # the same tables as the session's lake, built with the local process scheduler
    assert lake_content(tmp_path / "lake") == lake_content(built_lake[0])
    again = ingest(lake, archive[0], IngestConfig(scheduler=cluster.address))
    assert again.files_unchanged == truth.files_total and sum(again.outcomes.values()) == 0


def test_unreachable_scheduler_is_one_line_within_the_timeout(capsys, tmp_path, archive):
    lake = tmp_path / "lake"
    Lake.create(lake, profile="identified")
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    code = main(["ingest", str(archive[0]), "--lake", str(lake), "--scheduler", address,
                 "--scheduler-timeout", "2", "--no-progress"])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot use Dask scheduler {address}" in err and "after 2 s" in err
    assert elapsed < 8
    # the failed run is recorded, nothing else was committed
    from catalog import open_lake

    with open_lake(lake) as cat:
        assert cat.con.execute("SELECT status FROM ingest_runs").fetchall() == [("failed",)]
        assert cat.counts()["instances"] == 0


@pytest.mark.slow
def test_a_worker_killed_mid_run_still_gives_exactly_once_tables(archive, truth, built_lake,
                                                                  tmp_path):
    """SIGKILL one of two workers while it is computing a batch: distributed recomputes its
    tasks on the other worker; the driver classifies each batch result once, so the
    tables equal those of a clean run."""
    import threading

    from distributed import Client

    with dask_cluster(tmp_path) as cluster, Client(cluster.address) as observer:
        lake = Lake.create(tmp_path / "lake", profile="identified")
        w0 = next(a for a, w in observer.scheduler_info()["workers"].items()
                  if w["name"] == "w0")
        in_flight: list[int] = []
        finished = threading.Event()

        def killer() -> None:  # the moment w0 has a task running, kill it
            while not finished.is_set():
                busy = len(observer.processing().get(w0, ()))
                if busy:
                    cluster.kill_worker(0)
                    in_flight.append(busy)
                    return
                time.sleep(0.01)

        config = IngestConfig(scheduler=cluster.address, batch_files=4, batches_per_worker=2)
        watcher = threading.Thread(target=killer)
        watcher.start()
        try:
            s = ingest(lake, archive[0], config)
        finally:
            finished.set()
            watcher.join(30)
        assert in_flight and in_flight[0] >= 1  # it had tasks: they were computed again
        assert cluster.workers[0].returncode == -9
        assert s.files_seen == truth.files_total
        assert s.outcomes == truth.outcomes
        assert s.quarantine_reasons == truth.quarantine_reasons
        assert lake_content(tmp_path / "lake") == lake_content(built_lake[0])
