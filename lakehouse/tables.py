"""Delta Lake tables behind one consistent lake snapshot.

Writes go through :class:`LakeWriter` (one writer at a time, enforced by a
lock: ``flock`` in a folder, a leased lock object on object storage; see
:mod:`lakehouse.storage`). Each write stages Parquet files of its own (with provenance in
their key-value metadata) and commits them to the table's Delta log in one
transaction. A run then *publishes* a lake snapshot that pins the Delta
version of every table; readers only ever open published snapshots, so they
never see a half-finished run. Delta commits made after the last published
snapshot (a run killed mid-way) are rolled back when the next writer starts.

A lake lives in a local folder or on S3-compatible object storage
(``s3://bucket/prefix``); every file operation goes through the lake's
:class:`~lakehouse.storage.Storage`, every Delta operation gets its options.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake.transaction import (
    AddAction,
    CommitProperties,
    PostCommitHookProperties,
    RemoveAction,
)

from lakehouse import layout, privacy
from lakehouse.config import CHECKSUMS, PROFILES, LakeConfig
from lakehouse.errors import (
    FolderNotEmptyError,
    LakeAccessError,
    LakeError,
    LakeExistsError,
    LakeFormatError,
    NoLakeError,
    SnapshotNotFoundError,
)
from lakehouse.provenance import file_metadata
from lakehouse.schemas import TABLES, VAULT, TableSpec, conform
from lakehouse.storage import DEFAULT_LEASE_SECONDS, Storage, WriterLock, open_storage

if TYPE_CHECKING:
    import duckdb
    import pyarrow.dataset as ds

    from lakehouse import deid

log = logging.getLogger(__name__)

NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"
#: commitInfo key holding ``{relative path: sha256}`` of the files a commit adds.
CHECKSUMS_KEY = "lake.checksums"
#: commitInfo key holding a random id of the commit (the writer checks its commit won)
COMMIT_ID_KEY = "lake.commit_id"
#: A checkpoint of a table's state every this many commits (deltalake's default is 100).
#: Opening a table replays the JSON commits since its last checkpoint, about a
#: millisecond each: the lake's every reader and every run pays for them, and a table
#: committed once a run (``ingest_runs``) would otherwise replay up to 99 of them.
CHECKPOINT_EVERY = 10
#: What deltalake does after a commit of this lake's writer: no checkpoint of its own
#: (:meth:`LakeWriter._checkpoint` makes them), and no clean-up of expired commits. That
#: deletes the JSON commits older than 30 days once a later checkpoint exists, and with
#: them every older table version no checkpoint covers, which the lake's snapshots pin
#: (a cohort reproduced from an old snapshot, ``lake sql --snapshot``).
_HOOKS = PostCommitHookProperties(create_checkpoint=False, cleanup_expired_logs=False)
#: Rows per Parquet row group; large enough for scans, small enough for pruning.
ROW_GROUP_ROWS = 64_000
#: Partition files of one commit encoded and written at once (Parquet encoding, its
#: compression, the checksum and the write release the GIL).
STAGE_THREADS = 2
#: Columns whose values are (nearly) all distinct: no dictionary encoding (Parquet would
#: build a dictionary for each of their pages, then give it up).
NO_DICTIONARY = frozenset({"dicom_json"})
#: Files of fewer rows are written without dictionaries: a dictionary page per column
#: costs more to write (a third of a small file's encoding) and to store than it saves
#: on a few hundred rows (bench/README.md, thirteenth session).
DICTIONARY_MIN_ROWS = 1_000
#: Files of fewer rows are compressed with Snappy, larger ones with zstd. Arrow
#: compresses each page on its own, and a column of a small file is one page: zstd's
#: start on each of them took a small file's encoding from 1.2 to 2.1-2.8 ms (60
#: columns, 11 rows), while the few hundred rows gain little from it (the file's
#: footer and schema are most of it). Snappy costs about what no compression does, and
#: every Parquet reader reads it. Compaction writes the rows again in a larger file
#: (bench/README.md, thirty-fourth session).
ZSTD_MIN_ROWS = 1_000
#: Columns written without min/max statistics: nothing filters on them, and the largest
#: values of a page of whole headers made 18 % of an instances file.
NO_STATISTICS = frozenset({"dicom_json"})


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


#: layout paths relative to the lake's location (``research/instances``)
_REL = Path()


def as_rel(path: Path) -> str:
    """A layout path built from ``_REL`` as the storage's relative path string."""
    return path.as_posix()


class LocalOnlyError(LakeError):
    def __init__(self, url: str):
        self.url = url
        super().__init__(f"this needs a lake in a local folder; {url} is on object storage "
                         "(see README, 'A lake on object storage', for what works there)")


class ConcurrentWriteError(LakeError):
    def __init__(self, url: str, what: str, version: int):
        self.url = url
        self.what = what
        self.version = version
        super().__init__(f"another writer wrote version {version} of {what} in {url} while "
                         "this run held the write lock (its lease expired?); nothing more of "
                         "this run is published: run it again")


