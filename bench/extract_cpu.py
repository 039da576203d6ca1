"""Worker CPU per file: ``etl.extract.extract_batch`` in one process, against naive pydicom.

What a worker of ``lake ingest`` spends per file, measured as CPU time (not
wall time: the machine's cores are shared, so wall clocks are noisy), in ONE
process over the files of a generated archive, for:

- ``naive``: the baseline of ``bench/ingest.py``: ``dcmread(path,
  stop_before_pixels=True)`` and the schema's header columns converted simply
  (str / float / int / lists), rows kept in a list (no Parquet write);
- ``dcmread``: ``dcmread(path, stop_before_pixels=True)`` alone (pydicom
  converts values lazily, so this is parsing without conversion);
- ``identified``: ``extract_batch`` without a policy (identified lakes);
- ``research``: ``extract_batch`` with the research policy (the default profile:
  pseudonyms, UID remapping, date shifts, the header allow-list);
- ``identified-per-file`` and ``research-per-file``: the same with
  ``IngestConfig(columnar=False)``: every file read file by file, as before the batch
  path (:mod:`etl.batchread`), which the two above use.

Before anything is timed, each contender reads the first 50 files once: the batch
path's compiled code is loaded once per process (about 0.4 CPU-s, numba's code
generator starting up, as in each worker of an ingest), not per file.

Files are read in batches of ``IngestConfig.batch_files`` with the checksum mode
of new lakes (``header``), after a page-cache warming read. Each contender runs
``--repeat`` times, interleaved; the lowest CPU time is reported. The worker's
memos (decoded elements, typed values, pseudonyms, UIDs, dates, patient contexts)
are cleared before each timed run, so every file is read as an ingest reads it:
once. (With ``--warm-memos`` they are kept from the runs before, as before
2026-11-28: a second pass over the same files finds every per-instance value,
SOPInstanceUID and InstanceNumber included, already decoded, converted and
pseudonymized, which no ingest does: 0.20 against 0.25 ms per small research file.)

    .venv/bin/python bench/extract_cpu.py                       # both kinds, 2,000 files each
    .venv/bin/python bench/extract_cpu.py --kinds small --files 5000
    .venv/bin/python bench/extract_cpu.py --profile research --top 25   # cProfile top 25
    .venv/bin/python bench/extract_cpu.py --workdir /tmp/bt/w20        # reuse archives there

Archives come from ``bench/ingest.py``'s ``prepare_archive`` (presets ``bench``
and ``bench-small``); an existing complete archive in ``--workdir`` is reused
read-only.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import archive_files, baseline_columns, naive_row, prepare_archive, warm_cache

#: a fixed key: the figures do not depend on it, and no key file is needed
BENCH_KEY = bytes(range(32))


def _policy():
    from lakehouse.deid import Policy
    from lakehouse.privacy import Pseudonymizer

    return Policy(Pseudonymizer(BENCH_KEY))


def _found(files: list[Path]):
    from etl.discover import FoundFile

    out = []
    for p in files:
        st = os.stat(p)
        out.append(FoundFile(str(p), st.st_size, st.st_mtime_ns))
    return out


def run_dcmread(files) -> int:
    import pydicom

    n = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in files:
            try:
                pydicom.dcmread(f.path, stop_before_pixels=True)
                n += 1
            except Exception:
                pass
    return n


def run_naive(files) -> int:
    """The per-file work of ``bench/ingest.py``'s baseline (without its Parquet write)."""
    columns = baseline_columns()
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in files:
            try:
                rows.append(naive_row(f.path, columns))
            except Exception:
                continue
    return len(rows)


def run_extract(files, policy, batch: int, columnar: bool = True) -> int:
    """``extract_batch`` batch by batch, each with its own unpickled copy of the policy
    (as each Dask task carries one to its worker), in a process set up as a worker
    (``etl.extract.start_worker``, where the code has it; the other contenders run with
    Python's defaults)."""
    import gc
    import pickle

    import etl.extract
    from etl.extract import extract_batch

    config = _config(columnar)
    state = pickle.dumps(policy)
    ok = 0
    saved = gc.get_threshold()
    getattr(etl.extract, "start_worker", lambda: None)()
    try:
        for i in range(0, len(files), batch):
            table = extract_batch(files[i:i + batch], config, "bench", pickle.loads(state))
            ok += table.column("status").to_pylist().count("ok")
    finally:
        gc.set_threshold(*saved)
    return ok


