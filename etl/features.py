"""The features job: series geometry, image statistics and radiomics as lake tables.

It reads one lake snapshot (``instances`` for the geometry, the vault
``files`` table for source paths), finds the masks in the lake (DICOM SEG and
RTSTRUCT instances, matched to the image series they reference) plus any mask
files given with a series UID, and computes in two Dask stages: batches of
series (geometry, image statistics, masks placed on the image grid and cut
into (series, segment) units), then batches of units (radiomics; a worker
reads a series' volume once for the units of it that it runs). It commits
``series_geometry``, ``image_stats``, ``radiomics_features`` and
``feature_failures`` through :class:`~lakehouse.tables.LakeWriter` in one
snapshot. Rows of series computed again replace their earlier rows; in
``radiomics_features`` only those with the same parameter hash, so features
of several parameter sets live side by side, each exactly once.

>>> from lakehouse import Lake
>>> from etl.features import FeaturesConfig, compute_features
>>> summary = compute_features(Lake.open("lake"), FeaturesConfig(series=("1.2.3",)))
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from etl.errors import FeatureError, SchedulerError
from etl.imagestats import series_stats
from etl.masks import (
    MASK_SOP_CLASSES,
    RTSTRUCT_SOP_CLASS,
    MaskSet,
    Segment,
    labels_from_json,
    read_mask_file,
    read_rtstruct,
    read_seg,
    referenced_series,
)
from etl.radiomics import EXTRACTOR_VERSION, Params, extract
from etl.radiomics.preprocess import bounding_box, normalize
from etl.sourcefiles import Source, SourceChangedError, checked_path, quietly, source_from_row
from etl.volumes import Geometry, check_volume, load_volume, series_geometry
from lakehouse import audit
from lakehouse.errors import error_text
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
    #: series per Dask task of the first stage (geometry, statistics, masks)
    batch_series: int = 4
    #: (series, segment) units per Dask task of the second stage (radiomics)
    batch_segments: int = 1
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
    #: Dask tasks of the radiomics stage, and volumes they read from the source files
    segment_tasks: int = 0
    volume_loads: int = 0
    seconds: float = 0.0
    snapshot: int | None = None
    failure_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class SeriesTask:
    """Everything one worker needs for one image series (plain data, picklable)."""

    series_uid: str
    rows: list[dict]
    #: the source file of each instance {SOPInstanceUID: source}
    paths: dict[str, Source]
    #: (mask kind 'seg'/'rtstruct'/'file', SOPInstanceUID or None, source file or, for
    #: a mask file named by the user, its path)
    masks: list[tuple[str, str | None, Source | str]]
    #: segment labels of lake masks as the lake holds them {mask SOPInstanceUID: {n: label}}
    labels: dict[str, dict[int, str]] = field(default_factory=dict)


def _failure(series: str | None, stage: str, err: FeatureError) -> dict:
    return {"SeriesInstanceUID": series, "mask_SOPInstanceUID": err.mask_uid, "stage": stage,
            "reason": err.reason, "message": err.message}


@dataclass
class VolumeSource:
    """Where one series' volume comes from: its geometry and source files (picklable)."""

    series_uid: str
    geometry: Geometry
    paths: dict[str, Source]

    @property
    def key(self) -> tuple:
        return (self.series_uid, tuple((sop, self.paths.get(sop)) for sop in self.geometry.order))


@dataclass
class SegmentUnit:
    """One (image series, mask, segment): the unit of radiomics work (plain data, picklable).

    The segment travels as its bounding box (offset and shape) and the box's
    voxels as packed bits, so a unit weighs kilobytes whatever the volume.
    """

    series_uid: str
    mask_uid: str | None
    mask_source: str
    number: int
    label: str
    voxel_count: int
    offset: tuple[int, ...]
    box_shape: tuple[int, ...]
    bits: bytes

    @classmethod
    def of(cls, series_uid: str, mask_set: MaskSet, segment: Segment) -> SegmentUnit:
        box = bounding_box(segment.mask)
        crop = segment.mask[box]
        return cls(series_uid, mask_set.sop_uid, mask_set.source, segment.number, segment.label,
                   segment.voxel_count, tuple(s.start for s in box), crop.shape,
                   np.packbits(crop).tobytes())

    def mask(self, shape: tuple[int, ...]) -> np.ndarray:
        """The segment as a boolean array of the volume's shape."""
        n = int(np.prod(self.box_shape))
        crop = np.unpackbits(np.frombuffer(self.bits, dtype=np.uint8), count=n)
        full = np.zeros(shape, dtype=bool)
        box = tuple(slice(o, o + k) for o, k in zip(self.offset, self.box_shape, strict=True))
        full[box] = crop.reshape(self.box_shape).astype(bool)
        return full


