"""Benchmark: a listener's micro-batches into a large lake, with the lake's indexes kept
from one batch to the next (``etl.seen.Kept``) against scanned at every batch.

Every ingest run asks, of each instance it reads, whether the lake already holds its
SOPInstanceUID (``instances``) and, in a research lake, which pseudonym pairs the vault
already has (``identifiers``). A run scans both tables once into in-memory indexes; a
listener runs once per batch (every 10 s by default), so that scan, which grows with the
lake, was paid at every batch. `lake listen` now keeps the indexes between its batches.

1. Generates (or reuses) an archive of ``--files`` small files (``bench/ingest.py``'s
   generator), ingests it into a research lake, and copies that lake: two equal lakes.
2. Makes ``--batches`` folders of ``--per-batch`` new instances (archive files given new
   SOPInstanceUIDs, and one copy of an instance already in the lake per batch).
3. Ingests each batch into both lakes, alternating which goes first: lake A with a new
   index per run (as before), lake B with one ``Kept`` shared by its runs (as `lake
   listen` does now). Prints, per side, the median and best wall time per batch and the
   time spent making the indexes, with the ratios; the first batch of B (nothing kept
   yet) is left out.
4. Checks that both lakes recorded the same outcomes for every batch.

    python bench/listen_batches.py [--files 100000] [--batches 10] [--per-batch 5]
                                   [--workdir DIR]
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_batches(archive: Path, out: Path, batches: int, per_batch: int) -> list[Path]:
    """``batches`` folders of ``per_batch`` new instances each, and one copy of an archive
    file (a duplicate) each."""
    import pydicom
    from pydicom.uid import generate_uid

    from bench.ingest import archive_files

    files = [p for p in archive_files(archive) if p.suffix == ".dcm"]
    folders = []
    for b in range(batches):
        folder = out / f"batch-{b:03d}"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for k in range(per_batch):
            source = files[(b * per_batch + k) * 97 % len(files)]
            ds = pydicom.dcmread(source, force=True)
            if "SOPInstanceUID" not in ds:
                continue
            ds.SOPInstanceUID = generate_uid()
            ds.save_as(folder / f"new-{k}.dcm")
        shutil.copyfile(files[b * 131 % len(files)], folder / "duplicate.dcm")
        folders.append(folder)
    return folders


def base_lake(work: Path, files: int) -> tuple[Path, Path, Path]:
    """The archive of ``files`` small files (``bench/ingest.py``'s, generated or reused)
    and a research lake of it (built once, then reused): (archive, key file, lake)."""
    from bench.ingest import prepare_archive
    from etl import ingest
    from lakehouse import Lake

    work.mkdir(parents=True, exist_ok=True)
    archive, _, _ = prepare_archive(work, files, 7, print, kind="small")
    key = work / "listen-bench.key"
    base = work / f"listen-lake-{files}"
    if not (base / "built").exists():
        shutil.rmtree(base, ignore_errors=True)
        key.unlink(missing_ok=True)
        t = time.perf_counter()
        run = ingest(Lake.create(base, key_file=key), archive, key_file=key)
        (base / "built").write_text("ok\n")
        print(f"lake of {run.outcomes['ingested']:,} instances built in "
              f"{time.perf_counter() - t:.1f} s")
    return archive, key, base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--per-batch", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the archive and lakes go (the archive is reused)")
    args = parser.parse_args(argv)

    from etl import IngestConfig, ingest, jobs, seen
    from lakehouse import Lake

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-listen-batches-"))
    archive, key, base = base_lake(work, args.files)
    lakes = {}
    for side in ("A", "B"):
        path = work / f"listen-lake-{side}"
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(base, path, symlinks=True)
        lakes[side] = Lake.open(path)
    folders = make_batches(archive, work / "batches", args.batches, args.per_batch)

    indexing = {"now": 0.0}
    real = jobs._Job._index

    @functools.wraps(real)
    def timed(self, name):
        t = time.perf_counter()
        try:
            return real(self, name)
        finally:
            indexing["now"] += time.perf_counter() - t

    jobs._Job._index = timed  # type: ignore[method-assign]
    config = IngestConfig(scheduler="processes")  # as `lake listen` runs its batches
    kept = seen.Kept()
    rows: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
    for i, folder in enumerate(folders):
        outcomes = {}
        for side in (("A", "B") if i % 2 == 0 else ("B", "A")):
            indexing["now"] = 0.0
            t = time.perf_counter()
            run = ingest(lakes[side], folder, config, key_file=key,
                         kept=kept if side == "B" else None)
            wall = time.perf_counter() - t
            outcomes[side] = {k: v for k, v in run.outcomes.items() if v}
            if side == "A" or i > 0:
                rows[side].append((wall, indexing["now"]))
        if outcomes["A"] != outcomes["B"]:
            print(f"batch {i}: the lakes differ: {outcomes}")
            return 1
    print(f"{args.batches} batches of {args.per_batch} new instances and a duplicate, into "
          f"a research lake of {args.files:,} files; indexes kept: {kept.taken} taken, "
          f"{kept.missed} scanned")
    print(f"{'':26} {'median s':>9} {'best s':>9} {'indexes, median s':>18}")
    figures = {}
    for side, label in (("A", "scanned at every batch"), ("B", "kept between batches")):
        walls, idx = [w for w, _ in rows[side]], [x for _, x in rows[side]]
        figures[side] = (statistics.median(walls), min(walls), statistics.median(idx))
        print(f"{label:26} {figures[side][0]:9.3f} {figures[side][1]:9.3f} "
              f"{figures[side][2]:18.3f}")
    a, b = figures["A"], figures["B"]
    print(f"ratio (scanned / kept): batch median {a[0] / b[0]:.2f}x, best "
          f"{a[1] / b[1]:.2f}x; indexes {a[2] * 1000:.0f} ms -> {b[2] * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
