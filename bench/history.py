"""Benchmark: a nightly run into a lake with a long history, against the same run into a
lake with one run behind it.

A hospital's lake is written every night for months. Whatever a run pays per table
version, per commit or per data file grows with that history, and the other
benchmarks start from fresh lakes. This one measures it.

1. Reuses (or generates, as ``bench/ingest.py`` does) an archive of about ``--files``
   small files. Two source folders link to it (``fresh/src/base``, ``aged/src/base``);
   each is ingested into a lake of its own (research profile, header checksums).
2. ``--nights`` nightly runs into two aged lakes of the same source: each adds ``--add``
   new files to a folder of its own under ``aged/src/nightly`` (``bench/summaries.add_files``:
   new studies of existing patients dated today, a few late images of existing series)
   and ingests the whole source, as a nightly job would (in this process, the
   ``synchronous`` scheduler; no ``lake optimize``). The *aged* lake's runs never compact
   (``compact_files=0``, as before runs compacted); the *aged, compacting* lake's runs
   compact as ``lake ingest`` does by default (``IngestConfig.compact_files``).
3. Times ``lake ingest`` as a user runs it (a fresh process, the whole command; with
   ``--compact-files 0`` for the *aged* lake), best of ``--repeat``, the lakes
   alternating, each on a copy of its lake:
   - *nightly*: a run that finds ``--add`` new files in a folder of its own;
   - *no-op*: a run that finds nothing new.
   With ``--optimize``, also into a copy of the *aged* lake after ``lake optimize``.
4. Times two queries as a quality team runs them (a fresh process, the whole command,
   best of ``--repeat``, the lakes alternating; each lake as its nightly runs left it):
   - *report*: ``lake report utilization --by month,Modality --format csv`` (opening
     the catalog reads the footer of every live ``instances``, ``series`` and
     ``studies`` file);
   - *instances*: ``lake sql`` of a count of ``instances`` by Modality (a scan of
     every live ``instances`` file).
   Prints each lake against the fresh one, and the lakes' shapes: table versions, live
   data files (those of the current version), data files on disk, JSON commits since
   each table's last checkpoint.

    python bench/history.py [--files 5000] [--nights 100] [--add 20] [--repeat 3]
                            [--workdir DIR] [--optimize] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from ingest import archive_files, prepare_archive  # noqa: E402
from summaries import add_files  # noqa: E402


def lake_shape(lake_dir: Path) -> dict:
    """Per table: its latest version, its live data files (the current version's), data
    files on disk, and the JSON commits after its last checkpoint (what opening it
    replays)."""
    from deltalake import DeltaTable

    out = {}
    for zone in ("research", "vault"):
        for table in sorted((lake_dir / zone).iterdir()):
            log = table / "_delta_log"
            if not log.is_dir():
                continue
            versions = [int(p.name[:20]) for p in log.glob("*.json")]
            last = max(versions)
            marker = log / "_last_checkpoint"
            checkpoint = json.loads(marker.read_text())["version"] if marker.exists() else -1
            files = sum(1 for p in table.rglob("*.parquet") if "_delta_log" not in p.parts)
            live = len(DeltaTable(str(table)).file_uris())
            out[table.name] = {"version": last, "live_files": live, "data_files": files,
                               "replayed_commits": last - max(checkpoint, 0)}
    return out


def run_command(lake_dir: Path, source: Path, options: list[str]) -> float:
    """``lake ingest SOURCE --lake LAKE [options]`` in a fresh process: its wall time."""
    t = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "lake_cli.py"), "ingest", str(source),
                    "--lake", str(lake_dir), "--no-progress", *options], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


QUERIES = {
    "report": ["report", "utilization", "--by", "month,Modality", "--format", "csv"],
    "instances": ["sql", "SELECT Modality, count(*) AS n FROM instances GROUP BY ALL",
                  "--format", "csv"],
}


def run_query(lake_dir: Path, args: list[str]) -> float:
    """``lake ARGS --lake LAKE`` in a fresh process: its wall time."""
    t = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "lake_cli.py"), *args, "--lake", str(lake_dir)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def timed(lake: Path, source: Path, options: list[str], scratch: Path,
          tonight: Path | None) -> float:
    """The command on a copy of ``lake``; ``tonight`` (a folder of new files) is linked
    into ``source`` for the run and unlinked after."""
    copy = scratch / "lake"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(lake, copy, symlinks=True)
    link = source / "tonight"
    if tonight is not None:
        link.symlink_to(tonight, target_is_directory=True)
    try:
        return run_command(copy, source, options)
    finally:
        if tonight is not None:
            link.unlink()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=5000, help="archive size (small files)")
    p.add_argument("--nights", type=int, default=100, help="nightly runs into the aged lake")
    p.add_argument("--add", type=int, default=20, help="new files per nightly run")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the archive is kept (default: a temporary folder)")
    p.add_argument("--optimize", action="store_true",
                   help="also time the aged lake after `lake optimize`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from etl import ingest
    from etl.config import IngestConfig
    from lakehouse import Lake

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-history-"))
    workdir.mkdir(parents=True, exist_ok=True)
    archive, _, _ = prepare_archive(workdir, args.files, args.seed, log, kind="small")
    files = archive_files(archive)
    run = Path(tempfile.mkdtemp(prefix="history-", dir=workdir))
    try:
        lakes, sources = {}, {}
        for name in ("fresh", "aged"):
            src = run / name / "src"
            src.mkdir(parents=True)
            (src / "base").symlink_to(archive, target_is_directory=True)
            lakes[name] = Lake.create(run / name / "lake", key_file=run / "lake.key")
            sources[name] = src
            t = time.perf_counter()
            ingest(lakes[name], src, IngestConfig(scheduler="processes"),
                   key_file=run / "lake.key")
            log(f"{name}: first run {time.perf_counter() - t:.1f} s")
        # the second aged lake: its first run as the aged lake's, from a copy of it
        compacting = run / "aged-compacting"
        shutil.copytree(run / "aged" / "lake", compacting, symlinks=True)
        lakes["compacting"] = Lake.open(compacting)
        configs = {"aged": IngestConfig(scheduler="synchronous", compact_files=0),
                   "compacting": IngestConfig(scheduler="synchronous")}
        spent = dict.fromkeys(configs, 0.0)
        for n in range(args.nights):
            add_files(files[n * 7 % max(len(files) - 2 * args.add, 1):],
                      sources["aged"] / "nightly" / f"n{n:04d}", args.add)
            for name, config in configs.items():
                t = time.perf_counter()
                ingest(lakes[name], sources["aged"], config, key_file=run / "lake.key")
                spent[name] += time.perf_counter() - t
        for name, seconds in spent.items():
            log(f"{name}: {args.nights} nightly runs of {args.add} files in {seconds:.1f} s")
        tonight = run / "tonight"
        add_files(files[len(files) // 2:], tonight, args.add)
        never = ["--compact-files", "0"]
        sides = {"fresh": (run / "fresh" / "lake", sources["fresh"], []),
                 "aged": (run / "aged" / "lake", sources["aged"], never),
                 "aged, compacting": (compacting, sources["aged"], [])}
        if args.optimize:
            opt = run / "aged-optimized"
            shutil.copytree(run / "aged" / "lake", opt, symlinks=True)
            subprocess.run([sys.executable, str(REPO / "lake_cli.py"), "optimize", "--lake",
                            str(opt)], check=True, stdout=subprocess.DEVNULL)
            sides["aged, optimized"] = (opt, sources["aged"], never)
        os.environ["LAKE_KEY_FILE"] = str(run / "lake.key")
        times: dict[str, dict[str, list[float]]] = {
            s: {k: [] for k in ("nightly", "no-op", *QUERIES)} for s in sides}
        scratch = run / "scratch"
        scratch.mkdir()
        for r in range(args.repeat):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for kind, folder in (("nightly", tonight), ("no-op", None)):
                for side in order:
                    lake, src, options = sides[side]
                    times[side][kind].append(timed(lake, src, options, scratch, folder))
            for kind, query in QUERIES.items():
                for side in order:
                    times[side][kind].append(run_query(sides[side][0], query))
        report = {
            "files": len(files), "nights": args.nights, "add": args.add,
            "repeat": args.repeat,
            "seconds": {s: {k: min(v) for k, v in kinds.items()} for s, kinds in times.items()},
            "all_seconds": times,
            "nightly_runs_seconds": spent,
            "shapes": {s: lake_shape(lake) for s, (lake, _, _) in sides.items()},
        }
    finally:
        shutil.rmtree(run, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['files']:,} files; the aged lake had {args.nights} nightly runs of "
          f"{args.add} new files; best of {args.repeat}, the whole `lake ingest` command")
    kinds = ("nightly", "no-op", *QUERIES)
    print(f"{'lake':<18}" + "".join(f" {k + ' s':>12} {'x fresh':>8}" for k in kinds))
    base = report["seconds"]["fresh"]
    for side, s in report["seconds"].items():
        print(f"{side:<18}" + "".join(f" {s[k]:>12.2f} {s[k] / base[k]:>8.2f}" for k in kinds))
    print("\nshapes (version / live files / files on disk / commits replayed to open it):")
    for side, shape in report["shapes"].items():
        cells = ", ".join(f"{t} {v['version']}/{v['live_files']}/{v['data_files']}/"
                          f"{v['replayed_commits']}" for t, v in shape.items() if v["version"])
        print(f"  {side}: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
