"""Benchmark: ``lake ingest`` against a naive single-process pydicom baseline.

For each archive kind (``ct``: preset "bench", mostly 512x512 int16 CT slices;
``small``: preset "bench-small", 64x64 images of ~10 KB) and size this script

1. generates a synthetic archive with ``synth.generate_archive``;
2. warms the page cache by reading every file once (both contenders then read
   from memory, and neither pays the cold-cache cost for the other);
3. measures the raw read floor: one process opens every file and reads its
   first 16 KB, nothing else;
4. runs the baseline in this process: walk, ``pydicom.dcmread(path,
   stop_before_pixels=True)`` per file, the ``lakehouse.schemas.HEADER_COLUMNS``
   keywords with simple conversion, rows into a pandas DataFrame, ``to_parquet``;
5. runs ``etl.jobs.ingest`` on a fresh lake (``--checksums``: header, the
   default of new lakes, and/or full) in a child process (default
   ``IngestConfig()``, and optionally ``scheduler="local-cluster"``) that starts
   as ``lake ingest`` does (the workers' fork server before its own imports),
   timed end to end inside the child (its whole wall time printed beside), while
   this process samples the memory of the child and all its descendants;
6. runs ``ingest`` a second time on the same lake (nothing changed: a no-op).

Figures are ratios against the baseline measured in the same run (machines
are shared and noisy). This is a benchmark, not a timed test.

    python bench/ingest.py [--files 20000] [--sizes 5000,20000] [--workdir DIR]
                           [--keep] [--repeat 1] [--schedulers processes,local-cluster]
                           [--kinds ct,small] [--checksums header,full] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

MiB = 1024 * 1024
SAMPLE_SECONDS = 0.05
#: the process tree is re-listed (and CPU times, VmHWM read) every this many samples
REFRESH_EVERY = 10
CHILD_FLAG = "--_child"


# --- archive -------------------------------------------------------------------
def archive_files(root: Path) -> list[Path]:
    """Every regular file below ``root``, in sorted walk order."""
    out: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        out.extend(Path(folder) / f for f in sorted(files))
    return out


#: archive kinds: the synth preset behind each
KINDS = {"ct": "bench", "small": "bench-small"}


def archive_name(kind: str, n: int) -> str:
    return f"archive-{n}" if kind == "ct" else f"archive-{kind}-{n}"


def prepare_archive(workdir: Path, n: int, seed: int, log,
                    kind: str = "ct") -> tuple[Path, dict | None, float]:
    """Generate (or reuse) the archive of about ``n`` files; return root, truth outcomes,
    seconds spent generating (0 when reused)."""
    from synth import GroundTruth, generate_archive

    name = archive_name(kind, n)
    root = workdir / name
    truth_path = workdir / f"{name}.truth.json"
    done = workdir / f"{name}.done"
    if done.exists() and root.is_dir():
        log(f"reusing archive {root}")
        truth = GroundTruth.from_json(truth_path.read_text(encoding="utf-8"))
        return root, dict(truth.outcomes), 0.0
    if root.exists():
        shutil.rmtree(root)
    log(f"generating archive of ~{n} files in {root} ...")
    t = time.perf_counter()
    truth = generate_archive(root, seed=seed, preset=KINDS[kind], target_files=n,
                             truth_path=truth_path)
    seconds = time.perf_counter() - t
    done.write_text("ok\n", encoding="utf-8")
    log(f"  generated in {seconds:.1f} s")
    return root, dict(truth.outcomes), seconds


def warm_cache(files: list[Path]) -> tuple[int, float]:
    """Read every file once (page cache warming); return total bytes and seconds."""
    total = 0
    t = time.perf_counter()
    buf = bytearray(4 * MiB)
    view = memoryview(buf)
    for p in files:
        with open(p, "rb", buffering=0) as fh:
            while k := fh.readinto(view):
                total += k
    return total, time.perf_counter() - t


def rewarm(files: list[Path], args, log) -> None:
    """Read every file again right before a contender runs: the kernel may reclaim
    page-cache pages that sit unused (e.g. DAMON-based proactive reclaim on VMs), and a
    contender reading from disk measures the disk, not the code."""
    if args.rewarm:
        total, seconds = warm_cache(files)
        log(f"  page cache re-warmed: {total / MiB:,.0f} MiB in {seconds:.1f} s")


def run_floor(files: list[Path], head: int = 16 * 1024) -> float:
    """The raw read floor: one process opens every file and reads its first ``head``
    bytes (no parsing at all); return seconds."""
    t = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as fh:
            fh.read(head)
    return time.perf_counter() - t


# --- baseline ------------------------------------------------------------------
def _converter(arrow_type):
    import pyarrow as pa

    def scalar(fn):
        def conv(v):
            if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
                v = v[0] if len(v) else None
            if v is None or v == "":
                return None
            try:
                return fn(v)
            except (TypeError, ValueError):
                return None
        return conv

    def listing(fn):
        def conv(v):
            if v is None or v == "":
                return None
            items = list(v) if isinstance(v, (list, tuple)) or \
                type(v).__name__ == "MultiValue" else [v]
            try:
                return [fn(x) for x in items]
            except (TypeError, ValueError):
                return None
        return conv

    if pa.types.is_list(arrow_type):
        inner = arrow_type.value_type
        return listing(float if pa.types.is_floating(inner) else
                       int if pa.types.is_integer(inner) else str)
    if pa.types.is_floating(arrow_type):
        return scalar(float)
    if pa.types.is_integer(arrow_type):
        return scalar(int)
    return scalar(str)  # strings, and DA/TM values kept as their header strings


def baseline_columns() -> list:
    """(keyword, converter) of the header columns the naive baseline reads."""
    from lakehouse.schemas import HEADER_COLUMNS

    return [(c.keyword, _converter(c.type)) for c in HEADER_COLUMNS if c.keyword]


def naive_row(path, columns: list) -> dict:
    """The naive baseline for one file: ``dcmread(stop_before_pixels=True)``, then each
    column's value converted (raises whatever pydicom raises on a bad file)."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    row = {}
    for kw, conv in columns:
        if kw == "TransferSyntaxUID":
            v = ds.file_meta.get(kw) if getattr(ds, "file_meta", None) else None
        else:
            v = ds.get(kw)
        row[kw] = conv(v)
    return row


