"""Benchmark: the summary tables updated for what a run added, against rebuilding them whole.

1. Reuses (or generates, as ``bench/ingest.py`` does) an archive of about ``--files``
   small files and ingests it into a fresh lake (identified profile, default settings).
2. Writes ``--add`` new files (default 1 % of the archive) to a separate folder, as a
   nightly run brings them (``add_files``): new studies of existing patients dated today,
   and a few late images of existing series. Ingests that folder into the lake.
3. On the instances version before and after that run, times (best of ``--repeat``, each
   in a fresh process, with its peak RSS):
   - **update**: ``etl.summarize.update`` (what the run did: the changed series, studies,
     patients and dose events, from the files holding their rows);
   - **rebuild**: ``etl.summarize.build`` over the whole version (what every run did
     before, and what a first run does).
   Both compute the rows only (the commits are not timed here; the run's own
   ``summarize_seconds``, commits included, is printed too), and the bench checks that
   the updated rows equal the rebuilt rows of the same keys.

With ``--optimize``, ``lake optimize`` compacts the lake between steps 1 and 2: the
update must then tell the rows moved into the compacted files from the new ones.

    python bench/summaries.py [--files 20000] [--add N] [--workdir DIR] [--repeat 3]
                              [--optimize]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: the date of the new studies of the nightly run
TODAY = "20261128"


def add_files(files: list[Path], out: Path, n: int) -> int:
    """Write ``n`` new files to ``out``, as a nightly run brings them: 90 % are new studies
    of existing patients (copies of a run of the archive's files, whole series, given new
    study, series and instance UIDs and today's date), 10 % late images of existing series
    (copies spread over the archive, given a new SOPInstanceUID only)."""
    import pydicom
    from pydicom.uid import generate_uid

    out.mkdir(parents=True)
    late = max(n // 10, 1)
    block = files[len(files) // 3:][:n - late]
    step = max(len(files) // late, 1)
    new_uid: dict[str, str] = {}
    written = 0
    for i, src in enumerate([*block, *files[::step][:late]]):
        try:
            ds = pydicom.dcmread(src)
        except Exception:
            continue
        if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds:
            continue
        ds.SOPInstanceUID = generate_uid()
        if i < len(block):
            for kw in ("StudyInstanceUID", "SeriesInstanceUID"):
                if kw in ds:
                    old = ds.data_element(kw).value
                    setattr(ds, kw, new_uid.setdefault(old, generate_uid()))
            for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
                if kw in ds:
                    setattr(ds, kw, TODAY)
        if getattr(ds, "file_meta", None) is not None:
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(out / f"added-{i:06d}.dcm")
        written += 1
    return written


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(kind: str, lake_dir: str, before: int, after: int, studies_before: int,
           wanted: dict | None, queue) -> None:
    """In a fresh process: time ``update`` or ``build`` (rows only); put seconds, the RSS
    before and its peak during the computation, row counts, the keys changed (update) and
    the rows of those keys (sorted reprs)."""
    from etl import summarize
    from lakehouse import Lake

    lake = Lake.open(lake_dir)
    rss0 = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    t = time.perf_counter()
    if kind == "update":
        out = summarize.update(lake, lake.open_delta("instances", before),
                               lake.open_delta("instances", after),
                               lake.open_delta("studies", studies_before))
        if out is None:  # it chose a whole rebuild (etl.summarize.UPDATE_SHARE, READ_SHARE)
            queue.put({"seconds": time.perf_counter() - t, "rebuild_chosen": True})
            return
        rows = {k: u.rows for k, u in out.items()}
        wanted = {k: u.keys.to_pylist() for k, u in out.items()}
    else:
        rows = summarize.build(lake, lake.open_delta("instances", after))
    seconds = time.perf_counter() - t
    peak = _status_kib("VmHWM")
    digest = {}
    for name, table in rows.items():
        key, keys = summarize.KEYS[name], set(wanted[name] if wanted else [])
        digest[name] = sorted(repr(sorted(r.items())) for r in table.to_pylist()
                              if r[key] in keys)
    queue.put({"seconds": seconds, "peak_mib": peak / 1024, "base_mib": rss0 / 1024,
               "rows": {k: v.num_rows for k, v in rows.items()}, "keys": wanted,
               "digest": digest})


def run_child(kind: str, lake_dir: Path, before: int, after: int, studies_before: int,
              wanted: dict | None = None) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(kind, str(lake_dir), before, after, studies_before,
                                         wanted, queue))
    p.start()
    result = queue.get()
    p.join()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--add", type=int, default=0, help="new files (default 1 %% of --files)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where archives are kept (bench/ingest.py's --workdir)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--optimize", action="store_true",
                    help="run `lake optimize` between the full ingest and the nightly run "
                         "(the update must tell rows moved into compacted files from new ones)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from ingest import archive_files, prepare_archive

    from etl import ingest
    from etl.config import IngestConfig
    from lakehouse import Lake

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    workdir = args.workdir or Path(tempfile.gettempdir()) / "lake-bench"
    workdir.mkdir(parents=True, exist_ok=True)
    root, _, _ = prepare_archive(workdir, args.files, args.seed, log, kind="small")
    scratch = Path(tempfile.mkdtemp(prefix="summaries-", dir=workdir))
    try:
        lake_dir = scratch / "lake"
        lake = Lake.create(lake_dir, profile="identified")
        t = time.perf_counter()
        full = ingest(lake, root, IngestConfig())
        log(f"full ingest of {full.files_seen} files: {time.perf_counter() - t:.1f} s")
        before = lake.delta("instances").version()
        if args.optimize:
            from lakehouse.optimize import optimize

            t = time.perf_counter()
            done = optimize(lake).tables["instances"]
            log(f"optimize: instances files {done.files_before} -> {done.files_after} "
                f"({time.perf_counter() - t:.1f} s)")
        studies_before = lake.delta("studies").version()
        n_add = args.add or max(args.files // 100, 1)
        added = add_files(archive_files(root), scratch / "added", n_add)
        t = time.perf_counter()
        run = ingest(lake, scratch / "added", IngestConfig())
        run_seconds = time.perf_counter() - t
        after = lake.delta("instances").version()
        from catalog import open_lake

        with open_lake(lake_dir) as cat:
            summarize_seconds = cat.con.execute(
                "SELECT summarize_seconds FROM ingest_runs ORDER BY finished_at DESC LIMIT 1"
            ).fetchall()[0][0]
        log(f"added {added} files: run {run_seconds:.2f} s, its summaries "
            f"{summarize_seconds:.2f} s, {run.summaries} ({run.outcomes['ingested']} "
            "ingested)")
        upd = [run_child("update", lake_dir, before, after, studies_before)
               for _ in range(args.repeat)]
        if upd[0].get("rebuild_chosen"):
            b = run_child("build", lake_dir, before, after, studies_before, None)["seconds"]
            print(f"update chose a whole rebuild (after {upd[0]['seconds']:.3f} s of "
                  f"deciding); the rebuild: {b:.3f} s; the run: {run.summaries}; load "
                  f"average {tuple(round(x, 2) for x in os.getloadavg())}")
            return 0
        wanted = upd[0]["keys"]
        reb = [run_child("build", lake_dir, before, after, studies_before, wanted)
               for _ in range(args.repeat)]
        same = upd[0]["digest"] == reb[0]["digest"]
        u = min(r["seconds"] for r in upd)
        b = min(r["seconds"] for r in reb)
        report = {
            "files": full.files_seen, "added": added, "ingested": run.outcomes["ingested"],
            "instances_rows": lake.count("instances"),
            "optimized": args.optimize, "run_summaries": run.summaries,
            "run_seconds": run_seconds, "run_summarize_seconds": summarize_seconds,
            "update_seconds": u, "rebuild_seconds": b, "speedup": b / u,
            "update_peak_mib": max(r["peak_mib"] for r in upd),
            "rebuild_peak_mib": max(r["peak_mib"] for r in reb),
            "process_base_mib": min(r["base_mib"] for r in upd + reb),
            "update_rows": upd[0]["rows"], "rebuild_rows": reb[0]["rows"],
            "same_rows": same, "load_average": os.getloadavg(),
        }
    finally:
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"lake of {report['files']:,} files ({report['instances_rows']:,} instances), "
              f"+{report['added']} files ({report['ingested']} ingested)")
        print(f"  the run{' after lake optimize' if args.optimize else ''}: "
              f"{report['run_seconds']:.2f} s, of which summaries "
              f"{report['run_summarize_seconds']:.2f} s (commits included), "
              f"{report['run_summaries']}")
        print(f"  rows only, best of {args.repeat}: update {u:.3f} s "
              f"(peak {report['update_peak_mib']:.0f} MiB) vs rebuild {b:.3f} s "
              f"(peak {report['rebuild_peak_mib']:.0f} MiB): {report['speedup']:.1f}x")
        print(f"  RSS before either: {report['process_base_mib']:.0f} MiB (imports, the lake "
              "opened)")
        print(f"  changed rows {report['update_rows']} of {report['rebuild_rows']}; "
              f"same rows as the rebuild: {same}")
        print(f"  load average {tuple(round(x, 2) for x in report['load_average'])}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