def _config(columnar: bool):
    """The worker's configuration (code without the batch path has no ``columnar``)."""
    import dataclasses

    from etl.config import IngestConfig

    fields = {f.name for f in dataclasses.fields(IngestConfig)}
    return IngestConfig(checksum="header", **({"columnar": columnar} if "columnar" in fields
                                              else {}))


def contenders(policy, batch: int) -> dict:
    return {
        "naive": run_naive,
        "dcmread": run_dcmread,
        "identified": lambda files: run_extract(files, None, batch),
        "research": lambda files: run_extract(files, policy, batch),
        "identified-per-file": lambda files: run_extract(files, None, batch, False),
        "research-per-file": lambda files: run_extract(files, policy, batch, False),
    }


def clear_memos() -> None:
    """Empty every memo of the worker code (a worker that has not read these files)."""
    from etl import onewalk, rawjson, record
    from lakehouse import deid

    try:
        from etl import batchread
        batchread.clear_memos()
    except ImportError:  # code before the batch path
        pass
    onewalk._ELEMENTS.clear()
    getattr(onewalk, "_ITEMS", {}).clear()  # (code before 2026-12-02 has none)
    rawjson._MEMO.clear()
    record._MEMO.clear()
    # (code before 2026-11-28 kept a policy's memos in the policy: each copy starts cold)
    getattr(deid, "clear_memos", lambda: None)()


def cpu_ms_per_file(fn, files, warm: bool = False) -> tuple[float, int]:
    if not warm:
        clear_memos()
    t = time.process_time()
    ok = fn(files)
    return (time.process_time() - t) * 1000 / len(files), ok