def run_baseline(root: Path, out: Path) -> dict:
    """One process: dcmread(stop_before_pixels=True) per file, header columns, Parquet."""
    import pandas as pd

    columns = baseline_columns()
    t = time.perf_counter()
    files = archive_files(root)
    rows: list[dict] = []
    failed = 0
    for p in files:
        try:
            row = naive_row(p, columns)
        except Exception:
            failed += 1
            continue
        row["path"] = str(p)
        rows.append(row)
    df = pd.DataFrame(rows, columns=[kw for kw, _ in columns] + ["path"])
    df.to_parquet(out, index=False)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "files": len(files), "rows": len(rows), "failed": failed,
            "parquet_bytes": out.stat().st_size}


# --- lake ingest in a child process -------------------------------------------------
def child_main(argv: list[str]) -> None:
    """``ingest.py --_child LAKE ARCHIVE SCHEDULER WORKERS RESULT create|open CHECKSUM``."""
    lake_dir, archive, scheduler, workers, result, mode, checksum, profile = argv
    # as `lake ingest` does: the workers' fork server starts before this process's own
    # imports, which run beside the server's (the child's whole wall time, start-up
    # included, is reported too)
    from etl.workerserver import start

    start(scheduler)
    from etl.leaveout import INGEST_LEFT_OUT, leave_out, one_blas_thread

    one_blas_thread()  # as `lake ingest` does, before this process loads numpy
    leave_out(INGEST_LEFT_OUT)  # as `lake ingest` of a folder does, for its whole process
    import logging

    from etl.config import IngestConfig
    from etl.jobs import ingest
    from lakehouse.tables import Lake

    logging.basicConfig(level=logging.WARNING)
    config = IngestConfig(scheduler=scheduler, workers=int(workers) or None)
    t = time.perf_counter()
    lake = Lake.create(lake_dir, profile=profile, checksum=checksum) if mode == "create" \
        else Lake.open(lake_dir)
    t_open = time.perf_counter() - t
    t = time.perf_counter()
    summary = ingest(lake, archive, config)
    seconds = time.perf_counter() - t
    phases = {}
    try:  # the job's own phase timings, from its ingest_runs row
        runs = lake.read("ingest_runs").to_pylist()
        row = next(r for r in runs if r["ingest_run_id"] == summary.run_id)
        phases = {k: row[f"{k}_seconds"] for k in ("discover", "extract", "summarize")}
    except Exception as exc:  # optional detail, never fails the benchmark
        phases = {"error": repr(exc)}
    import gc

    gc.collect()  # Arrow scanners released before shutdown (see lake_cli.main)
    Path(result).write_text(json.dumps({"seconds": seconds, "open_seconds": t_open,
                                        "phases": phases, "summary": summary.to_dict()}),
                            encoding="utf-8")


