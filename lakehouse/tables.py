"""Delta Lake tables behind one consistent lake snapshot.

Writes go through :class:`LakeWriter` (one writer at a time, enforced by a
lock file). Each write stages Parquet files of its own (with provenance in
their key-value metadata) and commits them to the table's Delta log in one
transaction. A run then *publishes* a lake snapshot that pins the Delta
version of every table; readers only ever open published snapshots, so they
never see a half-finished run. Delta commits made after the last published
snapshot (a run killed mid-way) are rolled back when the next writer starts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake.transaction import AddAction, CommitProperties, RemoveAction

from lakehouse import deid, layout, privacy
from lakehouse.config import CHECKSUMS, PROFILES, LakeConfig
from lakehouse.errors import (
    LakeBusyError,
    LakeExistsError,
    LakeFormatError,
    NoLakeError,
    SnapshotNotFoundError,
)
from lakehouse.provenance import file_metadata
from lakehouse.schemas import TABLES, VAULT, TableSpec, conform

log = logging.getLogger(__name__)

NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"
#: commitInfo key holding ``{relative path: sha256}`` of the files a commit adds.
CHECKSUMS_KEY = "lake.checksums"
#: Rows per Parquet row group; large enough for scans, small enough for pruning.
ROW_GROUP_ROWS = 64_000


@dataclass(frozen=True)
class Snapshot:
    number: int
    versions: dict[str, int]
    created_at: str
    run_id: str | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "snapshot": self.number,
            "versions": self.versions,
            "created_at": self.created_at,
            "run_id": self.run_id,
            "note": self.note,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Snapshot:
        return cls(d["snapshot"], dict(d["versions"]), d["created_at"], d.get("run_id"),
                   d.get("note", ""), d.get("extra", {}))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Lake:
    """A lake folder: its configuration, tables and snapshots (read side)."""

    def __init__(self, root: Path | str, config: LakeConfig):
        self.root = Path(root)
        self.config = config

    # -- creation and opening -------------------------------------------------
    @classmethod
    def create(cls, root: Path | str, profile: str = "research",
               key_file: Path | str | None = None,
               labels: dict[str, str] | None = None,
               private_allowlist: list[dict] | None = None,
               checksum: str = "header") -> Lake:
        """A new lake. A research lake needs a key: ``key_file`` is used when it
        exists, created (random, owner-only) when it does not; by default it is
        ``privacy.default_key_path(lake_id)``, outside the lake folder."""
        root = Path(root)
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, not {profile!r}")
        if checksum not in CHECKSUMS:
            raise ValueError(f"checksum must be one of {CHECKSUMS}, not {checksum!r}")
        if layout.manifest_path(root).exists():
            raise LakeExistsError(root)
        if root.exists() and any(root.iterdir()):
            raise LakeExistsError(root)
        for item in private_allowlist or []:
            deid.private_tag(item)  # validate before anything is written
        lake_id = uuid.uuid4().hex
        fp = None
        if profile == "research":
            kpath = Path(key_file) if key_file else privacy.default_key_path(lake_id)
            if kpath.resolve().is_relative_to(root.resolve()):
                raise privacy.KeyError_(kpath, f"the key file {kpath} must live outside the "
                                               "lake folder")
            key = privacy.read_key_file(kpath) if kpath.exists() else \
                privacy.create_key_file(kpath)
            fp = privacy.fingerprint(key)
        root.mkdir(parents=True, exist_ok=True)
        layout.snapshots_dir(root).mkdir(parents=True, exist_ok=True)
        for zone in ("research", VAULT):
            layout.zone_path(root, zone).mkdir(exist_ok=True)
        os.chmod(layout.zone_path(root, VAULT), 0o700)
        config = LakeConfig(profile=profile, lake_id=lake_id, key_fingerprint=fp,
                            created_at=_now(), labels=labels or {},
                            private_allowlist=list(private_allowlist or []),
                            checksum=checksum)
        versions = {}
        for spec in TABLES.values():
            dt = DeltaTable.create(
                str(layout.table_path(root, spec.name)),
                spec.storage_schema(profile),
                partition_by=list(spec.partition_by) or None,
                name=spec.name,
                description=spec.description,
            )
            versions[spec.name] = dt.version()
        _atomic_write_json(layout.manifest_path(root), config.to_dict())
        _atomic_write_json(
            layout.snapshot_path(root, 0),
            Snapshot(0, versions, _now(), note="lake created").to_dict(),
        )
        log.info("created %s lake at %s", profile, root)
        return cls(root, config)

    @classmethod
    def open(cls, root: Path | str) -> Lake:
        root = Path(root)
        manifest = layout.manifest_path(root)
        if not manifest.is_file():
            raise NoLakeError(root)
        try:
            config = LakeConfig.from_dict(json.loads(manifest.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise LakeFormatError(root, f"{manifest.name}: {exc}") from exc
        return cls(root, config)

    @property
    def profile(self) -> str:
        return self.config.profile

    @property
    def research(self) -> bool:
        return self.config.profile == "research"

    def default_key_path(self) -> Path:
        return privacy.default_key_path(self.config.lake_id)

    def policy(self, key_file: Path | str | None = None) -> deid.Policy | None:
        """The de-identification policy of a research lake (None for identified lakes).

        Reads the key from ``key_file`` (default: the lake's default key path) and
        refuses a key whose fingerprint is not the lake's.
        """
        if not self.research:
            return None
        path = Path(key_file) if key_file else self.default_key_path()
        key = privacy.read_key_file(path)
        if privacy.fingerprint(key) != self.config.key_fingerprint:
            raise privacy.KeyError_(path, f"key file {path} is not the key of the lake at "
                                          f"{self.root} (fingerprints differ); use the key "
                                          "created by `lake init` for this lake")
        tags = [deid.private_tag(item) for item in self.config.private_allowlist]
        return deid.Policy(privacy.Pseudonymizer(key), tags)

    # -- snapshots ------------------------------------------------------------
    def snapshot_numbers(self) -> list[int]:
        names = (p.stem for p in layout.snapshots_dir(self.root).glob("*.json"))
        return sorted(int(n) for n in names if n.isdigit())

    def snapshot(self, number: int | None = None) -> Snapshot:
        numbers = self.snapshot_numbers()
        if not numbers:
            raise LakeFormatError(self.root, "no snapshot manifest")
        if number is None:
            number = numbers[-1]
        elif number not in numbers:
            raise SnapshotNotFoundError(number, numbers[-1])
        path = layout.snapshot_path(self.root, number)
        try:
            return Snapshot.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError) as exc:
            raise LakeFormatError(self.root, f"snapshot {number}: {exc}") from exc

    def snapshots(self) -> Iterator[Snapshot]:
        for n in self.snapshot_numbers():
            yield self.snapshot(n)

    # -- reading --------------------------------------------------------------
    def table_names(self, zone: str | None = None) -> list[str]:
        return [n for n, s in TABLES.items() if zone is None or s.zone == zone]

    def delta(self, name: str, snapshot: Snapshot | None = None) -> DeltaTable:
        snap = snapshot or self.snapshot()
        version = snap.versions[name]
        return DeltaTable(str(layout.table_path(self.root, name)), version=version)

    def dataset(self, name: str, snapshot: Snapshot | None = None) -> ds.Dataset:
        snap = snapshot or self.snapshot()
        if name not in snap.versions:
            # a table added to the schemas after this snapshot was published: empty
            spec = TABLES[name]
            return ds.dataset(spec.storage_schema(self.profile).empty_table())
        return self.delta(name, snap).to_pyarrow_dataset()

    def read(self, name: str, snapshot: Snapshot | None = None, columns: list[str] | None = None,
             filter: ds.Expression | None = None) -> pa.Table:
        return self.dataset(name, snapshot).to_table(columns=columns, filter=filter)

    def count(self, name: str, snapshot: Snapshot | None = None) -> int:
        return self.dataset(name, snapshot).count_rows()

    # -- writing --------------------------------------------------------------
    def writer(self, run_id: str) -> LakeWriter:
        return LakeWriter(self, run_id)


class LakeWriter:
    """The single writer of a lake. Use as a context manager.

    On entry it takes the lock and rolls every table back to the last
    published snapshot (undoing a run that died before publishing). Writes
    accumulate table versions; :meth:`publish` makes them visible at once.
    """

    def __init__(self, lake: Lake, run_id: str):
        self.lake = lake
        self.run_id = run_id
        self._lock_fh: IO[str] | None = None
        self.base: Snapshot | None = None
        self.versions: dict[str, int] = {}
        #: Free-form state carried from snapshot to snapshot (e.g. what the
        #: summary tables were built from).
        self.extra: dict = {}

    def __enter__(self) -> LakeWriter:
        fh = open(layout.lock_path(self.lake.root), "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise LakeBusyError(self.lake.root) from None
        self._lock_fh = fh
        self.base = self.lake.snapshot()
        self.versions = dict(self.base.versions)
        self.extra = dict(self.base.extra)
        self._recover()
        self._create_missing_tables()
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def _recover(self) -> None:
        for name, version in self.versions.items():
            dt = DeltaTable(str(layout.table_path(self.lake.root, name)))
            if dt.version() > version:
                log.warning("rolling %s back from unpublished version %d to %d",
                            name, dt.version(), version)
                dt.restore(version)
                self.versions[name] = DeltaTable(
                    str(layout.table_path(self.lake.root, name))).version()
        self._discard_staged_files()

    def _create_missing_tables(self) -> None:
        """Create tables added to the schemas after this lake was made (empty until written)."""
        for spec in TABLES.values():
            if spec.name in self.versions:
                continue
            path = layout.table_path(self.lake.root, spec.name)
            if (path / "_delta_log").is_dir():
                dt = DeltaTable(str(path))
                if dt.version() > 0:
                    dt.restore(0)  # unpublished writes of a run that died
            else:
                dt = DeltaTable.create(str(path), spec.storage_schema(self.lake.profile),
                                       partition_by=list(spec.partition_by) or None,
                                       name=spec.name, description=spec.description)
            self.versions[spec.name] = DeltaTable(str(path)).version()
            log.info("created table %s, new in this version", spec.name)

    def _discard_staged_files(self) -> None:
        for name in TABLES:
            for tmp in layout.table_path(self.lake.root, name).rglob(".staging-*"):
                tmp.unlink(missing_ok=True)

    def current(self, name: str) -> DeltaTable:
        return DeltaTable(str(layout.table_path(self.lake.root, name)),
                          version=self.versions[name])

    def dataset(self, name: str) -> ds.Dataset:
        return self.current(name).to_pyarrow_dataset()

    def append(self, name: str, data: pa.Table, param_hash: str = "") -> int:
        return self._write(name, data, "append", param_hash)

    def overwrite(self, name: str, data: pa.Table, param_hash: str = "") -> int:
        return self._write(name, data, "overwrite", param_hash)

    def compact(self, name: str, files: list[dict], param_hash: str = "") -> int:
        """Rewrite ``files`` (rows of ``get_add_actions(flatten=True)`` of the current
        version, all of one partition) as one file, in one commit that adds it and
        removes them (``dataChange`` false: the rows are the same). Returns the version."""
        spec = TABLES[name]
        root = layout.table_path(self.lake.root, name)
        keys = list(spec.partition_by)
        values = {k: files[0].get(f"partition.{k}") for k in keys}
        parts = []
        for f in files:
            path = root / f["path"]
            if not path.exists():
                path = root / unquote(f["path"])
            part = pq.read_table(path)
            for k in keys:
                typ = spec.storage_schema(self.lake.profile).field(k).type
                part = part.append_column(k, pa.array([values[k]] * part.num_rows, typ))
            parts.append(part)
        data = pa.concat_tables(parts, promote_options="default")
        now = int(time.time() * 1000)
        removes = [RemoveAction(f["path"], False, now, f["size_bytes"],
                                {k: (None if values[k] is None else str(values[k]))
                                 for k in keys}) for f in files]
        return self._write(name, data, "append", param_hash, removes=removes)

    def _write(self, name: str, data: pa.Table, mode: str, param_hash: str,
               removes: list[RemoveAction] | None = None) -> int:
        spec = TABLES[name]
        table = conform(spec, data, self.lake.profile)
        if table.num_rows == 0 and mode == "append":
            return self.versions[name]
        root = layout.table_path(self.lake.root, name)
        meta = file_metadata(self.run_id, name, param_hash)
        actions: list[AddAction | RemoveAction] = [
            self._stage(root, spec, part, values, meta, data_change=not removes)
            for values, part in _partitions(table, spec)]
        # the commit log records each new file's SHA-256 (``lake verify`` checks them)
        checksums = {a.path: _sha256(root / a.path) for a in actions
                     if isinstance(a, AddAction)}
        actions += removes or []
        dt = DeltaTable(str(root))
        dt.create_write_transaction(
            actions, mode, table.schema, partition_by=list(spec.partition_by) or None,
            commit_properties=CommitProperties(
                custom_metadata={"lake.run_id": self.run_id, "lake.param_hash": param_hash,
                                 CHECKSUMS_KEY: json.dumps(checksums, sort_keys=True)}),
        )
        version = DeltaTable(str(root)).version()
        self.versions[name] = version
        return version

    def _stage(self, root: Path, spec: TableSpec, part: pa.Table, values: dict[str, str | None],
               meta: dict[str, str], data_change: bool = True) -> AddAction:
        subdir = "/".join(
            f"{k}={quote(v if v is not None else NULL_PARTITION, safe='')}"
            for k, v in values.items()
        )
        rel = f"{subdir}/" if subdir else ""
        rel += f"part-{self.run_id}-{uuid.uuid4().hex[:12]}.zstd.parquet"
        final = root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        staged = final.with_name(".staging-" + final.name)
        body = part.drop_columns(list(spec.partition_by))
        body = body.replace_schema_metadata({**(body.schema.metadata or {}), **meta})
        pq.write_table(body, staged, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        os.replace(staged, final)
        st = final.stat()
        stats = {"numRecords": part.num_rows}
        return AddAction(rel, st.st_size, values, int(time.time() * 1000), data_change,
                         json.dumps(stats))

    def publish(self, note: str = "") -> Snapshot:
        numbers = self.lake.snapshot_numbers()
        snap = Snapshot(numbers[-1] + 1, dict(self.versions), _now(), self.run_id, note,
                        dict(self.extra))
        _atomic_write_json(layout.snapshot_path(self.lake.root, snap.number), snap.to_dict())
        self.base = snap
        return snap


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _partitions(table: pa.Table, spec: TableSpec) -> Iterator[tuple[dict[str, str | None],
                                                                   pa.Table]]:
    """Split ``table`` by the spec's partition columns (string partition values)."""
    keys = list(spec.partition_by)
    if not keys:
        yield {}, table
        return
    if table.num_rows == 0:
        return
    groups = table.group_by(keys, use_threads=False).aggregate([])
    for row in groups.to_pylist():
        mask = None
        for k in keys:
            col = table.column(k)
            cond = pc.is_null(col) if row[k] is None else pc.equal(col, row[k])
            mask = cond if mask is None else pc.and_(mask, cond)
        values = {k: (None if row[k] is None else str(row[k])) for k in keys}
        yield values, table.filter(mask)
