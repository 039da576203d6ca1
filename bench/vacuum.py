"""Benchmark: the files a lake's snapshots reference, replayed from the Delta log, against
deltalake's state of every snapshot's version loaded whole.

`lake vacuum` (with or without ``--expire-days``) must know every data file some kept
snapshot references. A lake fed by `lake listen` publishes a snapshot per batch: 8,640 a
day at the default 10 s.

1. Builds a lake of ``--snapshots`` small runs, as a listener's batches leave it: each
   appends a few rows to ``instances``, ``files`` and ``ingest_runs`` and publishes a
   snapshot; every ``--compact-every`` runs, ``lake optimize`` compacts them (removes and
   adds, as the runs' own compaction does).
2. Times, for every table (best of ``--repeat``):
   - **replay**: ``lakehouse.vacuum.referenced_files`` (the state loaded at the first
     snapshot's version, the later commits replayed from their log files);
   - **state**: the reference, deltalake's ``DeltaTable(version=v).get_add_actions()``
     for each snapshot's version (what vacuum did before).
   It checks that both give the same set of files, and prints the ratio.
3. Times `lake verify` (which reads the checksums from every commit of the log) before
   and after ``vacuum(expire_days=0)`` cleans the log of what no kept snapshot needs.

    python bench/vacuum.py [--snapshots 300] [--compact-every 50] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(root: Path, snapshots: int, compact_every: int):
    import pyarrow as pa

    from lakehouse import Lake
    from lakehouse.optimize import optimize

    lake = Lake.create(root / "lake", profile="identified")
    for i in range(snapshots):
        with lake.writer(f"run{i}") as w:
            w.append("instances", pa.table({"SOPInstanceUID": [f"1.2.{i}.{j}" for j in range(5)],
                                            "Modality": ["CT", "MR", "CT", "DX", "CT"]}))
            w.append("files", pa.table({"path": [f"/in/{i}/{j}.dcm" for j in range(5)],
                                        "outcome": ["ingested"] * 5}))
            w.append("ingest_runs", pa.table({"ingest_run_id": [f"run{i}"]}))
            w.publish(f"batch {i}")
        if compact_every and (i + 1) % compact_every == 0:
            optimize(lake, ["instances", "files", "ingest_runs"], small_bytes=2**30)
    return lake


def by_state(lake, name: str) -> set[str]:
    out: set[str] = set()
    for v in sorted({s.versions[name] for s in lake.snapshots() if name in s.versions}):
        for p in lake.open_delta(name, v).get_add_actions(flatten=True).column("path") \
                .to_pylist():
            out |= {p, unquote(p)}
    return out


def best(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def main(argv: list[str] | None = None) -> int:
    from lakehouse.vacuum import referenced_files

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--snapshots", type=int, default=300)
    ap.add_argument("--compact-every", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        lake = build(Path(tmp), args.snapshots, args.compact_every)
        print(f"lake of {len(lake.snapshot_numbers())} snapshots built in "
              f"{time.perf_counter() - t:.1f} s; load average {os.getloadavg()[0]:.2f}")
        print(f"{'table':<12} {'versions':>8} {'files':>6} {'replay s':>9} {'state s':>9} "
              f"{'state/replay':>12}")
        for name in ("instances", "files", "ingest_runs"):
            replay_s, replayed = best(lambda n=name: referenced_files(lake, n), args.repeat)
            state_s, stated = best(lambda n=name: by_state(lake, n), args.repeat)
            if replayed != stated:
                print(f"MISMATCH in {name}: {len(replayed ^ stated)} paths differ")
                return 1
            versions = len({s.versions[name] for s in lake.snapshots()})
            files = len({unquote(p) for p in replayed})
            print(f"{name:<12} {versions:>8} {files:>6} {replay_s:>9.3f} "
                  f"{state_s:>9.3f} {state_s / replay_s:>11.1f}x")
        print(f"load average {os.getloadavg()[0]:.2f}; the same files by both methods")
        return clean_log_figures(lake, args.repeat)


def clean_log_figures(lake, repeat: int) -> int:
    """`lake verify` reads the checksums from every commit in the log: timed before and
    after `lake vacuum --expire-days 0` cleans the log of what the latest snapshot does
    not need (the checksums carried to ``_lake_checksums.json``)."""
    from lakehouse.vacuum import vacuum
    from lakehouse.verify import verify

    def log_files() -> int:
        return sum(len(lake.storage.listdir(f"{zone}/{name}/_delta_log"))
                   for zone in ("research", "vault") for name in lake.storage.listdir(zone)
                   if lake.storage.exists(f"{zone}/{name}/_delta_log"))

    before_n = log_files()
    before_s, before = best(lambda: verify(lake), repeat)
    t = time.perf_counter()
    report = vacuum(lake, retention_hours=0, expire_days=0)
    vacuum_s = time.perf_counter() - t
    after_n = log_files()
    after_s, after = best(lambda: verify(lake), repeat)
    if not (before.ok and after.ok and after.files_without_checksum == 0
            and after.files_checked == before.files_checked):
        print("VERIFY DIFFERS after the log was cleaned")
        return 1
    print(f"vacuum --expire-days 0: {len(report.expired)} snapshots expired, "
          f"{sum(map(len, report.log_removed.values()))} log files removed in {vacuum_s:.2f} s")
    print(f"lake verify: {before_n} log files {before_s:.3f} s, {after_n} log files "
          f"{after_s:.3f} s ({before_s / after_s:.1f}x); {after.files_checked} data files "
          "checked, all with their checksums")
    return 0


if __name__ == "__main__":
    sys.exit(main())
