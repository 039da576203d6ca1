"""Remove files no lake snapshot can ever reference (what killed runs leave behind).

A run killed after staging or committing Parquet files but before publishing
leaves files that no published snapshot references: the next writer rolls
the Delta tables back, and the files stay on disk, invisible. :func:`vacuum`
deletes them once they are older than the retention period. Files referenced
by any published snapshot (time travel) are always kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from urllib.parse import unquote

from lakehouse import layout
from lakehouse.tables import _REL, Lake, as_rel

log = logging.getLogger(__name__)

DEFAULT_RETENTION_HOURS = 168.0


@dataclass
class VacuumReport:
    retention_hours: float
    dry_run: bool
    #: {table: [relative paths removed (or that would be, on a dry run)]}
    removed: dict[str, list[str]] = field(default_factory=dict)
    #: orphans kept because they are younger than the retention period
    kept_recent: int = 0
    bytes_removed: int = 0

    def to_dict(self) -> dict:
        return {"retention_hours": self.retention_hours, "dry_run": self.dry_run,
                "removed": self.removed, "kept_recent": self.kept_recent,
                "bytes_removed": self.bytes_removed}


def referenced_files(lake: Lake, name: str,
                     extra_versions: frozenset[int] | set[int] = frozenset()) -> set[str]:
    """Relative paths of every data file of ``name`` in any published snapshot."""
    versions = {s.versions[name] for s in lake.snapshots() if name in s.versions}
    out: set[str] = set()
    for v in sorted(versions | set(extra_versions)):
        paths = lake.open_delta(name, v).get_add_actions(flatten=True).column("path")
        for p in paths.to_pylist():
            out.add(p)
            out.add(unquote(p))
    return out


def vacuum(lake: Lake, retention_hours: float = DEFAULT_RETENTION_HOURS,
           dry_run: bool = False) -> VacuumReport:
    """Delete unreferenced files older than ``retention_hours`` (as the lake's writer)."""
    report = VacuumReport(retention_hours, dry_run)
    cutoff = time.time() - retention_hours * 3600
    with lake.writer("vacuum") as w:  # the lock; also rolls back an unpublished run
        for name in lake.table_names():
            root = as_rel(layout.table_path(_REL, name))
            keep = referenced_files(lake, name, {w.versions[name]})
            for rel, size, mtime in lake.storage.files(root):
                if rel.split("/", 1)[0] == "_delta_log" or rel in keep:
                    continue
                if mtime > cutoff:
                    report.kept_recent += 1
                    continue
                report.removed.setdefault(name, []).append(rel)
                report.bytes_removed += size
                if not dry_run:
                    lake.storage.remove(f"{root}/{rel}")
                    log.info("vacuum: removed %s/%s", name, rel)
    return report
