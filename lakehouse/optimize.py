"""Compact small files: ``lake optimize``.

Every ingest commit adds at least one Parquet file per partition it touches, so
many small runs (daily increments, ``lake listen`` micro-batches, PACS pulls)
leave many small files, and every query pays per file. :func:`optimize`
rewrites, per table and partition, the files smaller than ``small_bytes`` into
files of up to about ``target_bytes`` each, in one Delta commit per table that
adds the new files and removes the old ones (``dataChange`` false), then
publishes one lake snapshot. The rows do not change; snapshots published
before keep reading their own files (time travel), which stay on disk until
``lake vacuum`` finds no snapshot that references them. The new files carry the
optimize run's provenance; every row keeps its own ``ingest_run_id``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

from lakehouse.provenance import new_run_id
from lakehouse.schemas import TABLES
from lakehouse.tables import STAGE_THREADS, Lake, LakeWriter, add_actions, written_by

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: files below this size are candidates for compaction
SMALL_BYTES = 64 * MiB
#: compacted files are written up to about this size (compressed)
TARGET_BYTES = 256 * MiB
#: groups of files rewritten at once when their target sizes add up to at most this
#: (each is held in memory, decompressed, while it is rewritten)
PARALLEL_BYTES = 128 * MiB
#: in a tiered compaction (an ingest run's), a file joins the smaller files of its
#: partition being compacted only while it is at most this many times their size together
TIER_RATIO = 2
#: ... or while it is under this size: rewriting it costs a few tens of milliseconds, and
#: a small lake's partitions then stay one file each, as without tiers
TIER_FREE_BYTES = 2 * MiB


@dataclass
class TableResult:
    files_before: int = 0
    files_after: int = 0
    rows: int = 0
    #: files rewritten and the files that replaced them
    rewritten: int = 0
    written: int = 0


@dataclass
class OptimizeReport:
    run_id: str
    #: the snapshot published (None when there was nothing to compact)
    snapshot: int | None = None
    tables: dict[str, TableResult] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "snapshot": self.snapshot,
                "tables": {k: vars(v) for k, v in self.tables.items()}}


def optimize(lake: Lake, tables: list[str] | None = None, small_bytes: int = SMALL_BYTES,
             target_bytes: int = TARGET_BYTES, dry_run: bool = False) -> OptimizeReport:
    """Compact the small files of ``tables`` (default: all) as the lake's writer."""
    unknown = sorted(set(tables or []) - set(TABLES))
    if unknown:
        raise ValueError(f"unknown table(s) {unknown}; tables are {sorted(TABLES)}")
    report = OptimizeReport(new_run_id())
    with lake.writer(report.run_id) as w:
        for name in tables or lake.table_names():
            report.tables[name] = compact(w, name, small_bytes, target_bytes,
                                          dry_run=dry_run)
        if not dry_run and any(r.rewritten for r in report.tables.values()):
            report.snapshot = w.publish(note=f"optimize {report.run_id}").number
    return report


def compact(w: LakeWriter, name: str, small_bytes: int = SMALL_BYTES,
            target_bytes: int = TARGET_BYTES, min_excess: int = 1,
            dry_run: bool = False, leave_run: str | None = None,
            tiered: bool = False) -> TableResult:
    """Compact the small files of table ``name`` with the writer ``w`` (which publishes
    them): in each partition holding two files under ``small_bytes`` or more, those files
    into files of up to about ``target_bytes``, in one commit; but only when that takes
    away at least ``min_excess`` files (what every scan of the table pays for). ``lake
    optimize`` compacts whenever there is one; an ingest run (:mod:`etl.jobs`) once
    earlier runs have left many, leaving out the files it wrote itself (``leave_run``:
    its run id), whose sizes it chose, and ``tiered`` (:func:`_groups`): a partition's
    large file is not rewritten for every few small files that runs add beside it."""
    spec = TABLES[name]
    actions = add_actions(w.current(name))
    keep = ["path", "size_bytes", "num_records"] + [
        n for n in actions.column_names if n.startswith("partition.")]
    adds = actions.select(keep).to_pylist()
    result = TableResult(files_before=len(adds), files_after=len(adds))
    result.rows = sum(a.get("num_records") or 0 for a in adds)
    by_partition: dict[tuple, list[dict]] = defaultdict(list)
    for a in adds:
        if a["size_bytes"] < small_bytes and (
                leave_run is None or not written_by(a["path"], leave_run)):
            by_partition[tuple(a.get(f"partition.{k}") for k in spec.partition_by)].append(a)
    groups = [group for files in by_partition.values()
              for group in _groups(sorted(files, key=lambda a: a["path"]), target_bytes,
                                   tiered)]
    if sum(len(group) - 1 for group in groups) < max(min_excess, 1):
        return result
    for group in groups:
        result.rewritten += len(group)
        result.written += 1
        result.files_after -= len(group) - 1
    if groups and not dry_run:
        # two groups at a time when two fit in PARALLEL_BYTES (an ingest run's), else one
        w.compact(name, groups, threads=max(1, min(STAGE_THREADS,
                                                   PARALLEL_BYTES // target_bytes)))
    if result.rewritten:
        log.info("%s: %d small files -> %d", name, result.rewritten, result.written)
    return result


def _groups(files: list[dict], target_bytes: int, tiered: bool = False) -> list[list[dict]]:
    """Runs of files adding up to about ``target_bytes`` each, in the order of ``files``;
    single files are left alone (rewriting one file alone gains nothing).

    ``tiered``: the files are taken from the smallest, and a file joins the group only
    while it is at most :data:`TIER_RATIO` times the group's size so far (or under
    :data:`TIER_FREE_BYTES`): a large file much larger than the smaller files together
    is left as it is, and each group holds files of about the same size (in the order of
    ``files``). Without tiers, a partition's large file (a first run's, or many runs'
    compacted) was rewritten with every few small files added beside it: at every few of
    a listener's batches, a rewrite of the lake's partitions (3-4 s of a 1 s batch at
    1,000,000 instances). With them a row of a file of :data:`TIER_FREE_BYTES` or more
    is rewritten only when its file grows by half at least, so a few times in its life,
    and a compaction costs about what was added since the last; a large partition keeps
    a few files of growing sizes (``lake optimize`` makes them one)."""
    order = {id(f): i for i, f in enumerate(files)}
    groups: list[list[dict]] = []
    current: list[dict] = []
    size = 0
    for f in sorted(files, key=lambda a: a["size_bytes"]) if tiered else files:
        large = tiered and f["size_bytes"] >= TIER_FREE_BYTES \
            and f["size_bytes"] > TIER_RATIO * size
        if current and (large or size + f["size_bytes"] > target_bytes):
            groups.append(current)
            current, size = [], 0
        current.append(f)
        size += f["size_bytes"]
    groups.append(current)
    return [sorted(g, key=lambda f: order[id(f)]) for g in groups if len(g) > 1]


__all__ = ["OptimizeReport", "TableResult", "compact", "optimize"]
