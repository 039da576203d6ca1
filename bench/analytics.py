"""Benchmark: the quality analytics in DuckDB against the same computation in pandas.

1. Builds a synthetic lake of about ``--studies`` studies (default 1,000,000)
   and 12 instances per study on average (over 10 million ``instances`` rows),
   directly as Delta tables: numpy draws the studies (patients, dates, times,
   modality, body part, equipment; 3 % of studies placed 0-45 days after an
   earlier study of the same patient, modality and body part), pyarrow builds
   the rows, and ``LakeWriter.append`` commits them in chunks (no DICOM files,
   no ETL: ``series`` and ``patients`` stay empty, which no timed query reads).
   Instances carry ImageType (CT localizers), SOP classes (a few secondary
   captures, some studies made only of them) so the exclusions have work to do.
2. Times, each the fastest of ``--repeat`` runs, on one lake snapshot:
   - **repeat-exam rate by Modality and month** (default definition: 30 days,
     same patient, Modality and BodyPartExamined, localizer / derived /
     secondary-capture / non-image exclusions; Wilson 95% intervals):
     ``catalog.reports.repeat_rates(cat, by=["Modality", "month"])`` against
     pandas reading the same Delta tables (``Lake.read(...).to_pandas()``) and
     computing the same thing with vectorized pandas / numpy;
   - **utilization rollup**: studies, series and instances per month x Modality
     x BodyPartExamined x StationName x Manufacturer x ManufacturerModelName x
     InstitutionalDepartmentName, ``reports.utilization(...)`` against a pandas
     ``groupby`` of the ``studies`` table.
   Both sides start from the Delta tables on disk (the DuckDB figure includes
   its Parquet scan; the pandas figure is given with and without its read).
3. Checks that both sides give the same numbers, and prints seconds and ratios.

    python bench/analytics.py [--studies 1000000] [--workdir DIR] [--keep]
                              [--repeat 3] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from catalog import open_lake, reports
from lakehouse import Lake

MODALITIES = np.array(["CT", "MR", "CR", "DX", "US", "MG", "PT", "NM"])
WEIGHTS = np.array([0.30, 0.15, 0.15, 0.12, 0.10, 0.08, 0.05, 0.05])
#: mean instances per study and series per study, per modality
MEAN_INSTANCES = np.array([20, 25, 2, 2, 6, 4, 12, 10])
SERIES = np.array([3, 3, 1, 1, 1, 1, 1, 1])
BODY_PARTS = [("CHEST", "ABDOMEN", "HEAD", "PELVIS"), ("HEAD", "KNEE", "LSPINE"),
              ("CHEST", "HAND", "KNEE"), ("CHEST", "ANKLE", "SHOULDER"),
              ("ABDOMEN", "NECK", "PELVIS"), ("BREAST",), ("WHOLEBODY",), ("HEART",)]
EQUIPMENT = [[("SIEMENS", "SOMATOM Definition AS", "CT01"), ("GE MEDICAL SYSTEMS",
              "Revolution CT", "CT02"), ("Canon", "Aquilion ONE", "CT03")],
             [("SIEMENS", "MAGNETOM Skyra", "MR01"), ("Philips", "Ingenia", "MR02")],
             [("FUJIFILM Corporation", "FCR PROFECT CS", "CR01")],
             [("Philips", "DigitalDiagnost", "DX01"), ("GE Healthcare", "Definium 6000", "DX02")],
             [("GE Healthcare", "LOGIQ E10", "US01"), ("Philips", "EPIQ 7G", "US02")],
             [("HOLOGIC, Inc.", "Selenia Dimensions", "MG01")],
             [("GE MEDICAL SYSTEMS", "Discovery MI", "PET01")],
             [("SIEMENS NM", "Symbia Intevo", "NM01")]]
DEPARTMENTS = np.array(["Radiology", "Emergency Radiology", "Diagnostic Imaging"])
SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
             "CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
             "US": "1.2.840.10008.5.1.4.1.1.6.1", "MG": "1.2.840.10008.5.1.4.1.1.1.2",
             "PT": "1.2.840.10008.5.1.4.1.1.128", "NM": "1.2.840.10008.5.1.4.1.1.20"}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
UID_ROOT = "1.2.826.0.1.3680043.10.1234."
FIRST_DAY = dt.date(2019, 1, 1)
DAYS = (dt.date(2024, 12, 31) - FIRST_DAY).days
CHUNK_STUDIES = 100_000
#: what a kept lake must have been built with to be reused (2: studies written in one
#: overwrite, with instance_kinds)
LAKE_FORMAT = 2
Z = 1.959963984540054


# --- the synthetic lake ----------------------------------------------------------

def draw_studies(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    mod = rng.choice(len(MODALITIES), size=n, p=WEIGHTS)
    patients = rng.integers(0, max(n // 3, 1), size=n)
    day = rng.integers(0, DAYS - 45, size=n)
    body = np.empty(n, dtype=object)
    for m, parts in enumerate(BODY_PARTS):
        idx = np.flatnonzero(mod == m)
        body[idx] = np.array(parts, dtype=object)[rng.integers(0, len(parts), size=idx.size)]
    # 3 % of studies repeat an earlier study: same patient, modality and body part
    rep = rng.random(n) < 0.03
    src = rng.integers(0, n, size=n)
    rep &= src != np.arange(n)
    patients[rep], mod[rep], body[rep] = patients[src[rep]], mod[src[rep]], body[src[rep]]
    day[rep] = day[src[rep]] + rng.integers(0, 46, size=int(rep.sum()))
    seconds = rng.integers(7 * 3600, 19 * 3600, size=n)
    equip = np.array([rng.integers(0, len(EQUIPMENT[m])) for m in range(len(MODALITIES))])
    pick = (rng.integers(0, 1 << 30, size=n) + equip[mod]) % np.array(
        [len(EQUIPMENT[m]) for m in range(len(MODALITIES))])[mod]
    instances = 1 + rng.poisson(MEAN_INSTANCES[mod] - 1)
    return pd.DataFrame({
        "index": np.arange(n),
        "patient": patients,
        "mod": mod,
        "BodyPartExamined": body,
        "day": day,
        "seconds": seconds,
        "equipment": pick,
        "department": DEPARTMENTS[rng.integers(0, len(DEPARTMENTS), size=n)],
        "instances": instances,
        "series": np.minimum(SERIES[mod], instances),
        "localizer": (mod == 0) & (rng.random(n) < 0.4),
        # 0.5 % of studies with one secondary capture; 0.1 % made only of them
        "secondary": rng.random(n) < 0.005,
        "only_secondary": rng.random(n) < 0.001,
    })


def _join(*parts) -> pa.Array:
    return pc.binary_join_element_wise(*parts, "")


def study_table(s: pd.DataFrame) -> pa.Table:
    mods = MODALITIES[s["mod"].to_numpy()]
    eq = [EQUIPMENT[m][e] for m, e in zip(s["mod"], s["equipment"], strict=True)]
    dates = np.datetime64(FIRST_DAY) + s["day"].to_numpy().astype("timedelta64[D]")
    secs = s["seconds"].to_numpy()
    times = [f"{h:02d}:{m:02d}:{x:02d}.000000" for h, m, x in
             zip(secs // 3600, secs // 60 % 60, secs % 60, strict=True)]
    uid = _join(UID_ROOT, pc.cast(pa.array(s["index"].to_numpy()), pa.string()))
    n = len(s)
    return pa.table({
        "StudyInstanceUID": uid,
        "PatientID": _join("P", pc.cast(pa.array(s["patient"].to_numpy()), pa.string())),
        "StudyDate": pa.array(dates, pa.date32()),
        "StudyTime": pa.array(times, pa.string()),
        "StudyDescription": pa.array([f"{m} {b}" for m, b in
                                      zip(mods, s["BodyPartExamined"], strict=True)]),
        "Modality": pa.array(mods),
        "modalities": pa.array([[m] for m in mods], pa.list_(pa.string())),
        "BodyPartExamined": pa.array(s["BodyPartExamined"].to_numpy(), pa.string()),
        "body_parts": pa.array([[b] for b in s["BodyPartExamined"]], pa.list_(pa.string())),
        "InstitutionName": pa.array(["St. Example General Hospital"] * n),
        "InstitutionalDepartmentName": pa.array(s["department"].to_numpy(), pa.string()),
        "Manufacturer": pa.array([e[0] for e in eq]),
        "ManufacturerModelName": pa.array([e[1] for e in eq]),
        "StationName": pa.array([e[2] for e in eq]),
        "series_count": pa.array(s["series"].to_numpy(), pa.int64()),
        "instance_count": pa.array(s["instances"].to_numpy(), pa.int64()),
        "study_size_MB": pa.array(s["instances"].to_numpy() * 0.5),
        "study_year": pa.array(dates.astype("datetime64[Y]").astype(int) + 1970, pa.int32()),
    })


def instance_table(s: pd.DataFrame, studies: pa.Table) -> tuple[pa.Table, pa.Array]:
    """The instances of the studies ``s``, and each study's ``instance_kinds``."""
    counts = s["instances"].to_numpy()
    owner = np.repeat(np.arange(len(s)), counts)
    number = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)  # 0-based
    series_no = number % s["series"].to_numpy()[owner] + 1
    take = pa.array(owner)
    study_uid = studies.column("StudyInstanceUID").take(take)
    series_uid = _join(study_uid, ".", pc.cast(pa.array(series_no), pa.string()))
    sop_uid = _join(series_uid, ".", pc.cast(pa.array(number + 1), pa.string()))
    mods = MODALITIES[s["mod"].to_numpy()][owner]
    first = number == 0
    localizer = s["localizer"].to_numpy()[owner] & first
    secondary = (s["secondary"].to_numpy()[owner] & first) | s["only_secondary"].to_numpy()[owner]
    # ImageType as one of three lists, built from offsets (no Python loop per row)
    kinds = np.where(localizer, 1, np.where(secondary, 2, 0))
    values = [["ORIGINAL", "PRIMARY", "AXIAL"], ["ORIGINAL", "PRIMARY", "LOCALIZER"],
              ["DERIVED", "SECONDARY"]]
    lengths = np.array([len(v) for v in values])[kinds]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate([np.array(values[k], dtype=object) for k in range(3)])
    starts = np.array([0, 3, 6])[kinds]
    index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    image_type = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat[index], pa.string()))
    sop_class = np.array([SOP_CLASS[m] for m in MODALITIES], dtype=object)[
        s["mod"].to_numpy()[owner]]
    sop_class[secondary] = SECONDARY_CAPTURE
    # studies.instance_kinds as the summary SQL (etl/sql/studies.sql) computes it: bit k set
    # when an instance of kind k (1 localizer + 2 derived + 4 secondary) is in the study
    kind = np.where(localizer, 1, np.where(secondary, 2 | 4, 0))
    starts = np.cumsum(counts) - counts
    kinds = np.bitwise_or.reduceat(np.left_shift(1, kind), starts).astype(np.int32)
    return pa.table({
        "PatientID": studies.column("PatientID").take(take),
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "SOPInstanceUID": sop_uid,
        "SOPClassUID": pa.array(sop_class, pa.string()),
        "Modality": pa.array(mods),
        "BodyPartExamined": studies.column("BodyPartExamined").take(take),
        "StudyDate": studies.column("StudyDate").take(take),
        "StudyTime": studies.column("StudyTime").take(take),
        "SeriesNumber": pa.array(series_no, pa.int64()),
        "InstanceNumber": pa.array(number + 1, pa.int64()),
        "ImageType": image_type,
        "StationName": studies.column("StationName").take(take),
        "study_year": studies.column("study_year").take(take),
        "file_size": pa.array(np.full(owner.size, 526_000), pa.int64()),
    }), pa.array(kinds, pa.int32())


