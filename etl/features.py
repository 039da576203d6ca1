"""The features job: series geometry, image statistics and radiomics as lake tables.

It reads one lake snapshot (``instances`` for the geometry, the vault
``files`` table for source paths), finds the masks in the lake (DICOM SEG and
RTSTRUCT instances, matched to the image series they reference) plus any mask
files given with a series UID, computes one Dask task per image series, and
commits ``series_geometry``, ``image_stats``, ``radiomics_features`` and
``feature_failures`` through :class:`~lakehouse.tables.LakeWriter`, publishing
a snapshot. Rows of series computed again replace their earlier rows.

>>> from lakehouse import Lake
>>> from etl.features import FeaturesConfig, compute_features
>>> summary = compute_features(Lake.open("lake"), FeaturesConfig(series=("1.2.3",)))
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from etl.errors import FeatureError, SchedulerError
from etl.imagestats import series_stats
from etl.masks import (
    MASK_SOP_CLASSES,
    RTSTRUCT_SOP_CLASS,
    MaskSet,
    labels_from_json,
    read_mask_file,
    read_rtstruct,
    read_seg,
    referenced_series,
)
from etl.radiomics import EXTRACTOR_VERSION, Params, extract
from etl.volumes import load_volume, series_geometry
from lakehouse import audit
from lakehouse.provenance import new_run_id
from lakehouse.schemas import TABLES, conform
from lakehouse.tables import Lake

log = logging.getLogger(__name__)

GEOMETRY_COLUMNS = ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality",
                    "SOPClassUID", "ImagePositionPatient", "ImageOrientationPatient",
                    "PixelSpacing", "Rows", "Columns", "BurnedInAnnotation"]
MASK_COLUMNS = ["SOPInstanceUID", "dicom_json"]
OUTPUT_TABLES = ("series_geometry", "image_stats", "radiomics_features", "feature_failures")


@dataclass
class FeaturesConfig:
    #: image series to compute (empty: every image series of the lake)
    series: tuple[str, ...] = ()
    #: radiomics parameters (default: etl/radiomics/default.yaml)
    params: Params | None = None
    #: (image SeriesInstanceUID, label-map path) pairs of mask files outside the lake
    mask_files: tuple[tuple[str, str], ...] = ()
    #: processes, threads, synchronous, local-cluster or a scheduler address
    scheduler: str = "processes"
    workers: int | None = None
    #: series per Dask task
    batch_series: int = 4
    #: skip the non-image series among ``series`` (a cohort's SR, SEG...) instead of failing
    image_series_only: bool = False


@dataclass
class FeaturesSummary:
    run_id: str
    series: int = 0
    volumes_ok: int = 0
    image_stats: int = 0
    masks: int = 0
    segments: int = 0
    feature_rows: int = 0
    failures: int = 0
    seconds: float = 0.0
    snapshot: int | None = None
    failure_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class SeriesTask:
    """Everything one worker needs for one image series (plain data, picklable)."""

    series_uid: str
    rows: list[dict]
    paths: dict[str, str]
    #: (mask kind 'seg'/'rtstruct'/'file', SOPInstanceUID or None, path)
    masks: list[tuple[str, str | None, str]]
    #: segment labels of lake masks as the lake holds them {mask SOPInstanceUID: {n: label}}
    labels: dict[str, dict[int, str]] = field(default_factory=dict)


def _failure(series: str | None, stage: str, err: FeatureError) -> dict:
    return {"SeriesInstanceUID": series, "mask_SOPInstanceUID": err.mask_uid, "stage": stage,
            "reason": err.reason, "message": err.message}


def process_series(task: SeriesTask, params: Params) -> dict[str, list[dict]]:
    """Geometry, statistics and radiomics of one series; failures become rows."""
    out: dict[str, list[dict]] = {t: [] for t in OUTPUT_TABLES}
    uid = task.series_uid
    geo = series_geometry(task.rows, uid)
    out["series_geometry"].append(geo.row)
    first = task.rows[0]
    burned = any(str(r.get("BurnedInAnnotation") or "").upper() == "YES" for r in task.rows)
    files = [(r["SOPInstanceUID"], task.paths.get(r["SOPInstanceUID"])) for r in task.rows]
    out["image_stats"].append(series_stats(uid, files, first.get("Modality"),
                                           first.get("StudyInstanceUID"), burned))
    if not task.masks:
        return out
    try:
        image = load_volume(geo, task.paths)
    except FeatureError as err:
        for _kind, mask_uid, _path in task.masks:
            err.mask_uid = mask_uid
            out["feature_failures"].append(_failure(uid, "volume", err))
        return out
    readers = {"seg": read_seg, "rtstruct": read_rtstruct, "file": read_mask_file}
    for kind, mask_uid, path in task.masks:
        try:
            mask_set: MaskSet = readers[kind](path, geo)
        except FeatureError as err:
            err.mask_uid = mask_uid  # the lake's UID, never the one inside the file
            out["feature_failures"].append(_failure(uid, "mask", err))
            continue
        except Exception as exc:  # a malformed object the readers did not foresee
            out["feature_failures"].append(_failure(uid, "mask", FeatureError(
                "unsupported_mask", uid, f"the {kind} mask cannot be placed on the image: "
                f"{type(exc).__name__}: {exc}", mask_uid)))
            continue
        mask_set.sop_uid = mask_uid
        lake_labels = task.labels.get(mask_uid or "", {})
        for seg in mask_set.segments:
            seg.label = lake_labels.get(seg.number, seg.label) if mask_uid else seg.label
            n = seg.voxel_count
            if n == 0:
                out["feature_failures"].append(_failure(uid, "radiomics", FeatureError(
                    "empty_segment", uid, f"segment {seg.number} ({seg.label}) has no voxel",
                    mask_set.sop_uid)))
                continue
            try:
                values = extract(image, seg.mask, params)
            except Exception as exc:  # recorded, so one segment never stops the run
                out["feature_failures"].append(_failure(uid, "radiomics", FeatureError(
                    "feature_error", uid, f"segment {seg.number} ({seg.label}): "
                    f"{type(exc).__name__}: {exc}", mask_set.sop_uid)))
                continue
            for (cls, name), value in values.items():
                out["radiomics_features"].append({
                    "SeriesInstanceUID": uid, "mask_SOPInstanceUID": mask_set.sop_uid,
                    "mask_source": mask_set.source, "segment_number": seg.number,
                    "segment_label": seg.label, "feature_class": cls, "feature_name": name,
                    "value": value, "voxel_count": n, "param_hash": params.hash,
                    "params_version": params.version, "extractor_version": EXTRACTOR_VERSION,
                })
    return out


def process_batch(tasks: list[SeriesTask], params: Params) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {t: [] for t in OUTPUT_TABLES}
    for task in tasks:
        try:
            result = process_series(task, params)
        except Exception as exc:  # one odd series never stops the batch
            log.exception("series %s", task.series_uid)
            result = {t: [] for t in OUTPUT_TABLES}
            result["feature_failures"].append(_failure(task.series_uid, "volume", FeatureError(
                "feature_error", task.series_uid, f"{type(exc).__name__}: {exc}")))
        for name, rows in result.items():
            out[name].extend(rows)
    return out


def plan(lake: Lake, config: FeaturesConfig) -> list[SeriesTask]:
    """Image series to compute, with their instance rows, source paths and masks."""
    import pydicom

    inst = lake.read("instances", columns=GEOMETRY_COLUMNS).to_pylist()
    files = lake.read("files", columns=["path", "SOPInstanceUID", "outcome"],
                      filter=pc.field("outcome") == "ingested").to_pylist()
    paths = {f["SOPInstanceUID"]: f["path"] for f in files if f["SOPInstanceUID"]}
    by_series: dict[str, list[dict]] = defaultdict(list)
    masks: list[dict] = []
    for row in inst:
        if row["SOPClassUID"] in MASK_SOP_CLASSES:
            masks.append(row)
        elif row["Rows"]:
            by_series[row["SeriesInstanceUID"]].append(row)
    wanted = set(config.series) or set(by_series)
    unknown = sorted(wanted - set(by_series))
    if unknown and config.image_series_only:
        log.info("skipping %d series without images", len(unknown))
        wanted -= set(unknown)
    elif unknown:
        raise FeatureError("missing_file", unknown[0],
                           f"series {unknown[0]} is not an image series of this lake "
                           "(list them with `lake sql \"SELECT SeriesInstanceUID FROM series\"`)")
    tasks = {uid: SeriesTask(uid, sorted(by_series[uid], key=lambda r: r["SOPInstanceUID"]),
                             {r["SOPInstanceUID"]: paths[r["SOPInstanceUID"]]
                              for r in by_series[uid] if r["SOPInstanceUID"] in paths}, [])
             for uid in sorted(wanted)}
    # masks: the series they reference, read from the mask file's header; their labels
    # from the lake's header (cleaned by the privacy policy in research lakes)
    mask_labels: dict[str, dict[int, str]] = {}
    if masks:
        rows = lake.read("instances", columns=MASK_COLUMNS, filter=pc.field(
            "SOPInstanceUID").isin([m["SOPInstanceUID"] for m in masks])).to_pylist()
        mask_labels = {r["SOPInstanceUID"]: labels_from_json(r["dicom_json"]) for r in rows}
    original_to_lake: dict[str, str] | None = None
    for m in masks:
        path = paths.get(m["SOPInstanceUID"])
        if path is None:
            continue
        try:
            ref = referenced_series(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as exc:  # an unreadable mask header: nothing to match
            log.warning("mask %s: cannot read its header: %s", m["SOPInstanceUID"], exc)
            continue
        if ref is not None and ref not in by_series:
            # research lakes remap UIDs: match on the series UID found in the source files
            if original_to_lake is None:
                original_to_lake = {}
                for uid, rows in by_series.items():
                    p = paths.get(rows[0]["SOPInstanceUID"])
                    if p:
                        try:
                            d = pydicom.dcmread(p, stop_before_pixels=True,
                                                specific_tags=["SeriesInstanceUID"])
                            original_to_lake[str(d.SeriesInstanceUID)] = uid
                        except Exception:
                            continue
            ref = original_to_lake.get(ref)
        if ref in tasks:
            kind = "rtstruct" if m["SOPClassUID"] == RTSTRUCT_SOP_CLASS else "seg"
            tasks[ref].masks.append((kind, m["SOPInstanceUID"], path))
            tasks[ref].labels[m["SOPInstanceUID"]] = mask_labels.get(m["SOPInstanceUID"], {})
    for series_uid, mask_path in config.mask_files:
        if series_uid not in tasks:
            raise FeatureError("missing_file", series_uid,
                               f"mask file {Path(mask_path).name} names series {series_uid}, "
                               "which is not an image series of this lake")
        tasks[series_uid].masks.append(("file", None, str(mask_path)))
    return list(tasks.values())


def _compute(batches: list[list[SeriesTask]], params: Params, config: FeaturesConfig
             ) -> list[dict[str, list[dict]]]:
    import dask

    delayed = [dask.delayed(process_batch, pure=False)(b, params) for b in batches]
    if config.scheduler in ("processes", "threads", "synchronous"):
        kwargs: dict = {"scheduler": config.scheduler}
        if config.workers and config.scheduler != "synchronous":
            kwargs["num_workers"] = config.workers
        if config.scheduler == "processes":
            # one batch per hand-out: Dask's default chunks of 6 would idle a worker
            kwargs["chunksize"] = 1
        return list(dask.compute(*delayed, **kwargs))
    from distributed import Client, LocalCluster

    cluster = None
    try:
        if config.scheduler == "local-cluster":
            cluster = LocalCluster(n_workers=config.workers or 2, threads_per_worker=1,
                                   processes=True, host="127.0.0.1", dashboard_address=":0")
            client = Client(cluster)
        else:
            client = Client(config.scheduler, timeout="10s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise SchedulerError(config.scheduler, str(exc) or type(exc).__name__) from None
    try:
        return list(client.gather(client.compute(delayed)))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def compute_features(lake: Lake, config: FeaturesConfig | None = None) -> FeaturesSummary:
    """Compute and commit the feature tables; returns what was done."""
    config = config or FeaturesConfig()
    params = config.params or Params.default()
    run_id = new_run_id()
    started = time.monotonic()
    summary = FeaturesSummary(run_id)
    tasks = plan(lake, config)
    # the source paths come from the vault: say so in its audit log
    audit.record(lake, "features", text=f"source paths of {len(tasks)} series",
                 snapshot=lake.snapshot().number, extra={"features_run_id": run_id})
    summary.series = len(tasks)
    summary.masks = sum(len(t.masks) for t in tasks)
    size = max(1, config.batch_series)
    batches = [tasks[i:i + size] for i in range(0, len(tasks), size)]
    results = _compute(batches, params, config) if batches else []
    merged: dict[str, list[dict]] = {t: [] for t in OUTPUT_TABLES}
    for res in results:
        for name, rows in res.items():
            merged[name].extend(rows)
    computed = {t.series_uid for t in tasks}
    with lake.writer(run_id) as writer:
        for name in OUTPUT_TABLES:
            for row in merged[name]:
                row["features_run_id"] = run_id
            new = pa.Table.from_pylist(merged[name]) if merged[name] else None
            old = writer.dataset(name).to_table()
            keep = old.filter(pc.invert(pc.is_in(old.column("SeriesInstanceUID"),
                                                 pa.array(sorted(computed), pa.string()))))
            parts = [keep.select(old.column_names)]
            if new is not None:
                parts.append(conform(TABLES[name], new, lake.profile))
            writer.overwrite(name, pa.concat_tables(parts), param_hash=params.hash)
        snap = writer.publish(f"features run {run_id}")
    summary.snapshot = snap.number
    summary.volumes_ok = sum(1 for r in merged["series_geometry"] if r.get("volume_ok"))
    summary.image_stats = sum(1 for r in merged["image_stats"] if r.get("status") != "failed")
    summary.feature_rows = len(merged["radiomics_features"])
    summary.segments = len({(r["SeriesInstanceUID"], r["mask_SOPInstanceUID"], r["mask_source"],
                             r["segment_number"]) for r in merged["radiomics_features"]})
    summary.failures = len(merged["feature_failures"])
    reasons: dict[str, int] = defaultdict(int)
    for r in merged["feature_failures"]:
        reasons[r["reason"]] += 1
    summary.failure_reasons = dict(reasons)
    summary.seconds = time.monotonic() - started
    log.info("features run %s: %d series, %d feature rows, %d failures", run_id,
             summary.series, summary.feature_rows, summary.failures)
    return summary
