"""Quarantine replay: a quarantined file that was fixed and ingested again.

When a path that was quarantined by an earlier run is read again (its size or
mtime changed, or it could not be read before) and now gives a normal
outcome, its earlier quarantine rows are marked resolved: ``resolved_by_run_id``
and ``resolved_at`` are set. The quarantine table keeps its history.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from lakehouse.tables import LakeWriter

log = logging.getLogger(__name__)

RESOLVING = ("ingested", "duplicate", "conflict", "skipped")


def resolve_fixed(writer: LakeWriter, files: pa.Table, run_id: str) -> int:
    """Mark resolved the quarantine rows of paths in ``files`` (this run's file rows, not
    yet committed) that now have a normal outcome; return how many rows were resolved."""
    fixed = files.filter(pc.is_in(files.column("outcome"), pa.array(RESOLVING)))
    if not fixed.num_rows:
        return 0
    earlier = writer.dataset("files").to_table(
        columns=["file_sha256", "ingest_run_id"],
        filter=(ds.field("path").isin(fixed.column("path").to_pylist())
                & (ds.field("outcome") == "quarantined")),
    )
    if not earlier.num_rows:
        return 0
    wanted = Counter(zip(earlier.column("file_sha256").to_pylist(),
                         earlier.column("ingest_run_id").to_pylist(), strict=True))
    quarantine = writer.dataset("quarantine").to_table()
    by = quarantine.column("resolved_by_run_id").to_pylist()
    at = quarantine.column("resolved_at").to_pylist()
    now = datetime.now(UTC)
    resolved = 0
    for i, key in enumerate(zip(quarantine.column("file_sha256").to_pylist(),
                                quarantine.column("ingest_run_id").to_pylist(), strict=True)):
        if by[i] is None and wanted[key] > 0:
            wanted[key] -= 1
            by[i], at[i] = run_id, now
            resolved += 1
    if resolved:
        quarantine = quarantine.set_column(
            quarantine.schema.get_field_index("resolved_by_run_id"), "resolved_by_run_id",
            pa.array(by, pa.string()))
        quarantine = quarantine.set_column(
            quarantine.schema.get_field_index("resolved_at"), "resolved_at",
            pa.array(at, pa.timestamp("us", "UTC")))
        writer.overwrite("quarantine", quarantine)
        log.info("%d quarantined files were fixed and ingested: marked resolved", resolved)
    return resolved
