"""Benchmark: a run's index of the files read before, of the whole lake against the files
below the run's source only.

Each ingest run scans the vault's ``files`` table into an in-memory index (path, size,
mtime: ``etl.seen``) to skip the files it read before unchanged. A listener runs once per
batch, on a new staging folder; a nightly ``lake ingest`` of the day's folder runs on a
small part of a large archive. Both need only the files below their source.

1. Builds a lake whose ``files`` table holds ``--runs`` runs of ``--per-run`` files, each
   run one folder (``/archive/2025/NNN/...``), committed as ingest commits them.
2. Times ``etl.seen.Hasher.table_keys`` over ``files`` (best of ``--repeat``):
   - **whole**: every file of the lake (what each run did before);
   - **below**: the files below the source (``etl.seen.under``), for the last run's
     folder (``--per-run`` files) and for a listener's new batch folder (none).
   It checks that the index below the folder holds exactly that folder's files, and
   prints the ratio.

    python bench/file_index.py [--runs 50] [--per-run 100000] [--repeat 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(root: Path, runs: int, per_run: int) -> None:
    import numpy as np
    import pyarrow as pa

    from lakehouse import Lake
    from lakehouse.schemas import TABLES

    lake = Lake.create(root, profile="identified")
    schema = TABLES["files"].storage_schema("identified")
    for r in range(runs):
        n = per_run
        table = pa.table({
            "path": [f"/archive/2025/{r:03d}/{k // 100:05d}/{k:06d}.dcm" for k in range(n)],
            "file_size": pa.array(np.full(n, 12_345)),
            "mtime_ns": pa.array(np.arange(n) * 7),
            "file_sha256": ["ab" * 32] * n, "source_sha256": ["cd" * 32] * n,
            "checksum_bytes": pa.array(np.full(n, 4_000)), "outcome": ["ingested"] * n,
            "reason": pa.nulls(n, pa.string()), "message": pa.nulls(n, pa.string()),
            "SOPInstanceUID": [f"1.2.3.{r}.{k}" for k in range(n)],
            "ingest_run_id": [f"run{r:04d}"] * n}, schema=schema)
        with lake.writer(f"run{r:04d}") as w:
            w.append("files", table)
            w.publish(note=f"run {r}")


def best(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--per-run", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the lake goes (kept, and reused when built the same way)")
    args = parser.parse_args(argv)

    from etl import seen
    from lakehouse import Lake

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-file-index-"))
    root = work / f"lake-{args.runs}x{args.per_run}"
    if not (root / "built").exists():
        t = time.perf_counter()
        build(root, args.runs, args.per_run)
        (root / "built").touch()
        print(f"built {args.runs * args.per_run:,} files rows in {args.runs} runs "
              f"({time.perf_counter() - t:.1f} s)")
    lake = Lake.open(root)
    dt = lake.open_delta("files")
    hasher = seen.Hasher()
    whole_s, whole = best(lambda: hasher.table_keys(lake, "files", dt, *seen.FILE_KEY),
                          args.repeat)
    print(f"{'source':<28} {'index rows':>11} {'whole s':>8} {'below s':>8} {'x':>6}")
    last = f"/archive/2025/{args.runs - 1:03d}"
    batch = "/lake/vault/staging/listen-batch-20261201T040815Z-6d53c548"
    for label, source, expected in (("the last run's folder", last, args.per_run),
                                    ("a listener's new batch", batch, 0)):
        below_s, below = best(lambda s=source: hasher.table_keys(
            lake, "files", dt, *seen.FILE_KEY, *seen.under(s, True)), args.repeat)
        if len(below[0]) != expected:
            raise SystemExit(f"{source}: {len(below[0])} rows indexed, not {expected}")
        print(f"{label:<28} {len(below[0]):>11,} {whole_s:>8.3f} {below_s:>8.3f} "
              f"{whole_s / below_s:>6.1f}")
    print(f"(whole: {len(whole[0]):,} rows)")
    hasher.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