def _proc_bytes(pid: int, name: str, field: str) -> int:
    """A ``field:`` line (in kB) of /proc/<pid>/<name>, in bytes; 0 if unavailable."""
    try:
        with open(f"/proc/{pid}/{name}", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _hwm_bytes(pid: int) -> int:
    """VmHWM (peak resident set) of a process; 0 if unavailable."""
    return _proc_bytes(pid, "status", "VmHWM:")


def _pss_bytes(pid: int) -> int:
    """Pss (proportional set size) of a process; 0 if unavailable."""
    return _proc_bytes(pid, "smaps_rollup", "Pss:")


class TreeMemorySampler:
    """Samples the summed RSS of a process and all its descendants (psutil).

    Every ``SAMPLE_SECONDS`` the RSS of the known processes is summed; every
    ``REFRESH_EVERY`` samples the tree is listed again (new workers show up
    within that time). Listing the tree scans /proc, so it is kept rare: the
    sampler shares the CPUs with the ingest it measures.

    ``peak_sum``: the largest summed RSS seen at one sampling instant (what the
    machine had to hold at once, give or take the sampling interval).
    ``hwm_sum``: the sum over processes of each one's own peak (VmHWM, read
    while it was alive); an upper bound, since those peaks need not coincide.
    ``peak_pss``: the largest summed proportional set size (``Pss`` of
    /proc/<pid>/smaps_rollup: a page shared by n processes counts 1/n in each),
    read at each re-listing: the memory the tree held, pages shared between
    processes (worker processes forked from one server) counted once.
    """

    def __init__(self, pid: int, interval: float = SAMPLE_SECONDS):
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_sum = 0
        self.peak_procs = 0
        self.peak_pss = 0
        self.hwm: dict[tuple[int, float], int] = {}
        #: last CPU seconds (user + system) seen per process; the root's is the driver's
        self.cpu: dict[tuple[int, float], float] = {}
        self.root_key = (pid, self.root.create_time())
        self.samples = 0
        self._procs = [self.root]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _refresh(self) -> None:
        """Re-list the process tree; record CPU seconds and VmHWM (the costly part)."""
        ps = self._psutil
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except ps.Error:
            return
        keep = []
        pss = 0
        for p in procs:
            try:
                key = (p.pid, p.create_time())
                t = p.cpu_times()
            except ps.Error:
                continue
            self.cpu[key] = t.user + t.system
            pss += _pss_bytes(p.pid)
            hwm = _hwm_bytes(p.pid)
            if hwm > self.hwm.get(key, 0):
                self.hwm[key] = hwm
            keep.append(p)
        self._procs = keep
        self.peak_pss = max(self.peak_pss, pss)

    def _sample(self) -> None:
        """Sum the current RSS of the known processes (cheap: /proc/<pid>/statm)."""
        total = alive = 0
        for p in self._procs:
            try:
                total += p.memory_info().rss
            except self._psutil.Error:
                continue
            alive += 1
        self.samples += 1
        if total > self.peak_sum:
            self.peak_sum, self.peak_procs = total, alive

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            if tick % REFRESH_EVERY == 0:
                self._refresh()
            self._sample()
            tick += 1
            self._stop.wait(self.interval)
        self._refresh()

    @property
    def cpu_driver(self) -> float:
        return self.cpu.get(self.root_key, 0.0)

    @property
    def cpu_others(self) -> float:
        return sum(v for k, v in self.cpu.items() if k != self.root_key)

    @property
    def hwm_sum(self) -> int:
        return sum(self.hwm.values())


def run_ingest_child(lake_dir: Path, archive: Path, scheduler: str, workers: int,
                     create: bool, checksum: str = "header", profile: str = "research") -> dict:
    result = lake_dir.parent / f"{lake_dir.name}.{'full' if create else 'rerun'}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, os.path.abspath(__file__), CHILD_FLAG, str(lake_dir), str(archive),
           scheduler, str(workers), str(result), "create" if create else "open", checksum,
           profile]
    t = time.perf_counter()
    env = {**os.environ, "DASK_LOGGING__DISTRIBUTED": "warning"}
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env)
    sampler = TreeMemorySampler(proc.pid).start()
    rc = proc.wait()
    sampler.stop()
    wall = time.perf_counter() - t
    # a child that finished (its result written after ingest() returned) but then died
    # in interpreter shutdown (SIGABRT from a native library's threads, seen rarely under
    # heavy load) still measured a complete ingest: kept, and flagged in the report
    finished = result.exists()
    if rc != 0 and not (rc == -6 and finished):
        raise RuntimeError(f"ingest child failed with exit code {rc}: {' '.join(cmd)}")
    out = json.loads(result.read_text(encoding="utf-8"))
    out["exit_code"] = rc
    out.update(wall_seconds=wall, peak_rss_sum=sampler.peak_sum, peak_pss_sum=sampler.peak_pss,
               peak_rss_procs=sampler.peak_procs, hwm_sum=sampler.hwm_sum,
               processes_seen=len(sampler.hwm), samples=sampler.samples,
               cpu_driver=sampler.cpu_driver, cpu_workers=sampler.cpu_others)
    return out