def build_lake(path: Path, n_studies: int, seed: int, log) -> dict:
    t0 = time.perf_counter()
    drawn = draw_studies(n_studies, seed)
    lake = Lake.create(path)
    instances = 0
    parts = []
    with lake.writer("bench-analytics") as w:
        for start in range(0, n_studies, CHUNK_STUDIES):
            chunk = drawn.iloc[start:start + CHUNK_STUDIES]
            studies = study_table(chunk)
            rows, kinds = instance_table(chunk, studies)
            parts.append(studies.append_column("instance_kinds", kinds))
            w.append("instances", rows)
            instances += rows.num_rows
            log(f"  {start + len(chunk):,} studies, {instances:,} instances written")
        # instances arrive in many appends (one per ingest commit), but the ETL rebuilds
        # the summary tables whole, in one overwrite (etl/summarize.py): one file per
        # partition, as here
        w.overwrite("studies", pa.concat_tables(parts))
        w.publish("synthetic analytics benchmark lake")
    return {"studies": n_studies, "instances": instances, "seconds": time.perf_counter() - t0,
            "format": LAKE_FORMAT}


# --- the pandas baseline -----------------------------------------------------------

STUDY_COLUMNS = ["StudyInstanceUID", "PatientID", "StudyDate", "StudyTime", "Modality",
                 "BodyPartExamined", "instance_count"]
