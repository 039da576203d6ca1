"""etl.leaveout: packages made to look uninstalled, and put back."""

import importlib
import inspect
import os
import subprocess
import sys

import pytest

from etl.leaveout import leave_out
from tests.conftest import unnamed_threads


def test_a_left_out_package_cannot_be_imported_until_restored():
    name = "tabnanny"  # a standard module nothing here imports
    sys.modules.pop(name, None)
    restore = leave_out([name])
    try:
        with pytest.raises(ModuleNotFoundError, match="left out of this process") as exc:
            importlib.import_module(name)
        assert exc.value.name == name
        importlib.import_module("colorsys")  # others import as before
    finally:
        restore()
    assert importlib.import_module(name).__name__ == name
    restore()  # twice: nothing happens


def test_nothing_is_left_out_when_the_package_is_imported_already():
    finders = list(sys.meta_path)
    restore = leave_out(["json", "tabnanny"])
    assert sys.meta_path == finders
    restore()
    assert sys.meta_path == finders


def _blas_in_a_fresh_process(env_value: str | None, numpy_first: bool) -> list[str]:
    """In a new interpreter: the variable after ``one_blas_thread()`` and the threads of
    the process once numpy is loaded."""
    code = ("import os, sys\n"
            + ("import numpy\n" if numpy_first else "")
            + "from etl.leaveout import one_blas_thread\n"
            "one_blas_thread()\n"
            "import numpy\n"
            + inspect.getsource(unnamed_threads) +
            "print(os.environ.get('OPENBLAS_NUM_THREADS'), unnamed_threads(os.getpid()))\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if env_value is not None:
        env["OPENBLAS_NUM_THREADS"] = env_value
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=60, check=True)
    return out.stdout.split()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2,
                    reason="counts threads in /proc on a machine of two cores or more")
def test_numpy_loads_without_blas_threads_unless_the_user_asked_for_them():
    """numpy's OpenBLAS starts a thread per further core as numpy loads (why that costs:
    :func:`etl.leaveout.one_blas_thread`): after ``one_blas_thread()`` the process has its
    main thread only. A value the user set stands, and a process that loaded numpy already
    is left as it is."""
    assert _blas_in_a_fresh_process(None, numpy_first=False) == ["1", "1"]
    assert _blas_in_a_fresh_process("2", numpy_first=False) == ["2", "2"]
    assert _blas_in_a_fresh_process(None, numpy_first=True)[0] == "None"
