"""How batches travel between the driver and worker processes: files in as pickled
``FoundFile`` tuples, tables back as Arrow IPC streams (``etl.runners.extract_ipc``)."""

from __future__ import annotations

import gc
import inspect
import os
import pickle
import shutil
import subprocess
import sys

import cloudpickle
import pytest
from pydicom.data import get_testdata_file

from etl.config import IngestConfig
from etl.discover import FileBatch, FoundFile, walk
from etl.extract import BATCH_SCHEMA, WORKER_GC_THRESHOLD, extract_batch
from etl.runners import LocalRunner, extract_ipc, from_ipc
from lakehouse.deid import Policy
from lakehouse.privacy import Pseudonymizer
from tests.conftest import unnamed_threads
from tests.etl import corpus as bad_inputs

POLICY = Policy(Pseudonymizer(bytes(range(32))))


@pytest.fixture(scope="module")
def files(archive, tmp_path_factory) -> list[FoundFile]:
    """Synthetic instances, the bad-input corpus (quarantined and skipped files) and a
    broken link (an io_error row)."""
    extra = tmp_path_factory.mktemp("transport")
    bad_inputs.build(extra)
    os.symlink(extra / "nowhere", extra / "zz-broken-link")
    found = list(walk(archive[0]))[:40] + list(walk(extra))
    assert any(f.error for f in found)
    return found


def test_a_batch_pickles_as_columns(monkeypatch):
    """A batch goes to a worker as four columns, never file by file (each file's own
    reduction is not called), and comes back as the same files, errors included."""
    files = [FoundFile(f"/a/{i}.dcm", i * 10, 1_700_000_000_000_000_000 + i)
             for i in range(300)]
    files[7] = FoundFile("/a/gone", 0, 0, error="FileNotFoundError")
    batch = FileBatch(files)

    def no(self):
        raise AssertionError("pickled file by file")

    monkeypatch.setattr(FoundFile, "__reduce__", no)
    for dumps in (pickle.dumps, cloudpickle.dumps):
        back = pickle.loads(dumps(batch))
        assert type(back) is FileBatch and back == files
        assert back[7].error == "FileNotFoundError" and back[8].error is None
    assert pickle.loads(pickle.dumps(FileBatch())) == []


def test_found_file_pickles_as_itself():
    for f in (FoundFile("/a/b.dcm", 12, 34), FoundFile("/a/c", 0, 0, error="denied")):
        assert pickle.loads(pickle.dumps(f)) == f
        assert cloudpickle.loads(cloudpickle.dumps(f)) == f
        assert type(pickle.loads(pickle.dumps(f))) is FoundFile


@pytest.mark.parametrize("policy", [None, POLICY], ids=["identified", "research"])
def test_ipc_stream_gives_the_batch_table(files, policy):
    config = IngestConfig(checksum="header")
    want = extract_batch(files, config, "run-1", policy)
    assert set(want.column("status").to_pylist()) == {"ok", "quarantined", "skipped"}
    stream = extract_ipc(files, config, "run-1", policy)
    got = from_ipc(pickle.loads(pickle.dumps(stream)))  # as it crosses the process pool
    assert got.schema == BATCH_SCHEMA
    assert got.num_rows == len(files)
    assert got.equals(want)


def test_process_runner_returns_the_tables_of_the_synchronous_one(files):
    batches = [files[:7], files[7:30], files[30:]]
    config = IngestConfig(checksum="header", workers=2)
    tables = {}
    for scheduler in ("processes", "synchronous"):
        runner = LocalRunner(IngestConfig(**{**config.to_dict(), "scheduler": scheduler}),
                             "run-1", POLICY)
        try:
            tables[scheduler] = runner.submit(batches).result()
        finally:
            runner.close()
    assert [t.num_rows for t in tables["processes"]] == [7, 23, len(files) - 30]
    for got, want in zip(tables["processes"], tables["synchronous"], strict=True):
        assert got.equals(want)