class Lake:
    """A lake (a folder or an object-store prefix): its configuration, tables and
    snapshots (read side)."""

    def __init__(self, root: Path | str | Storage, config: LakeConfig):
        self.storage = open_storage(root)
        self.config = config

    @property
    def location(self) -> str:
        """Where the lake is: a folder, or ``s3://bucket/prefix``."""
        return self.storage.url

    @property
    def root(self) -> Path:
        """The lake's folder (a local lake only; see :attr:`storage` for any lake)."""
        local_root = getattr(self.storage, "root", None)
        if not isinstance(local_root, Path):
            raise LocalOnlyError(self.location)
        return local_root

    @property
    def local(self) -> bool:
        return self.storage.local

    # -- creation and opening -------------------------------------------------
    @classmethod
    def create(cls, root: Path | str | Storage, profile: str = "research",
               key_file: Path | str | None = None,
               labels: dict[str, str] | None = None,
               private_allowlist: list[dict] | None = None,
               checksum: str = "header",
               storage_options: dict | None = None) -> Lake:
        """A new lake in a folder or at ``s3://bucket/prefix`` (``storage_options``:
        fsspec options of the object store). A research lake needs a key: ``key_file``
        is used when it exists, created (random, owner-only) when it does not; by
        default it is ``privacy.default_key_path(lake_id)``, outside the lake (a local
        file, also for a lake on object storage)."""
        store = open_storage(root, storage_options)
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, not {profile!r}")
        if checksum not in CHECKSUMS:
            raise ValueError(f"checksum must be one of {CHECKSUMS}, not {checksum!r}")
        if key_file is not None and profile != "research":
            raise ValueError(f"a key file is for research lakes: an {profile} lake keeps "
                             "identifiers as found and uses no key; leave the key file out")
        check_bucket = getattr(store, "check_bucket", None)
        if check_bucket is not None:
            check_bucket()
        if store.exists(as_rel(layout.manifest_path(_REL))):
            raise LakeExistsError(store.url)
        if not store.is_empty():
            raise FolderNotEmptyError(store.url)
        if private_allowlist:
            from lakehouse import deid  # pydicom: only where tags are parsed (0.2 s)

            for item in private_allowlist:
                deid.private_tag(item)  # validate before anything is written
        lake_id = uuid.uuid4().hex
        fp = None
        if profile == "research":
            kpath = Path(key_file) if key_file else privacy.default_key_path(lake_id)
            local_root = getattr(store, "root", None)
            if local_root is not None and kpath.resolve().is_relative_to(local_root.resolve()):
                raise privacy.KeyError_(kpath, f"the key file {kpath} must live outside the "
                                               "lake folder")
            key = privacy.read_key_file(kpath) if kpath.exists() else \
                privacy.create_key_file(kpath)
            fp = privacy.fingerprint(key)
        store.makedirs("")
        store.makedirs(as_rel(layout.snapshots_dir(_REL)))
        store.makedirs(as_rel(layout.zone_path(_REL, "research")))
        store.makedirs(as_rel(layout.zone_path(_REL, VAULT)), private=True)
        config = LakeConfig(profile=profile, lake_id=lake_id, key_fingerprint=fp,
                            created_at=_now(), labels=labels or {},
                            private_allowlist=list(private_allowlist or []),
                            checksum=checksum)
        versions = {}
        for spec in TABLES.values():
            dt = DeltaTable.create(
                store.uri(as_rel(layout.table_path(_REL, spec.name))),
                spec.storage_schema(profile),
                partition_by=list(spec.partition_by) or None,
                name=spec.name,
                description=spec.description,
                storage_options=store.delta_options,
            )
            versions[spec.name] = dt.version()
        store.write_json(as_rel(layout.manifest_path(_REL)), config.to_dict())
        store.write_json(as_rel(layout.snapshot_path(_REL, 0)),
                         Snapshot(0, versions, _now(), note="lake created").to_dict())
        log.info("created %s lake at %s", profile, store.url)
        return cls(store, config)

    @classmethod
    def open(cls, root: Path | str | Storage, storage_options: dict | None = None) -> Lake:
        """The lake in a folder or at ``s3://bucket/prefix`` (``storage_options``: fsspec
        options of the object store; default: the standard AWS environment)."""
        store = open_storage(root, storage_options)
        manifest = as_rel(layout.manifest_path(_REL))
        try:
            data = store.read_text(manifest)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NoLakeError(store.url) from None
        except PermissionError as exc:
            raise LakeAccessError(store.url, "read", exc.strerror or str(exc)) from None
        try:
            config = LakeConfig.from_dict(json.loads(data))
        except (OSError, ValueError, TypeError) as exc:
            raise LakeFormatError(store.url, f"{layout.MANIFEST}: {exc}") from exc
        return cls(store, config)

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
        return self.policy_of(self.key(key_file))

    def key(self, key_file: Path | str | None = None) -> bytes | None:
        """The key of a research lake (None for identified lakes), read from ``key_file``
        (default: the lake's default key path); a key whose fingerprint is not the lake's
        is refused."""
        if not self.research:
            return None
        path = Path(key_file) if key_file else self.default_key_path()
        key = privacy.read_key_file(path)
        if privacy.fingerprint(key) != self.config.key_fingerprint:
            raise privacy.KeyError_(path, f"key file {path} is not the key of the lake at "
                                          f"{self.location} (fingerprints differ); use the key "
                                          "created by `lake init` for this lake")
        return key

    def policy_of(self, key: bytes | None) -> deid.Policy | None:
        """The de-identification policy of this lake with ``key`` (from :meth:`key`)."""
        if key is None:
            return None
        from lakehouse import deid  # pydicom: not loaded by a lake only read

        tags = [deid.private_tag(item) for item in self.config.private_allowlist]
        return deid.Policy(privacy.Pseudonymizer(key), tags)

    # -- snapshots ------------------------------------------------------------
    def snapshot_numbers(self) -> list[int]:
        listed = self.storage.listdir(as_rel(layout.snapshots_dir(_REL)))
        names = (n[:-len(".json")] for n in listed if n.endswith(".json"))
        return sorted(int(n) for n in names if n.isdigit())

    def snapshot(self, number: int | None = None, *,
                 numbers: Sequence[int] | None = None) -> Snapshot:
        """Snapshot ``number`` (None: the latest); ``numbers``, the kept ones when the
        caller has just listed them (the folder is then not listed again)."""
        numbers = self.snapshot_numbers() if numbers is None else numbers
        if not numbers:
            raise LakeFormatError(self.location, "no snapshot manifest")
        if number is None:
            number = numbers[-1]
        elif number not in numbers:
            raise SnapshotNotFoundError(number, numbers[-1], len(numbers))
        return self._read_snapshot(number)

    def _read_snapshot(self, number: int) -> Snapshot:
        path = as_rel(layout.snapshot_path(_REL, number))
        try:
            return Snapshot.from_dict(json.loads(self.storage.read_text(path)))
        except (OSError, ValueError, KeyError) as exc:
            raise LakeFormatError(self.location, f"snapshot {number}: {exc}") from exc

    def snapshots(self) -> Iterator[Snapshot]:
        """Every kept snapshot, oldest first (the folder listed once: a lake fed by a
        listener keeps thousands)."""
        for n in self.snapshot_numbers():
            yield self._read_snapshot(n)

    # -- reading --------------------------------------------------------------
    def table_names(self, zone: str | None = None) -> list[str]:
        return [n for n, s in TABLES.items() if zone is None or s.zone == zone]

    def table_uri(self, name: str) -> str:
        """Where table ``name`` is, as deltalake takes it."""
        return self.storage.uri(as_rel(layout.table_path(_REL, name)))

    def open_delta(self, name: str, version: int | None = None) -> DeltaTable:
        """Table ``name`` at ``version`` (None: its latest commit, published or not)."""
        return DeltaTable(self.table_uri(name), version=version,
                          storage_options=self.storage.delta_options)

    def commit_actions(self, name: str, version: int) -> list[dict] | None:
        """The actions of commit ``version`` of table ``name``, each a one-key dict as in
        the Delta log (``{"add": {...}}``, ``{"remove": {...}}``, ``{"commitInfo": ...}``);
        None when that commit's log file is gone (log clean-up after a checkpoint)."""
        log_file = commit_file(name, version)
        try:
            text = self.storage.read_text(log_file)
        except FileNotFoundError:
            return None
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def commit_kinds(self, name: str, before: int, after: int) -> list[str | None]:
        """What each commit of table ``name`` after version ``before`` up to ``after`` did
        to its rows, from its log: ``"none"`` (no file added or removed), ``"moved"``
        (every file action ``dataChange`` false: the same rows in other files, as
        compaction writes them), ``"added"`` (files added, none removed), ``"changed"``
        (files removed, rows with them); None when its log is gone (cleaned up after a
        checkpoint)."""
        kinds: list[str | None] = []
        for version in range(before + 1, after + 1):
            actions = self.commit_actions(name, version)
            if actions is None:
                kinds.append(None)
                continue
            files = [a[k] for a in actions for k in ("add", "remove") if k in a]
            if not files:
                kinds.append("none")
            elif not any(f.get("dataChange", True) for f in files):
                kinds.append("moved")
            else:
                kinds.append("changed" if any("remove" in a for a in actions) else "added")
        return kinds

    def arrow_dataset(self, name: str, dt: DeltaTable) -> ds.Dataset:
        """``dt`` (a version of table ``name``) as a pyarrow dataset, its files read
        through Arrow's own file system (:meth:`Storage.arrow_filesystem`)."""
        fs = self.storage.arrow_filesystem(as_rel(layout.table_path(_REL, name)))
        return dt.to_pyarrow_dataset(filesystem=fs)

    def delta(self, name: str, snapshot: Snapshot | None = None) -> DeltaTable:
        snap = snapshot or self.snapshot()
        return self.open_delta(name, snap.versions[name])

    def work_dir(self) -> Path:
        """A local folder, owner-only, for this lake's working files (instances pulled
        from a PACS before ingest): the vault folder of a local lake; for a lake on
        object storage, a folder of the user's own (``$XDG_STATE_HOME``, default
        ``~/.local/state``, ``imaging-lakehouse/<lake id>``)."""
        if self.local:
            return layout.zone_path(self.root, VAULT)
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        folder = Path(base) / "imaging-lakehouse" / self.config.lake_id
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        return folder

    def dataset(self, name: str, snapshot: Snapshot | None = None) -> ds.Dataset:
        snap = snapshot or self.snapshot()
        if name not in snap.versions:
            # a table added to the schemas after this snapshot was published: empty
            import pyarrow.dataset as ds  # with pandas (0.3 s): not for a catalog's SQL

            spec = TABLES[name]
            return ds.dataset(spec.storage_schema(self.profile).empty_table())
        return self.arrow_dataset(name, self.delta(name, snap))

    def read(self, name: str, snapshot: Snapshot | None = None, columns: list[str] | None = None,
             filter: ds.Expression | None = None) -> pa.Table:
        return self.dataset(name, snapshot).to_table(columns=columns, filter=filter)

    def count(self, name: str, snapshot: Snapshot | None = None) -> int:
        return self.dataset(name, snapshot).count_rows()

    # -- writing --------------------------------------------------------------
    def writer(self, run_id: str, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> LakeWriter:
        """The lake's single writer (``lease_seconds``: the lease of its lock on object
        storage, renewed while it runs; how long a writer that died blocks the next)."""
        return LakeWriter(self, run_id, lease_seconds)


class LakeWriter:
    """The single writer of a lake. Use as a context manager.

    On entry it takes the lock and rolls every table back to the last
    published snapshot (undoing a run that died before publishing). Writes
    accumulate table versions; :meth:`publish` makes them visible at once.
    """

    def __init__(self, lake: Lake, run_id: str, lease_seconds: float = DEFAULT_LEASE_SECONDS):
        self.lake = lake
        self.run_id = run_id
        self.storage = lake.storage
        self._lease_seconds = lease_seconds
        self._lock: WriterLock | None = None
        #: set when another writer was found to have written meanwhile: nothing more
        #: of this run is committed or published
        self._conflict: ConcurrentWriteError | None = None
        self.base: Snapshot | None = None
        self.versions: dict[str, int] = {}
        #: each table as :meth:`current` last opened it (a version is opened once)
        self._opened: dict[str, DeltaTable] = {}
        self._con: duckdb.DuckDBPyConnection | None = None
        #: Free-form state carried from snapshot to snapshot (e.g. what the
        #: summary tables were built from).
        self.extra: dict = {}

    def __enter__(self) -> LakeWriter:
        lock = self.storage.lock(as_rel(layout.lock_path(_REL)), self._lease_seconds)
        lock.acquire()
        self._lock = lock
        try:
            self.base = self.lake.snapshot()
            self.versions = dict(self.base.versions)
            self.extra = dict(self.base.extra)
            self._recover()
            self._create_missing_tables()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def _release(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _check_lock(self) -> None:
        if self._conflict is not None:
            raise self._conflict
        if self._lock is not None:
            self._lock.check()

    def _recover(self) -> None:
        for name, version in self.versions.items():
            # Delta versions have no gaps: without a commit after the published one there
            # is nothing to undo (a file check, not a load of the table's state)
            if not self.storage.exists(commit_file(name, version + 1)):
                continue
            dt = self.lake.open_delta(name)
            if dt.version() > version:
                log.warning("rolling %s back from unpublished version %d to %d",
                            name, dt.version(), version)
                # a new commit whose files are those of ``version`` (history is kept).
                # deltalake's restore holds the GIL during its I/O: an S3 server running
                # in this same Python process (moto's ThreadedMotoServer) cannot answer it
                dt.restore(version, post_commithook_properties=_HOOKS)
                self.versions[name] = self.lake.open_delta(name).version()
                self._checkpoint(name, self.versions[name])
        assert self._lock is not None
        if not self._lock.left_clean:  # the last writer died: it may have left partial files
            self._discard_staged_files()
        # from here on, each file this writer stages is whole or removed (Storage.write_bytes)
        self._lock.leave_clean()

    def _create_missing_tables(self) -> None:
        """Create tables added to the schemas after this lake was made (empty until written)."""
        for spec in TABLES.values():
            if spec.name in self.versions:
                continue
            path = as_rel(layout.table_path(_REL, spec.name))
            if self.storage.listdir(f"{path}/_delta_log"):
                dt = self.lake.open_delta(spec.name)
                if dt.version() > 0:
                    # unpublished writes of a run that died
                    dt.restore(0, post_commithook_properties=_HOOKS)
            else:
                self._check_lock()
                DeltaTable.create(self.lake.table_uri(spec.name),
                                  spec.storage_schema(self.lake.profile),
                                  partition_by=list(spec.partition_by) or None,
                                  name=spec.name, description=spec.description,
                                  storage_options=self.storage.delta_options)
            self.versions[spec.name] = self.lake.open_delta(spec.name).version()
            log.info("created table %s, new in this version", spec.name)

    def _discard_staged_files(self) -> None:
        for name in TABLES:
            self.storage.discard_partial(as_rel(layout.table_path(_REL, name)))

    def current(self, name: str) -> DeltaTable:
        """Table ``name`` at this writer's version of it, opened once (a run reads a table,
        writes it, reads it again: each open replays its log); after each of this writer's
        commits the same object is read on to the new version (:meth:`_advance`)."""
        dt = self._opened.get(name)
        if dt is None or dt.version() != self.versions[name]:
            dt = self._opened[name] = self.lake.open_delta(name, self.versions[name])
        return dt

    def dataset(self, name: str) -> ds.Dataset:
        return self.lake.arrow_dataset(name, self.current(name))

    def append(self, name: str, data: pa.Table, param_hash: str = "") -> int:
        return self._write(name, data, "append", param_hash)

    def overwrite(self, name: str, data: pa.Table, param_hash: str = "") -> int:
        return self._write(name, data, "overwrite", param_hash)

    def compact(self, name: str, groups: list[list[dict]], param_hash: str = "",
                threads: int = 1) -> int:
        """Rewrite each of ``groups`` (files given as rows of
        ``get_add_actions(flatten=True)`` of the current version, a group all of one
        partition) as one file, in one commit that adds the new files and removes those
        they replace (``dataChange`` false: the rows are the same). ``threads`` groups are
        read and written at once (reading, encoding and compressing release the GIL), so
        as many groups are held in memory. Returns the version."""
        spec = TABLES[name]
        stage, checksums = self._stager(name, param_hash, data_change=False)

        def rewrite(files: list[dict]) -> tuple[pa.Schema, list[AddAction],
                                                  list[RemoveAction]]:
            stored = [self._stored_path(name, f) for f in files]
            parts = [self._read_file(name, f, rel) for f, rel in zip(files, stored, strict=True)]
            table = conform(spec, pa.concat_tables(parts, promote_options="default"),
                            self.lake.profile)
            return table.schema, [stage(item) for item in _partitions(table, spec)], [
                self._remove(name, f, rel, data_change=False)
                for f, rel in zip(files, stored, strict=True)]

        if threads > 1 and len(groups) > 1:
            with ThreadPoolExecutor(threads, thread_name_prefix="compact") as pool:
                done = list(pool.map(rewrite, groups))
        else:
            done = [rewrite(files) for files in groups]
        if not done:
            return self.versions[name]
        actions: list[AddAction | RemoveAction] = [a for _, adds, _ in done for a in adds]
        actions += [r for _, _, removes in done for r in removes]
        return self._commit(name, actions, "append", done[0][0], param_hash, checksums)

    def replace(self, name: str, key: str, keys: pa.Array, data: pa.Table,
                param_hash: str = "") -> int:
        """Replace the rows of ``name`` whose ``key`` is one of ``keys`` by ``data`` (which
        should hold rows of those keys only), in one commit: each file of the current
        version holding such a row is rewritten without them, and ``data`` is added.
        Returns the version. Files without such a row are not touched (only their ``key``
        column is read), so the cost follows the rows replaced, not the table."""
        spec = TABLES[name]
        if key in spec.partition_by:
            raise ValueError(f"replace() by a partition column ({key}) is not supported")
        wanted = pc.unique(pa.array(keys)).drop_null()
        kept, removes = [], []
        if len(wanted):
            for f, rel in self._holding(name, key, wanted):
                part = self._read_file(name, f, rel)
                kept.append(part.filter(pc.invert(pc.is_in(part.column(key),
                                                           value_set=wanted))))
                removes.append(self._remove(name, f, rel, data_change=True))
        profile = self.lake.profile
        data = pa.concat_tables([conform(spec, t, profile) for t in [*kept, data]])
        return self._write(name, data, "append", param_hash, removes=removes)

    def _holding(self, name: str, key: str, wanted: pa.Array) -> list[tuple[dict, str]]:
        """The add actions of the current version of ``name`` whose file holds a row with
        ``key`` in ``wanted``, each with its path as stored (:meth:`_stored_path`): one
        scan of that column over every file, not a read of each file in turn from Python,
        which a table of many small files (a nightly run's) paid per file."""
        dt = self.current(name)
        adds = add_actions(dt).to_pylist()
        if not adds:
            return []
        hit = self._paths_holding(name, dt, key, wanted, [f["path"] for f in adds])
        out = []
        for f in adds:  # the file as stored: the path given, or decoded once
            rel = next((p for p in (f["path"], unquote(f["path"])) if p in hit), None)
            if rel is not None:
                out.append((f, rel))
        return out

    def _paths_holding(self, name: str, dt: DeltaTable, key: str, wanted: pa.Array,
                       paths: list[str]) -> set[str]:
        """The paths (in the table's folder) of the files of ``dt`` holding a row with
        ``key`` in ``wanted``. In a local lake DuckDB's Parquet reader scans the column
        (in parallel: 22-32 ms for the 88-99 files of a 100,000-instance lake's
        ``studies`` or ``series``, against 58-85 ms for a pyarrow dataset scan, which a
        listener's batch paid for each summary table); on object storage, or for paths
        DuckDB would not read as given (:func:`lakehouse.duck.readable_as_given`: a
        percent-encoded partition folder, a glob wildcard in the lake's folder), Arrow's
        scan through the lake's filesystem."""
        from lakehouse.duck import readable_as_given

        root = self.lake.table_uri(name) + "/"
        files = [root + p for p in paths]
        if self.storage.local and readable_as_given(files, "/"):
            found = self._duckdb().execute(
                f'SELECT DISTINCT filename FROM read_parquet($files, filename = true, '
                f'hive_partitioning = false) WHERE "{key}" IN (SELECT unnest($keys))',
                {"files": files, "keys": wanted.to_pylist()}).fetchall()
            return {f[len(root):] for (f,) in found}
        scanner = self.lake.arrow_dataset(name, dt).scanner(
            columns=[key], filter=pc.field(key).isin(wanted))
        return {b.fragment.path for b in scanner.scan_batches() if b.record_batch.num_rows}

    def _duckdb(self) -> duckdb.DuckDBPyConnection:
        """This writer's DuckDB connection (made when first needed)."""
        if self._con is None:
            from lakehouse.duck import shared_cursor

            self._con = shared_cursor()
        return self._con

    def _stored_path(self, name: str, f: dict) -> str:
        """The path of the file ``f`` (an add action) in its table's folder, as this
        writer gave it to its add action: ``get_add_actions`` gives it URL-encoded once
        more when a partition value was quoted (``Modality=O%2520T``), and a remove action
        must name the file as its add action did. A path without ``%`` is the same either
        way: no file is looked up (a compaction names every file it rewrites, and on object
        storage each lookup is a request)."""
        path = f["path"]
        if "%" in path and not self.storage.exists(
                f"{as_rel(layout.table_path(_REL, name))}/{path}"):
            path = unquote(path)
        return path

    def _read_file(self, name: str, f: dict, stored: str) -> pa.Table:
        """The rows of the file ``f`` (an add action) of table ``name``, with its partition
        columns (which the file itself does not hold)."""
        spec = TABLES[name]
        path = f"{as_rel(layout.table_path(_REL, name))}/{stored}"
        part = pq.read_table(pa.BufferReader(self.storage.read_bytes(path)))
        for k in spec.partition_by:
            typ = spec.storage_schema(self.lake.profile).field(k).type
            part = part.append_column(k, pa.array([f.get(f"partition.{k}")] * part.num_rows,
                                                  typ))
        return part

    def _remove(self, name: str, f: dict, stored: str, data_change: bool) -> RemoveAction:
        """A remove action for the file ``f`` (an add action) of table ``name``, stored at
        ``stored`` in its folder."""
        values = {k: f.get(f"partition.{k}") for k in TABLES[name].partition_by}
        return RemoveAction(stored, data_change, int(time.time() * 1000),
                            f["size_bytes"],
                            {k: (None if v is None else str(v)) for k, v in values.items()})

    def _write(self, name: str, data: pa.Table, mode: str, param_hash: str,
               removes: list[RemoveAction] | None = None) -> int:
        spec = TABLES[name]
        table = conform(spec, data, self.lake.profile)
        if table.num_rows == 0 and mode == "append" and not removes:
            return self.versions[name]
        data_change = not removes or any(r.data_change for r in removes)
        stage, checksums = self._stager(name, param_hash, data_change)
        parts = list(_partitions(table, spec))
        actions: list[AddAction | RemoveAction]
        if len(parts) > 1:
            with ThreadPoolExecutor(STAGE_THREADS, thread_name_prefix="stage") as pool:
                actions = list(pool.map(stage, parts))
        else:
            actions = [stage(item) for item in parts]
        actions += removes or []
        return self._commit(name, actions, mode, table.schema, param_hash, checksums)

    def _stager(self, name: str, param_hash: str, data_change: bool) -> tuple[
            Callable[[tuple[dict[str, str | None], pa.Table]], AddAction], dict[str, str]]:
        """A function writing one partition's rows of table ``name`` as a new file (its
        add action), and the SHA-256 of each file it wrote, which the commit log records
        (``lake verify`` checks them)."""
        spec = TABLES[name]
        root = as_rel(layout.table_path(_REL, name))
        meta = file_metadata(self.run_id, name, param_hash)
        checksums: dict[str, str] = {}

        def stage(item: tuple[dict[str, str | None], pa.Table]) -> AddAction:
            return self._stage(root, spec, item[1], item[0], meta, checksums, data_change)

        return stage, checksums

    def _commit(self, name: str, actions: list[AddAction | RemoveAction], mode: str,
                schema: pa.Schema, param_hash: str, checksums: dict[str, str]) -> int:
        """Commit ``actions`` as the next version of table ``name``; returns it."""
        spec = TABLES[name]
        self._check_lock()
        expected = self.versions[name] + 1
        commit_id = uuid.uuid4().hex
        dt = self.current(name)
        dt.create_write_transaction(
            actions, mode, schema, partition_by=list(spec.partition_by) or None,
            commit_properties=CommitProperties(
                custom_metadata={"lake.run_id": self.run_id, "lake.param_hash": param_hash,
                                 COMMIT_ID_KEY: commit_id,
                                 CHECKSUMS_KEY: json.dumps(checksums, sort_keys=True)}),
            post_commithook_properties=_HOOKS,
        )
        if self._commit_id(name, expected) != commit_id:
            # another writer committed to this table meanwhile (possible on object storage
            # only when a writer outlived its lease): nothing of this run may be published
            self._conflict = ConcurrentWriteError(self.lake.location, name, expected)
            raise self._conflict
        # on object storage, a commit PUT whose answer was lost (the store wrote it) is
        # retried by deltalake, finds its version taken and commits the same actions, with
        # the same commit id, at the next one: the same files, so the same table (a local
        # commit is a rename, whose outcome is never lost)
        while not self.storage.local and self._commit_id(name, expected + 1) == commit_id:
            log.info("%s: version %d repeats this run's version %d (a commit retried after "
                     "its answer was lost)", name, expected + 1, expected)
            expected += 1
        self.versions[name] = expected
        self._advance(name, dt, expected)
        self._checkpoint(name, expected)
        return expected

    def _advance(self, name: str, dt: DeltaTable, version: int) -> None:
        """Bring ``dt``, the table as :meth:`current` gave it for a commit, to ``version``
        (that commit) by reading the commits since: 1-3 ms, against 4-10 ms to open it
        again (a listener's lake), which the table's next use after every commit paid. A
        caller takes a table from :meth:`current` for one operation, never across a commit
        to that table, so no one holds the object as it moves. If the read fails, the table
        is opened afresh when next used."""
        try:
            dt.load_as_version(version)
        except Exception as exc:
            log.debug("%s reopened at version %d (not read on: %s)", name, version, exc)
            self._opened.pop(name, None)

    def _checkpoint(self, name: str, version: int) -> None:
        """A checkpoint of table ``name`` at ``version`` (this writer's version of it)
        when that is a multiple of :data:`CHECKPOINT_EVERY`. Any version is readable with
        or without one: a reader starts from the last checkpoint at or before the version
        it wants."""
        if version % CHECKPOINT_EVERY:
            return
        try:
            self.current(name).create_checkpoint()
        except Exception as exc:  # the commit stands; readers replay a few more commits
            log.warning("no checkpoint of %s at version %d: %s", name, version, exc)

    def _commit_id(self, name: str, version: int) -> str | None:
        """The ``lake.commit_id`` of commit ``version`` of table ``name`` (None: none)."""
        for action in self.lake.commit_actions(name, version) or []:
            if "commitInfo" in action:
                return action["commitInfo"].get(COMMIT_ID_KEY)
        return None

    def _stage(self, root: str, spec: TableSpec, part: pa.Table, values: dict[str, str | None],
               meta: dict[str, str], checksums: dict[str, str],
               data_change: bool = True) -> AddAction:
        subdir = "/".join(
            f"{k}={quote(v if v is not None else NULL_PARTITION, safe='')}"
            for k, v in values.items()
        )
        rel = f"{subdir}/" if subdir else ""
        codec = codec_for(part.num_rows)
        rel += f"{file_prefix(self.run_id)}{uuid.uuid4().hex[:12]}.{codec}.parquet"
        body = part.drop_columns(list(spec.partition_by))
        body = body.replace_schema_metadata({**(body.schema.metadata or {}), **meta})
        sink = pa.BufferOutputStream()
        pq.write_table(body, sink, compression=codec, row_group_size=ROW_GROUP_ROWS,
                       use_dictionary=dictionary_columns(body.schema)
                       if body.num_rows >= DICTIONARY_MIN_ROWS else False,
                       write_statistics=leaf_columns(body.schema, NO_STATISTICS))
        data = sink.getvalue().to_pybytes()
        # written whole (a local temporary file renamed, or one object PUT)
        self.storage.write_bytes(f"{root}/{rel}", data, sync=False)
        checksums[rel] = hashlib.sha256(data).hexdigest()
        stats = {"numRecords": part.num_rows}
        return AddAction(rel, len(data), values, int(time.time() * 1000), data_change,
                         json.dumps(stats))

    def publish(self, note: str = "") -> Snapshot:
        if self._conflict is not None:
            raise self._conflict
        assert self.base is not None, "publish() outside `with lake.writer(...)`"
        # the snapshot after the one this writer started from (or last published), created
        # exclusively (If-None-Match on S3): when another writer published meanwhile, it
        # exists and this writer publishes nothing
        snap = Snapshot(self.base.number + 1, dict(self.versions), _now(), self.run_id, note,
                        dict(self.extra))
        self._check_lock()
        try:
            self.storage.write_json(as_rel(layout.snapshot_path(_REL, snap.number)),
                                    snap.to_dict(), exclusive=True)
        except FileExistsError:
            self._conflict = ConcurrentWriteError(self.lake.location, "_lake/snapshots",
                                                  snap.number)
            raise self._conflict from None
        self.base = snap
        return snap


def codec_for(rows: int) -> str:
    """The Parquet compression of a lake file of ``rows`` rows (see :data:`ZSTD_MIN_ROWS`)."""
    return "zstd" if rows >= ZSTD_MIN_ROWS else "snappy"


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The Parquet column paths of ``schema`` to dictionary-encode (in a file of at least
    :data:`DICTIONARY_MIN_ROWS` rows): every column but those of :data:`NO_DICTIONARY`."""
    return leaf_columns(schema, NO_DICTIONARY)


def leaf_columns(schema: pa.Schema, leave_out: frozenset[str] = frozenset()) -> list[str]:
    """The Parquet column paths (leaves: ``a.list.element`` for a list ``a``) of the
    columns of ``schema`` not named in ``leave_out``."""
    out: list[str] = []

    def leaves(path: str, typ: pa.DataType) -> None:
        if pa.types.is_list(typ) or pa.types.is_large_list(typ) \
                or pa.types.is_fixed_size_list(typ):
            leaves(f"{path}.list.element", typ.value_type)
        elif pa.types.is_struct(typ):
            for child in typ:
                leaves(f"{path}.{child.name}", child.type)
        elif pa.types.is_map(typ):
            leaves(f"{path}.key_value.key", typ.key_type)
            leaves(f"{path}.key_value.value", typ.item_type)
        else:
            out.append(path)

    for f in schema:
        if f.name not in leave_out:
            leaves(f.name, f.type)
    return out


def partition_codes(table: pa.Table, keys: list[str]) -> tuple[np.ndarray, list[list]]:
    """One int64 group number per row of ``table`` for its values of ``keys``, and the
    dictionary of each key (code 0 is null, code i + 1 value i of the dictionary; the
    group number combines the codes, first key most significant)."""
    group = np.zeros(table.num_rows, dtype=np.int64)
    dictionaries = []
    for k in keys:
        col = table.column(k)
        encoded = pc.dictionary_encode(col.combine_chunks() if col.num_chunks != 1
                                       else col.chunk(0))
        codes = pc.fill_null(encoded.indices.cast(pa.int64()), -1).to_numpy() + 1
        group = group * (len(encoded.dictionary) + 1) + codes
        dictionaries.append(encoded.dictionary.to_pylist())
    return group, dictionaries


def add_actions(dt: DeltaTable) -> pa.Table:
    """The add actions of the version ``dt`` (``get_add_actions(flatten=True)``) as an Arrow
    table, through the Arrow C stream interface: ``pa.table()`` of deltalake's batch
    imports pandas first (0.3 s), to test whether it is a DataFrame."""
    return pa.RecordBatchReader.from_stream(dt.get_add_actions(flatten=True)).read_all()


def file_prefix(run_id: str) -> str:
    """How the name of every data file the run ``run_id`` writes begins."""
    return f"part-{run_id}-"


def written_by(path: str, run_id: str) -> bool:
    """Whether the data file at ``path`` (relative to its table) was written by the run
    ``run_id`` (:meth:`LakeWriter._stage` names each file after its run)."""
    return path.rsplit("/", 1)[-1].startswith(file_prefix(run_id))


def commit_file(name: str, version: int) -> str:
    """The log file of commit ``version`` of table ``name``, relative to the lake."""
    return f"{as_rel(layout.table_path(_REL, name))}/_delta_log/{version:020d}.json"


def group_order(table: pa.Table, keys: list[str]) -> np.ndarray:
    """Row indices of ``table`` in the order of its partitions (stable: rows keep their
    order within a partition). A table taken in this order is split by
    :func:`_partitions` into zero-copy slices."""
    group, _ = partition_codes(table, keys)
    return np.argsort(group, kind="stable")


#: Rows per run of one partition, on average, from which a table is split into zero-copy
#: slices of its runs rather than copied whole in partition order.
MIN_RUN_ROWS = 8


def _partitions(table: pa.Table, spec: TableSpec) -> Iterator[tuple[dict[str, str | None],
                                                                   pa.Table]]:
    """Split ``table`` by the spec's partition columns (string partition values).

    Each partition column is dictionary-encoded and the codes combined into one group
    number per row. When the rows come in runs of one partition (a commit buffer whose
    waves were each put in partition order, :func:`group_order`), each partition is its
    runs, sliced without a copy; otherwise the rows are put in partition order by one
    stable sort and one ``take`` (a copy of the table). Rows keep their order within a
    partition. (A filter per partition scanned the whole table once per partition: a
    hundred (Modality, year) partitions made each commit a hundred scans.)
    """
    keys = list(spec.partition_by)
    if not keys:
        yield {}, table
        return
    if table.num_rows == 0:
        return
    group, dictionaries = partition_codes(table, keys)

    def values(code: int) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for k, dictionary in reversed(list(zip(keys, dictionaries, strict=True))):
            code, c = divmod(code, len(dictionary) + 1)
            out[k] = None if c == 0 else str(dictionary[c - 1])
        return {k: out[k] for k in keys}

    bounds = _runs(group)
    if len(bounds) * MIN_RUN_ROWS <= table.num_rows or len(bounds) == 1:
        runs: dict[int, list[pa.Table]] = {}
        for start, end in bounds:
            runs.setdefault(int(group[start]), []).append(table.slice(start, end - start))
        for code, parts in runs.items():
            yield values(code), parts[0] if len(parts) == 1 else pa.concat_tables(parts)
        return
    order = np.argsort(group, kind="stable")
    group = group[order]
    ordered = table.take(pa.array(order))
    for start, end in _runs(group):
        yield values(int(group[start])), ordered.slice(start, end - start)


def _runs(group: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of equal values in ``group`` (not empty)."""
    starts = np.concatenate([[0], np.flatnonzero(group[1:] != group[:-1]) + 1]).tolist()
    return list(zip(starts, [*starts[1:], len(group)], strict=True))
