"""What the fork server of a local process pool imports before it forks any worker.

:class:`etl.runners.LocalRunner` forks its worker processes from the lake's own fork
server (``etl.workerserver.SERVER``, not the one ``multiprocessing`` shares with other
code). The server imports this module once: the worker code with its libraries
(pydicom, pyarrow, numba), and :func:`etl.extract.warm_up` loads the batch path's
compiled code; then ``dask.local``, whose functions Dask's local scheduler sends with
every task (a worker imported dask while unpickling its first task: 0.1-0.16 s, while
the first wave waited). Each worker forked from it starts with all of that done, instead
of every worker doing it again.

Optional libraries that the workers never use are kept out: importing them was more
than a third of the server's start, and the workers wait for it.

- scipy, which numba imports to look for a BLAS when its code generator starts
  (0.26 s; the batch path's compiled code does no linear algebra);
- pandas, which pyarrow imports on its first conversion of Python values, to check
  whether they are pandas objects (0.33 s; a worker builds Arrow arrays from Python
  values and numpy arrays only);
- requests and tqdm, which pydicom imports to download its test files (0.09 s), and
  cffi, which numba imports to call C functions through it (0.03 s);
- Pillow (PIL) and pylibjpeg, which pydicom's pixel decoders import to see which of them
  can run (0.02-0.03 s; ingest reads headers only, and never decodes pixels), and
  jinja2, which Dask imports for its notebook displays (0.017 s).

numpy's BLAS starts no threads in the server (:func:`etl.leaveout.one_blas_thread`: they
spun up to 0.1 s of CPU while the server loaded, and the workers do no linear algebra).

They stay importable in the workers afterwards; only what those libraries found missing
at import stays so there (numba's BLAS functions, pydicom's downloads through requests
and its Pillow and pylibjpeg decoders; pyarrow's own pandas conversions still import
pandas when called).
"""

import contextlib
import gc
import signal
import sys

from etl.leaveout import leave_out, one_blas_thread


def _continue_when_orphaned() -> None:
    """Have the kernel send this process ``SIGCONT`` when the thread that started it ends
    (``PR_SET_PDEATHSIG``; Linux): the driver pauses the server with ``SIGSTOP`` during a
    rerun's walk (``etl.workerserver.pause``), and a driver killed meanwhile would leave
    it stopped for ever; continued, it finds its driver gone and exits. The signal comes
    when the thread that started the server ends, which may be before the driver does: a
    ``SIGCONT`` to a running server does nothing, and to a paused one it only ends the
    pause early. Workers forked from the server do not inherit the setting."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGCONT), 0, 0, 0)


_continue_when_orphaned()

#: Packages the server does not import while it loads the worker code (see above).
LEFT_OUT = ("scipy", "pandas", "requests", "tqdm", "cffi", "PIL", "pylibjpeg", "jinja2")

# the server must start whatever happens here: each worker then loads the code at its
# first batch, and a batch path that cannot run reads its batches file by file
one_blas_thread()
restore = leave_out(LEFT_OUT)
try:
    with contextlib.suppress(Exception):
        from etl.extract import warm_up

        warm_up()
    with contextlib.suppress(Exception):
        import dask.local  # noqa: F401  (the tasks' functions)
    with contextlib.suppress(Exception):
        import etl.runners  # noqa: F401  (each task names etl.runners.extract_ipc)
finally:
    restore()

# what the server holds now is shared with every worker forked from it: kept out of the
# collector's generations, so that collections in a worker do not copy those pages
gc.freeze()
