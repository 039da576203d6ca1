"""A file that kills its worker process does not end the run or lose its batch."""

from __future__ import annotations

import os

import pytest

from catalog import open_lake
from etl import IngestConfig, ingest
from lakehouse import Lake
from tests.etl import corpus


@pytest.mark.parametrize(("files", "poisoned", "batch_files", "batches_per_worker"),
                         [(9, [5], 4, 8), (30, [3, 17, 26], 2, 1)])
def test_a_worker_crash_quarantines_only_the_poisoned_file(tmp_path, monkeypatch, files,
                                                           poisoned, batch_files,
                                                           batches_per_worker):
    """One poisoned file; then three, in waves of two batches that compute side by side
    (a crash in one wave also breaks the other's pool: each is read again alone, and only
    the poisoned files become quarantine rows)."""
    src = tmp_path / "src"
    src.mkdir()
    uid = corpus._Uids()
    names = [f"f{i:02d}.dcm" for i in range(files)]
    for i in poisoned:
        names.insert(i, f"f{i - 1:02d}_poison_crash.dcm")
    for name in names:
        (src / name).write_bytes(corpus.part10(corpus.base(uid)))
    # spawned workers inherit the environment: reading this file calls os._exit in the worker
    monkeypatch.setenv("LAKE_TEST_CRASH_MARKER", "poison_crash")
    lake = Lake.create(tmp_path / "lake")
    s = ingest(lake, src, IngestConfig(scheduler="processes", workers=2, batch_files=batch_files,
                                       batches_per_worker=batches_per_worker))
    assert s.outcomes["ingested"] == files and s.outcomes["quarantined"] == len(poisoned)
    assert s.quarantine_reasons == {"worker_crash": len(poisoned)}
    with open_lake(tmp_path / "lake", vault=True) as c:
        rows = dict(c.con.execute("SELECT path, reason FROM files").fetchall())
        assert c.counts()["instances"] == files
    assert rows == {str(src / n): ("worker_crash" if "poison" in n else None) for n in names}


def test_recursion_error_in_one_file_keeps_the_rest_of_the_batch(tmp_path):
    """With the depth limit lifted, 100,000 nested sequences overflow the Python stack."""
    from etl.discover import walk
    from etl.extract import extract_batch

    src = tmp_path / "src"
    src.mkdir()
    uid = corpus._Uids()
    data = corpus.part10(corpus.base(uid))
    i = data.index(corpus.PIXEL_TAG)
    (src / "a_nested.dcm").write_bytes(data[:i] + corpus._nested(100_000) + data[i:])
    (src / "b_good.dcm").write_bytes(corpus.part10(corpus.base(uid)))
    (src / "c_good.dcm").write_bytes(corpus.part10(corpus.base(uid)))
    names = ["a_nested.dcm", "b_good.dcm", "c_good.dcm"]
    found = {os.path.basename(f.path): f for f in walk(src)}
    t = extract_batch([found[n] for n in names], IngestConfig(max_depth=10**6), "run")
    assert t.column("status").to_pylist() == ["quarantined", "ok", "ok"]
    assert t.column("reason").to_pylist() == ["too_deep", None, None]
    assert "RecursionError" in t.column("message")[0].as_py()


MEMORY_CHILD = r"""
import os, resource, sys, zlib
from etl.config import IngestConfig
from etl.discover import walk
from etl.extract import extract_batch
src = sys.argv[1]
found = sorted(walk(src), key=lambda f: f.path)
# a worker's first batch loads its code (the batch path's compiled code: numba's code
# generator reserves address space; pyarrow's pandas shim): the limit is what a file may
# take beyond that
extract_batch(found[1:], IngestConfig(), "warm-up")
with open("/proc/self/statm") as fh:
    vm = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
resource.setrlimit(resource.RLIMIT_AS, (vm + (160 << 20), resource.RLIM_INFINITY))
t = extract_batch(found, IngestConfig(), "run")
print(t.column("reason").to_pylist())
"""


def test_memory_error_in_one_file_keeps_the_rest_of_the_batch(tmp_path):
    """A deflated data set that inflates to 384 MiB, read under a 160 MiB memory limit."""
    import subprocess
    import sys
    import zlib
    from pathlib import Path

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    src = tmp_path / "src"
    src.mkdir()
    uid = corpus._Uids()
    good = corpus.part10(corpus.base(uid), DeflatedExplicitVRLittleEndian)
    head = good[:corpus._meta_end(good)]
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(16 << 20)
    bomb = b"".join(z.compress(zeros) for _ in range(24)) + z.flush()
    (src / "a_bomb.dcm").write_bytes(head + bomb)
    (src / "b_good.dcm").write_bytes(good)
    r = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(src)], capture_output=True,
                       text=True, cwd=Path(__file__).parents[2], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "['out_of_memory', None]"


@pytest.mark.slow
def test_a_worker_crash_on_a_distributed_cluster(tmp_path, monkeypatch):
    """distributed restarts the dead worker, gives up on the task (KilledWorker) after a few
    deaths; the batch is then bisected like on the local pool."""
    src = tmp_path / "src"
    src.mkdir()
    uid = corpus._Uids()
    names = [f"f{i}.dcm" for i in range(5)] + ["f5_poison_crash.dcm"]
    for name in names:
        (src / name).write_bytes(corpus.part10(corpus.base(uid)))
    monkeypatch.setenv("LAKE_TEST_CRASH_MARKER", "poison_crash")
    lake = Lake.create(tmp_path / "lake")
    s = ingest(lake, src, IngestConfig(scheduler="local-cluster", workers=2, batch_files=3))
    assert s.outcomes["ingested"] == 5 and s.quarantine_reasons == {"worker_crash": 1}
