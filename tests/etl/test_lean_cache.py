"""The workers' server loads the batch path's compiled code without numba's registries
(:func:`etl.batchwalk.lean_cache_loads`, used by :func:`etl.extract.warm_up`).

Each case runs in a fresh interpreter (what numba has installed is per process), with
numba's cache in a folder of the test's own: the first run compiles (a cache miss inside
the lean window), the later ones load what it saved. All of them read the same files
through the batch path, and their rows must be the same.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from etl.discover import walk

ROOT = Path(__file__).resolve().parents[2]

#: the child: counts numba's installs of its registries (``load_additional_registries``,
#: which every context refresh calls) during the warm-up and during a batch read after
#: it, and how many compiled versions each of the batch path's functions has
CHILD = r"""
import contextlib, hashlib, json, sys
from numba.core import caching, cpu

calls = []
real = cpu.CPUContext.load_additional_registries
def counted(self):
    calls.append(1)
    return real(self)
cpu.CPUContext.load_additional_registries = counted
original = caching.Cache.load_overload

from etl import batchread, batchwalk, extract
from etl.config import IngestConfig
from etl.discover import FoundFile

if sys.argv[1] == "full":  # numba's own loads, for the reference
    batchwalk.lean_cache_loads = contextlib.nullcontext
extract.warm_up()
warm = len(calls)
restored = caching.Cache.load_overload is original

def versions():
    return {name: len(obj.overloads) for mod in (batchwalk, batchread)
            for name, obj in vars(mod).items() if hasattr(obj, "overloads")}
before = versions()
files = [FoundFile(*f) for f in json.loads(sys.stdin.read())]
table = extract.extract_batch(files, IngestConfig(columnar=True), "run-lean", None)
print(json.dumps({
    "warm_up": warm, "after": len(calls) - warm, "restored": restored,
    "new_versions": {k: v - before[k] for k, v in versions().items() if v != before[k]},
    "rows": table.num_rows,
    "digest": hashlib.sha256(repr(table.to_pylist()).encode()).hexdigest(),
}))
"""


def _child(mode: str, cache: Path, files: str) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], input=files, env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def files(archive) -> str:
    """The session's sample archive and pydicom's bundled files, as discovery finds them."""
    import pydicom.data

    found = list(walk(archive[0])) + list(walk(Path(pydicom.data.__file__).parent / "test_files"))
    return json.dumps([[f.path, f.size, f.mtime_ns] for f in found if f.error is None])


def test_lean_loads_give_the_rows_of_numbas_own(files, tmp_path):
    cache = tmp_path / "numba-cache"
    compiled = _child("lean", cache, files)  # an empty cache: compiled inside the window
    assert compiled["warm_up"] > 0 and compiled["restored"]
    assert any(cache.rglob("*.nbi")), "the compiled code was not saved"
    lean = _child("lean", cache, files)
    full = _child("full", cache, files)
    # the lean load installed nothing, and reading a batch after it needed nothing more:
    # no registry, and no function of the batch path compiled or loaded for new types
    assert lean == {**lean, "warm_up": 0, "after": 0, "restored": True, "new_versions": {}}
    # numba's own load refreshes its contexts: what the lean one leaves out
    assert full["warm_up"] > 0 and full["new_versions"] == {}
    assert lean["rows"] > 300
    assert lean["rows"] == full["rows"] == compiled["rows"]
    assert lean["digest"] == full["digest"] == compiled["digest"]


def test_numbas_own_load_is_back_after_the_window():
    from numba.core import caching

    from etl import batchwalk

    original = caching.Cache.load_overload
    with batchwalk.lean_cache_loads():
        assert caching.Cache.load_overload is not original
    assert caching.Cache.load_overload is original
    with pytest.raises(RuntimeError, match="inside"), batchwalk.lean_cache_loads():
        raise RuntimeError("inside")
    assert caching.Cache.load_overload is original


def test_unexpected_numba_internals_change_nothing(monkeypatch):
    from numba.core import caching

    from etl import batchwalk

    original = caching.Cache.load_overload
    monkeypatch.delattr(caching.Cache, "_load_overload")
    with batchwalk.lean_cache_loads():
        assert caching.Cache.load_overload is original
    assert caching.Cache.load_overload is original
