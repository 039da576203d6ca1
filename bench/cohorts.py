"""Benchmark: ten fixed cohort queries in DuckDB against the same filters in pandas.

Two data sets, each timed in the same run against a pandas baseline:

1. **A synthetic lake** of ``--series`` series (default 1,000,000) in about a quarter
   as many studies, whose ``instanceCount`` add up to at least ten times the series
   count (10 million instances by default). The ``series`` and ``studies`` tables
   are written directly through ``LakeWriter`` from vectorised random columns
   (seeded): cohort queries read only those two tables, so the ``instances``
   table is left empty (writing 10 million instance rows would measure Parquet
   writing, not cohorts). The ten queries are declarative specs
   (``catalog.spec``), compiled to the query of their members
   (``compile_spec(spec, members=True)``: the matching SeriesInstanceUIDs) and
   run through one ``open_lake`` catalog, as a notebook session runs them:
   - ``lake``: every query decodes the snapshot's Parquet files again (the
     catalog keeps only the files' footers, ``parquet_metadata_cache``);
   - ``lake_cached``: after ``catalog.cohorts.cache_base(cat)`` (``series``,
     ``studies`` and their join ``cohort_base`` copied into DuckDB memory once;
     that cost is printed).
   ``--form rows`` times ``SELECT SeriesInstanceUID FROM (<the rows query>)``
   instead (every column of ``cohort_base``, projected), the form measured before
   the members query existed. The pandas baseline applies the same filters to
   DataFrames already in memory (series joined with the study age once, outside
   the timing).
2. **IDC's series index** (``idc_index.parquet`` of ``idc-index-data``, about 1.04
   million series): ten SQL queries over the index loaded into a DuckDB table,
   against the same filters on the DataFrame read from the same file.

Each query runs once to warm up, then ``--repeat`` times (default 5); the report
gives the median wall time per query, the median CPU time of the process (DuckDB's
threads included) for the same runs, the ratio pandas / DuckDB, and checks that both
return the same number of series. The machine's load average is printed with the
figures (other processes on a shared machine slow the wall times, less the CPU
times). Target (issue 7): median per query at most 100 ms on 2 cores.

    python bench/cohorts.py [--series 1000000] [--repeat 5] [--threads 2]
                            [--form members|rows] [--workdir DIR] [--keep]
                            [--skip-idc] [--skip-lake] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

MODALITIES = np.array(["CT", "MR", "CR", "DX", "US", "MG", "PT", "NM"])
MOD_P = np.array([0.35, 0.15, 0.12, 0.1, 0.1, 0.08, 0.05, 0.05])
BODY = {"CT": ["CHEST", "ABDOMEN", "HEAD", "PELVIS"], "MR": ["HEAD", "KNEE", "LSPINE"],
        "CR": ["CHEST", "HAND", "KNEE"], "DX": ["CHEST", "SHOULDER"], "US": ["NECK", "PELVIS"],
        "MG": ["BREAST"], "PT": ["WHOLEBODY"], "NM": ["HEART"]}
DEVICES = [("SIEMENS", "SOMATOM Definition AS"), ("GE MEDICAL SYSTEMS", "Revolution CT"),
           ("Philips", "Ingenia"), ("SIEMENS", "MAGNETOM Skyra"), ("GE Healthcare", "LOGIQ E10")]
DESCRIPTIONS = ["Chest 1.0 Sharp", "Chest 5.0 Soft", "AX T2 TSE", "SAG T1 SE",
                "Topogram 0.6 T20s", "Abdomen with contrast 2.5", "Screening Mammo",
                "PET WB AC", "Shoulder PA/LAT"]


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# --- the synthetic lake ------------------------------------------------------------

def synthetic_tables(n_series: int, seed: int) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(seed)
    n_studies = n_series // 4
    n_patients = max(1, n_studies // 3)
    study_patient = rng.integers(0, n_patients, n_studies)
    study_mod = rng.choice(len(MODALITIES), n_studies, p=MOD_P)
    study_body = np.array([BODY[MODALITIES[m]][i % len(BODY[MODALITIES[m]])]
                           for m, i in zip(study_mod, rng.integers(0, 12, n_studies),
                                           strict=True)])
    start = np.datetime64("2015-01-01")
    study_date = start + rng.integers(0, 10 * 365, n_studies).astype("timedelta64[D]")
    birth_age = rng.uniform(0, 95, n_patients)
    age = np.round(birth_age[study_patient] + rng.uniform(0, 3, n_studies), 1)
    sex = np.array(["F", "M", "O"])[rng.choice(3, n_patients, p=[0.5, 0.49, 0.01])]
    # every study has at least one series; the rest spread at random
    series_study = np.concatenate([np.arange(n_studies),
                                   rng.integers(0, n_studies, n_series - n_studies)])
    series_study.sort()
    device = rng.integers(0, len(DEVICES), n_studies)[series_study]
    inst = np.maximum(1, rng.gamma(1.2, 16.0, n_series).astype(np.int64))
    inst[rng.random(n_series) < 0.02] += 300  # some long series
    thick = rng.choice([0.6, 1.0, 1.25, 2.5, 3.0, 5.0], n_series)
    uid = pa.array(np.arange(n_series)).cast(pa.string())
    suid = pa.array(np.arange(n_studies)).cast(pa.string())
    pid = pc.binary_join_element_wise("P", pa.array(np.arange(n_patients)).cast(pa.string()),
                                      "")
    study_uid = pc.binary_join_element_wise("2.25.9", suid, "")
    mods = MODALITIES[study_mod]
    dates = pa.array(study_date.astype("datetime64[D]"), pa.date32())
    series = pa.table({
        "SeriesInstanceUID": pc.binary_join_element_wise("2.25.1", uid, ""),
        "StudyInstanceUID": pc.take(study_uid, pa.array(series_study)),
        "PatientID": pc.take(pid, pa.array(study_patient[series_study])),
        "PatientSex": pa.array(sex[study_patient[series_study]]),
        "PatientAge": pa.array([f"{int(a):03d}Y" for a in age[series_study]]),
        "StudyDate": pc.take(dates, pa.array(series_study)),
        "StudyDescription": pa.array(np.char.add(np.char.add(mods[series_study], " "),
                                                 study_body[series_study])),
        "BodyPartExamined": pa.array(study_body[series_study]),
        "Modality": pa.array(mods[series_study]),
        "Manufacturer": pa.array(np.array([d[0] for d in DEVICES])[device]),
        "ManufacturerModelName": pa.array(np.array([d[1] for d in DEVICES])[device]),
        "SeriesDescription": pa.array(np.array(DESCRIPTIONS)[
            rng.integers(0, len(DESCRIPTIONS), n_series)]),
        "SeriesNumber": pa.array(rng.integers(1, 10, n_series)),
        "instanceCount": pa.array(inst),
        "series_size_MB": pa.array(np.round(inst * 0.52, 3)),
        "slice_thickness_min": pa.array(thick),
        "slice_thickness_max": pa.array(thick),
        "distinct_orientations": pa.array(np.where(rng.random(n_series) < 0.03, 2, 1)),
        "distinct_dimensions": pa.array(np.ones(n_series, dtype=np.int64)),
        "uneven_spacing": pa.array(rng.random(n_series) < 0.02),
        "study_year": pa.array(study_date.astype("datetime64[Y]").astype(int) + 1970,
                               pa.int32()).take(pa.array(series_study)),
    })
    counts = np.bincount(series_study, minlength=n_studies)
    inst_per_study = np.bincount(series_study, weights=inst, minlength=n_studies)
    studies = pa.table({
        "StudyInstanceUID": study_uid,
        "PatientID": pc.take(pid, pa.array(study_patient)),
        "PatientSex": pa.array(sex[study_patient]),
        "patient_age_years": pa.array(age),
        "StudyDate": dates,
        "Modality": pa.array(mods),
        "BodyPartExamined": pa.array(study_body),
        "series_count": pa.array(counts.astype(np.int64)),
        "instance_count": pa.array(inst_per_study.astype(np.int64)),
        "study_year": pa.array(study_date.astype("datetime64[Y]").astype(int) + 1970,
                               pa.int32()),
    })
    return series, studies


def build_lake(path: Path, n_series: int, seed: int) -> dict:
    from lakehouse import Lake

    done = path / "bench.done"
    if done.exists():
        return json.loads(done.read_text())
    if path.exists():
        shutil.rmtree(path)
    t = time.perf_counter()
    series, studies = synthetic_tables(n_series, seed)
    gen = time.perf_counter() - t
    lake = Lake.create(path, profile="identified")
    t = time.perf_counter()
    with lake.writer("bench-cohorts") as w:
        w.append("series", series)
        w.append("studies", studies)
        w.publish("bench: synthetic series and studies")
    info = {"series": series.num_rows, "studies": studies.num_rows,
            "instances_counted": int(pc.sum(series.column("instanceCount")).as_py()),
            "generate_seconds": round(gen, 1), "write_seconds": round(time.perf_counter() - t, 1)}
    done.write_text(json.dumps(info))
    return info


# --- the queries -----------------------------------------------------------------------

def lake_queries():
    """(name, spec, pandas filter on the joined series+age frame ``b``)."""
    from catalog.spec import where as w

    def followed(b: pd.DataFrame) -> pd.Series:
        sel = (b.Modality == "CT") & (b.BodyPartExamined == "CHEST")
        first = b.loc[sel, ["SeriesInstanceUID", "PatientID", "StudyInstanceUID", "StudyDate"]]
        later = b.loc[sel, ["PatientID", "StudyInstanceUID", "StudyDate"]]
        pairs = first.merge(later, on="PatientID", suffixes=("", "_l"))
        days = (pairs.StudyDate_l - pairs.StudyDate).dt.days
        ok = pairs[(pairs.StudyInstanceUID != pairs.StudyInstanceUID_l)
                   & days.between(90, 400)]
        return b.SeriesInstanceUID.isin(ok.SeriesInstanceUID)

    ct_chest = w.modality("CT") & w.body_part("CHEST")
    return [
        ("modality CT", w.modality("CT"), lambda b: b.Modality == "CT"),
        ("CT chest", ct_chest,
         lambda b: (b.Modality == "CT") & (b.BodyPartExamined.str.upper() == "CHEST")),
        ("adult thin CT chest 2019-2022", ct_chest & w.study_date("2019-01-01", "2022-12-31")
         & w.age(min=18) & w.slice_thickness(max=1.25),
         lambda b: (b.Modality == "CT") & (b.BodyPartExamined.str.upper() == "CHEST")
         & b.StudyDate.between(pd.Timestamp("2019-01-01"), pd.Timestamp("2022-12-31"))
         & (b.patient_age_years >= 18) & (b.slice_thickness_max <= 1.25)),
        ("MR head Siemens", w.modality("MR") & w.body_part("HEAD") & w.manufacturer("SIEMENS"),
         lambda b: (b.Modality == "MR") & (b.BodyPartExamined.str.upper() == "HEAD")
         & (b.Manufacturer.str.upper() == "SIEMENS")),
        ("text 'contrast'", w.text("contrast"),
         lambda b: b.StudyDescription.str.lower().str.contains("contrast", regex=False)
         | b.SeriesDescription.str.lower().str.contains("contrast", regex=False)),
        ("MG or female DX", w.modality("MG") | (w.modality("DX") & w.sex("F")),
         lambda b: (b.Modality == "MG") | ((b.Modality == "DX") & (b.PatientSex == "F"))),
        ("not CT/MR, age >= 65", ~w.modality("CT", "MR") & w.age(min=65),
         lambda b: ~b.Modality.isin(["CT", "MR"]) & (b.patient_age_years >= 65)),
        ("clean geometry, >= 100 images",
         w.geometry("single_orientation", "even_spacing") & w.threshold("instanceCount", min=100),
         lambda b: (b.distinct_orientations == 1) & ~b.uneven_spacing
         & (b.instanceCount >= 100)),
        ("50-200 MB on Revolution CT",
         w.threshold("series_size_MB", min=50, max=200) & w.model("Revolution CT"),
         lambda b: b.series_size_MB.between(50, 200)
         & (b.ManufacturerModelName.str.upper() == "REVOLUTION CT")),
        ("CT chest, follow-up 90-400 d", ct_chest.followed_by(ct_chest, (90, 400)), followed),
    ]


def idc_queries():
    """(name, SQL over table ``idc`` with $params, params, pandas filter on ``d``)."""
    def followed(d: pd.DataFrame) -> pd.Series:
        sel = d[(d.Modality == "CT") & d.BodyPartExamined.isin(["CHEST", "LUNG", "THORAX"])]
        sel = sel.assign(date=pd.to_datetime(sel.StudyDate, errors="coerce"))
        pairs = sel.merge(sel[["PatientID", "collection_id", "StudyInstanceUID", "date"]],
                          on=["PatientID", "collection_id"], suffixes=("", "_l"))
        days = (pairs.date_l - pairs.date).dt.days
        ok = pairs[(pairs.StudyInstanceUID != pairs.StudyInstanceUID_l) & days.between(90, 400)]
        return d.SeriesInstanceUID.isin(ok.SeriesInstanceUID)

    chest = ["CHEST", "LUNG", "THORAX"]
    return [
        ("modality CT", "Modality = 'CT'", {}, lambda d: d.Modality == "CT"),
        ("CT chest", "Modality = 'CT' AND list_contains($bp, BodyPartExamined)",
         {"bp": chest}, lambda d: (d.Modality == "CT") & d.BodyPartExamined.isin(chest)),
        ("MR brain Siemens", "Modality = 'MR' AND BodyPartExamined IN ('BRAIN', 'HEAD') "
         "AND upper(Manufacturer) = $m", {"m": "SIEMENS"},
         lambda d: (d.Modality == "MR") & d.BodyPartExamined.isin(["BRAIN", "HEAD"])
         & (d.Manufacturer.str.upper() == "SIEMENS")),
        ("text 'contrast'", "contains(lower(StudyDescription), $t) OR "
         "contains(lower(SeriesDescription), $t)", {"t": "contrast"},
         lambda d: d.StudyDescription.str.lower().str.contains("contrast", regex=False)
         .fillna(False)
         | d.SeriesDescription.str.lower().str.contains("contrast", regex=False).fillna(False)),
        ("female, 2000-2010", "StudyDate BETWEEN $a AND $b AND PatientSex = 'F'",
         {"a": "2000-01-01", "b": "2010-12-31"},
         lambda d: d.StudyDate.between("2000-01-01", "2010-12-31") & (d.PatientSex == "F")),
        (">= 100 images, < 200 MB", "instanceCount >= 100 AND series_size_MB < 200", {},
         lambda d: (d.instanceCount >= 100) & (d.series_size_MB < 200)),
        ("not CT/MR, CC BY 4.0", "Modality NOT IN ('CT', 'MR') AND license_short_name = $l",
         {"l": "CC BY 4.0"},
         lambda d: ~d.Modality.isin(["CT", "MR"]) & (d.license_short_name == "CC BY 4.0")),
        ("original data of 3 collections", "list_contains($c, collection_id) AND "
         "analysis_result_id IS NULL", {"c": ["nlst", "tcga_luad", "lidc_idri"]},
         lambda d: d.collection_id.isin(["nlst", "tcga_luad", "lidc_idri"])
         & d.analysis_result_id.isna()),
        ("age >= 65", "TRY_CAST(left(PatientAge, 3) AS INTEGER) >= 65 AND PatientAge LIKE '%Y'",
         {}, lambda d: (pd.to_numeric(d.PatientAge.str[:3], errors="coerce") >= 65)
         & d.PatientAge.str.endswith("Y").fillna(False)),
        ("CT chest, follow-up 90-400 d",
         "Modality = 'CT' AND list_contains($bp, BodyPartExamined) AND EXISTS (SELECT 1 "
         "FROM idc l WHERE l.PatientID = idc.PatientID AND l.collection_id = idc.collection_id "
         "AND l.Modality = 'CT' AND list_contains($bp, l.BodyPartExamined) "
         "AND l.StudyInstanceUID <> idc.StudyInstanceUID AND date_diff('day', "
         "TRY_CAST(idc.StudyDate AS DATE), TRY_CAST(l.StudyDate AS DATE)) BETWEEN 90 AND 400)",
         {"bp": chest}, followed),
    ]


# --- timing ------------------------------------------------------------------------------

def timed(fn: Callable[[], int], repeat: int) -> tuple[float, float, int]:
    """(median wall seconds, median CPU seconds of the process, result) after a warm-up."""
    n = fn()  # warm-up
    walls, cpus = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), n


def run_lake(path: Path, repeat: int, threads: int, form: str, info: dict) -> list[dict]:
    """The ten specs, first decoding the Parquet files per query, then with the tables
    cached in memory."""
    from catalog import cohorts, open_lake
    from catalog.spec import compile_spec

    rows = []
    t = time.perf_counter()
    cat = open_lake(path, threads=threads)
    info["open_seconds"] = round(time.perf_counter() - t, 3)
    with cat:
        t = time.perf_counter()
        base = cat.df("SELECT * FROM cohort_base")  # pandas side: in memory, joined once
        base["StudyDate"] = pd.to_datetime(base["StudyDate"])
        info["pandas_load_seconds"] = round(time.perf_counter() - t, 2)
        for label in ("lake", "lake_cached"):
            if label == "lake_cached":
                t = time.perf_counter()
                cohorts.cache_base(cat)
                info["cache_seconds"] = round(time.perf_counter() - t, 2)
            for name, spec, pfilter in lake_queries():
                if form == "members":
                    c = compile_spec(spec, members=True)
                    sql = c.sql
                else:
                    c = compile_spec(spec)
                    sql = f"SELECT SeriesInstanceUID FROM ({c.sql})"

                def duck(sql=sql, params=c.params) -> int:
                    return cat.arrow(sql, params).num_rows

                def pandas(pfilter=pfilter) -> int:
                    return len(base.loc[pfilter(base), "SeriesInstanceUID"])

                d, dc, nd = timed(duck, repeat)
                p, pcpu, np_ = timed(pandas, repeat)
                rows.append({"data": label, "query": name, "duckdb_ms": d * 1000,
                             "duckdb_cpu_ms": dc * 1000, "pandas_ms": p * 1000,
                             "pandas_cpu_ms": pcpu * 1000, "series": nd, "same": nd == np_})
                log(f"  {label} {name}: {d * 1000:.0f} ms (cpu {dc * 1000:.0f}), pandas "
                    f"{p * 1000:.0f} ms, {nd} series")
    return rows


def run_idc(repeat: int, threads: int) -> list[dict]:
    import duckdb
    import idc_index_data

    path = str(idc_index_data.IDC_INDEX_PARQUET_FILEPATH)
    con = duckdb.connect()
    con.execute(f"SET threads TO {int(threads)}")
    con.execute("CREATE TABLE idc AS SELECT * FROM read_parquet(?)", [path])
    df = pd.read_parquet(path)
    rows = []
    for name, where, params, pfilter in idc_queries():
        sql = f"SELECT SeriesInstanceUID FROM idc WHERE {where}"

        def duck(sql=sql, params=params) -> int:
            return con.sql(sql, params=params or None).to_arrow_table().num_rows

        def pandas(pfilter=pfilter) -> int:
            return len(df.loc[pfilter(df), "SeriesInstanceUID"])

        d, dc, nd = timed(duck, repeat)
        p, pcpu, np_ = timed(pandas, repeat)
        rows.append({"data": "idc_index", "query": name, "duckdb_ms": d * 1000,
                     "duckdb_cpu_ms": dc * 1000, "pandas_ms": p * 1000,
                     "pandas_cpu_ms": pcpu * 1000, "series": nd, "same": nd == np_})
        log(f"  idc {name}: {d * 1000:.0f} ms (cpu {dc * 1000:.0f}), pandas {p * 1000:.0f} ms, "
            f"{nd} series")
    con.close()
    return rows


def report(rows: list[dict], info: dict) -> str:
    out = [f"# cohort queries, {info['threads']} DuckDB threads, median of {info['repeat']} "
           f"runs ({info['date']}, {info['machine']}); load average "
           f"{info['load_before']} before, {info.get('load_after', '?')} after"]
    if "lake" in info:
        lk = info["lake"]
        out.append(f"synthetic lake: {lk['series']:,} series, {lk['studies']:,} studies, "
                   f"{lk['instances_counted']:,} instances counted; catalog opened in "
                   f"{info.get('open_seconds', '?')} s; query form: {info['form']}")
        out.append("  lake: each query decodes the snapshot's Parquet files (footers cached); "
                   f"lake_cached: series, studies and cohort_base in memory (copied once in "
                   f"{info.get('cache_seconds', '?')} s)")
    out.append("each query returns the SeriesInstanceUIDs of the matching series; cpu = CPU "
               "time of the process (all threads)")
    out.append(f"{'data':<11} {'query':<31} {'duckdb ms':>9} {'cpu ms':>7} {'pandas ms':>9} "
               f"{'pandas/duckdb':>13} {'series':>9}  same")
    for r in rows:
        out.append(f"{r['data']:<11} {r['query']:<31} {r['duckdb_ms']:>9.1f} "
                   f"{r['duckdb_cpu_ms']:>7.1f} {r['pandas_ms']:>9.1f} "
                   f"{r['pandas_ms'] / r['duckdb_ms']:>13.2f} {r['series']:>9,}  "
                   f"{'yes' if r['same'] else 'NO'}")
    for data in ("lake", "lake_cached", "idc_index"):
        sel = [r for r in rows if r["data"] == data]
        if sel:
            med = statistics.median(r["duckdb_ms"] for r in sel)
            cpu = statistics.median(r["duckdb_cpu_ms"] for r in sel)
            pmed = statistics.median(r["pandas_ms"] for r in sel)
            out.append(f"{data}: median per query duckdb {med:.1f} ms wall, {cpu:.1f} ms cpu "
                       f"(target <= 100 ms: {'met' if med <= 100 else 'NOT met'}), pandas "
                       f"{pmed:.1f} ms, ratio of medians {pmed / med:.2f}")
    return "\n".join(out)


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--series", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="where the synthetic lake goes (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the synthetic lake")
    ap.add_argument("--skip-idc", action="store_true")
    ap.add_argument("--skip-lake", action="store_true")
    ap.add_argument("--form", choices=("members", "rows"), default="members",
                    help="members: the spec's members query (default); rows: the UIDs "
                    "projected out of the rows query")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-cohorts-"))
    info: dict = {"threads": args.threads, "repeat": args.repeat, "date": date.today().isoformat(),
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "form": args.form,
                  "load_before": _load()}
    rows: list[dict] = []
    try:
        if not args.skip_lake:
            lake = workdir / f"lake-{args.series}-{args.seed}"
            log(f"building the synthetic lake ({args.series:,} series) in {lake} ...")
            info["lake"] = build_lake(lake, args.series, args.seed)
            log(f"  {info['lake']}")
            rows += run_lake(lake, args.repeat, args.threads, args.form, info)
        if not args.skip_idc:
            try:
                rows += run_idc(args.repeat, args.threads)
            except ImportError:
                log("idc-index-data is not installed (pip install idc-index-data): "
                    "IDC part skipped")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    info["load_after"] = _load()
    print(json.dumps({"info": info, "rows": rows}, indent=2) if args.json
          else report(rows, info))
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
