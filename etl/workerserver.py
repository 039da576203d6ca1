"""The lake's own fork server, from which the local process pool forks its workers.

Not ``multiprocessing``'s: that one is shared by every user of the "forkserver" start
method in this process (Python 3.14's default), and the server's imports leave pyarrow
and numba without pandas and scipy (:mod:`etl.preload`), which the ingest workers never
use but other code forked from it might. The classes below are ``multiprocessing``'s
own, pointed at this server instead (``Popen._launch`` is the standard library's,
Python 3.11-3.13).

The server imports the worker code once (about a second of CPU), and every worker forked
from it starts with that done. :func:`start` starts it in the background: ``lake
ingest`` calls it before its own imports, which then run beside the server's.

This module imports the standard library only, so that it can run first.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from multiprocessing import forkserver, popen_forkserver, reduction, spawn, util
from multiprocessing.context import ForkServerContext, ForkServerProcess, set_spawning_popen

#: the module the server imports before it forks any worker
WORKER_PRELOAD = "etl.preload"
#: the scheduler whose workers are forked from the server (``IngestConfig.scheduler``)
SCHEDULER = "processes"

SERVER = forkserver.ForkServer()
SERVER.set_forkserver_preload([WORKER_PRELOAD])


def available() -> bool:
    """Whether this platform can fork from a server (not on Windows)."""
    return "forkserver" in multiprocessing.get_all_start_methods()


def start(scheduler: str) -> None:
    """Start the server now if ``scheduler`` forks its workers from it: it imports the
    worker code in the background while this process goes on. Returns at once; a server
    already running is left as it is."""
    if scheduler == SCHEDULER and available():
        SERVER.ensure_running()


class _WorkerPopen(popen_forkserver.Popen):
    def _launch(self, process_obj):
        prep_data = spawn.get_preparation_data(process_obj._name)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = SERVER.connect_to_new_process(self._fds)
        # a duplicate of the data pipe's write end: the child's sign that its parent lives
        _parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _WorkerProcess(ForkServerProcess):
    @staticmethod
    def _Popen(process_obj):
        return _WorkerPopen(process_obj)


class WorkerContext(ForkServerContext):
    """A ``multiprocessing`` context whose processes are forked from :data:`SERVER`."""

    Process = _WorkerProcess
