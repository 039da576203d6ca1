"""Where batches run: Dask's local schedulers or a distributed cluster.

Every runner takes a list of batches and returns, in the same order, one
Arrow table per batch. ``submit`` does not block, so the job can prepare the
next wave while a wave is computing.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import process as futures_process
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import util as mp_util
from typing import TYPE_CHECKING, Protocol, TypeVar

import dask
import pyarrow as pa

from etl import workerserver
from etl.config import LOCAL_SCHEDULERS, IngestConfig
from etl.discover import FileBatch, FoundFile
from etl.errors import SchedulerError, WorkerStartError

if TYPE_CHECKING:
    from lakehouse.deid import Policy

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


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
        self._pool: ProcessPoolExecutor | None = None
        #: a file each worker appends its pid to once started (``start_worker``)
        self._started: str | None = None
        if self.scheduler == workerserver.SCHEDULER:  # the pool forked from the server
            self._pool = self._new_pool()
        # two waves computing at a time: a wave starts as soon as the one before it has
        # handed its last task to the pool (its tasks queue behind those), so the
        # workers go on to the next wave's batches instead of waiting at each wave's end
        # for its last batch and for the next wave's start (a tenth of their time).
        # Waves that do not run in the pool (threads, synchronous) go one after another.
        self._driver = ThreadPoolExecutor(2, thread_name_prefix="lake-wave")
        self._gate = _Gate()
        #: set when the last wave submitted has handed every task to the pool
        self._handed = threading.Event()
        self._handed.set()

    def _new_pool(self) -> ProcessPoolExecutor:
        # never forked from the driver: it holds DuckDB and Delta (Rust) threads. Workers
        # are forked from a server process (one per driver process, started on first use,
        # single-threaded) that imported the worker code and loaded its compiled code
        # once (``etl.workerserver``): each worker then starts in milliseconds instead of
        # importing and loading for 1.5 CPU-s. Where there is no fork server: spawn.
        marker = os.environ.get("LAKE_TEST_CRASH_MARKER", "")
        if self._started is None:
            # in multiprocessing's temporary folder of this process, beside the fork
            # server's socket: removed with it at exit, and a killed driver leaves that
            # one folder behind, not a file more in the system's temporary folder
            fd, self._started = tempfile.mkstemp(prefix="lake-workers-", suffix=".pids",
                                                 dir=mp_util.get_temp_dir())
            os.close(fd)
        return ProcessPool(self.workers, mp_context=_worker_context(),
                           initializer=_start_worker, initargs=(marker, self._started))

    def _compute(self, batches: list[list[FoundFile]],
                 handed: threading.Event | None = None) -> list[pa.Table]:
        """The tables of ``batches``; ``handed`` is set once their last task is in the
        pool (only for the process pool: other schedulers never set it)."""
        # worker processes send their tables back as Arrow IPC streams (see extract_ipc)
        if self._pool is not None:
            fn = extract_ipc
        else:
            from etl.extract import extract_batch as fn
        # each batch goes in as one opaque literal: Dask would otherwise walk the list
        # of files looking for Dask objects inside (66 ms of the driver per wave)
        tasks = [dask.delayed(fn, pure=False)(
                     dask.delayed(b, name=f"files-{uuid.uuid4().hex}", traverse=False),
                     self.config, self.run_id, self.policy)
                 for b in batches]
        # the scheduler's own function: by name, dask.compute imports ``distributed`` to
        # look for a client (half a second of the driver's CPU, for nothing)
        kwargs: dict = {"scheduler": _LOCAL_GET[self.scheduler]()}
        if self._pool is not None:
            # one task at a time per worker (Dask's default chunks of 6 leave a worker
            # idle), and a second one queued behind it: Dask hands out a new task only
            # when its scheduler thread in this process gets to a finished one, which
            # can wait while the driver classifies and commits
            kwargs.update(pool=_Queued(self._pool, depth=2, tasks=len(tasks), handed=handed),
                          chunksize=1)
        elif self.scheduler == "threads":
            kwargs["num_workers"] = self.workers
        results = dask.compute(*tasks, **kwargs)
        if self._pool is not None:
            return [from_ipc(r) for r in results]
        return list(results)

    def _reset(self) -> None:
        """A worker died: the pool is broken; start a new one. When no worker ever got as
        far as its initializer, they die while starting (a new pool would too, for ever):
        :class:`WorkerStartError`."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            if self._started is not None and not os.path.getsize(self._started):
                main = getattr(sys.modules.get("__main__"), "__file__", None)
                raise WorkerStartError(main)
            self._pool = self._new_pool()

    def submit(self, batches):
        batches = [FileBatch(b) for b in batches]
        before, self._handed = self._handed, threading.Event()
        return self._driver.submit(self._wave, batches, before, self._handed)

    def _wave(self, batches: list[list[FoundFile]], before: threading.Event,
              handed: threading.Event) -> list[pa.Table]:
        try:
            before.wait()  # the wave before has handed its last task to the pool
            with self._gate.shared():
                try:
                    return self._compute(batches, handed)
                except BaseException as exc:
                    if not _is_crash(exc):
                        raise
        finally:
            handed.set()
        # a worker died, in this wave or in the other one computing: this wave is read
        # again alone (batch by batch once the pool is broken, see survive_crashes), no
        # other wave computing meanwhile, whose crash would be blamed on its files
        with self._gate.exclusive():
            return survive_crashes(self._compute, self._reset, batches, self.run_id)

    def close(self) -> None:
        self._driver.shutdown(wait=True)
        if self._started is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._started)
        if self._pool is not None:
            # every wave has been collected: the workers exit (interpreter shutdown takes
            # them a while) while the driver goes on to commit and summarize
            self._pool.shutdown(wait=False, cancel_futures=True)