def test_worker_processes_collect_garbage_less_often_than_the_driver():
    """The pool's workers start with the collector's first threshold raised
    (``etl.extract.start_worker``); the driver's is left as it was."""
    driver = gc.get_threshold()
    assert driver[0] != WORKER_GC_THRESHOLD
    runner = LocalRunner(IngestConfig(scheduler="processes", workers=2), "run-1", POLICY)
    try:
        assert runner._pool is not None
        got = {runner._pool.submit(gc.get_threshold).result() for _ in range(4)}
    finally:
        runner.close()
    assert got == {(WORKER_GC_THRESHOLD, *driver[1:])}
    assert gc.get_threshold() == driver


def _frozen_after_a_batch(files: list[FoundFile]) -> tuple[int, int]:
    """(objects frozen before, after) a batch read by ``extract_ipc`` in this process."""
    before = gc.get_freeze_count()
    extract_ipc(files, IngestConfig(checksum="header"), "run-1", POLICY)
    return before, gc.get_freeze_count()


def test_workers_freeze_what_outlives_a_batch(files):
    """A pool's worker moves what outlives each batch (the memos) out of the collector's
    generations; a driver reading a batch itself (``extract_ipc`` is only ever called in
    workers, but whatever calls it) leaves its own collector alone."""
    before, after = _frozen_after_a_batch(files)
    assert after == before  # this process is no worker
    runner = LocalRunner(IngestConfig(scheduler="processes", workers=1), "run-1", POLICY)
    try:
        assert runner._pool is not None
        first = runner._pool.submit(_frozen_after_a_batch, files).result()
        second = runner._pool.submit(_frozen_after_a_batch, files[:5]).result()
    finally:
        runner.close()
    # the fork server's imports were frozen before; the first batch's memos (thousands
    # of objects) join them, and stay there for the next batch
    assert first[0] > 50_000
    assert first[1] > first[0] + 1_000
    assert second[0] > first[0] + 1_000


