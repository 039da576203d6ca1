"""Remove files no lake snapshot can ever reference (what killed runs leave behind), and,
when asked, snapshots older than a number of days.

A run killed after staging or committing Parquet files but before publishing
leaves files that no published snapshot references: the next writer rolls
the Delta tables back, and the files stay on disk, invisible. :func:`vacuum`
deletes them once they are older than the retention period. Files referenced
by any kept snapshot (time travel) are always kept.

Every run publishes a snapshot, and a snapshot keeps every file it references,
also those that compaction has since rewritten: a lake that ingests often (a
listener publishes one per batch) keeps growing on disk. ``expire_days``
forgets the snapshots published more than that many days ago, except the
latest one and those a saved cohort pins (``_lake/cohorts/*.json``); their
files that no kept snapshot references are then deleted like orphans.

Each commit also leaves a file in its table's Delta log (a listener's lake, thousands a
day), and readers need only those from the last checkpoint at or before the version they
read. :func:`clean_log` removes, from each table's log, the files before the last
checkpoint at or before the oldest version a kept snapshot pins; the checksums those
commits recorded for files still referenced are kept in the table's
:data:`lakehouse.layout.CARRIED_CHECKSUMS` first (`lake verify` reads them).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import unquote

from lakehouse import layout
from lakehouse.errors import LakeError
from lakehouse.tables import _REL, Lake, Snapshot, add_actions, as_rel
from lakehouse.verify import checksums_in

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
    #: snapshots older than this many days are expired (None: none are)
    expire_days: float | None = None
    #: the snapshots expired (or that would be, on a dry run)
    expired: list[int] = field(default_factory=list)
    #: {snapshot: [saved cohorts]}: old enough to expire, kept for these cohorts
    pinned: dict[int, list[str]] = field(default_factory=dict)
    #: {table: [Delta log files removed (or that would be)]}
    log_removed: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"retention_hours": self.retention_hours, "dry_run": self.dry_run,
                "removed": self.removed, "kept_recent": self.kept_recent,
                "bytes_removed": self.bytes_removed, "expire_days": self.expire_days,
                "expired": self.expired,
                "pinned": {str(k): v for k, v in sorted(self.pinned.items())},
                "log_removed": self.log_removed}


class CohortFileError(LakeError):
    """A saved cohort's file cannot be read, so the snapshot it pins is unknown."""

    def __init__(self, path: str, why: str):
        self.path = path
        super().__init__(f"cannot read the saved cohort {path} ({why}), so the snapshot it "
                         "pins is not known and no snapshot was expired; restore the file, or "
                         "delete the cohort (`lake cohort delete`)")


class CarriedChecksumsError(LakeError):
    """A table's carried checksums cannot be read, so its log is not cleaned (the
    checksums of the commits cleaned would be lost)."""

    def __init__(self, path: str, why: str):
        self.path = path
        super().__init__(f"cannot read {path} ({why}), the checksums of commits cleaned from "
                         "the log earlier, so no more of the log was cleaned; restore the "
                         "file from a backup, or delete it (`lake verify` then counts the "
                         "files it covered as without checksum)")


def cohort_pins(lake: Lake) -> dict[int, list[str]]:
    """{snapshot: [names of the saved cohorts pinned to it]}."""
    rel = as_rel(layout.cohorts_dir(_REL))
    pins: dict[int, list[str]] = {}
    for name in sorted(lake.storage.listdir(rel)):
        if not name.endswith(".json") or name.startswith("."):
            continue
        try:
            number = json.loads(lake.storage.read_text(f"{rel}/{name}"))["snapshot"]
        except FileNotFoundError:  # deleted meanwhile: it pins nothing
            continue
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CohortFileError(lake.storage.uri(f"{rel}/{name}"),
                                  type(exc).__name__) from None
        if not isinstance(number, int):
            raise CohortFileError(lake.storage.uri(f"{rel}/{name}"), "no snapshot number")
        pins.setdefault(number, []).append(name[:-len(".json")])
    return pins


def _created(snap: Snapshot) -> datetime:
    """When ``snap`` was published (a time it does not give as such: now, never old)."""
    try:
        when = datetime.fromisoformat(snap.created_at)
    except (TypeError, ValueError):
        return datetime.now(UTC)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _expire(lake: Lake, report: VacuumReport, days: float) -> list[Snapshot]:
    """Expire (unless a dry run) the snapshots older than ``days`` that are neither the
    latest nor pinned; returns the snapshots kept."""
    snapshots = list(lake.snapshots())
    cutoff = datetime.now(UTC) - timedelta(days=days)
    pins = cohort_pins(lake)
    old = [s for s in snapshots[:-1] if _created(s) < cutoff]
    report.pinned = {s.number: pins[s.number] for s in old if s.number in pins}
    gone = [s for s in old if s.number not in pins]
    if not report.dry_run:
        for snap in gone:
            lake.storage.remove(as_rel(layout.snapshot_path(_REL, snap.number)))
        # a cohort saved meanwhile at one of them (`lake cohort save --snapshot N` does not
        # wait for the writer): that snapshot is published again, as it was
        again = set(cohort_pins(lake)) & {s.number for s in gone}
        for snap in gone:
            if snap.number in again:
                lake.storage.write_json(as_rel(layout.snapshot_path(_REL, snap.number)),
                                        snap.to_dict())
                log.warning("snapshot %d not expired: a cohort was saved at it meanwhile",
                            snap.number)
        gone = [s for s in gone if s.number not in again]
    report.expired = [s.number for s in gone]
    expired = set(report.expired)
    return [s for s in snapshots if s.number not in expired]


