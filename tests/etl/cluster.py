"""Test helpers: a real Dask cluster (a `dask scheduler` and `dask worker` processes) on
loopback, and a comparison of two lakes' tables that ignores run ids and times."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from catalog import open_lake

DASK = str(Path(sys.executable).parent / "dask")

#: Columns that differ between two runs of the same input (run ids, clock times).
RUN_COLUMNS = {
    "instances": ["ingest_run_id"],
    "series": ["first_ingest_run_id", "last_ingest_run_id"],
    "studies": [],
    "patients": [],
    "quarantine": ["ingest_run_id", "quarantined_at"],
    "conflicts": ["kept_ingest_run_id", "ingest_run_id", "detected_at"],
    "files": ["ingest_run_id"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    address: str
    scheduler: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)
    log_dir: Path | None = None

    def kill_worker(self, i: int = 0) -> None:
        os.kill(self.workers[i].pid, signal.SIGKILL)
        self.workers[i].wait(10)


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)


@contextlib.contextmanager
def dask_cluster(log_dir: Path, n_workers: int = 2) -> Iterator[Cluster]:
    """A scheduler and ``n_workers`` workers, each a separate OS process on 127.0.0.1
    (workers without a nanny, so that SIGKILL really kills the process computing)."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    try:
        sched = _spawn([DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                        "--no-dashboard"], log_dir / "scheduler.log")
        procs.append(sched)
        cluster = Cluster(address, sched, log_dir=log_dir)
        for i in range(n_workers):
            w = _spawn([DASK, "worker", address, "--nworkers", "1", "--nthreads", "1",
                        "--no-nanny", "--host", "127.0.0.1", "--no-dashboard",
                        "--name", f"w{i}"], log_dir / f"worker{i}.log")
            procs.append(w)
            cluster.workers.append(w)
        with Client(address, timeout="30s") as c:
            c.wait_for_workers(n_workers, timeout=60)
        yield cluster
    finally:
        for p in reversed(procs):  # workers hold nothing worth a graceful exit
            if p.poll() is None:
                (p.terminate if p is procs[0] else p.kill)()
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def lake_content(path: Path) -> dict[str, list[tuple]]:
    """Every row of the data tables (vault file index included), run ids and times left out,
    sorted: equal for two lakes built from the same input, however the work was split."""
    out: dict[str, list[tuple]] = {}
    with open_lake(path, vault=True) as cat:
        for name, drop in RUN_COLUMNS.items():
            rel = cat.table(name)
            cols = [c for c in rel.columns if c not in drop]
            rows = rel.select(*[f'"{c}"' for c in cols]).fetchall()
            out[name] = sorted(rows, key=repr)
    return out
