"""Benchmark: ingest on a real Dask cluster with 1 and 2 workers, and DICOMweb ingest
against filesystem ingest of the same studies.

In one run, on one generated archive (page cache warmed first):

1. **Cluster scaling**: a `dask scheduler` and N `dask worker` processes
   (`--nthreads 1`) on loopback; `ingest(..., IngestConfig(scheduler=address))` into a
   fresh lake with 1 worker, then with 2. Baseline: the 1-worker run.
2. **DICOMweb vs folder**: Orthanc (Debian packages) on loopback is loaded with the
   archive (not timed); then the folder is ingested, and the same studies are
   ingested from Orthanc (`lake ingest dicomweb+http://...`: QIDO-RS listing, WADO-RS
   fetch into the vault's staging, the same folder pipeline). Both use the same
   IngestConfig (Dask's local process scheduler). Baseline: the folder run.
3. **S3 lake vs local lake**: the folder is ingested into a lake in a local folder,
   then into a lake on S3-compatible object storage (a moto server on loopback, in a
   process of its own: every Parquet file, Delta commit and snapshot an HTTP request),
   with the same IngestConfig. Baseline: the local lake.

Figures are ratios against the baseline measured in the same run (the machine is
shared and noisy; the load average is printed with them). Not a test; DIMSE is not
benchmarked (60-120 ms per C-STORE between local peers here).

    python bench/sources.py [--files 1000] [--preset demo] [--repeat 1] [--workdir DIR]
                            [--only cluster,dicomweb,s3lake] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' helpers


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def warm(root: Path) -> int:
    total = 0
    for folder, _dirs, names in os.walk(root):
        for n in names:
            total += len(Path(folder, n).read_bytes())
    return total


def timed_ingest(workdir: Path, name: str, source, config, lake_at=None) -> tuple[float, dict]:
    """Seconds to ingest ``source`` into a new lake (``lake_at``: a location, e.g. an
    ``s3://`` URL; default ``workdir/name``), and what the run did."""
    from etl import ingest
    from etl.sources import ingest_remote
    from lakehouse import Lake

    path = workdir / name
    if path.exists():
        shutil.rmtree(path)
    lake = Lake.create(lake_at or path, profile="identified")
    t = time.perf_counter()
    if isinstance(source, Path):
        s = ingest(lake, source, config)
        seconds = time.perf_counter() - t
        info = {"files_seen": s.files_seen, "ingested": s.outcomes["ingested"]}
    else:
        p = ingest_remote(lake, source, config)
        seconds = time.perf_counter() - t
        assert p.run is not None
        info = {"files_seen": p.run.files_seen, "ingested": p.run.outcomes["ingested"],
                "fetch_seconds": round(p.fetch_seconds, 3), "fetched": p.fetched,
                "failed": p.failed}
    if lake.local:
        shutil.rmtree(path)
    return seconds, info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--preset", default="demo", choices=["test", "demo", "bench"])
    ap.add_argument("--repeat", type=int, default=1, help="rounds; the fastest time counts")
    ap.add_argument("--workdir")
    ap.add_argument("--only", default="cluster,dicomweb,s3lake",
                    help="comma-separated sections to run (default: all)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from etl import IngestConfig
    from etl.sources import resolve
    from synth import generate_archive
    from tests.etl.cluster import dask_cluster
    from tests.pacs import orthanc_missing, run_orthanc
    from tests.s3server import moto_missing, run_moto

    only = {x.strip() for x in args.only.split(",") if x.strip()}
    loads: list[tuple[float, float, float]] = []

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-sources-"))
    workdir.mkdir(parents=True, exist_ok=True)
    archive = workdir / "archive"
    if not archive.exists():
        log(f"generating ~{args.files} files ({args.preset} preset) ...")
        generate_archive(archive, seed=0, preset=args.preset, target_files=args.files)
    size = warm(archive)
    n_files = sum(len(f) for _, _, f in os.walk(archive))
    log(f"archive: {n_files} files, {size / 1e6:.1f} MB (page cache warmed)")
    times: dict[str, list[float]] = {}
    info: dict[str, dict] = {}

    def record(key: str, seconds: float, detail: dict) -> None:
        times.setdefault(key, []).append(seconds)
        info[key] = detail
        log(f"  {key}: {seconds:.2f} s {detail}")

    for r in range(args.repeat):
        loads.append(os.getloadavg())
        if "s3lake" in only:
            why = moto_missing()
            if why:
                log(f"skipping S3 lake vs local lake: {why}")
            else:
                log(f"round {r + 1}: S3 lake vs local lake")
                with run_moto(workdir / "moto.log") as s3:
                    os.environ.update(s3.env)
                    s3.create_bucket("bench")
                    cfg = IngestConfig(batch_files=64)
                    record("local_lake", *timed_ingest(workdir, "lake-l", archive, cfg))
                    record("s3_lake", *timed_ingest(workdir, "lake-s", archive, cfg,
                                                    lake_at=f"s3://bench/lake-{r}"))
        if "cluster" not in only:
            continue
        log(f"round {r + 1}: cluster scaling")
        for n in (1, 2):
            logs = workdir / f"dask-{n}"
            logs.mkdir(exist_ok=True)
            with dask_cluster(logs, n_workers=n) as cluster:
                cfg = IngestConfig(scheduler=cluster.address, batch_files=64)
                record(f"cluster_{n}_worker", *timed_ingest(workdir, "lake-c", archive, cfg))
        why = orthanc_missing() if "dicomweb" in only else "not asked for (--only)"
        if why:
            log(f"skipping DICOMweb vs folder: {why}")
            continue
        log(f"round {r + 1}: DICOMweb vs folder")
        with run_orthanc() as pacs:
            t = time.perf_counter()
            stored = pacs.upload_folder(archive)
            log(f"  loaded Orthanc with {stored} instances in {time.perf_counter() - t:.1f} s")
            cfg = IngestConfig(batch_files=64)
            record("folder", *timed_ingest(workdir, "lake-f", archive, cfg))
            record("dicomweb", *timed_ingest(workdir, "lake-w",
                                              resolve(f"dicomweb+{pacs.dicomweb}"), cfg))

    best = {k: min(v) for k, v in times.items()}
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_at_start_of_rounds": [[round(x, 2) for x in la] for la in loads],
                    "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "archive": {"files": n_files, "MB": round(size / 1e6, 1), "preset": args.preset},
        "seconds": {k: round(v, 3) for k, v in best.items()},
        "files_per_second": {k: round(info[k]["files_seen"] / v, 1) for k, v in best.items()
                             if info[k]["files_seen"]},
        "details": info,
        "ratios": {},
    }
    if "cluster_1_worker" in best and "cluster_2_worker" in best:
        report["ratios"]["speedup_2_workers_vs_1"] = round(
            best["cluster_1_worker"] / best["cluster_2_worker"], 2)
    if "folder" in best and "dicomweb" in best:
        report["ratios"]["dicomweb_time_vs_folder"] = round(best["dicomweb"] / best["folder"], 2)
        report["ratios"]["dicomweb_fetch_share"] = round(
            info["dicomweb"]["fetch_seconds"] / best["dicomweb"], 2)
    if "local_lake" in best and "s3_lake" in best:
        report["ratios"]["s3_lake_time_vs_local_lake"] = round(
            best["s3_lake"] / best["local_lake"], 2)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"archive: {n_files} files, {report['archive']['MB']} MB; "
              f"{os.cpu_count()} CPUs (shared); load average "
              f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min) at the end, "
              f"{loads[0][0] if loads else 0:.2f} at the start")
        for k, v in best.items():
            print(f"  {k:<18} {v:8.2f} s  {report['files_per_second'].get(k, 0):8.1f} files/s")
        for k, v in report["ratios"].items():
            print(f"  {k:<30} {v}")
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