@dataclass
class Prepared:
    """What the first stage makes of a batch of series."""

    rows: dict[str, list[dict]]
    units: list[SegmentUnit] = field(default_factory=list)
    volumes: dict[str, VolumeSource] = field(default_factory=dict)


def _empty_rows() -> dict[str, list[dict]]:
    return {t: [] for t in OUTPUT_TABLES}


def prepare_series(task: SeriesTask) -> Prepared:
    """Stage 1 for one series: geometry, statistics, its masks cut into segment units."""
    out = Prepared(_empty_rows())
    rows = out.rows
    uid = task.series_uid
    geo = series_geometry(task.rows, uid)
    rows["series_geometry"].append(geo.row)
    first = task.rows[0]
    burned = any(str(r.get("BurnedInAnnotation") or "").upper() == "YES" for r in task.rows)
    files = [(r["SOPInstanceUID"], task.paths.get(r["SOPInstanceUID"])) for r in task.rows]
    rows["image_stats"].append(series_stats(uid, files, first.get("Modality"),
                                            first.get("StudyInstanceUID"), burned))
    if not task.masks:
        return out
    try:
        check_volume(geo, task.paths)
    except FeatureError as err:
        for _kind, mask_uid, _path in task.masks:
            err.mask_uid = mask_uid
            rows["feature_failures"].append(_failure(uid, "volume", err))
        return out
    out.volumes[uid] = VolumeSource(uid, geo, {sop: task.paths[sop] for sop in geo.order})
    readers: dict[str, Callable[..., MaskSet]] = {
        "seg": read_seg, "rtstruct": read_rtstruct, "file": read_mask_file}
    for kind, mask_uid, path in task.masks:
        try:
            mask_set: MaskSet = readers[kind](path, geo)
        except FeatureError as err:
            err.mask_uid = mask_uid  # the lake's UID, never the one inside the file
            rows["feature_failures"].append(_failure(uid, "mask", err))
            continue
        except Exception as exc:  # a malformed object the readers did not foresee
            rows["feature_failures"].append(_failure(uid, "mask", FeatureError(
                "unsupported_mask", uid, f"the {kind} mask cannot be placed on the image: "
                f"{error_text(exc)}", mask_uid)))
            continue
        mask_set.sop_uid = mask_uid
        lake_labels = task.labels.get(mask_uid or "", {})
        for seg in mask_set.segments:
            seg.label = lake_labels.get(seg.number, seg.label) if mask_uid else seg.label
            if seg.voxel_count == 0:
                rows["feature_failures"].append(_failure(uid, "radiomics", FeatureError(
                    "empty_segment", uid, f"segment {seg.number} ({seg.label}) has no voxel",
                    mask_set.sop_uid)))
                continue
            out.units.append(SegmentUnit.of(uid, mask_set, seg))
    return out


def prepare_batch(tasks: list[SeriesTask]) -> Prepared:
    """Stage 1 for a batch of series; an unexpected error in one series is a failure row."""
    out = Prepared(_empty_rows())
    for task in tasks:
        try:
            with quietly():
                result = prepare_series(task)
        except Exception as exc:  # one odd series never stops the batch
            # the error without the values it quotes (the traceback at debug level)
            log.error("series %s: %s", task.series_uid, error_text(exc))
            log.debug("series %s", task.series_uid, exc_info=True)
            result = Prepared(_empty_rows())
            result.rows["feature_failures"].append(_failure(
                task.series_uid, "volume", FeatureError(
                    "feature_error", task.series_uid, error_text(exc))))
        for name, rows in result.rows.items():
            out.rows[name].extend(rows)
        out.units.extend(result.units)
        out.volumes.update(result.volumes)
    return out


# --- stage 2: radiomics per (series, segment) ------------------------------------------

#: Volumes kept per worker process between units (the units of a series are handed out
#: together, so one is enough; each holds a whole series in float32).
VOLUME_CACHE_SIZE = 1
_volumes: OrderedDict[tuple, object] = OrderedDict()
_volumes_lock = threading.Lock()


