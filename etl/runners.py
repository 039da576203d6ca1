"""Where batches run: Dask's local schedulers or a distributed cluster.

Every runner takes a list of batches and returns, in the same order, one
Arrow table per batch. ``submit`` does not block, so the job can prepare the
next wave while a wave is computing.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Protocol

import dask

from etl.config import IngestConfig
from etl.discover import FoundFile
from etl.errors import SchedulerError
from etl.extract import extract_batch
from lakehouse.deid import Policy

log = logging.getLogger(__name__)

LOCAL_SCHEDULERS = ("processes", "threads", "synchronous")


class Runner(Protocol):
    workers: int
    description: str

    def submit(self, batches: Sequence[Sequence[FoundFile]]) -> Future: ...

    def close(self) -> None: ...


class LocalRunner:
    """Dask's local scheduler (``processes`` by default: pydicom holds the GIL)."""

    def __init__(self, config: IngestConfig, run_id: str, policy: Policy | None = None):
        self.config = config
        self.run_id = run_id
        self.policy = policy
        self.scheduler = config.scheduler
        self.workers = 1 if self.scheduler == "synchronous" else config.resolved_workers()
        self.description = self.scheduler
        self._pool = None
        if self.scheduler == "processes":
            # spawn: the driver holds DuckDB and Delta (Rust) threads; forking them is unsafe
            self._pool = ProcessPoolExecutor(self.workers,
                                             mp_context=multiprocessing.get_context("spawn"))
        self._driver = ThreadPoolExecutor(1, thread_name_prefix="lake-wave")

    def submit(self, batches):
        tasks = [dask.delayed(extract_batch, pure=False)(list(b), self.config, self.run_id,
                                                          self.policy)
                 for b in batches]
        kwargs: dict = {"scheduler": self.scheduler}
        if self._pool is not None:
            kwargs["pool"] = self._pool
        elif self.scheduler == "threads":
            kwargs["num_workers"] = self.workers
        return self._driver.submit(lambda: list(dask.compute(*tasks, **kwargs)))

    def close(self) -> None:
        self._driver.shutdown(wait=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class DistributedRunner:
    """A ``distributed`` cluster: a running scheduler, or a LocalCluster we start."""

    def __init__(self, config: IngestConfig, run_id: str, policy: Policy | None = None):
        from distributed import Client, LocalCluster

        self.config = config
        self.run_id = run_id
        self.policy = policy
        self._cluster = None
        if config.scheduler == "local-cluster":
            n = config.resolved_workers()
            self._cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                         host="127.0.0.1", dashboard_address=None)
            self.client = Client(self._cluster)
            self.description = f"local-cluster({n})"
        else:
            try:
                self.client = Client(config.scheduler, timeout=f"{config.scheduler_timeout}s")
            except (OSError, TimeoutError, ValueError) as exc:
                raise SchedulerError(config.scheduler, str(exc) or type(exc).__name__) from None
            self.description = config.scheduler
            try:  # a scheduler without workers would leave the run waiting forever
                self.client.wait_for_workers(1, timeout=config.scheduler_timeout)
            except (OSError, TimeoutError) as exc:
                self.client.close()
                raise SchedulerError(config.scheduler, "no worker joined within "
                                     f"{config.scheduler_timeout:g} s ({exc})") from None
        self.workers = max(1, len(self.client.scheduler_info().get("workers", {})))
        self._driver = ThreadPoolExecutor(1, thread_name_prefix="lake-wave")

    def submit(self, batches):
        futures = self.client.map(extract_batch, [list(b) for b in batches],
                                  config=self.config, run_id=self.run_id, policy=self.policy,
                                  pure=False)
        return self._driver.submit(lambda: list(self.client.gather(futures)))

    def close(self) -> None:
        self._driver.shutdown(wait=True)
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


def make_runner(config: IngestConfig, run_id: str, policy: Policy | None = None) -> Runner:
    """The runner for ``config.scheduler``. The policy (with the lake key) travels to the
    workers with each task: use TLS between distributed scheduler and workers."""
    if config.scheduler in LOCAL_SCHEDULERS:
        return LocalRunner(config, run_id, policy)
    return DistributedRunner(config, run_id, policy)