def test_prestart_starts_the_fork_server_for_the_process_pool_only():
    """``prestart`` (a lake's first run, before its walk) starts the fork server that the
    process pool's workers are forked from, with the worker code to preload; for the
    thread and synchronous schedulers it starts nothing. The server is the lake's own:
    ``multiprocessing``'s shared one is not started. In a fresh interpreter, where no
    server runs yet."""
    import subprocess
    import sys

    code = (
        "import multiprocessing.forkserver as fs, os\n"
        "from etl.config import IngestConfig\n"
        "from etl import jobs, workerserver\n"
        "jobs.prestart(IngestConfig(scheduler='threads'))\n"
        "jobs.prestart(IngestConfig(scheduler='synchronous'))\n"
        "print(workerserver.SERVER._forkserver_pid)\n"
        "jobs.prestart(IngestConfig(scheduler='processes'))\n"
        "pid = workerserver.SERVER._forkserver_pid\n"
        "os.kill(pid, 0)\n"  # alive
        "print(pid, workerserver.SERVER._preload_modules)\n"
        "print(fs._forkserver._forkserver_pid)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()
    assert out[0] == "None"
    pid, preload = out[1].split(" ", 1)
    assert int(pid) > 0 and preload == "['etl.preload']"
    assert out[2] == "None"


def _letter(pid):
    """The state letter of /proc/<pid>/stat ('' once the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return ""


def _state(pid, stopped):
    """The state letter of the process, once it is stopped (``T``) or not, as asked (the
    last one read, if that does not come within 3 s)."""
    import time

    for _ in range(300):
        s = _letter(pid)
        if (s == "T") == stopped:
            return s
        time.sleep(0.01)
    return s


#: ``_letter`` and ``_state`` (as ``state``) for the code run in a fresh interpreter
_STATE = (inspect.getsource(_letter) + inspect.getsource(_state)).replace("_state(", "state(")


def _fresh(code: str, timeout: float) -> subprocess.CompletedProcess:
    """``code`` run in a fresh interpreter, with ``state(pid, stopped)`` defined."""
    return subprocess.run([sys.executable, "-c", _STATE + code], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_the_fork_server_paused_and_resumed():
    """``workerserver.pause`` stops the fork server's process (``SIGSTOP``), ``resume``
    and ``start`` continue it; either is a no-op when there is nothing to do. In a fresh
    interpreter."""
    code = (
        "from etl import workerserver as ws\n"
        "ws.pause(); ws.resume()\n"  # no server yet: nothing to do
        "ws.start('processes')\n"
        "pid = ws.SERVER._forkserver_pid\n"
        "out = []\n"
        "for step in ('pause', 'pause', 'resume', 'resume', 'pause', 'start'):\n"
        "    ws.start('processes') if step == 'start' else getattr(ws, step)()\n"
        "    out.append(state(pid, step == 'pause'))\n"
        "print(' '.join(out))\n")
    out = _fresh(code, 120)
    assert out.returncode == 0, out.stderr
    assert [s == "T" for s in out.stdout.split()] == [True, True, False, False, True, False]


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_a_paused_fork_server_ends_when_its_driver_is_killed():
    """A driver killed while the server is paused: the kernel continues the server (its
    parent's death signal), which finds its driver gone and exits, although the killed
    driver's process group (this test's) lives on."""
    import signal
    import time

    code = (
        "import os, time\n"
        "from etl import workerserver as ws\n"
        "ws.start('processes')\n"
        "pid = ws.SERVER._forkserver_pid\n"
        "for _ in range(600):\n"  # the worker code loaded: the server waits for requests
        "    with open(f'/proc/{pid}/wchan') as f:\n"
        "        if any(w in f.read() for w in ('poll', 'select')):\n"
        "            break\n"
        "    time.sleep(0.05)\n"
        "ws.pause()\n"
        "print(pid, state(pid, True), flush=True)\n"
        "os.kill(os.getpid(), 9)\n")
    out = _fresh(code, 120)
    assert out.returncode == -signal.SIGKILL, out.stderr
    pid, letter = out.stdout.split()
    assert letter == "T"
    for _ in range(200):
        if _letter(pid) in ("", "Z", "X"):  # gone, or a zombie nobody reaps here
            break
        time.sleep(0.05)
    else:
        os.kill(int(pid), signal.SIGKILL)
        raise AssertionError(f"the paused server {pid} outlived its driver")


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_a_reruns_walk_pauses_the_fork_server_until_a_file_is_to_be_read(tmp_path):
    """A rerun whose walk a second process ``stat``s ahead of pauses the workers' fork
    server for the walk; the walk's end resumes it (a no-op rerun), and so does a file to
    read (the server then forks the workers that read it). A first run never pauses it.
    In a fresh interpreter, the second process forced for a walk of three files."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(name), src / name)
    code = (
        "import shutil, sys\n"
        "from etl import statahead, workerserver as ws, ingest, IngestConfig\n"
        "import etl.listings\n"
        "from lakehouse import Lake\n"
        "statahead.MIN_ENTRIES = 0; etl.listings.SETTLE_NS = 0\n"
        "statahead.usable_cpus = lambda: 2\n"
        "calls, real = [], ws.pause\n"
        "def pause():\n"
        "    real(); calls.append(state(ws.SERVER._forkserver_pid, True))\n"
        "ws.pause = pause\n"
        f"src, lake = {str(src)!r}, Lake.create({str(tmp_path / 'lk')!r}, profile='identified')\n"
        "for step in ('first', 'no-op', 'one more'):\n"
        "    if step == 'one more':\n"
        "        shutil.copy(src + '/CT_small.dcm', src + '/copy.dcm')\n"
        "    s = ingest(lake, src, IngestConfig(scheduler='processes'))\n"
        "    print(step, s.files_read, s.outcomes['duplicate'], calls,\n"
        "          state(ws.SERVER._forkserver_pid, False))\n")
    out = _fresh(code, 300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("first 2 0 [] ") and lines[0][-1] != "T"
    assert lines[1].startswith("no-op 0 0 ['T'] ") and lines[1][-1] != "T"
    assert lines[2].startswith("one more 1 1 ['T', 'T'] ") and lines[2][-1] != "T"


def _imports_after_a_batch(files: list) -> dict:
    import sys

    from etl.config import IngestConfig
    from etl.preload import LEFT_OUT

    table = from_ipc(extract_ipc(files, IngestConfig(checksum="header"), "r1"))
    loaded = sorted(m for m in LEFT_OUT if m in sys.modules)
    # numba's linear algebra, where it looks for scipy's BLAS: imported without scipy
    # where the server compiled the batch path (an empty cache: a fresh clone), not even
    # imported where it loaded it from numba's cache (without numba's registries,
    # etl.batchwalk.lean_cache_loads)
    blas = getattr(sys.modules.get("numba.np.arraymath"), "_HAVE_BLAS", False)
    # still there when asked for: pyarrow's pandas conversion imports pandas
    frame = table.select(["status"]).to_pandas()
    # numpy's BLAS started no threads in the server (the worker's parent), nor will here
    threads = unnamed_threads(os.getppid())
    return {"ok": table.column("status").to_pylist().count("ok"), "loaded": loaded,
            "blas": blas, "frame": len(frame), "server_threads": threads,
            "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS")}


def _imports_of_a_child() -> list:
    import sys

    import pyarrow as pa

    pa.array([1, 2])
    return sorted(m for m in ("etl.preload", "pandas") if m in sys.modules)


def test_the_fork_server_leaves_pandas_and_scipy_out_of_the_workers(archive):
    """The workers read their batches without ever importing pandas (pyarrow's check for
    pandas objects), scipy (numba's look for a BLAS) or the other libraries of
    ``etl.preload.LEFT_OUT``, which the server would import for 0.7 s before any worker
    can start; pandas is still there when asked for. numpy's BLAS started no threads in
    the server (:func:`etl.leaveout.one_blas_thread`). Code forked by ``multiprocessing``'s
    own fork server in the same process is untouched: it imports neither the worker code
    nor anything less."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    files = list(walk(archive[0]))[:40]
    runner = LocalRunner(IngestConfig(scheduler="processes", workers=1), "r1")
    try:
        assert runner._pool is not None
        got = runner._pool.submit(_imports_after_a_batch, files).result()
    finally:
        runner.close()
    assert got == {"ok": 40, "loaded": [], "blas": False, "frame": 40,
                   "server_threads": 1 if os.path.isdir("/proc/self/task") else None,
                   "blas_threads": "1"}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")) as ex:
        assert ex.submit(_imports_of_a_child).result() == ["pandas"]


def test_the_workers_start_with_dasks_scheduler_code_imported():
    """Dask's local scheduler sends each task as a function of ``dask.local``: a worker
    whose server had not imported dask imported it while the first wave waited (0.1-0.16
    s per worker). The server imports it with the worker code; a worker's first call
    finds it there (``eval``, a builtin, so that nothing is imported to unpickle it)."""
    runner = LocalRunner(IngestConfig(scheduler="processes", workers=1), "r1")
    try:
        assert runner._pool is not None
        got = runner._pool.submit(
            eval, "sorted(m for m in ('dask', 'dask.local', 'etl.extract') "
                  "if m in __import__('sys').modules)").result()
    finally:
        runner.close()
    assert got == ["dask", "dask.local", "etl.extract"]


def test_the_workers_pid_file_is_in_multiprocessings_folder_and_removed_on_close():
    """Each worker of the pool writes its pid to a file (the driver's sign that a worker
    started): in ``multiprocessing``'s temporary folder of this process, removed with it
    at exit (a driver killed by a signal left ``lake-workers-*.pids`` files behind in the
    system's temporary folder), and removed when the runner closes."""
    import os
    from multiprocessing import util

    runner = LocalRunner(IngestConfig(scheduler="processes", workers=1), "r1")
    try:
        assert runner._pool is not None and runner._started is not None
        started = runner._started
        assert os.path.dirname(started) == util.get_temp_dir()
        pid = runner._pool.submit(eval, "__import__('os').getpid()").result()
        with open(started) as f:
            assert f.read() == f"{pid}\n"
    finally:
        runner.close()
    assert not os.path.exists(started)


def test_a_wave_starts_once_the_wave_before_has_handed_its_last_task_to_the_pool(
        archive, monkeypatch):
    """Two waves compute side by side: the second hands its first task to the pool as soon
    as the first has handed its last one, before that task is done (the worker goes on to
    it instead of waiting for the first wave's end). Each wave gets its own tables, in
    order. One worker; the first wave's last batch is large (the archive's files ten
    times over, 0.2-0.3 s of work: with 200 files it once ended 3.5 ms before the second
    wave's first task was handed over, and with three times 280 files 0.1 ms before, on a
    machine running two test suites), so that it is still running when the second wave
    starts."""
    import threading
    import time

    from etl import runners

    found = sorted(walk(archive[0]), key=lambda f: f.path)
    first = [found[:5], found[5:10], found[10:290] * 10]
    second = [found[290:295], found[295:300]]
    events: list[tuple[str, int, float]] = []
    waves: dict[int, int] = {}
    lock = threading.Lock()
    real = runners._Queued.submit

    def submit(self, fn, *args, **kwargs):
        future = real(self, fn, *args, **kwargs)
        with lock:
            wave = waves.setdefault(id(self), len(waves))
            events.append(("submitted", wave, time.perf_counter()))
        future.add_done_callback(
            lambda _: events.append(("done", wave, time.perf_counter())))
        return future

    monkeypatch.setattr(runners._Queued, "submit", submit)
    runner = LocalRunner(IngestConfig(scheduler="processes", workers=1), "r1")
    try:
        one, two = runner.submit(first), runner.submit(second)
        tables = one.result(), two.result()
    finally:
        runner.close()
    started = min(t for kind, wave, t in events if (kind, wave) == ("submitted", 1))
    first_done = max(t for kind, wave, t in events if (kind, wave) == ("done", 0))
    assert started < first_done
    assert [[t.column("path").to_pylist() for t in wave] for wave in tables] == [
        [[f.path for f in b] for b in batches] for batches in (first, second)]


def _unguarded_script(archive, tmp_path, preamble: str = ""):
    """A script that runs ``preamble``, then calls ingest() at its top level (no main
    guard) on 20 files, then prints ``finished``."""
    from lakehouse import Lake

    src = tmp_path / "src"
    src.mkdir()
    for i, p in enumerate(sorted((archive[0] / "archive").rglob("*.dcm"))[:20]):
        (src / f"{i:03d}.dcm").write_bytes(p.read_bytes())
    Lake.create(tmp_path / "lake", profile="identified")
    script = tmp_path / "unguarded.py"
    script.write_text(
        preamble + "from etl import IngestConfig, ingest\nfrom lakehouse import Lake\n"
        f"ingest(Lake.open({str(tmp_path / 'lake')!r}), {str(src)!r}, "
        "IngestConfig(scheduler='processes', workers=2))\nprint('finished')\n")
    return script


def test_workers_forked_from_the_server_do_not_run_the_main_module(archive, tmp_path):
    """multiprocessing runs the parent's main module in each child it starts (as
    ``__mp_main__``); the lake's workers only run its own functions, by module name, and
    are started without it: a script that calls ingest() at its top level, without a
    main guard, runs once, and its workers never import it (nor, for ``lake``, the
    CLI)."""
    import subprocess
    import sys

    from lakehouse import Lake

    marks = tmp_path / "marks"
    script = _unguarded_script(archive, tmp_path, preamble=(
        f"with open({str(marks)!r}, 'a') as f: f.write(__name__ + '\\n')\n"))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300)
    assert (run.returncode, run.stdout.strip()) == (0, "finished"), run.stderr[-800:]
    assert marks.read_text().splitlines() == ["__main__"]
    assert Lake.open(tmp_path / "lake").count("instances") == 20


def test_a_script_without_a_main_guard_fails_at_once_with_what_to_do(archive, tmp_path):
    """Where the workers are spawned (no fork server: Windows), each imports the main
    module: a script that calls ingest() at its top level starts it again in every worker,
    which dies while starting (here: the lake is being written). The run stops at the
    first crash with an error that says what to do, instead of retrying (each retry's
    workers die the same way)."""
    import subprocess
    import sys

    from lakehouse import Lake

    # the platform without a fork server, in the script's process and its workers
    script = _unguarded_script(archive, tmp_path, preamble=(
        "import etl.workerserver\netl.workerserver.available = lambda: False\n"))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1 and "finished" not in run.stdout
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("etl.errors.WorkerStartError: the ingest worker processes died")
    assert 'under `if __name__ == "__main__":`' in last and str(script) in last
    # the same script, guarded, ingests the files
    script.write_text(script.read_text().replace("ingest(", "if __name__ == '__main__':\n"
                                                            "    ingest(", 1)
                      .replace("print(", "    print(", 1))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300)
    assert (run.returncode, run.stdout.strip()) == (0, "finished"), run.stderr[-800:]
    assert Lake.open(tmp_path / "lake").count("instances") == 20