class _ManagerThread(futures_process._ExecutorManagerThread):  # type: ignore[name-defined]
    """The pool's manager thread, which marks the pool broken under the pool's lock
    before failing its tasks and terminating its workers (as CPython does from 3.12)."""

    def terminate_broken(self, cause):
        executor = self.executor_reference()
        if executor is not None:
            # a submit in progress (it holds this lock) has put its task in the pending
            # ones and started its worker; every submit after it fails
            with self.shutdown_lock:
                executor._broken = ("A child process terminated abruptly, the process "
                                    "pool is not usable anymore")
            executor = None
        super().terminate_broken(cause)


class ProcessPool(ProcessPoolExecutor):
    """A process pool whose breaking does not race its submits.

    In CPython 3.11 the manager thread marks a pool broken (a worker died) without
    the pool's lock. A task submitted meanwhile, one that starts a worker, either failed
    with OSError (the task queue closed under the worker being started; the run stopped
    with it) or was never failed nor run (its future pending for ever, the wave waiting
    on it) and its worker never terminated, so that the manager thread, then the
    interpreter's exit, waited for that worker for ever. From 3.12 CPython takes the
    lock itself; there this is ProcessPoolExecutor as it is."""

    if sys.version_info < (3, 12):
        def _start_executor_manager_thread(self) -> None:
            if self._executor_manager_thread is None:  # type: ignore[has-type]
                if not self._safe_to_dynamically_spawn_children:  # ie, forked
                    self._launch_processes()  # type: ignore[attr-defined]
                thread = _ManagerThread(self)
                self._executor_manager_thread = thread
                thread.start()
                futures_process._threads_wakeups[thread] = (  # type: ignore[attr-defined]
                    self._executor_manager_thread_wakeup)  # type: ignore[attr-defined]


def _worker_context() -> multiprocessing.context.BaseContext:
    """How the local pool starts its workers: forked from the lake's fork server
    (:mod:`etl.workerserver`, which imports the worker code first), or spawned where
    there is none."""
    if workerserver.available():
        return workerserver.WorkerContext()
    return multiprocessing.get_context("spawn")


def _start_worker(marker: str, started: str) -> None:
    """:func:`etl.extract.start_worker`, imported in the worker: the driver of a process
    pool never imports the worker code (the batch path's numba code, the header readers:
    about 0.3 s of the driver's CPU, and numba's memory, for nothing)."""
    from etl.extract import start_worker

    start_worker(marker, started)


def extract_ipc(files: Sequence[FoundFile], config: IngestConfig, run_id: str,
                policy: Policy | None = None) -> pa.Buffer:
    """:func:`etl.extract.extract_batch` in a worker process, its table returned as an
    Arrow IPC stream. A pickled table is rebuilt column by column, its types too (about
    0.5 ms per batch of the driver's CPU, 1.6 ms of the worker's to pickle it); a stream
    is read in a twentieth of that, its buffers used in place."""
    from etl.extract import after_batch, extract_batch

    table = extract_batch(files, config, run_id, policy)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as out:
        out.write_table(table)
    del table
    after_batch()
    return sink.getvalue()


def from_ipc(stream: pa.Buffer | bytes) -> pa.Table:
    """The table of an Arrow IPC stream written by :func:`extract_ipc`."""
    return pa.ipc.open_stream(stream).read_all()


def _multiprocessing_get() -> Callable:
    import dask.multiprocessing

    return dask.multiprocessing.get