def _volume(source: VolumeSource, params: Params, run_id: str) -> tuple[object, bool]:
    """The series' image, normalized as the parameters say: (image, whether it was read now).

    Kept per process for the units that follow, keyed by the run, the files and the
    normalization settings, so a worker reads each volume once while its units come.
    """
    setting = params.setting
    norm = tuple((k, setting.get(k)) for k in ("normalize", "normalizeScale", "removeOutliers"))
    key = (run_id, source.key, norm)
    with _volumes_lock:
        if key in _volumes:
            _volumes.move_to_end(key)
            return _volumes[key], False
    image = normalize(load_volume(source.geometry, source.paths), setting)
    with _volumes_lock:
        _volumes[key] = image
        while len(_volumes) > VOLUME_CACHE_SIZE:
            _volumes.popitem(last=False)
    return image, True


@dataclass
class SegmentResults:
    rows: dict[str, list[dict]]
    #: volumes read from the source files by this batch (the others came from the cache)
    volume_loads: int = 0


def compute_segments(units: list[SegmentUnit], volumes: dict[str, VolumeSource],
                     params: Params, run_id: str = "") -> SegmentResults:
    """Stage 2: the radiomics features of each unit; failures become rows."""
    out = SegmentResults({"radiomics_features": [], "feature_failures": []})
    rows = out.rows
    for unit in units:
        uid = unit.series_uid
        try:
            with quietly():
                image, loaded = _volume(volumes[uid], params, run_id)
        except FeatureError as err:
            err.mask_uid = unit.mask_uid
            rows["feature_failures"].append(_failure(uid, "volume", err))
            continue
        except Exception as exc:  # one odd volume never stops the batch
            log.error("series %s: %s", uid, error_text(exc))
            log.debug("series %s", uid, exc_info=True)
            rows["feature_failures"].append(_failure(uid, "volume", FeatureError(
                "feature_error", uid, error_text(exc), unit.mask_uid)))
            continue
        out.volume_loads += loaded
        where = f"segment {unit.number} ({unit.label})"
        try:
            values = extract(image, unit.mask(volumes[uid].geometry.shape), params,
                             normalized=True)
        except Exception as exc:  # recorded, so one segment never stops the run
            rows["feature_failures"].append(_failure(uid, "radiomics", FeatureError(
                "feature_error", uid, f"{where}: {error_text(exc)}", unit.mask_uid)))
            continue
        for (cls, name), value in values.items():
            rows["radiomics_features"].append({
                "SeriesInstanceUID": uid, "mask_SOPInstanceUID": unit.mask_uid,
                "mask_source": unit.mask_source, "segment_number": unit.number,
                "segment_label": unit.label, "feature_class": cls, "feature_name": name,
                "value": value, "voxel_count": unit.voxel_count, "param_hash": params.hash,
                "params_version": params.version, "extractor_version": EXTRACTOR_VERSION,
            })
    return out


def process_series(task: SeriesTask, params: Params) -> dict[str, list[dict]]:
    """Both stages for one series, in this process (what a features run does for it)."""
    prepared = prepare_series(task)
    done = compute_segments(prepared.units, prepared.volumes, params)
    return _merge([prepared.rows, done.rows])


def process_batch(tasks: list[SeriesTask], params: Params) -> dict[str, list[dict]]:
    """Both stages for a batch of series, in this process."""
    prepared = prepare_batch(tasks)
    done = compute_segments(prepared.units, prepared.volumes, params)
    return _merge([prepared.rows, done.rows])


#: What makes a row unique in each output table of one run (a row met twice, say a unit
#: computed again after a worker was lost, is kept once).
ROW_KEYS: dict[str, tuple[str, ...]] = {
    "series_geometry": ("SeriesInstanceUID",),
    "image_stats": ("SeriesInstanceUID",),
    "radiomics_features": ("SeriesInstanceUID", "mask_SOPInstanceUID", "mask_source",
                           "segment_number", "feature_class", "feature_name", "param_hash"),
    "feature_failures": ("SeriesInstanceUID", "mask_SOPInstanceUID", "stage", "reason",
                         "message"),
}