# --- the benchmark ---------------------------------------------------------------
def _fmt_phases(phases: dict) -> str:
    return ", ".join(f"{k} {v:.1f} s" if isinstance(v, float) else f"{k} {v}"
                     for k, v in phases.items())


def bench_size(workdir: Path, n: int, args, log, kind: str = "ct") -> dict:
    root, truth, gen_seconds = prepare_archive(workdir, n, args.seed, log, kind)
    files = archive_files(root)
    log(f"warming the page cache: reading {len(files)} files once ...")
    total_bytes, warm_seconds = warm_cache(files)
    log(f"  {total_bytes / MiB:,.0f} MiB in {warm_seconds:.1f} s")

    # rounds: floor, baseline, then every contender, so each ingest run has a baseline
    # measured next to it (the machine's load changes over minutes)
    floor_runs: list[float] = []
    base_runs: list[dict] = []
    contenders = [(s, c) for c in args.checksums for s in args.schedulers]
    ingest_runs: dict[str, list[dict]] = {f"{s}/{c}": [] for s, c in contenders}
    for r in range(args.repeat):
        rewarm(files, args, log)
        floor_runs.append(run_floor(files))
        log(f"raw read floor (first 16 KB of every file, one process): {floor_runs[-1]:.2f} s")
        out = workdir / f"baseline-{kind}-{n}.parquet"
        log(f"baseline (single-process pydicom -> pandas -> Parquet), round {r + 1} ...")
        rewarm(files, args, log)
        base_runs.append(run_baseline(root, out))
        out.unlink()
        log(f"  {base_runs[-1]['seconds']:.1f} s, {base_runs[-1]['failed']} files failed")
        for sched, checksum in contenders:
            workers = args.cluster_workers if sched == "local-cluster" else 0
            lake_dir = workdir / f"lake-{kind}-{n}-{sched}-{checksum}"
            if lake_dir.exists():
                shutil.rmtree(lake_dir)
            log(f"lake ingest ({sched}, checksum {checksum}), round {r + 1} ...")
            rewarm(files, args, log)
            full = run_ingest_child(lake_dir, root, sched, workers, True, checksum, args.profile)
            log(f"  {full['seconds']:.1f} s (child process {full['wall_seconds']:.1f} s from "
                f"start to exit), peak {full['peak_rss_sum'] / MiB:,.0f} MiB, "
                f"phases {_fmt_phases(full['phases'])}, outcomes {full['summary']['outcomes']}")
            rerun = run_ingest_child(lake_dir, root, sched, workers, False, checksum,
                                     args.profile)
            log(f"  no-op rerun {rerun['seconds']:.2f} s (child process "
                f"{rerun['wall_seconds']:.2f} s from start to exit)")
            ingest_runs[f"{sched}/{checksum}"].append(
                {"full": full, "rerun": rerun, "checksum": checksum,
                 "paired_ratio": base_runs[-1]["seconds"] / full["seconds"]})
            shutil.rmtree(lake_dir)
    baseline = min(base_runs, key=lambda b: b["seconds"])
    baseline_fps = len(files) / baseline["seconds"]
    floor_fps = len(files) / min(floor_runs)

    results = {}
    for sched, runs in ingest_runs.items():
        best = min(runs, key=lambda x: x["full"]["seconds"])
        full, rerun = best["full"], best["rerun"]
        outcomes = full["summary"]["outcomes"]
        fps = len(files) / full["seconds"]
        results[sched] = {
            "scheduler": full["summary"]["scheduler"] or sched,
            "checksum": best["checksum"],
            "workers": full["summary"]["workers"],
            "seconds": full["seconds"],
            "files_per_s": fps,
            "ratio_vs_baseline": fps / baseline_fps,
            "ratio_vs_floor": fps / floor_fps,
            "peak_mib": max(x["full"]["peak_rss_sum"] for x in runs) / MiB,
            "peak_mib_upper_bound": max(x["full"]["hwm_sum"] for x in runs) / MiB,
            "peak_pss_mib": max(x["full"].get("peak_pss_sum", 0) for x in runs) / MiB,
            "processes": full["processes_seen"],
            "child_wall_seconds": full["wall_seconds"],
            "phases": full["phases"],
            "cpu_seconds_driver": full["cpu_driver"],
            "cpu_seconds_workers": full["cpu_workers"],
            "rerun_seconds": rerun["seconds"],
            "rerun_ratio": rerun["seconds"] / full["seconds"],
            # the same, of each child process from start to exit (what a user timing the
            # `lake ingest` command sees: Python's start and the imports in both)
            "rerun_child_wall_seconds": rerun["wall_seconds"],
            "rerun_process_ratio": rerun["wall_seconds"] / full["wall_seconds"],
            "rerun_unchanged": rerun["summary"]["files_unchanged"],
            "outcomes": outcomes,
            "matches_truth": truth is None or outcomes == truth,
            "all_seconds": [x["full"]["seconds"] for x in runs],
            "paired_ratios": [x["paired_ratio"] for x in runs],
        }
        if truth is not None and outcomes != truth:
            log(f"  WARNING: outcomes {outcomes} differ from the ground truth {truth}")
    return {
        "kind": kind,
        "files": len(files),
        "floor": {"seconds": min(floor_runs), "files_per_s": floor_fps,
                  "all_seconds": floor_runs},
        "total_bytes": total_bytes,
        "generate_seconds": gen_seconds,
        "warm_read_seconds": warm_seconds,
        "baseline": {"seconds": baseline["seconds"], "files_per_s": baseline_fps,
                     "rows": baseline["rows"], "failed": baseline["failed"],
                     "all_seconds": [b["seconds"] for b in base_runs]},
        "ingest": results,
    }


