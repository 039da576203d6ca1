"""Remove files no lake snapshot can ever reference (what killed runs leave behind).

A run killed after staging or committing Parquet files but before publishing
leaves files that no published snapshot references: the next writer rolls
the Delta tables back, and the files stay on disk, invisible. :func:`vacuum`
deletes them once they are older than the retention period. Files referenced
by any published snapshot (time travel) are always kept.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from urllib.parse import unquote

from deltalake import DeltaTable

from lakehouse import layout
from lakehouse.tables import Lake

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
    root = str(layout.table_path(lake.root, name))
    versions = {s.versions[name] for s in lake.snapshots() if name in s.versions}
    out: set[str] = set()
    for v in sorted(versions | set(extra_versions)):
        paths = DeltaTable(root, version=v).get_add_actions(flatten=True).column("path")
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
            root = layout.table_path(lake.root, name)
            keep = referenced_files(lake, name, {w.versions[name]})
            for dirpath, dirnames, filenames in os.walk(root):
                if os.path.basename(dirpath) == "_delta_log":
                    dirnames[:] = []
                    continue
                dirnames[:] = [d for d in dirnames if d != "_delta_log"]
                for fn in filenames:
                    full = os.path.join(dirpath, fn)
                    rel = os.path.relpath(full, root)
                    if rel in keep:
                        continue
                    st = os.stat(full)
                    if st.st_mtime > cutoff:
                        report.kept_recent += 1
                        continue
                    report.removed.setdefault(name, []).append(rel)
                    report.bytes_removed += st.st_size
                    if not dry_run:
                        os.unlink(full)
                        log.info("vacuum: removed %s/%s", name, rel)
    return report