ROLLUP = ["Modality", "BodyPartExamined", "StationName", "Manufacturer",
          "ManufacturerModelName", "InstitutionalDepartmentName"]


#: the kinds of study (studies.instance_kinds bits) that make an exam under the default
#: definition: none of the localizer (1), derived (2), secondary (4), non-image (8) bits
EXAM_KINDS = sum(1 << k for k in range(16) if k & (1 | 2 | 4 | 8) == 0)


def pandas_load_repeats(lake: Lake) -> pd.DataFrame:
    return lake.read("studies", columns=[*STUDY_COLUMNS, "instance_kinds"]).to_pandas(
        date_as_object=False)


def pandas_repeats(studies: pd.DataFrame, window: int = 30) -> pd.DataFrame:
    """The repeat rate by Modality and month, as ``repeat_rates_for`` computes it, from the
    same ``studies`` columns (``instance_kinds`` for the exclusions)."""
    exams = studies[(studies["instance_kinds"] & EXAM_KINDS) != 0]
    keys = ["PatientID", "Modality", "BodyPartExamined"]
    comparable = exams.dropna(subset=[*keys, "StudyDate"]).sort_values(
        [*keys, "StudyDate", "StudyTime", "StudyInstanceUID"], na_position="first")
    previous = comparable.groupby(keys, sort=False)["StudyDate"].shift()
    days = (comparable["StudyDate"] - previous).dt.days
    is_repeat = pd.Series(False, index=exams.index)
    is_repeat.loc[comparable.index] = (days <= window).to_numpy()
    exams = exams.assign(is_repeat=is_repeat,
                         month=exams["StudyDate"].dt.to_period("M").dt.start_time)
    exams = exams[exams["StudyDate"].notna()]
    out = exams.groupby(["Modality", "month"]).agg(studies=("is_repeat", "size"),
                                                   repeats=("is_repeat", "sum")).reset_index()
    k, n = out["repeats"].to_numpy(float), out["studies"].to_numpy(float)
    p = k / n
    centre, half = p + Z * Z / (2 * n), Z * np.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return out.assign(repeat_rate=p, ci_low=np.maximum(0, (centre - half) / (1 + Z * Z / n)),
                      ci_high=np.minimum(1, (centre + half) / (1 + Z * Z / n)))


