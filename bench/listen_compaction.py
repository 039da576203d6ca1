"""Benchmark: a listener's micro-batches into a large lake, with the runs' tiered
compaction against compaction of every small file of a partition together.

An ingest run compacts, at its end, the small files earlier runs left in the tables it
wrote to (``IngestConfig.compact_files``). Each of a listener's batches adds a small file
to every ``instances`` partition it touches. Before tiers, once enough had gathered, they
were rewritten together with their partition's large file (a first run's, below the 16 MiB
a run compacts): in a lake of 1,000,000 instances, every fourth batch or so rewrote a
dozen partitions, 3-4 s in a batch of 1 s. Tiered (``lakehouse.optimize._groups``,
``tiered=True``), the small files are merged with files of about their size, and a large
file only once they add up to half its size.

1. Builds (or reuses) ``bench/listen_batches.py``'s research lake of ``--files`` small
   files, and copies it: two equal lakes.
2. Runs ``--rounds`` rounds of ``--batches`` batch folders (``--per-batch`` new instances
   and a duplicate each; new SOPInstanceUIDs every round) into both lakes, alternating
   which goes first, with the processes scheduler as `lake listen` runs: lake A with the
   compaction of every small file of a partition together (as before), lake B tiered.
   The first batch, which compacts the files the lake's first run left (both sides the
   same way), is reported on its own.
3. Prints, per side: the mean, median and slowest batch, the seconds spent compacting,
   the data files of ``instances`` at the end (and the most in one partition), and a
   query over ``instances`` (count by Modality, best of 5): what more files cost.
4. Checks that both lakes recorded the same outcomes for every batch and hold the same
   instances.

    python bench/listen_compaction.py [--files 100000] [--rounds 3] [--batches 10]
                                      [--per-batch 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.listen_batches import base_lake, make_batches


def instances_files(lake) -> tuple[int, int]:
    """The data files of ``instances`` and the most in one partition."""
    from lakehouse.tables import add_actions

    adds = add_actions(lake.delta("instances")).to_pylist()
    parts = Counter(tuple(v for k, v in sorted(a.items()) if k.startswith("partition."))
                    for a in adds)
    return len(adds), max(parts.values())


def query_seconds(path: Path, repeat: int = 5) -> float:
    from catalog import open_lake

    best = float("inf")
    with open_lake(path) as cat:
        for _ in range(repeat):
            t = time.perf_counter()
            cat.arrow("SELECT Modality, count(*) FROM instances GROUP BY 1")
            best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--per-batch", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the archive and lakes go (the archive is reused)")
    args = parser.parse_args(argv)

    from etl import IngestConfig, ingest, jobs, seen
    from lakehouse import Lake

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-listen-compaction-"))
    archive, key, base = base_lake(work, args.files)
    sides = {"A": False, "B": True}  # tiered?
    paths = {side: work / f"compaction-lake-{side}" for side in sides}
    for path in paths.values():
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(base, path, symlinks=True)
    lakes = {side: Lake.open(path) for side, path in paths.items()}

    now = {"tiered": True, "seconds": 0.0}
    real = jobs.compact

    @functools.wraps(real)
    def compact(*a, **k):
        k["tiered"] = now["tiered"]
        t = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            now["seconds"] += time.perf_counter() - t

    jobs.compact = compact  # type: ignore[assignment]
    config = IngestConfig(scheduler="processes")  # as `lake listen` runs its batches
    kept = {side: seen.Kept() for side in sides}
    walls: dict[str, list[float]] = {side: [] for side in sides}
    compacting = {side: 0.0 for side in sides}
    first = {}
    n = 0
    for _ in range(args.rounds):
        folders = make_batches(archive, work / "batches", args.batches, args.per_batch)
        for folder in folders:
            outcomes = {}
            for side in (("A", "B") if n % 2 == 0 else ("B", "A")):
                now.update(tiered=sides[side], seconds=0.0)
                t = time.perf_counter()
                run = ingest(lakes[side], folder, config, key_file=key, kept=kept[side])
                wall = time.perf_counter() - t
                outcomes[side] = {k: v for k, v in run.outcomes.items() if v}
                if n == 0:
                    first[side] = wall
                else:
                    walls[side].append(wall)
                    compacting[side] += now["seconds"]
            if outcomes["A"] != outcomes["B"]:
                print(f"batch {n}: the lakes differ: {outcomes}")
                return 1
            n += 1
    uids = {side: sorted(lakes[side].read("instances", columns=["SOPInstanceUID"])
                         .column(0).to_pylist()) for side in sides}
    if uids["A"] != uids["B"]:
        print("the lakes hold different instances")
        return 1
    queries = {side: [] for side in sides}
    for i in range(3):
        for side in (("A", "B") if i % 2 == 0 else ("B", "A")):
            queries[side].append(query_seconds(paths[side]))
    print(f"{n} batches of {args.per_batch} new instances and a duplicate into a research "
          f"lake of {args.files:,} files ({len(uids['A']):,} instances at the end); the "
          f"first batch (compacting the first run's files): {first['A']:.2f} s and "
          f"{first['B']:.2f} s")
    print(f"{'compaction':24} {'mean s':>7} {'median s':>9} {'slowest s':>10} "
          f"{'compacting s':>13} {'files':>6} {'most in a partition':>20} {'query s':>8}")
    figures = {}
    for side, label in (("A", "a partition's all at once"), ("B", "tiered")):
        w = walls[side]
        files, most = instances_files(lakes[side])
        figures[side] = (statistics.mean(w), statistics.median(w), max(w), compacting[side],
                         files, most, min(queries[side]))
        f = figures[side]
        print(f"{label:24} {f[0]:7.3f} {f[1]:9.3f} {f[2]:10.3f} {f[3]:13.1f} {f[4]:6d} "
              f"{f[5]:20d} {f[6]:8.3f}")
    a, b = figures["A"], figures["B"]
    print(f"ratio (before / tiered): mean batch {a[0] / b[0]:.2f}x, slowest {a[2] / b[2]:.2f}x,"
          f" compacting {a[3] / max(b[3], 1e-9):.1f}x; query {a[6] / b[6]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
