"""Optional packages kept out of a process that never uses them.

Libraries that work without pandas still import it where it is installed, to check
whether a value is a pandas object: pyarrow when its dataset module loads and on its
first conversion of Python values, DuckDB when Arrow data is registered. That costs a
process 0.3-0.4 s of CPU, which ``lake ingest`` paid on every run, a run that reads
nothing included. The ingest workers' fork server (:mod:`etl.preload`) and ``lake
ingest``'s own process (``lake_cli``) never use pandas: they import with it left out,
and each library takes the branch it takes where pandas is not installed.

Likewise the threads of numpy's BLAS (:func:`one_blas_thread`), which neither process uses.

Not for a process that goes on to other work (a notebook, a test session): a library
that found pandas missing may remember it (pyarrow then no longer recognizes a pandas
object as array-like). Nothing is left out of a process that already imported one of
the packages: there is nothing to save then.

This module imports the standard library only, so that it can run first.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable

#: what ``lake ingest`` of a folder leaves out of its own process: pandas, which pyarrow and
#: DuckDB import only to check whether a value is one of its objects, and jinja2, which
#: Dask imports for its notebook displays (``dask.widgets``: 17 ms while the workers wait
#: for their first tasks; Dask takes the branch it has for jinja2 not installed)
INGEST_LEFT_OUT = ("pandas", "jinja2")


class _LeaveOut:
    """A finder that makes ``import`` of its packages fail, as if they were not installed."""

    def __init__(self, packages: Iterable[str]) -> None:
        self.packages = frozenset(packages)

    def find_spec(self, name: str, path=None, target=None):
        if name.partition(".")[0] in self.packages:
            raise ModuleNotFoundError(f"{name} is left out of this process", name=name)
        return None


def leave_out(packages: Iterable[str]) -> Callable[[], None]:
    """Make ``import`` of ``packages`` (and their modules) fail in this process until the
    function returned is called; nothing when one of them is imported already."""
    packages = tuple(packages)
    if any(p in sys.modules for p in packages):
        return lambda: None
    finder = _LeaveOut(packages)
    sys.meta_path.insert(0, finder)

    def restore() -> None:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(finder)

    return restore


#: numpy's BLAS in its wheels (OpenBLAS) reads this when numpy loads
BLAS_THREADS_VARIABLE = "OPENBLAS_NUM_THREADS"


def one_blas_thread() -> None:
    """Have numpy's BLAS, when this process loads it, run on the calling thread only.

    OpenBLAS starts a thread for each further core as numpy loads, and each thread spins
    before it sleeps: ``import numpy`` cost 0.21-0.23 s of CPU against 0.12-0.14 s with one
    thread (2 cores), the server's load of the worker code 0.66-0.95 s against 0.54-0.72.
    ``lake ingest``'s own process and the workers' fork server load numpy while the other
    one loads too, and neither does any linear algebra; the workers forked from the
    server, one per core, would only oversubscribe the cores with threads of their own.
    Nothing when numpy is loaded already, or when the variable is set (the user's choice
    stands); processes started from this one inherit it."""
    if "numpy" not in sys.modules:
        os.environ.setdefault(BLAS_THREADS_VARIABLE, "1")