def test_lake_ingest_starts_the_fork_server_before_its_own_imports(tmp_path):
    """``lake ingest`` with the process pool starts the workers' fork server first, before
    it imports the ingest code, DuckDB or pydicom (the server's imports then run beside
    its own); with the thread scheduler it starts none. Each in a fresh interpreter."""
    import shutil
    import subprocess
    import sys

    from pydicom.data import get_testdata_file

    from lakehouse.tables import Lake

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "a.dcm")
    out = []
    for name, extra in (("pool", []), ("threads", ["--scheduler", "threads"])):
        Lake.create(tmp_path / name)
        argv = ["ingest", str(src), "--lake", str(tmp_path / name), *extra]
        code = (
            "import sys\n"
            "from etl import workerserver\n"
            "calls = []\n"
            "real = workerserver.start\n"
            "def spy(scheduler):\n"
            "    heavy = [m for m in ('etl.jobs', 'duckdb', 'pydicom') if m in sys.modules]\n"
            "    calls.append((scheduler, heavy))\n"
            "    real(scheduler)\n"
            "workerserver.start = spy\n"
            "from lake_cli import main\n"
            f"assert main({argv!r}) == 0\n"
            "print('first', calls[0], workerserver.SERVER._forkserver_pid is not None)\n")
        out += [line for line in subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
            check=True).stdout.splitlines() if line.startswith("first")]
        assert Lake.open(tmp_path / name).count("instances") == 1
    assert out == ["first ('processes', []) True", "first ('threads', []) False"]


def test_a_rerun_starts_the_fork_server_when_it_finds_files_to_read(tmp_path, monkeypatch):
    """`ingest` starts the server before the walk on a lake's first run; on a rerun, only
    when the walk finds a file to read (`lake ingest` starts it first anyway)."""
    import shutil

    from pydicom.data import get_testdata_file

    from etl import ingest, jobs
    from lakehouse import Lake
    from tests.conftest import fast_config

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "a.dcm")
    lake = Lake.create(tmp_path / "lk")
    calls = []
    monkeypatch.setattr(jobs, "prestart", lambda config: calls.append(config.scheduler))
    ingest(lake, src, fast_config())
    assert calls == ["synchronous"]  # a first run: at once, before its walk
    calls.clear()
    ingest(lake, src, fast_config())
    assert calls == []  # nothing to read
    shutil.copy(get_testdata_file("MR_small.dcm"), src / "b.dcm")
    assert ingest(lake, src, fast_config()).outcomes["ingested"] == 1
    assert calls == ["synchronous"]