def referenced_files(lake: Lake, name: str,
                     extra_versions: frozenset[int] | set[int] = frozenset(),
                     snapshots: Iterable[Snapshot] | None = None) -> set[str]:
    """Relative paths of every data file of ``name`` in any published snapshot (or in
    ``snapshots``) and in the table's ``extra_versions`` (each as the log writes it and
    unquoted).

    The table's state is loaded once, at the first of those versions; the commits after
    it are replayed from the log (their adds and removes), and the files live at each
    wanted version are taken. Loading the state of every version instead cost about
    0.1 s each: two minutes for a lake of 1,000 snapshots (a listener's day is 8,640).
    Where a commit's log file is gone, the state of the next wanted version is loaded."""
    wanted = {s.versions[name] for s in (lake.snapshots() if snapshots is None
                                         else snapshots) if name in s.versions}
    versions = sorted(wanted | set(extra_versions))
    out: set[str] = set()
    live: set[str] = set()
    loaded = None  # the version ``live`` is the state of
    for v in versions:
        if loaded is not None:
            for commit in range(loaded + 1, v + 1):
                actions = lake.commit_actions(name, commit)
                if actions is None:
                    loaded = None
                    break
                for action in actions:
                    if "add" in action:
                        live.add(action["add"]["path"])
                    elif "remove" in action:
                        live.discard(action["remove"]["path"])
        if loaded is None:
            live = set(add_actions(lake.open_delta(name, v)).column("path").to_pylist())
        loaded = v
        out |= live
    return out | {unquote(p) for p in out}


def _log_version(name: str) -> int | None:
    """The version a Delta log file belongs to (a commit, checkpoint or checksum file of
    it); None for other files (``_last_checkpoint``, a temporary commit)."""
    head = name.split(".", 1)[0]
    return int(head) if len(head) == 20 and head.isdigit() else None


def clean_log(lake: Lake, name: str, oldest: int, keep: set[str],
              dry_run: bool = False, names: list[str] | None = None) -> list[str]:
    """Remove (unless a dry run) the Delta log files of table ``name`` that no reader of
    version ``oldest`` or later needs: those of the versions before the last checkpoint at
    or before ``oldest``. The checksums those commits recorded for ``keep`` (the files
    kept snapshots reference) go to :data:`layout.CARRIED_CHECKSUMS` first. ``names``:
    the log's file names, where the caller has listed them. Returns the names removed."""
    root = as_rel(layout.table_path(_REL, name))
    if names is None:
        names = lake.storage.listdir(f"{root}/_delta_log")
    checkpoints = [v for n in names if ".checkpoint." in n
                   and (v := _log_version(n)) is not None and v <= oldest]
    if not checkpoints:
        return []
    start = max(checkpoints)
    old = {n: v for n in names if (v := _log_version(n)) is not None and v < start}
    if dry_run or not old:
        return sorted(old)
    carried = f"{root}/{layout.CARRIED_CHECKSUMS}"
    try:
        sums = json.loads(lake.storage.read_text(carried))
    except FileNotFoundError:
        sums = {}
    except (OSError, ValueError) as exc:
        raise CarriedChecksumsError(lake.storage.uri(carried), type(exc).__name__) from None
    if not isinstance(sums, dict):
        raise CarriedChecksumsError(lake.storage.uri(carried), "not a JSON object")
    for n, v in old.items():
        if n.endswith(".json"):
            sums.update(checksums_in(lake.commit_actions(name, v) or []))
    lake.storage.write_json(carried, {p: h for p, h in sums.items() if p in keep})
    for n in sorted(old):
        lake.storage.remove(f"{root}/_delta_log/{n}")
    log.info("vacuum: removed %d log files of %s (before version %d)", len(old), name, start)
    return sorted(old)


def vacuum(lake: Lake, retention_hours: float = DEFAULT_RETENTION_HOURS,
           dry_run: bool = False, expire_days: float | None = None) -> VacuumReport:
    """Delete unreferenced files older than ``retention_hours`` (as the lake's writer);
    first, with ``expire_days``, expire the snapshots older than that (see the module)."""
    report = VacuumReport(retention_hours, dry_run, expire_days=expire_days)
    cutoff = time.time() - retention_hours * 3600
    with lake.writer("vacuum") as w:  # the lock; also rolls back an unpublished run
        kept = list(lake.snapshots()) if expire_days is None else \
            _expire(lake, report, expire_days)
        for name in lake.table_names():
            root = as_rel(layout.table_path(_REL, name))
            keep = referenced_files(lake, name, {w.versions[name]}, kept)
            log_names: list[str] = []
            for rel, size, mtime in lake.storage.files(root):
                folder, _, rest = rel.partition("/")
                if folder == "_delta_log":
                    log_names.append(rest)
                    continue
                if rel in keep or rel == layout.CARRIED_CHECKSUMS:
                    continue
                if mtime > cutoff:
                    report.kept_recent += 1
                    continue
                report.removed.setdefault(name, []).append(rel)
                report.bytes_removed += size
                if not dry_run:
                    lake.storage.remove(f"{root}/{rel}")
                    log.info("vacuum: removed %s/%s", name, rel)
            oldest = min([s.versions[name] for s in kept if name in s.versions]
                         + [w.versions[name]])
            cleaned = clean_log(lake, name, oldest, keep, dry_run, log_names)
            if cleaned:
                report.log_removed[name] = cleaned
    return report