def render_table(report: dict) -> str:
    head = ("kind", "files", "GiB", "floor f/s", "baseline f/s", "scheduler", "checksum",
            "ingest f/s", "ingest/base", "ingest/floor", "peak MiB", "rerun s", "rerun/full",
            "rerun/full (processes)", "truth")
    rows = []
    for size in report["sizes"]:
        for res in size["ingest"].values():
            rows.append((size["kind"], f"{size['files']:,}",
                         f"{size['total_bytes'] / 1024**3:.2f}",
                         f"{size['floor']['files_per_s']:.0f}",
                         f"{size['baseline']['files_per_s']:.0f}", res["scheduler"],
                         res["checksum"], f"{res['files_per_s']:.0f}",
                         f"{res['ratio_vs_baseline']:.2f}", f"{res['ratio_vs_floor']:.3f}",
                         f"{res['peak_mib']:,.0f}", f"{res['rerun_seconds']:.2f}",
                         f"{res['rerun_ratio']:.3f}", f"{res['rerun_process_ratio']:.3f}",
                         "ok" if res["matches_truth"] else "DIFF"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


#: the project's modules, compiled to bytecode before timing (:func:`compile_project`)
PROJECT = ("etl", "lakehouse", "catalog", "lake_cli.py")


def compile_project() -> str:
    """Compile the project's modules to bytecode, as Python does at a module's first import,
    where this interpreter does not (``PYTHONDONTWRITEBYTECODE``, which this project's
    machines set): each process of the run would otherwise compile them from source at
    every start (``lake ingest``: 0.06-0.1 s of CPU for the driver and about as much for
    the workers' server), while pydicom and the other installed packages, which the
    baseline runs, were compiled when installed. Returns what was done, for the report."""
    if not sys.flags.dont_write_bytecode:
        return "written by Python at first import"
    import compileall

    repo = project_root()
    ok = all(compileall.compile_dir(repo / p, quiet=1) if (repo / p).is_dir()
             else compileall.compile_file(repo / p, quiet=1) for p in PROJECT)
    return ("compiled by this script (the interpreter does not write it)" if ok
            else "compiled by this script, with errors (some modules compile at each start)")


def project_root() -> Path:
    """The folder of the project under test (where ``etl`` is imported from)."""
    import etl

    return Path(etl.__file__).resolve().parent.parent


def code_revision() -> str:
    """Git commit of the code under test (``+dirty`` with uncommitted changes), if known."""
    repo = project_root()
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--",
                                "etl", "lakehouse"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"unknown ({repo})"
    return rev + ("+dirty" if dirty else "")


def render(report: dict) -> str:
    out = [f"ingest benchmark  {report['date']}  {report['cpus']} CPUs  "
           f"python {report['python']}  code {report['code']}  "
           f"repeat={report['repeat']} (best run shown)  {report['profile']} lakes",
           "load average (1, 5, 15 min) at start {} and end {}: other work on the machine "
           "skews both timings".format(*(" ".join(f"{x:.1f}" for x in report[k])
                                         for k in ("loadavg_start", "loadavg_end"))),
           "", render_table(report), ""]
    for size in report["sizes"]:
        b = size["baseline"]
        out.append(f"{size['kind']} {size['files']:,} files: raw read floor "
                   f"{size['floor']['seconds']:.2f} s; baseline {b['seconds']:.1f} s "
                   f"({b['rows']:,} rows, {b['failed']} unreadable files skipped); "
                   f"cache warm-up read {size['total_bytes'] / MiB:,.0f} MiB "
                   f"in {size['warm_read_seconds']:.2f} s")
        for res in size["ingest"].values():
            out.append(f"  {res['scheduler']} ({res['checksum']} checksums): "
                       f"{res['seconds']:.1f} s (the child process "
                       f"{res['child_wall_seconds']:.1f} s from start to exit, its start-up "
                       f"and imports included), peak {res['peak_mib']:,.0f} "
                       f"MiB (proportional {res['peak_pss_mib']:,.0f} MiB, "
                       f"upper bound {res['peak_mib_upper_bound']:,.0f} MiB, "
                       f"{res['processes']} processes); {_fmt_phases(res['phases'])}; "
                       f"CPU s driver {res['cpu_seconds_driver']:.1f} / workers "
                       f"{res['cpu_seconds_workers']:.1f}; no-op rerun "
                       f"{res['rerun_seconds']:.2f} s (the child process "
                       f"{res['rerun_child_wall_seconds']:.2f} s); "
                       f"ingest/base per round (each round's baseline): "
                       f"{', '.join(f'{r:.2f}x' for r in res.get('paired_ratios', []))}; "
                       f"outcomes {res['outcomes']}"
                       f"{'' if res['matches_truth'] else '  (DIFFER FROM GROUND TRUTH)'}")
    flat = report.get("flatness")
    if flat:
        out.append("")
        for sched, f in flat.items():
            out.append(f"peak memory flatness ({sched}): "
                       + ", ".join(f"{n:,} files {m:,.0f} MiB" for n, m in f["peak_mib"])
                       + f"; largest/smallest = {f['ratio']:.2f} "
                       f"for {f['files_ratio']:.1f}x the files")
    out += ["", "method: page cache warmed by reading every file once before timing; baseline "
            "(one process) runs first, then lake ingest in a child process; peak memory = "
            "largest summed RSS of the ingest child and all its descendants, sampled every "
            f"{SAMPLE_SECONDS * 1000:.0f} ms with psutil; rerun = second ingest on the same "
            "lake (unchanged archive); rerun/full = ingest() of each, timed in its child "
            "process; rerun/full (processes) = each child process from start to exit; "
            f"bytecode: {report['method'].get('bytecode', 'not recorded')}."]
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20_000, help="archive size (default 20000)")
    ap.add_argument("--sizes", help="comma-separated archive sizes (overrides --files), "
                    "e.g. 5000,20000 to check that peak memory stays flat")
    ap.add_argument("--workdir", type=Path, help="working folder (default: a temp folder "
                    "under /tmp, deleted at the end unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir; a later run with "
                    "the same --workdir reuses the generated archives")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each contender; the "
                    "fastest is reported (default 1)")
    ap.add_argument("--schedulers", default="processes,local-cluster",
                    help="IngestConfig.scheduler values to run (default processes,local-cluster)")
    ap.add_argument("--cluster-workers", type=int, default=2,
                    help="workers of the local-cluster run (default 2)")
    ap.add_argument("--kinds", default="ct,small",
                    help="archives to run: ct (preset bench: mostly 512x512 CT slices) and/or "
                    "small (preset bench-small: 64x64 images, ~10 KB files); default both")
    ap.add_argument("--checksums", default="header",
                    help="lake checksum modes to run: header (the default of new lakes), full, "
                    "or header,full")
    ap.add_argument("--profile", choices=["research", "identified"], default="research",
                    help="profile of the lakes ingested into (default research, as `lake "
                    "init` makes; identified skips the de-identification work)")
    ap.add_argument("--no-rewarm", dest="rewarm", action="store_false",
                    help="do not re-read the archive right before each contender (by default "
                    "it is, so that reclaimed page-cache pages do not turn a contender's "
                    "run into a disk benchmark)")
    ap.add_argument("--seed", type=int, default=0, help="archive seed (default 0)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    args.sizes = sorted([int(s) for s in args.sizes.split(",") if s.strip()] if args.sizes
                  else [args.files])
    args.schedulers = [s.strip() for s in args.schedulers.split(",") if s.strip()]
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    args.checksums = [c.strip() for c in args.checksums.split(",") if c.strip()]
    if not set(args.kinds) <= set(KINDS) or not set(args.checksums) <= {"header", "full"}:
        ap.error(f"--kinds takes {sorted(KINDS)}, --checksums header and/or full")
    if args.repeat < 1 or any(s < 1 for s in args.sizes):
        ap.error("--repeat and sizes must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    made_temp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir="/tmp")) if made_temp \
        else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"workdir {workdir}")
    code = code_revision()
    bytecode = compile_project()
    log(f"the project's bytecode: {bytecode}")
    load_start = os.getloadavg()
    try:
        sizes = [bench_size(workdir, n, args, log, kind) for kind in args.kinds
                 for n in args.sizes]
    finally:
        if not args.keep:
            if made_temp:
                shutil.rmtree(workdir, ignore_errors=True)
            else:  # remove only what this script created
                for kind in args.kinds:
                    for n in args.sizes:
                        name = archive_name(kind, n)
                        shutil.rmtree(workdir / name, ignore_errors=True)
                        for suffix in (".truth.json", ".done"):
                            (workdir / f"{name}{suffix}").unlink(missing_ok=True)
        else:
            log(f"kept {workdir}")
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "code": code, "repeat": args.repeat, "profile": args.profile, "sizes": sizes,
        "method": {
            "bytecode": f"the project's modules: {bytecode}",
            "cache": "every file read once before timing; baseline runs first, then ingest",
            "peak_memory": "max summed RSS of the ingest child process and its descendants, "
                           f"psutil sampling every {SAMPLE_SECONDS}s; upper bound = sum of "
                           "each process's VmHWM",
            "timing": "ingest(): timed inside the child around the call (discover, extract, "
                      "Delta commits, summary tables, run record); baseline: walk + read + "
                      "DataFrame + Parquet",
        },
    }
    if len(args.sizes) > 1:
        report["flatness"] = {}
        for kind in args.kinds:
            runs = [s for s in sizes if s["kind"] == kind]
            small, large = runs[0], runs[-1]
            for key in small["ingest"]:
                report["flatness"][f"{kind} {key}"] = {
                    "peak_mib": [(s["files"], s["ingest"][key]["peak_mib"]) for s in runs],
                    "ratio": large["ingest"][key]["peak_mib"] / small["ingest"][key]["peak_mib"],
                    "files_ratio": large["files"] / small["files"]}
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD_FLAG:
        child_main(sys.argv[2:])
    else:
        sys.exit(main(sys.argv[1:]))