def _threaded_get() -> Callable:
    import dask.threaded

    return dask.threaded.get


def _sync_get() -> Callable:
    import dask.local

    return dask.local.get_sync


#: The get function of each local scheduler (imported when first used).
_LOCAL_GET: dict[str, Callable[[], Callable]] = {
    "processes": _multiprocessing_get, "threads": _threaded_get, "synchronous": _sync_get}


class _Queued:
    """A process pool as Dask's local scheduler sees it: ``depth`` task slots per worker
    process (Dask keeps ``pool._max_workers`` tasks in flight), so that each worker
    has its next task waiting in the pool's queue when it finishes one. ``handed`` is set
    when the last of the compute's ``tasks`` is submitted."""

    def __init__(self, pool: ProcessPoolExecutor, depth: int, tasks: int = 0,
                 handed: threading.Event | None = None):
        self._pool = pool
        self._max_workers = pool._max_workers * depth  # type: ignore[attr-defined]
        self._left = tasks
        self._handed = handed

    def submit(self, fn, /, *args, **kwargs):
        future = self._pool.submit(fn, *args, **kwargs)
        self._left -= 1
        if self._left <= 0 and self._handed is not None:
            self._handed.set()
        return future


class _Gate:
    """Waves compute side by side (``shared``); a wave read again after a worker died
    computes alone (``exclusive``: it waits for the waves computing to end, and waves
    that come after it wait for it)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0  # exclusive turns asked for

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def _is_crash(exc: BaseException) -> bool:
    """A worker process died (not an exception raised by our code in a worker)."""
    return isinstance(exc, BrokenProcessPool) or type(exc).__name__ == "KilledWorker"


def bisect_crashes(compute: Callable[[list[list[T]]], list[R]], reset: Callable[[], None],
                   batches: list[list[T]], crashed: Callable[[list[T]], R],
                   join: Callable[[R, R], R],
                   batch_of: Callable[[list[T]], list[T]] = list) -> list[R]:
    """``compute(batches)``; when a worker process dies, find the item that killed it.

    The batches are computed again one by one (``reset`` first replaces the broken
    pool); a batch that crashes again is split in halves until the item is alone,
    and ``crashed([item])`` stands for its result. Halves' results are ``join``-ed,
    so results keep their order.
    """
    try:
        return compute(batches)
    except BaseException as exc:
        if not _is_crash(exc):
            raise
        log.warning("a worker process died (%s); retrying batch by batch", type(exc).__name__)
        reset()

    def one(batch: list[T]) -> R:
        try:
            return compute([batch])[0]
        except BaseException as exc:
            if not _is_crash(exc):
                raise
            reset()
        if len(batch) == 1:
            return crashed(batch)
        mid = len(batch) // 2
        return join(one(batch_of(batch[:mid])), one(batch_of(batch[mid:])))

    return [one(b) for b in batches]


def survive_crashes(compute: Callable[[list[list[FoundFile]]], list[pa.Table]],
                    reset: Callable[[], None], batches: list[list[FoundFile]],
                    run_id: str) -> list[pa.Table]:
    """``compute(batches)``; a file that kills its worker process becomes a
    ``worker_crash`` quarantine row, and every other file of its batch is read
    normally (:func:`bisect_crashes`)."""

    def crashed(batch: list[FoundFile]) -> pa.Table:
        # no path in the log: it may identify a patient (the vault has it)
        log.warning("reading a file crashed its worker: quarantined as worker_crash")
        from etl.extract import crashed_batch

        return crashed_batch(batch, run_id)

    return bisect_crashes(compute, reset, batches, crashed,
                          lambda a, b: pa.concat_tables([a, b]), FileBatch)


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
            # a task whose worker dies fails at once (KilledWorker) and its batch is
            # bisected: the default retries only kill more workers, and repeated deaths
            # made distributed close the nannies (the run then hung with no workers)
            with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
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

    def _compute(self, batches: list[list[FoundFile]]) -> list[pa.Table]:
        from etl.extract import extract_batch

        futures = self.client.map(extract_batch, batches, config=self.config,
                                  run_id=self.run_id, policy=self.policy, pure=False)
        try:
            return list(self.client.gather(futures))
        except BaseException:
            # forget the wave's tasks: a poisoned one left running would kill the
            # workers the retries run on
            self.client.cancel(futures, force=True)
            raise

    def submit(self, batches):
        # a worker that dies is restarted by its nanny; the scheduler gives up on a
        # task after a few deaths (KilledWorker), and the batch is then bisected
        return self._driver.submit(survive_crashes, self._compute, lambda: None,
                                   [FileBatch(b) for b in batches], self.run_id)

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
