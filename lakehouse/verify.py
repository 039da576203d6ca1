"""Integrity checks: data files against the commit log, sources against the file index.

Every commit made by :class:`lakehouse.tables.LakeWriter` records, in its
commitInfo, the SHA-256 of each Parquet file it adds; the Delta log records
its size (`lake vacuum` carries the checksums of the commits it cleans from the log to
the table's :data:`lakehouse.layout.CARRIED_CHECKSUMS`). :func:`verify` checks every data
file of a lake snapshot against both, and with ``sources=True`` every source file the
vault's file index recorded against its checksum (of the first ``checksum_bytes`` bytes)
and size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import pyarrow.compute as pc
from deltalake.exceptions import DeltaError

from lakehouse import layout
from lakehouse.checksums import sha256_prefix
from lakehouse.storage import Storage, open_storage
from lakehouse.tables import _REL, CHECKSUMS_KEY, Lake, Snapshot, as_rel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    #: table name, or ``source`` for a source file
    table: str
    path: str
    #: ``missing``, ``size``, ``checksum`` (data files); ``source_missing``, ``source_changed``
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.table}: {self.path}: {self.kind}: {self.detail}"


@dataclass
class Report:
    snapshot: int
    files_checked: int = 0
    #: data files whose commit recorded no checksum (written before checksums existed)
    files_without_checksum: int = 0
    sources_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"snapshot": self.snapshot, "files_checked": self.files_checked,
                "files_without_checksum": self.files_without_checksum,
                "sources_checked": self.sources_checked,
                "problems": [p.__dict__ for p in self.problems]}


def checksums_in(actions: Iterable[dict]) -> dict[str, str]:
    """``{relative path: sha256}`` that a commit's actions record (in its commitInfo)."""
    out: dict[str, str] = {}
    for action in actions:
        info = action.get("commitInfo")
        if info and CHECKSUMS_KEY in info:
            out.update(json.loads(info[CHECKSUMS_KEY]))
    return out


def recorded_checksums(table_root: Path | str, storage: Storage | None = None) -> dict[str, str]:
    """``{relative path: sha256}`` from every commit of a table's Delta log (``table_root``:
    a folder, or a path relative to ``storage``), and those of commits `lake vacuum` has
    cleaned from the log (:data:`layout.CARRIED_CHECKSUMS`)."""
    store = storage or open_storage(Path(table_root))
    base = str(table_root) if storage else ""
    log_dir = f"{base}/_delta_log" if base else "_delta_log"
    carried = f"{base}/{layout.CARRIED_CHECKSUMS}" if base else layout.CARRIED_CHECKSUMS
    try:
        out: dict[str, str] = json.loads(store.read_text(carried))
    except FileNotFoundError:
        out = {}
    for name in store.listdir(log_dir):
        if name.endswith(".json"):
            text = store.read_text(f"{log_dir}/{name}")
            out.update(checksums_in(json.loads(line) for line in text.splitlines()
                                    if line.strip()))
    return out


def _stored_sha256(storage: Storage, rel: str) -> str:
    """SHA-256 of a whole file of the lake (a data file), in any storage."""
    h = hashlib.sha256()
    with storage.open(rel) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(lake: Lake, snapshot: Snapshot | None = None, sources: bool = False) -> Report:
    snap = snapshot or lake.snapshot()
    report = Report(snap.number)
    for name in lake.table_names():
        if name not in snap.versions:  # a table added after this snapshot: nothing to check
            continue
        store = lake.storage
        root = as_rel(layout.table_path(_REL, name))
        try:
            sums = recorded_checksums(root, store)
            present = {p: size for p, size, _mtime in store.files(root)}
            adds = lake.delta(name, snap).get_add_actions(flatten=True)
        except (DeltaError, OSError, ValueError) as exc:  # a table folder or log damaged
            text = str(exc).strip()
            report.problems.append(Problem(
                name, root, "unreadable",
                f"the table (version {snap.versions[name]}) cannot be read: "
                f"{text.splitlines()[0] if text else type(exc).__name__}"))
            continue
        for rel, size in zip(adds.column("path").to_pylist(),
                             adds.column("size_bytes").to_pylist(), strict=True):
            report.files_checked += 1
            found = rel if rel in present else unquote(rel)
            if found not in present:
                report.problems.append(Problem(name, rel, "missing",
                                               "in the commit log, not on disk"))
                continue
            path = f"{root}/{found}"
            actual = present[found]
            if actual != size:
                report.problems.append(Problem(name, rel, "size",
                                               f"commit log says {size} bytes, file has {actual}"))
                continue
            expected = sums.get(rel) or sums.get(unquote(rel))
            if expected is None:
                report.files_without_checksum += 1
                continue
            got = _stored_sha256(store, path)
            if got != expected:
                report.problems.append(Problem(name, rel, "checksum",
                                               f"sha256 {got[:16]}..., commit log has "
                                               f"{expected[:16]}..."))
    if sources:
        _verify_sources(lake, snap, report)
    for p in report.problems:
        log.warning("%s", p)
    return report


def _verify_sources(lake: Lake, snap: Snapshot, report: Report) -> None:
    """Each source path's most recent recorded checksum against the file today."""
    # the plain checksum of the source (research tables hold a keyed one)
    # (checksum_bytes: how much of the file it covers; absent in lakes made before it)
    wanted = ["path", "source_sha256", "ingest_run_id", "file_size", "checksum_bytes"]
    dataset = lake.dataset("files", snap)
    files = dataset.to_table(columns=[c for c in wanted if c in dataset.schema.names])
    files = files.filter(pc.is_valid(files.column("source_sha256")))
    col = {c: (files.column(c).to_pylist() if c in files.column_names else [None] * len(files))
           for c in wanted}
    latest: dict[str, tuple[str, str, int | None, int | None]] = {}
    for path, sha, run, size, nbytes in zip(*(col[c] for c in wanted), strict=True):
        if path not in latest or (run or "") >= latest[path][1]:
            latest[path] = (sha, run or "", size, nbytes)
    for path, (sha, _, size, nbytes) in sorted(latest.items()):
        report.sources_checked += 1
        try:
            actual_size = os.stat(path).st_size
            got = sha256_prefix(path, nbytes)
        except OSError as exc:
            report.problems.append(Problem("source", path, "source_missing",
                                           exc.strerror or type(exc).__name__))
            continue
        if size is not None and actual_size != size:
            report.problems.append(Problem("source", path, "source_changed",
                                           f"{actual_size} bytes, recorded {size}; ingest it "
                                           "again to record the new version"))
        elif got != sha:
            report.problems.append(Problem("source", path, "source_changed",
                                           f"sha256 {got[:16]}..., recorded {sha[:16]}...; "
                                           "ingest it again to record the new version"))
