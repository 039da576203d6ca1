"""The lake's own fork server, from which the local process pool forks its workers.

Not ``multiprocessing``'s: that one is shared by every user of the "forkserver" start
method in this process (Python 3.14's default), and the server's imports leave pyarrow
and numba without pandas and scipy (:mod:`etl.preload`), which the ingest workers never
use but other code forked from it might. The classes below are ``multiprocessing``'s
own, pointed at this server instead (``Popen._launch`` is the standard library's,
Python 3.11-3.13, except that a worker does not run the driver's main module).

The server imports the worker code once (about a second of CPU), and every worker forked
from it starts with that done. :func:`start` starts it in the background: ``lake
ingest`` calls it before its own imports, which then run beside the server's.
:func:`pause` stops it meanwhile, when the driver has a better use for the second core
(a rerun's walk, which a second process ``stat``s ahead of: see :func:`pause`).

This module imports the standard library only, so that it can run first.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import multiprocessing
import os
import signal
import threading
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
    already running is left as it is, and resumed if paused."""
    if scheduler == SCHEDULER and available():
        resume()
        SERVER.ensure_running()


_pause_lock = threading.Lock()
#: the server's process id while it is stopped by :func:`pause`
_paused: int | None = None
_resume_at_exit = False


def pause() -> None:
    """Stop the server's process (``SIGSTOP``), if it runs, until :func:`resume` or
    :func:`start`.

    For a rerun's walk of a large archive: ``lake ingest`` starts the server at once, and
    its load (0.7-0.8 s of CPU) then shares the two cores with the walk and the second
    process that ``stat``s ahead of it (:mod:`etl.statahead`). A no-op rerun never needs
    the server: stopped meanwhile, a rerun of 100,009 unchanged files took 0.50-0.61 s
    against 0.69-0.79 (a rerun whose one new file is the walk's last: 1.42-1.63 s against
    1.28-1.42, the server loading after the walk). A file to read found by the walk
    resumes it (``etl.jobs.prestart`` calls :func:`start`), and so does the walk's end,
    and this process's exit; when this process is killed, the kernel continues it
    (:mod:`etl.preload` asks for ``SIGCONT`` at its parent's death), and it exits as it
    does whenever its driver is gone."""
    global _paused, _resume_at_exit
    if not hasattr(signal, "SIGSTOP"):
        return
    with _pause_lock:
        pid = getattr(SERVER, "_forkserver_pid", None)
        if pid is None or _paused is not None:
            return
        try:
            os.kill(pid, signal.SIGSTOP)
        except OSError:  # it has ended
            return
        _paused = pid
        if not _resume_at_exit:
            atexit.register(resume)
            _resume_at_exit = True


def resume() -> None:
    """Continue the server's process if :func:`pause` stopped it."""
    global _paused
    with _pause_lock:
        if _paused is not None:
            with contextlib.suppress(OSError):  # it has ended
                os.kill(_paused, signal.SIGCONT)
            _paused = None


#: what the preparation data of a child says about its parent's main module
_MAIN_KEYS = ("init_main_from_path", "init_main_from_name")


class _WorkerPopen(popen_forkserver.Popen):
    def _launch(self, process_obj):
        prep_data = spawn.get_preparation_data(process_obj._name)
        # without the driver's main module: multiprocessing runs it in every child (as
        # ``__mp_main__``) so that functions defined there can be unpickled. The workers
        # only run the lake's functions, by module name; ``lake``'s main module imported
        # the CLI (20 ms per worker, while the first batches waited)
        for key in _MAIN_KEYS:
            prep_data.pop(key, None)
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