def _merge(parts: list[dict[str, list[dict]]]) -> dict[str, list[dict]]:
    """Rows of several results, each key once (the first met)."""
    out = _empty_rows()
    for name in OUTPUT_TABLES:
        seen: set[tuple] = set()
        for part in parts:
            for row in part.get(name, []):
                key = tuple(row.get(k) for k in ROW_KEYS[name])
                if key not in seen:
                    seen.add(key)
                    out[name].append(row)
    return out


def segment_batches(units: list[SegmentUnit], size: int) -> list[list[SegmentUnit]]:
    """Units in batches of at most ``size`` segments, in series order.

    Work is balanced by segment, not by series: a series with many segments is
    spread over several tasks, and a task holds segments of several small series.
    Keeping series order lets a worker's consecutive units share the cached volume.
    """
    ordered = sorted(units, key=lambda u: (u.series_uid, u.mask_source, u.mask_uid or "",
                                           u.number))
    size = max(1, size)
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def plan(lake: Lake, config: FeaturesConfig,
         unplaced: list[dict] | None = None) -> list[SeriesTask]:
    """Image series to compute, with their instance rows, source paths and masks.

    A mask of the lake the plan places on no image series (its header unreadable or
    changed since the ingest, or the series it references not in the lake) is added to
    ``unplaced`` as a ``feature_failures`` row, when the run is over the whole lake (a
    run over some series cannot tell whether a mask was one of theirs).
    """
    import pydicom

    inst = lake.read("instances", columns=GEOMETRY_COLUMNS).to_pylist()
    files = lake.read("files", columns=["path", "SOPInstanceUID", "outcome", "file_size",
                                        "file_sha256", "source_sha256", "checksum_bytes"],
                      filter=pc.field("outcome") == "ingested").to_pylist()
    paths = {f["SOPInstanceUID"]: source_from_row(f) for f in files if f["SOPInstanceUID"]}
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
            # force: the ingest has checked the file; a Part 10 file may lack its preamble
            ref = referenced_series(pydicom.dcmread(checked_path(path), stop_before_pixels=True,
                                                    force=True))
        except Exception as exc:  # an unreadable or changed mask: nothing to match
            log.warning("mask %s: cannot read its header: %s", m["SOPInstanceUID"],
                        error_text(exc))
            if unplaced is not None and not config.series:
                reason = "source_changed" if isinstance(exc, SourceChangedError) \
                    else "unsupported_mask"
                what = str(exc) if reason == "source_changed" else error_text(exc)
                unplaced.append(_failure(None, "mask", FeatureError(
                    reason, None, f"cannot read the mask's header: {what}",
                    m["SOPInstanceUID"])))
            continue
        if ref is not None and ref not in by_series:
            # research lakes remap UIDs: match on the series UID found in the source files
            if original_to_lake is None:
                original_to_lake = {}
                for uid, rows in by_series.items():
                    for row in rows:  # the first of its files still as ingested
                        p = paths.get(row["SOPInstanceUID"])
                        if p is None:
                            continue
                        try:
                            d = pydicom.dcmread(checked_path(p), stop_before_pixels=True,
                                                specific_tags=["SeriesInstanceUID"])
                        except Exception:
                            continue
                        original_to_lake[str(d.SeriesInstanceUID)] = uid
                        break
            ref = original_to_lake.get(ref)
        if ref in tasks:
            kind = "rtstruct" if m["SOPClassUID"] == RTSTRUCT_SOP_CLASS else "seg"
            tasks[ref].masks.append((kind, m["SOPInstanceUID"], path))
            tasks[ref].labels[m["SOPInstanceUID"]] = mask_labels.get(m["SOPInstanceUID"], {})
        elif ref not in by_series and unplaced is not None and not config.series:
            unplaced.append(_failure(None, "mask", FeatureError(
                "no_image_series", None, "the mask references no image series of the lake "
                "(ingest the series it was drawn on; its reference may be damaged)",
                m["SOPInstanceUID"])))
    for series_uid, mask_path in config.mask_files:
        if series_uid not in tasks:
            raise FeatureError("missing_file", series_uid,
                               f"mask file {Path(mask_path).name} names series {series_uid}, "
                               "which is not an image series of this lake")
        tasks[series_uid].masks.append(("file", None, str(mask_path)))
    return list(tasks.values())