def profile(fn, files, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn(files)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def stages(files, policy, head_bytes: int, warm: bool = False) -> dict[str, float]:
    """CPU ms per file of each step of a worker, timed file by file (one CPU clock
    reading between steps; objects live as long as in a worker) over the files that
    take the fast path. The glue (FileResult, rows, the Arrow table) is what the
    total of ``extract_batch`` adds to their sum."""
    import gc

    import etl.extract

    names = ["read", "walk", "sha256", "deid", "record", "json text"]
    totals = dict.fromkeys(names, 0)
    if not warm:
        clear_memos()
    saved = gc.get_threshold()
    getattr(etl.extract, "start_worker", lambda: None)()  # as run_extract
    try:
        _stage_loop(files, policy, head_bytes, names, totals)
    finally:
        gc.set_threshold(*saved)
    if policy is None:
        del totals["deid"]
    return {k: round(v / 1e6 / len(files), 4) for k, v in totals.items()}


def _stage_loop(files, policy, head_bytes: int, names: list[str], totals: dict) -> None:
    import hashlib

    from etl import onewalk
    from etl.headers import _dumps as encode
    from etl.record import record_from_json

    clock = time.process_time_ns
    for f in files:
        t0 = clock()
        fd = os.open(f.path, os.O_RDONLY)  # as etl.headers
        try:
            os.fstat(fd)
            buf = os.read(fd, head_bytes)
        finally:
            os.close(fd)
        t1 = clock()
        try:
            layout, header = onewalk.walk(buf, file_size=f.size)
        except Exception:
            continue
        if header is None:
            continue
        t2 = clock()
        hashlib.sha256(memoryview(buf)[:layout.header_end]).hexdigest()
        t3 = clock()
        if policy is not None:
            header = policy.apply(header).json
        t4 = clock()
        record_from_json(header)
        t5 = clock()
        encode(header)
        t6 = clock()
        for name, a, b in zip(names, (t0, t1, t2, t3, t4, t5), (t1, t2, t3, t4, t5, t6),
                              strict=True):
            totals[name] += b - a


def bench_kind(kind: str, args, log) -> dict:
    root, _truth, _ = prepare_archive(Path(args.workdir), args.archive_files, args.seed, log,
                                      kind=kind)
    paths = archive_files(root)[: args.files]
    warm_cache(paths)
    files = _found(paths)
    funcs = contenders(_policy(), args.batch)
    if args.profile:
        return {"kind": kind, "files": len(files),
                "profile": profile(funcs[args.profile], files, args.top)}
    for fn in funcs.values():  # warm-up: imports, dictionaries, caches
        fn(files[:50])
    best: dict[str, float] = {}
    ok: dict[str, int] = {}
    for _ in range(args.repeat):
        for name, fn in funcs.items():
            ms, n = cpu_ms_per_file(fn, files, args.warm_memos)
            best[name] = min(best.get(name, ms), ms)
            ok[name] = n
    base = best["naive"]
    steps = {}
    if args.stages:
        from etl.headers import HEAD_BYTES

        for name, pol in (("identified", None), ("research", _policy())):
            steps[name] = min((stages(files, pol, HEAD_BYTES, args.warm_memos)
                               for _ in range(args.repeat)),
                              key=lambda d: sum(d.values()))
    return {
        "stages_cpu_ms_per_file": steps,
        "kind": kind, "files": len(files), "repeat": args.repeat,
        "memos": "warm" if args.warm_memos else "cleared before each run",
        "cpu_ms_per_file": {k: round(v, 4) for k, v in best.items()},
        "ok_files": ok,
        "speedup_vs_naive": {k: round(base / v, 2) for k, v in best.items()},
        "research_over_identified": round(best["research"] / best["identified"], 3),
        "per_file_over_batch": {k: round(best[f"{k}-per-file"] / best[k], 2)
                                for k in ("identified", "research")},
    }


def render(results: list[dict], load: tuple[float, ...]) -> str:
    lines = [f"load average before/after: {load[0]:.2f} / {load[1]:.2f}"]
    for r in results:
        if "profile" in r:
            lines.append(f"== {r['kind']}: cProfile of {r['files']} files")
            lines.append(r["profile"])
            continue
        lines.append(f"== {r['kind']}: {r['files']} files, best of {r['repeat']}, "
                     f"memos {r['memos']}")
        lines.append(f"{'contender':<20} {'CPU ms/file':>12} {'x naive':>10}")
        for name, ms in r["cpu_ms_per_file"].items():
            lines.append(f"{name:<20} {ms:>12.3f} {r['speedup_vs_naive'][name]:>10.2f}")
        lines.append(f"research / identified: {r['research_over_identified']:.3f}")
        for name, ratio in r["per_file_over_batch"].items():
            lines.append(f"{name}: per-file path / batch path: {ratio:.2f}")
        for name, steps in r["stages_cpu_ms_per_file"].items():
            total = r["cpu_ms_per_file"][name]
            glue = total - sum(steps.values())
            lines.append(f"  {name} steps (CPU ms/file): "
                         + ", ".join(f"{k} {v:.3f}" for k, v in steps.items())
                         + f"; glue {glue:.3f} (of {total:.3f})")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default="ct,small", help="archives: ct and/or small")
    ap.add_argument("--files", type=int, default=2000, help="files per archive to read")
    ap.add_argument("--archive-files", type=int, default=5000,
                    help="size of the archive to generate or reuse (archive-N)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bt", "w20"),
                    help="where archives are generated or reused")
    ap.add_argument("--seed", type=int, default=0, help="archive seed (as bench/ingest.py)")
    ap.add_argument("--batch", type=int, default=512,
                    help="files per extract_batch call (IngestConfig.batch_files)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", choices=["naive", "dcmread", "identified", "research",
                                          "identified-per-file", "research-per-file"],
                    help="print a cProfile of this contender instead of timings")
    ap.add_argument("--top", type=int, default=30, help="functions in the profile")
    ap.add_argument("--stages", action="store_true",
                    help="also time each step of a worker separately (read, the walk "
                         "(safety checks and raw JSON, etl.onewalk), hash, de-identification, "
                         "record, the DICOM JSON text)")
    ap.add_argument("--warm-memos", action="store_true",
                    help="keep the worker's memos from one run to the next (each run then "
                         "finds the values of the files read before: not what an ingest "
                         "sees)")
    ap.add_argument("--json", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    load0 = os.getloadavg()[0]
    results = [bench_kind(k.strip(), args, log) for k in args.kinds.split(",") if k.strip()]
    load = (load0, os.getloadavg()[0])
    if args.json:
        print(json.dumps({"load_average": load, "results": results}, indent=2))
    else:
        print(render(results, load))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
