"""The local runner's process pool when a worker dies while a task is being submitted
(``etl.runners.ProcessPool``)."""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

from etl.runners import ProcessPool


def test_a_task_submitted_while_the_pool_breaks_fails_and_its_worker_is_ended():
    """A worker dies while a second task is being submitted, and that submit starts a
    second worker. The second task fails with BrokenProcessPool, like the first, the new
    worker is terminated and the pool's manager thread ends. CPython 3.11's own pool
    fails this: the submit raises OSError (the task queue closed under the worker being
    started) or, a moment earlier, the task is left pending for ever and the manager
    thread joins the new worker for ever (which then holds up the interpreter's exit)."""
    pool = ProcessPool(2, mp_context=multiprocessing.get_context("forkserver"))
    try:
        first = pool.submit(os._exit, 3)  # starts the first worker and the manager thread
        (dying,) = pool._processes.values()
        spawn = pool._spawn_process

        def slow_spawn():
            # the submit holds the pool's lock: the worker dies and the manager thread
            # sees it meanwhile, before the second worker exists
            dying.join(30)
            time.sleep(0.5)
            spawn()

        pool._spawn_process = slow_spawn  # type: ignore[method-assign]
        second = pool.submit(abs, -1)
        assert len(pool._processes) == 2
        for future in (first, second):
            with pytest.raises(BrokenProcessPool):
                future.result(timeout=30)
        manager = pool._executor_manager_thread
        manager.join(30)
        assert not manager.is_alive()
        assert [p.is_alive() for p in pool._processes.values()] == [False, False]
        with pytest.raises(BrokenProcessPool):
            pool.submit(abs, -1)
    finally:
        for p in list(pool._processes.values()):
            p.terminate()
        pool.shutdown(wait=False)