class _Run:
    """Computes lists of Dask delayed objects on the configured scheduler; ``reset``
    replaces a process pool a dead worker has broken."""

    def __init__(self, compute: Callable[[list], list], reset: Callable[[], None]):
        self.compute = compute
        self.reset = reset

    def __call__(self, delayed: list) -> list:
        return self.compute(delayed) if delayed else []


@contextlib.contextmanager
def _runner(config: FeaturesConfig) -> Iterator[_Run]:
    """A :class:`_Run` on the configured scheduler."""
    import dask

    if config.scheduler in ("processes", "threads", "synchronous"):
        kwargs: dict = {"scheduler": config.scheduler}
        if config.workers and config.scheduler != "synchronous":
            kwargs["num_workers"] = config.workers
        if config.scheduler != "processes":
            yield _Run(lambda delayed: list(dask.compute(*delayed, **kwargs)), lambda: None)
            return
        from concurrent.futures import ProcessPoolExecutor

        from dask.multiprocessing import get_context, initialize_worker_process

        # one pool for both stages (its processes start and import once), set up as Dask
        # sets up its own; one task per hand-out: chunks of 6 would idle a worker
        kwargs["chunksize"] = 1
        os.environ.setdefault("PYTHONHASHSEED", "6640")

        def new_pool() -> None:
            kwargs["pool"] = ProcessPoolExecutor(config.workers or os.cpu_count(),
                                                 mp_context=get_context(),
                                                 initializer=initialize_worker_process)

        def reset() -> None:  # a worker died: the pool is broken for good
            kwargs["pool"].shutdown(wait=True, cancel_futures=True)
            new_pool()

        new_pool()
        try:
            yield _Run(lambda delayed: list(dask.compute(*delayed, **kwargs)), reset)
        finally:
            kwargs["pool"].shutdown(wait=True, cancel_futures=True)
        return
    from distributed import Client, LocalCluster

    cluster = None
    try:
        if config.scheduler == "local-cluster":
            # a task whose worker dies fails at once (KilledWorker), and its batch is
            # bisected: the default retries only kill more workers
            with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
                cluster = LocalCluster(n_workers=config.workers or 2, threads_per_worker=1,
                                       processes=True, host="127.0.0.1",
                                       dashboard_address=":0")
            client = Client(cluster)
        else:
            client = Client(config.scheduler, timeout="10s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise SchedulerError(config.scheduler, str(exc) or type(exc).__name__) from None
    try:
        yield _Run(lambda delayed: list(client.gather(client.compute(delayed))), lambda: None)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _crashed_series(tasks: list[SeriesTask]) -> Prepared:
    """Stage 1's result for a series whose computing killed its worker process."""
    out = Prepared(_empty_rows())
    for task in tasks:
        log.warning("computing a series crashed its worker: recorded as worker_crash")
        out.rows["feature_failures"].append(_failure(task.series_uid, "volume", FeatureError(
            "worker_crash", task.series_uid, "computing this series killed its worker process "
            "(a decoder's crash, or the memory exhausted); the rest of the run went on")))
    return out


def _crashed_units(units: list[SegmentUnit]) -> SegmentResults:
    """Stage 2's result for segments whose computing killed their worker process."""
    out = SegmentResults({"radiomics_features": [], "feature_failures": []})
    for u in units:
        log.warning("computing a segment crashed its worker: recorded as worker_crash")
        out.rows["feature_failures"].append(_failure(u.series_uid, "radiomics", FeatureError(
            "worker_crash", u.series_uid, f"computing segment {u.number} ({u.label}) killed "
            "its worker process (a decoder's crash, or the memory exhausted); the rest of "
            "the run went on", u.mask_uid)))
    return out


def _join_prepared(a: Prepared, b: Prepared) -> Prepared:
    return Prepared(_merge([a.rows, b.rows]), a.units + b.units, {**a.volumes, **b.volumes})


def _join_results(a: SegmentResults, b: SegmentResults) -> SegmentResults:
    return SegmentResults(_merge([a.rows, b.rows]), a.volume_loads + b.volume_loads)


def _rows_table(rows: list[dict]) -> pa.Table:
    """The rows as a table with every key any of them has: a failed series' row lacks the
    statistics (``pa.Table.from_pylist`` would take the columns of the first row only)."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pydict({n: [r.get(n) for r in rows] for n in names})


def _replace(old: pa.Table, computed: list[str], param_hash: str | None,
             whole_lake: bool = False) -> pa.Table:
    """Rows of ``old`` a run does not replace: other series, or (radiomics) other parameters.
    A run over the whole lake also replaces the rows of no series (unplaced masks)."""
    mine = pc.is_in(old.column("SeriesInstanceUID"), pa.array(computed, pa.string()))
    if whole_lake:
        mine = pc.or_kleene(mine, pc.is_null(old.column("SeriesInstanceUID")))
    if param_hash is not None:
        mine = pc.and_(mine, pc.equal(old.column("param_hash"), param_hash))
    return old.filter(pc.invert(pc.fill_null(mine, False)))


def compute_features(lake: Lake, config: FeaturesConfig | None = None) -> FeaturesSummary:
    """Compute and commit the feature tables; returns what was done.

    Two Dask stages: batches of series (geometry, image statistics, masks cut
    into segments), then batches of (series, segment) units (radiomics), each
    worker reading a volume once for the units of that series it is given.
    One commit replaces the rows of the computed series: all of them in
    series_geometry, image_stats and feature_failures, those with this
    parameter hash in radiomics_features (other parameter sets stay).
    """
    import dask

    config = config or FeaturesConfig()
    params = config.params or Params.default()
    run_id = new_run_id()
    started = time.monotonic()
    summary = FeaturesSummary(run_id)
    unplaced: list[dict] = []
    with quietly():  # the masks' headers, read for the series they reference
        tasks = plan(lake, config, unplaced)
    # the source paths come from the vault: say so in its audit log
    audit.record(lake, "features", text=f"source paths of {len(tasks)} series",
                 snapshot=lake.snapshot().number, extra={"features_run_id": run_id})
    summary.series = len(tasks)
    summary.masks = sum(len(t.masks) for t in tasks)
    size = max(1, config.batch_series)
    batches = [tasks[i:i + size] for i in range(0, len(tasks), size)]
    from etl.runners import bisect_crashes

    with _runner(config) as run:
        # named keys: Dask runs independent tasks in key order, so the units of a series
        # run one after the other and share the volume a worker has read
        # (numbered per call too: a key computed again in halves names another batch)
        calls = itertools.count()

        def stage1(parts: list[list[SeriesTask]]) -> list[Prepared]:
            call = next(calls)
            return run([dask.delayed(prepare_batch, pure=False)(
                b, dask_key_name=f"series-{run_id}-{call:04d}-{i:06d}")
                for i, b in enumerate(parts)])

        # a series or segment that kills its worker process (a decoder's crash, the
        # memory exhausted) is found by computing its batch again in halves: a failure
        # row, and the rest of the run goes on
        prepared = bisect_crashes(stage1, run.reset, batches, _crashed_series, _join_prepared)
        units = [u for p in prepared for u in p.units]
        volumes = {uid: v for p in prepared for uid, v in p.volumes.items()}
        unit_batches = segment_batches(units, config.batch_segments)

        def stage2(parts: list[list[SegmentUnit]]) -> list[SegmentResults]:
            call = next(calls)
            return run([dask.delayed(compute_segments, pure=False)(
                b, {u.series_uid: volumes[u.series_uid] for u in b}, params, run_id,
                dask_key_name=f"segments-{run_id}-{call:04d}-{i:06d}")
                for i, b in enumerate(parts)])

        done = bisect_crashes(stage2, run.reset, unit_batches, _crashed_units, _join_results)
    summary.segment_tasks = len(unit_batches)
    summary.volume_loads = sum(d.volume_loads for d in done)
    merged = _merge([p.rows for p in prepared] + [d.rows for d in done])
    merged["feature_failures"].extend(unplaced)
    computed = sorted(t.series_uid for t in tasks)
    with lake.writer(run_id) as writer:
        for name in OUTPUT_TABLES:
            for row in merged[name]:
                row["features_run_id"] = run_id
            new = _rows_table(merged[name]) if merged[name] else None
            old = writer.dataset(name).to_table()
            keep = _replace(old, computed,
                            params.hash if name == "radiomics_features" else None,
                            whole_lake=not config.series)
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
    log.info("features run %s: %d series, %d segments in %d tasks (%d volume reads), "
             "%d feature rows, %d failures", run_id, summary.series, summary.segments,
             summary.segment_tasks, summary.volume_loads, summary.feature_rows,
             summary.failures)
    return summary