def pandas_load_rollup(lake: Lake) -> pd.DataFrame:
    return lake.read("studies", columns=["StudyDate", *ROLLUP, "series_count",
                                         "instance_count"]).to_pandas(date_as_object=False)


def pandas_rollup(studies: pd.DataFrame) -> pd.DataFrame:
    studies = studies[studies["StudyDate"].notna()]
    month = studies["StudyDate"].dt.to_period("M").dt.start_time.rename("month")
    return studies.groupby([month, *[studies[c] for c in ROLLUP]], dropna=False).agg(
        studies=("series_count", "size"), series=("series_count", "sum"),
        instances=("instance_count", "sum")).reset_index()


# --- timing --------------------------------------------------------------------------

#: CPU seconds (this process, all threads) of the fastest run of each timed computation
CPU: dict[str, float] = {}


def best(fn, repeat: int, name: str = "") -> tuple[float, object]:
    """The fastest wall time of ``repeat`` runs (its CPU time goes to ``CPU[name]``)."""
    times, result = [], None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        result = fn()
        times.append((time.perf_counter() - t, time.process_time() - c))
    wall, cpu = min(times)
    CPU[name] = cpu
    return wall, result


def run(args, log) -> dict:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-an-"))
    path = workdir / f"lake-{args.studies}"
    done = workdir / f"lake-{args.studies}.done"
    if done.exists() and json.loads(done.read_text()).get("format") == LAKE_FORMAT:
        built = json.loads(done.read_text())
        log(f"reusing the lake in {path}")
    else:
        if path.exists():
            shutil.rmtree(path)
        log(f"building a lake of {args.studies:,} studies in {path} ...")
        built = build_lake(path, args.studies, args.seed, log)
        done.write_text(json.dumps(built))
    lake = Lake.open(path)
    report: dict = {"lake": built, "threads": args.threads, "repeat": args.repeat,
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    report["load_average_before"] = os.getloadavg()
    try:
        with open_lake(path, threads=args.threads) as cat:
            log("DuckDB: repeat rate by Modality and month ...")
            duck_rep_s, duck_rep = best(
                lambda: reports.repeat_rates(cat, by=["Modality", "month"]), args.repeat,
                "duck_rep")
            log("DuckDB: utilization rollup ...")
            duck_util_s, duck_util = best(
                lambda: reports.utilization(cat, by=["month", *ROLLUP]), args.repeat,
                "duck_util")
        log("pandas: repeat rate by Modality and month ...")
        load_rep_s, loaded = best(lambda: pandas_load_repeats(lake), args.repeat, "load_rep")
        pd_rep_s, pd_rep = best(lambda: pandas_repeats(loaded), args.repeat, "pd_rep")
        log("pandas: utilization rollup ...")
        load_util_s, st = best(lambda: pandas_load_rollup(lake), args.repeat, "load_util")
        pd_util_s, pd_util = best(lambda: pandas_rollup(st), args.repeat, "pd_util")
        check = agree(duck_rep, pd_rep, duck_util, pd_util)
        report["load_average_after"] = os.getloadavg()
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    for name, duck, load, compute, k in (
            ("repeat_rate_by_modality_month", duck_rep_s, load_rep_s, pd_rep_s, "rep"),
            ("utilization_rollup", duck_util_s, load_util_s, pd_util_s, "util")):
        cpu_duck, cpu_pd = CPU[f"duck_{k}"], CPU[f"load_{k}"] + CPU[f"pd_{k}"]
        report[name] = {"duckdb_s": duck, "pandas_read_s": load, "pandas_compute_s": compute,
                        "pandas_total_s": load + compute,
                        "speedup_vs_pandas_total": (load + compute) / duck,
                        "speedup_vs_pandas_compute": compute / duck,
                        "duckdb_cpu_s": cpu_duck, "pandas_total_cpu_s": cpu_pd,
                        "cpu_ratio": cpu_pd / cpu_duck}
    report["results_agree"] = check
    return report


def agree(duck_rep: pa.Table, pd_rep: pd.DataFrame, duck_util: pa.Table,
          pd_util: pd.DataFrame) -> dict:
    d = duck_rep.to_pandas()
    d["month"] = pd.to_datetime(d["month"])
    merged = d.merge(pd_rep, on=["Modality", "month"], suffixes=("_duck", "_pd"), how="outer")
    same_rates = bool(len(merged) == len(d) == len(pd_rep)
                      and (merged["studies_duck"] == merged["studies_pd"]).all()
                      and (merged["repeats_duck"] == merged["repeats_pd"]).all()
                      and np.allclose(merged["ci_low_duck"], merged["ci_low_pd"])
                      and np.allclose(merged["ci_high_duck"], merged["ci_high_pd"]))
    same_rollup = bool(duck_util.num_rows == len(pd_util)
                       and pc.sum(duck_util.column("instances")).as_py()
                       == int(pd_util["instances"].sum())
                       and pc.sum(duck_util.column("studies")).as_py()
                       == int(pd_util["studies"].sum()))
    if not (same_rates and same_rollup):
        raise SystemExit(f"DuckDB and pandas disagree: rates {same_rates}, "
                         f"rollup {same_rollup}")
    return {"repeat_groups": len(d), "repeats": int(d["repeats"].sum()),
            "rollup_groups": duck_util.num_rows, "rates": same_rates, "rollup": same_rollup}


def print_report(r: dict) -> None:
    lake = r["lake"]
    print(f"lake: {lake['studies']:,} studies, {lake['instances']:,} instances "
          f"(built in {lake['seconds']:.0f} s); DuckDB threads {r['threads']}, "
          f"fastest of {r['repeat']} runs, {r['machine']['cpus']} CPUs")
    print(f"{'computation':<32}{'DuckDB s':>10}{'pandas read':>13}{'pandas comp':>13}"
          f"{'pandas total':>14}{'x total':>9}{'x compute':>11}")
    for name in ("repeat_rate_by_modality_month", "utilization_rollup"):
        x = r[name]
        print(f"{name:<32}{x['duckdb_s']:>10.3f}{x['pandas_read_s']:>13.3f}"
              f"{x['pandas_compute_s']:>13.3f}{x['pandas_total_s']:>14.3f}"
              f"{x['speedup_vs_pandas_total']:>9.1f}{x['speedup_vs_pandas_compute']:>11.1f}")
    print(f"{'CPU seconds (all threads)':<32}" + "".join(
        f"  {n.split('_')[0]}: DuckDB {r[n]['duckdb_cpu_s']:.3f}, pandas "
        f"{r[n]['pandas_total_cpu_s']:.3f} (x{r[n]['cpu_ratio']:.1f})"
        for n in ("repeat_rate_by_modality_month", "utilization_rollup")))
    print("load average (1, 5, 15 min) before {:.1f} {:.1f} {:.1f}, after {:.1f} {:.1f} {:.1f}"
          .format(*r["load_average_before"], *r["load_average_after"]))
    c = r["results_agree"]
    print(f"same results: {c['repeat_groups']:,} Modality x month groups, {c['repeats']:,} "
          f"repeats; {c['rollup_groups']:,} rollup groups")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=1_000_000)
    p.add_argument("--workdir", help="where the lake goes (default: a new folder in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep (and later reuse) the lake")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="DuckDB threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    report = run(args, log)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
