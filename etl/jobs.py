"""The ingest job: discover → extract in Dask batches → classify → commit.

Files are discovered in walk order, filtered against the vault's file index
(unchanged files are not read again), grouped into batches and computed in
waves by Dask workers. The driver classifies each file in walk order (new
instance, exact duplicate, conflict, skipped, quarantined), buffers rows and
commits them in large appends, publishing a lake snapshot after each commit.
At the end the summary tables are rebuilt and the run is recorded.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake.exceptions import DeltaError

from etl import replay, seen, summarize, workerserver
from etl.config import HEAD_BYTES, IngestConfig, check_scheduler
from etl.discover import Found, FoundFile, WalkStats, tally, walk_columns
from etl.errors import REASONS
from etl.listings import Listings, listings_path
from lakehouse.optimize import MiB, compact
from lakehouse.provenance import code_version, config_hash, new_run_id
from lakehouse.schemas import SCHEMA_VERSION, TABLES
from lakehouse.tables import ConcurrentWriteError, Lake, LakeWriter, group_order, partition_codes

if TYPE_CHECKING:  # pydicom, through the policy: a no-op rerun never loads it
    from lakehouse.deid import Policy

log = logging.getLogger(__name__)

OUTCOMES = ("ingested", "duplicate", "conflict", "skipped", "quarantined")
#: The partition columns of ``instances``.
PARTITION = list(TABLES["instances"].partition_by)
#: Discovered files are checked against the file index this many at a time.
INDEX_CHUNK = 20_000
#: The collector's youngest-generation threshold during a run (Python's default: 700).
GC_YOUNG = 50_000
#: A run's compaction (``IngestConfig.compact_files``) takes the files under this size and
#: writes files of up to about ``COMPACT_TARGET_BYTES``: smaller than ``lake optimize``'s
#: (64 and 256 MiB), so that what a run rewrites, and holds in memory while it does,
#: stays small. A file past it is left alone: a scan of it pays for its rows, not for
#: being one more file.
COMPACT_SMALL_BYTES = 16 * MiB
COMPACT_TARGET_BYTES = 64 * MiB
#: A run into a lake without instances keeps what the summaries read of its rows (700-870
#: bytes a row: some 300,000 rows) up to this size, and summarizes them from memory at
#: its end instead of decoding the files it wrote (100,000 small files: 0.62-0.76 s
#: against 1.10-1.35 s); past it, it drops them and reads the files.
SUMMARY_ROWS_BYTES = 256 << 20


@dataclass
class RunSummary:
    run_id: str
    files_seen: int = 0
    files_unchanged: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    snapshot: int | None = None
    seconds: float = 0.0
    scheduler: str = ""
    workers: int = 0
    folders_unreadable: int = 0
    #: how the summary tables were brought up to date: updated, rebuilt or current
    summaries: str = ""
    #: rows written per summary table by an update (the changed ones)
    summary_rows: dict[str, int] = field(default_factory=dict)
    #: per table compacted at the end of the run: the small files rewritten, and the
    #: files they became (``IngestConfig.compact_files``)
    compacted: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def files_read(self) -> int:
        return sum(self.outcomes.values())

    def to_dict(self) -> dict:
        return {
            "run_id": self.run_id, "files_seen": self.files_seen,
            "files_unchanged": self.files_unchanged, "outcomes": self.outcomes,
            "quarantine_reasons": self.quarantine_reasons,
            "skipped_reasons": self.skipped_reasons, "bytes_read": self.bytes_read,
            "snapshot": self.snapshot, "seconds": round(self.seconds, 3),
            "scheduler": self.scheduler, "workers": self.workers,
            "folders_unreadable": self.folders_unreadable,
            "summaries": self.summaries, "summary_rows": self.summary_rows,
            "compacted": {k: {"files": a, "into": b} for k, (a, b) in self.compacted.items()},
        }


Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; total is 0 while unknown."""


def ingest(lake: Lake, source: Path | str, config: IngestConfig | None = None,
           progress: Progress | None = None, key_file: Path | str | None = None,
           source_kind: str = "folder", kept: seen.Kept | None = None) -> RunSummary:
    """Ingest every DICOM file below ``source`` into ``lake``; return what happened.

    ``source_kind`` is recorded in ``ingest_runs`` (``folder``, or the kind of remote
    source whose instances were staged into ``source`` by :mod:`etl.sources`).
    ``kept``: the lake's indexes kept between the runs of a process that runs many
    (:class:`etl.seen.Kept`); the run takes them, and gives them back once published.

    A research lake needs its key (``key_file``, default: the lake's default key
    path); a missing or different key stops the run before anything is read.
    """
    config = replace(config or IngestConfig(), checksum=lake.config.checksum)
    check_scheduler(config.scheduler)
    key = lake.key(key_file)  # a missing or wrong key stops the run before it reads
    run_id = new_run_id()
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    summary = RunSummary(run_id)
    with lake.writer(run_id) as writer, _run_settings():
        job = _Job(lake, writer, config, summary, progress or (lambda *_: None),
                   functools.partial(lake.policy_of, key))
        job.count = progress is not None  # the total only a progress bar needs
        job.source_kind = source_kind
        job.kept = kept
        try:
            job.run(Path(source))
        except BaseException as exc:
            summary.seconds = time.perf_counter() - t0
            job.record_run(started, "failed", failure_message(exc, lake.profile))
            writer.publish(note=f"ingest {run_id} failed")
            raise
        summary.seconds = time.perf_counter() - t0
        job.record_run(started, "completed", None)
        summary.snapshot = writer.publish(note=f"ingest {run_id}").number
        job.give_back()
    return summary


def failure_message(exc: BaseException, profile: str) -> str:
    """What the ``ingest_runs`` row of a run that failed with ``exc`` says. In a research
    lake only the kind of error: its text may quote a source path (folder names can hold
    a patient's name or number) or an original UID, which research tables never hold; the
    run's output and log have it whole."""
    if profile != "research":
        return f"{type(exc).__name__}: {exc}"[:500]
    return (f"{type(exc).__name__} (its message may quote source paths or identifiers: "
            "it is in the run's output and log, not in the research tables)")


class _RunSettings:
    """Process settings for as long as ingest runs (in any thread of the process); the
    first run to start sets them, the last one to end puts back what was there.

    - The cyclic garbage collector runs less often: a run keeps an entry per pending
      instance and its files' columns alive, which each collection walked again (0.3
      CPU-s per 100,000 files). Cycles are still collected.
    - Arrow allocates from the C library's allocator instead of its default (mimalloc):
      the driver's kernel time per 100,000 files was 2.3-2.5 s with mimalloc and 1.6-1.8 s
      with it, at the same peak memory (measured in-process, ``bench/README.md``).
      Buffers keep the pool they came from, so buffers allocated before or after a run
      are unaffected."""

    def __init__(self, young: int) -> None:
        self.young = young
        self._lock = threading.Lock()
        self._runs = 0
        self._gc: tuple[int, ...] = ()
        self._pool: pa.MemoryPool | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if not self._runs:
                self._gc = gc.get_threshold()
                gc.set_threshold(max(self._gc[0], self.young), *self._gc[1:])
                self._pool = pa.default_memory_pool()
                pa.set_memory_pool(pa.system_memory_pool())
            self._runs += 1
        try:
            yield
        finally:
            with self._lock:
                self._runs -= 1
                if not self._runs:
                    gc.set_threshold(*self._gc)
                    assert self._pool is not None
                    pa.set_memory_pool(self._pool)


_run_settings = _RunSettings(GC_YOUNG)


class _Job:
    def __init__(self, lake: Lake, writer: LakeWriter, config: IngestConfig,
                 summary: RunSummary, progress: Progress,
                 policy: Callable[[], Policy | None]):
        self._make_policy = policy
        self.lake = lake
        self.w = writer
        self.config = config
        self.summary = summary
        self.progress = progress
        self.timings = {"discover": 0.0, "extract": 0.0, "summarize": 0.0}
        self.runner = None
        self.source_kind = "folder"
        #: count the source's files for the progress total (a second, cheaper walk)
        self.count = True
        # rows not yet committed
        self._ingested: list[pa.Table] = []
        self._files: list[pa.Table] = []
        self._conflicts: list[dict] = []
        self._id_maps: list[pa.ChunkedArray] = []
        # uid -> (sha, run id, wave table, row) of instances buffered in this run
        self._pending: dict[str, tuple[str, str, pa.Table, int]] = {}
        self._buffer_rows = 0
        self._buffer_bytes = 0
        #: what the summaries read of each instances commit of the run, for them to be
        #: built from memory at its end: kept while the lake had no instances before the
        #: run (checked at its first commit) and they fit in SUMMARY_ROWS_BYTES
        self._run_rows: list[pa.Table] | None = []
        self._run_rows_bytes = 0
        # the summaries of an instances version, built during the run's last commit
        self._built: tuple[int, Future[dict[str, pa.Table]]] | None = None
        self._instances_before = writer.versions["instances"]
        self._versions_before = dict(writer.versions)  # what the run wrote to: compacted
        # what the lake holds, scanned once per run when first needed (etl.seen)
        self._hasher: seen.Hasher | None = None
        self._uids: seen.KeyIndex | None = None
        self._pairs: seen.KeyIndex | None = None
        #: where those indexes come from and go back to, between runs (None: scanned)
        self.kept: seen.Kept | None = None
        # paths read by an earlier run and changed since (their quarantine rows may resolve)
        self._reread: set[str] = set()
        self._walked = False  # the walk of the source has ended

    # -- the run ---------------------------------------------------------------
    def run(self, source: Path) -> None:
        self._hasher = seen.Hasher()
        try:
            self._run(source)
        finally:
            self._hasher.close()

    def _run(self, source: Path) -> None:
        stats = WalkStats()
        listings = None
        if self.source_kind == "folder" and source.is_dir():
            listings = Listings(listings_path(self.lake.work_dir(), str(source.absolute())),
                                reuse=self.config.reuse_listings)
        # a rerun's walk that a second process stat-s ahead of: the workers' server,
        # started with the run and not needed unless a file is to be read, waits meanwhile
        # (a file to read resumes it: prestart)
        pause = ((workerserver.pause, workerserver.resume)
                 if self.config.scheduler == workerserver.SCHEDULER else None)
        # a generator: files are found as extraction goes, INDEX_CHUNK at a time after a
        # first chunk of one batch per worker, which the workers can start on at once
        found = walk_columns(source, stats, INDEX_CHUNK, listings,
                             first=self.config.batch_files * self.config.resolved_workers(),
                             stat_ahead=pause)
        t = time.perf_counter()
        todo = self._changed(found, stats, source)
        self._extract(source, todo)
        self.timings["extract"] = time.perf_counter() - t
        log.info("%d files found, %d unchanged, %d read", self.summary.files_seen,
                 self.summary.files_unchanged, self.summary.files_read)
        if listings is not None:
            log.info("%d folders listed, %d unchanged since the last run", listings.listed,
                     listings.reused)

        t = time.perf_counter()
        self._summarize_if_stale()
        self.timings["summarize"] = time.perf_counter() - t
        self._compact()

    def _changed(self, found: Iterator[Found], stats: WalkStats,
                 source: Path) -> Iterator[FoundFile]:
        """The files of ``found`` not already read with the same path, size and mtime (one
        scan of the file index per run, then lookups in memory), a chunk of the walk at a
        time: the walk runs only as far ahead of extraction as one chunk (at the start of
        a rerun, while the index is made, up to ``INDEX_CHUNK`` files more). An unchanged
        file costs its ``stat`` and its share of a few column operations: no object."""
        hasher = self._hasher
        assert hasher is not None
        t = time.perf_counter()
        index = seen.KeyIndex()
        walked: list[Found] = []
        if self.w.versions["files"] > 0:
            # files were read before (version 0 is the empty table): their index is made
            # (the table opened, DuckDB's connection, the scan of ``files``: 50-100 ms at
            # 100,000 files, mostly without the GIL) while the walk starts, up to a chunk
            # ahead
            made: Future = Future()
            # of the files below the source only (a listener's batch, a night's folder of a
            # large archive: not the whole lake's paths)
            where = seen.under(str(source.absolute()), source.is_dir())
            threading.Thread(target=_settle, args=(made, lambda: index.add(*hasher.table_keys(
                self.lake, "files", self.w.current("files"), *seen.FILE_KEY, *where))),
                name="lake-files-index").start()
            try:
                while not made.done() and sum(map(len, walked)) < INDEX_CHUNK \
                        and (chunk := next(found, None)) is not None:
                    walked.append(chunk)
            finally:
                made.exception()  # the connection is not closed under the thread
            made.result()
        if not len(index):  # the lake's first run: every file found will be read
            prestart(self.config)
        self.timings["discover"] += time.perf_counter() - t
        found = itertools.chain(walked, found)
        while True:
            t = time.perf_counter()
            chunk = next(found, None)
            self.summary.folders_unreadable = stats.folders_unreadable
            if chunk is None:
                self.timings["discover"] += time.perf_counter() - t
                self._walked = True
                return
            n = len(chunk)
            self.summary.files_seen += n
            table = pa.table({
                "path": pa.array(chunk.paths, pa.string()),
                "file_size": pa.array(chunk.sizes, pa.int64()),
                "mtime_ns": pa.array(chunk.mtimes, pa.int64()),
                "reason": pa.nulls(n, pa.string()),
            })
            present, unchanged = index.lookup(*hasher.keys(table, *seen.FILE_KEY))
            if chunk.errors:  # a file that could not be stat'ed is never unchanged
                unchanged[list(chunk.errors)] = False
            todo = np.flatnonzero(~unchanged).tolist()
            if todo and len(index):
                # a rerun with files to read: the workers' server starts now, if it is not
                # running yet (a first run started it above, `lake ingest` at its start)
                prestart(self.config)
            self.summary.files_unchanged += n - len(todo)
            self.timings["discover"] += time.perf_counter() - t
            for i in todo:
                f = chunk.file(i)
                if present[i]:
                    self._reread.add(f.path)
                yield f

    def _batches(self, files: Iterator[FoundFile]) -> Iterator[list[FoundFile]]:
        # the bytes a worker reads of each file: all of it for whole-file checksums, else
        # its header (the first HEAD_BYTES, rarely more); a batch of 512 CT slices is
        # then 16 MB of reading, not 220 MB of files
        whole = self.config.checksum == "full"
        batch: list[FoundFile] = []
        size = 0
        for f in files:
            batch.append(f)
            size += f.size if whole else min(f.size, HEAD_BYTES)
            if len(batch) >= self.config.batch_files or size >= self.config.batch_bytes:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def _extract(self, source: Path, files: Iterator[FoundFile]) -> None:
        """Read ``files`` in waves of batches, one wave computing while the one before is
        classified; the workers start only when there is a first file to read."""
        batches = self._batches(files)
        first = next(batches, None)
        if first is None:
            return
        # Dask and the worker code: imported by a run that reads files only
        from etl.runners import make_runner

        runner = make_runner(self.config, self.summary.run_id, self.policy)
        self.summary.scheduler = runner.description
        self.summary.workers = runner.workers
        wave_size = max(1, runner.workers * self.config.batches_per_worker)
        # a first wave of one batch per worker: they start on it while the files of the
        # next wave (16 batches) are walked
        waves = itertools.chain([[first, *itertools.islice(batches, runner.workers - 1)]],
                                _chunked(batches, wave_size))
        # the total for the progress bar comes from a second walk that only counts (none
        # without a progress bar: 0.3 CPU-s per 100,000 files)
        counter = _Counter(source) if self.count else None
        done = 0
        queued: Future | None = None
        self.progress("extract", 0, 0)
        try:
            # two waves submitted at a time: the runner starts the second as soon as the
            # first has handed its last task to the workers (the process pool; else when
            # the first is done), while this thread takes the first's tables and walks on
            # to the third (with one, the workers waited for that walk after every wave)
            pending: Future | None = runner.submit(next(waves))
            wave_next = next(waves, None)
            queued = runner.submit(wave_next) if wave_next is not None else None
            while pending is not None:
                tables = pending.result()
                pending, queued = queued, None
                if pending is not None:
                    wave_next = next(waves, None)
                    queued = runner.submit(wave_next) if wave_next is not None else None
                wave = pa.concat_tables(tables)
                self._classify(wave)
                done += wave.num_rows
                total = self.summary.files_seen if self._walked or counter is None \
                    else counter.total(self.summary.files_seen)
                self.progress("extract", done + self.summary.files_unchanged, total)
                if (self._buffer_rows >= self.config.flush_rows
                        or self._buffer_bytes >= self.config.flush_bytes):
                    self._flush(final=False)
            self._flush()
        finally:
            if queued is not None:  # a wave failed: the one behind it is not wanted
                queued.cancel()
            if counter is not None:
                counter.stop()
            runner.close()

    @functools.cached_property
    def policy(self) -> Policy | None:
        """The lake's de-identification policy, made when first needed (with pydicom: a
        run that reads no file never loads it)."""
        return self._make_policy()

    # -- what the lake holds ----------------------------------------------------
    def _index(self, name: str) -> seen.KeyIndex:
        """The keys (:data:`etl.seen.KEYS`) of table ``name`` as this run found it: kept
        from the process's last run when still right, or scanned."""
        version = self.w.versions[name]
        index = self.kept.take(self.lake, name, version) if self.kept is not None else None
        if index is None:
            assert self._hasher is not None
            index = seen.KeyIndex()
            index.add(*self._hasher.table_keys(self.lake, name, self.w.current(name),
                                               *seen.KEYS[name]))
        return index

    def give_back(self) -> None:
        """Hand the run's indexes, which its commits kept up to date, to :attr:`kept`
        (once the run has published)."""
        if self.kept is not None:
            for name, index in (("instances", self._uids), ("identifiers", self._pairs)):
                if index is not None:
                    self.kept.put(self.lake, name, self.w.versions[name], index)

    # -- classification --------------------------------------------------------
    def _known(self, uids: list[str], where: pa.Table | None = None
               ) -> dict[str, tuple[str, str]]:
        """SOPInstanceUID -> (sha256, run id) of instances already committed (a scan of
        ``instances``: only for the few UIDs the index cannot settle). ``where``: the
        partitions (Modality, study_year) to look in first, those of the new copies (a
        corrected copy of an instance is usually in its partition); the UIDs not found
        there are then looked up everywhere."""
        if not uids:
            return {}
        dataset = self.w.dataset("instances")
        columns = ["SOPInstanceUID", "file_sha256", "ingest_run_id"]
        out: dict[str, tuple[str, str]] = {}
        passes = [_in_partitions(where), None] if where is not None else [None]
        for scope in passes:
            todo = [u for u in uids if u not in out]
            if not todo:
                break
            hit = ds.field("SOPInstanceUID").isin(todo)
            t = dataset.to_table(columns=columns, filter=hit if scope is None else hit & scope,
                                 batch_readahead=1, fragment_readahead=1)
            out.update((u, (sha, r)) for u, sha, r in zip(
                t.column(0).to_pylist(), t.column(1).to_pylist(), t.column(2).to_pylist(),
                strict=True))
        return out

    def _committed(self, wave: pa.Table, ok: list[int]) -> dict[str, tuple[str, str]]:
        """SOPInstanceUID -> (sha256, run id) of the committed instances among the rows
        ``ok`` of ``wave``; an identical committed copy is known from the index alone
        (its run id is then not looked up: only conflicts report it)."""
        assert self._hasher is not None
        if not ok:
            return {}
        if self._uids is None:
            self._uids = self._index("instances")
        if not len(self._uids):
            return {}
        rows = wave.select(["SOPInstanceUID", "file_sha256", *PARTITION]).take(
            pa.array(ok, pa.int64()))
        present, same = self._uids.lookup(*self._hasher.keys(rows, *seen.INSTANCE_KEY))
        uids = rows.column(0).to_pylist()
        shas = rows.column(1).to_pylist()
        known = {uids[i]: (shas[i], "") for i in np.flatnonzero(present & same)}
        # the UID is there with another checksum (a conflict), or its key collided
        other = np.flatnonzero(present & ~same)
        if len(other):
            known.update(self._known([uids[i] for i in other],
                                     rows.select(PARTITION).take(pa.array(other))))
        return known

    def _classify(self, wave: pa.Table) -> None:
        status = wave.column("status").to_pylist()
        uids = wave.column("SOPInstanceUID").to_pylist()
        shas = wave.column("file_sha256").to_pylist()
        reasons = wave.column("reason").to_pylist()
        sizes = wave.column("file_size").to_pylist()
        known = self._committed(wave, [i for i, s in enumerate(status) if s == "ok"])
        outcome: list[str] = []
        take: list[int] = []
        self.summary.bytes_read += sum(s for s in sizes if s)
        pending, run_id = self._pending, self.summary.run_id
        for i, (st, uid, sha) in enumerate(zip(status, uids, shas, strict=True)):
            if st != "skipped" and st != "quarantined" and uid not in pending \
                    and uid not in known:  # the common case first: a new instance
                outcome.append("ingested")
                pending[uid] = (sha, run_id, wave, i)
                take.append(i)
            elif st == "skipped":
                outcome.append("skipped")
                self.summary.skipped_reasons[reasons[i]] = \
                    self.summary.skipped_reasons.get(reasons[i], 0) + 1
            elif st == "quarantined":
                outcome.append("quarantined")
                self.summary.quarantine_reasons[reasons[i]] = \
                    self.summary.quarantine_reasons.get(reasons[i], 0) + 1
            else:  # the UID is pending in this run or committed
                kept_sha, kept_run, *where = pending.get(uid) or known[uid]
                if kept_sha == sha:
                    outcome.append("duplicate")
                else:
                    outcome.append("conflict")
                    kept_json = (where[0].column("dicom_json")[where[1]].as_py() if where
                                 else self._committed_json(uid))
                    self._conflicts.append(self._conflict(wave, i, kept_sha, kept_run,
                                                          kept_json))
        for o, n in Counter(outcome).items():
            self.summary.outcomes[o] += n
        files = wave.select(["path", "file_size", "mtime_ns", "file_sha256", "source_sha256",
                             "checksum_bytes",
                             "reason", "message", "SOPInstanceUID", "ingest_run_id", "status"])
        files = files.append_column("outcome", pa.array(outcome, pa.string()))
        # copied (a few hundred bytes a row): a column read from a worker's IPC stream is
        # a slice of its batch's one buffer, and would keep the whole batch (its DICOM
        # JSON too) in memory until the commit
        self._files.append(files.take(pa.array(np.arange(files.num_rows))))
        if take:
            # the kept rows in partition order (in walk order within a partition): the
            # commit then writes each partition's runs without copying the buffer again.
            # Pending rows point into the kept rows, so the rest of the wave can be freed
            kept = wave.select(PARTITION).take(pa.array(take, pa.int64()))
            take = np.asarray(take, np.int64)[group_order(kept, PARTITION)].tolist()
            rows = wave.take(pa.array(take, pa.int64()))
            for j, i in enumerate(take):
                self._pending[uids[i]] = (shas[i], self.summary.run_id, rows, j)
            if self.policy is not None:
                self._id_maps.append(rows.column("id_map"))
            self._ingested.append(rows)
            self._buffer_rows += rows.num_rows
            self._buffer_bytes += rows.column("dicom_json").nbytes

    def _conflict(self, wave: pa.Table, i: int, kept_sha: str, kept_run: str,
                  kept_json: str | None) -> dict:
        row = wave.slice(i, 1).to_pylist()[0]
        return {
            "SOPInstanceUID": row["SOPInstanceUID"],
            "StudyInstanceUID": row["StudyInstanceUID"],
            "SeriesInstanceUID": row["SeriesInstanceUID"],
            "kept_sha256": kept_sha,
            "rejected_sha256": row["file_sha256"],
            "kept_ingest_run_id": kept_run,
            "ingest_run_id": self.summary.run_id,
            "differing_keywords": _differing_keywords(kept_json, row["dicom_json"]),
            "detected_at": datetime.now(UTC),
        }

    def _committed_json(self, uid: str) -> str | None:
        """The DICOM JSON of a committed instance: its UID is looked up file by file, and
        only the file that holds it has its (large) ``dicom_json`` column read."""
        hit = ds.field("SOPInstanceUID") == uid
        for fragment in self.w.dataset("instances").get_fragments():
            if fragment.count_rows(filter=hit):
                t = fragment.to_table(columns=["dicom_json"], filter=hit)
                return t.column(0)[0].as_py()
        return None

    # -- commits ---------------------------------------------------------------
    def _flush(self, final: bool = True) -> None:
        """Commit the buffered rows. A commit that is not the run's last (``final``) holds
        back the rows of the smallest partitions (``IngestConfig.hold_share``) and the
        vault ``files`` rows of their files: those files are committed, and so known to
        be read, only with their instances (a run killed meanwhile reads them again)."""
        if not self._files:
            return
        files = pa.concat_tables(self._files)
        held: pa.Table | None = None
        if self._ingested:
            instances = pa.concat_tables(self._ingested)
            if not final and self.config.hold_share > 0:
                instances, held = hold_back(
                    instances, int(self.config.hold_share * self.config.flush_rows),
                    int(self.config.hold_share * self.config.flush_bytes))
            if held is not None and held.num_rows:
                waiting = pc.and_(pc.equal(files.column("outcome"), "ingested"),
                                  pc.is_in(files.column("SOPInstanceUID"),
                                           value_set=held.column("SOPInstanceUID")))
                self._files = [files.filter(waiting)]
                files = files.filter(pc.invert(waiting))
            self.w.append("instances", instances)
            self._keep_for_summaries(instances)
            if final:
                self._build_summaries_meanwhile()
            if self._uids is not None:
                assert self._hasher is not None
                self._uids.add(*self._hasher.keys(
                    instances.select(["SOPInstanceUID", "file_sha256"]), *seen.INSTANCE_KEY))
        quarantined = files.filter(pc.equal(files.column("outcome"), "quarantined"))
        if quarantined.num_rows:
            now = pa.array([datetime.now(UTC)] * quarantined.num_rows, pa.timestamp("us", "UTC"))
            quarantined = quarantined.append_column("quarantined_at", now)
            if self.policy is not None:  # details may quote identifiers: they stay in the vault
                generic = [REASONS.get(r, r) for r in quarantined.column("reason").to_pylist()]
                quarantined = quarantined.set_column(
                    quarantined.schema.get_field_index("message"), "message",
                    pa.array(generic, pa.string()))
            self.w.append("quarantine", quarantined)
        if self._id_maps:
            self._append_identifiers()
        if self._conflicts:
            self.w.append("conflicts", pa.Table.from_pylist(self._conflicts))
        if self._reread:  # only a path read before can have earlier quarantine rows
            again = files.filter(pc.is_in(files.column("path"),
                                          pa.array(list(self._reread), pa.string())))
            replay.resolve_fixed(self.w, again, self.summary.run_id)
        self.w.append("files", files)
        self.w.publish(note=f"ingest {self.summary.run_id}: {files.num_rows} files")
        self._conflicts, self._id_maps = [], []
        self._pending.clear()
        if held is not None and held.num_rows:
            # the held rows wait for the next commit: still pending in this run
            run_id = self.summary.run_id
            for j, (uid, sha) in enumerate(zip(held.column("SOPInstanceUID").to_pylist(),
                                               held.column("file_sha256").to_pylist(),
                                               strict=True)):
                self._pending[uid] = (sha, run_id, held, j)
            self._ingested = [held]
            self._buffer_rows = held.num_rows
            self._buffer_bytes = held.column("dicom_json").nbytes
        else:
            self._files, self._ingested = [], []
            self._buffer_rows = self._buffer_bytes = 0

    def _append_identifiers(self) -> None:
        """New original <-> pseudonym pairs of this flush into the vault."""
        assert self._hasher is not None
        pairs = pa.Table.from_struct_array(
            pc.list_flatten(pa.chunked_array(
                [c for arr in self._id_maps for c in arr.chunks], self._id_maps[0].type)))
        con = self._hasher.con  # the run's DuckDB connection
        con.register("new_pairs", pairs)
        try:
            fresh = con.sql("SELECT DISTINCT kind, pseudonym, original FROM new_pairs "
                            "ORDER BY 1, 2").to_arrow_table()
        finally:
            con.unregister("new_pairs")
        if self._pairs is None:
            self._pairs = self._index("identifiers")
        keys = self._hasher.keys(fresh, *seen.PAIR_KEY)
        _, known = self._pairs.lookup(*keys)
        if known.any():
            new = ~known
            fresh = fresh.filter(pa.array(new))
            keys = (keys[0][new], keys[1][new])
        if fresh.num_rows:
            run = pa.array([self.summary.run_id] * fresh.num_rows, pa.string())
            self.w.append("identifiers", fresh.append_column("ingest_run_id", run))
            self._pairs.add(*keys)

    def _keep_for_summaries(self, instances: pa.Table) -> None:
        """Keep what the summaries read of ``instances`` (committed), while the run's kept
        rows stay within :data:`SUMMARY_ROWS_BYTES`."""
        if self._run_rows is None:
            return
        if not self._run_rows and summarize.row_count(
                self.lake.open_delta("instances", self._instances_before)) != 0:
            self._run_rows = None  # rows not the run's: the summaries read the files
            return
        rows = summarize.summary_rows(instances, self.lake.profile)
        self._run_rows_bytes += rows.nbytes
        if self._run_rows_bytes > SUMMARY_ROWS_BYTES:
            log.debug("summaries: more rows than kept in memory; the files will be read")
            self._run_rows = None
        else:
            self._run_rows.append(rows)

    @functools.cached_property
    def _summaries_code(self) -> str:
        """:func:`etl.summarize.fingerprint` (it reads the SQL files): once per run."""
        return summarize.fingerprint()

    def _rebuilds_summaries(self) -> bool:
        """Whether the summaries are to be built whole (not updated): no version of
        ``instances`` they were built from (a first run), or built by other code."""
        return (self.w.extra.get("summaries_from") is None
                or self.w.extra.get("summaries_code") != self._summaries_code)

    def _build_summaries_meanwhile(self) -> None:
        """At the run's last commit of instances, when the summaries are to be built whole
        from the run's kept rows: build them in a thread while the commit goes on (the
        vault's pairs, the ``files`` rows, the snapshot), for :meth:`_summarize_if_stale`
        to write. DuckDB builds them outside the GIL, beside that commit's Python work:
        the run's tail is shorter by most of the build (0.12 s of a 20,000-file first
        run's 0.6 s). The build only reads: if the commit fails, its result is dropped."""
        if not self._run_rows or not self._rebuilds_summaries():
            return
        rows = pa.concat_tables(self._run_rows)
        self._run_rows = None
        built: Future[dict[str, pa.Table]] = Future()
        version = self.w.versions["instances"]
        self._built = (version, built)

        def build() -> dict[str, pa.Table]:
            # the version opened for the build alone: the writer's own table object is
            # read on in place by its next commit to instances (LakeWriter._advance)
            return summarize.build(self.lake, self.lake.open_delta("instances", version), rows)

        threading.Thread(target=_settle, name="lake-summaries", args=(built, build)).start()

    def _summarize_if_stale(self) -> None:
        """Bring series/studies/patients/dose_events up to this instances version: updated
        for what changed since the version they were built from, rebuilt whole on a first
        run or when the summary code changed (also repairs the summaries after a run that
        died before summarizing)."""
        kept, self._run_rows = self._run_rows, None
        built, self._built = self._built, None
        rows = pa.concat_tables(kept) if kept else None
        current, code = self.w.versions["instances"], self._summaries_code
        since, whole = self.w.extra.get("summaries_from"), self._rebuilds_summaries()
        if since == current and not whole:
            self.summary.summaries = "current"
            return
        updates = None
        if not whole:
            try:
                before = self.lake.open_delta("instances", since)
            except DeltaError:  # its log is gone (cleaned up): rebuild whole
                log.info("summaries: instances version %s cannot be opened; rebuilt whole",
                         since)
            else:
                updates = summarize.update(self.lake, before, self.w.current("instances"),
                                           self.w.current("studies"))
        if updates is None:
            # the run's rows are all of the version's: the lake had none before it (build
            # checks the count: ingest only ever appends instances)
            tables = built[1].result() if built is not None and built[0] == current else \
                summarize.build(self.lake, self.w.current("instances"), rows)
            for name, table in tables.items():
                self.w.overwrite(name, table)
            self.summary.summaries = "rebuilt"
        else:
            for name, u in updates.items():
                self.w.replace(name, u.key, u.keys, u.rows)
                self.summary.summary_rows[name] = u.rows.num_rows
            self.summary.summaries = "updated"
        self.w.extra.update(summaries_from=current, summaries_code=code)

    def _compact(self) -> None:
        """Compact the small files earlier runs left in each table this run wrote to (and
        in ``ingest_runs``, which every run adds a file to) once compacting them takes
        ``compact_files`` files away or more, before the run is recorded and published: one
        snapshot has the run's rows and fewer files. Tiered (``lakehouse.optimize``): a
        small file joins others of about its size, not a partition's much larger file,
        which is rewritten only once they add up to half its size. The run's own files
        are left as it wrote them: a first run of a large archive writes a few files per
        partition (``flush_rows``), and rewriting them at its end would cost a large part
        of the run (2.2-2.7 s of CPU at 100,012 small files). The summaries stay those of
        the compacted ``instances`` (its rows did not change). A compaction that fails
        leaves its table as it was, and the run goes on. A table created empty at version 0
        and not written before this run (every table, in a lake's first run) holds only the
        run's own files: it is not opened again to look (4-5 ms a table)."""
        if not self.config.compact_files:
            return
        names = [n for n, v in self.w.versions.items()
                 if (v != self._versions_before.get(n) or n == "ingest_runs")
                 and self._versions_before.get(n, 0) > 0]
        instances = self.w.versions["instances"]
        for name in names:
            try:
                result = compact(self.w, name, COMPACT_SMALL_BYTES, COMPACT_TARGET_BYTES,
                                 min_excess=self.config.compact_files,
                                 leave_run=self.summary.run_id, tiered=True)
            except ConcurrentWriteError:
                raise
            except (OSError, pa.ArrowException, DeltaError) as exc:
                log.warning("%s not compacted: %s", name, exc)
                continue
            if result.rewritten:
                self.summary.compacted[name] = (result.rewritten, result.written)
        if self.w.extra.get("summaries_from") == instances != self.w.versions["instances"]:
            self.w.extra["summaries_from"] = self.w.versions["instances"]

    def record_run(self, started: datetime, status: str, message: str | None) -> None:
        s = self.summary
        cfg = {k: v for k, v in self.config.to_dict().items()}
        row = {
            "ingest_run_id": s.run_id, "started_at": started,
            "finished_at": datetime.now(UTC), "code_version": code_version(),
            "schema_version": SCHEMA_VERSION, "config_hash": config_hash(cfg),
            "config_json": json.dumps(cfg, sort_keys=True), "source_kind": self.source_kind,
            "files_seen": s.files_seen, "files_unchanged": s.files_unchanged,
            **{f"files_{k}": v for k, v in s.outcomes.items()},
            "bytes_read": s.bytes_read,
            "discover_seconds": self.timings["discover"],
            "extract_seconds": self.timings["extract"],
            "summarize_seconds": self.timings["summarize"], "summaries": s.summaries or None,
            "total_seconds": s.seconds, "workers": s.workers, "scheduler": s.scheduler,
            "status": status, "message": message,
        }
        self.w.append("ingest_runs", pa.Table.from_pylist([row]))


def hold_back(rows: pa.Table, max_rows: int, max_bytes: int) -> tuple[pa.Table, pa.Table]:
    """``(write, held)``: ``rows`` (instances, in runs of one partition) split by partition.
    ``held``: the rows of the smallest (Modality, study_year) partitions, smallest first,
    as many whole partitions as fit in ``max_rows`` rows and ``max_bytes`` of DICOM JSON,
    copied in partition order (so they keep no wave's buffers alive); ``write``: the
    others, sliced from ``rows`` without a copy. Rows keep their order within a
    partition. A partition held back at each commit gathers its rows into one file
    later instead of one small file per commit."""
    if not rows.num_rows or max_rows <= 0:
        return rows, rows.slice(0, 0)
    group, _ = partition_codes(rows, PARTITION)
    codes, inverse, counts = np.unique(group, return_inverse=True, return_counts=True)
    lengths = pc.binary_length(rows.column("dicom_json")).to_numpy(zero_copy_only=False)
    json_bytes = np.bincount(inverse, weights=np.nan_to_num(lengths.astype(np.float64)),
                             minlength=len(codes))
    order = np.argsort(counts, kind="stable")  # smallest partitions first
    fits = (np.cumsum(counts[order]) <= max_rows) & (np.cumsum(json_bytes[order]) <= max_bytes)
    # a partition that does not fit ends the held ones: all of them would be more
    held_codes = codes[order[:int(np.argmin(fits)) if not fits.all() else len(order)]]
    if not len(held_codes) or len(held_codes) == len(codes):
        return rows, rows.slice(0, 0)
    is_held = np.isin(group, held_codes)
    starts = np.concatenate([[0], np.flatnonzero(
        (group[1:] != group[:-1]) | (is_held[1:] != is_held[:-1])) + 1])
    ends = np.append(starts[1:], len(group))
    runs = list(zip(starts.tolist(), (ends - starts).tolist(), is_held[starts].tolist(),
                    strict=True))
    write = [rows.slice(a, n) for a, n, h in runs if not h]
    # only the held rows are copied: a ``take`` over the whole buffer (many chunks) would
    # first concatenate every chunk of it, a transient copy of the buffer
    held = pa.concat_tables([rows.slice(a, n) for a, n, h in runs if h]).combine_chunks()
    held = held.take(pa.array(np.argsort(group[is_held], kind="stable")))
    out = pa.concat_tables(write) if write else rows.slice(0, 0)
    return out, held


def prestart(config: IngestConfig) -> None:
    """Start the local pool's fork server now, for a run that is sure to read files: it
    imports the worker code (about a second of CPU) in the background while the driver
    walks the source, instead of after the first batch is found. Returns at once. (Here,
    not in :mod:`etl.runners`: a run that reads nothing imports neither Dask nor the
    worker code.)"""
    workerserver.start(config.scheduler)


def _settle(future: Future, work: Callable[[], object]) -> None:
    """Run ``work`` and give its result (or its exception) to ``future``."""
    try:
        future.set_result(work())
    except BaseException as exc:
        future.set_exception(exc)


def _chunked(items: Iterator, n: int) -> Iterator[list]:
    while chunk := list(itertools.islice(items, n)):
        yield chunk


class _Counter:
    """Counts the files below a source in a background thread (``discover.tally``: the
    folders listed, no ``stat`` per file), so the progress bar has a total while the
    files are found as they are read."""

    def __init__(self, source: Path):
        self._count = 0
        self._done = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True,
                                        name="lake-count-files")
        self._thread.start()

    def _run(self, source: Path) -> None:
        try:
            for n in tally(source):
                self._count += n
                if self._stop.is_set():
                    return
        except Exception:  # only the progress bar depends on it; the real walk reports
            return
        self._done = True

    def total(self, seen_so_far: int) -> int:
        """Files in the source: exact once counted, the larger of both counts until then."""
        return self._count if self._done else max(self._count, seen_so_far)

    def stop(self) -> None:
        self._stop.set()


def _in_partitions(rows: pa.Table) -> ds.Expression:
    """Rows of ``instances`` in one of the (Modality, study_year) partitions of ``rows``."""
    scope = None
    for values in rows.group_by(PARTITION, use_threads=False).aggregate([]).to_pylist():
        term = None
        for name in PARTITION:
            v = values[name]
            cond = ds.field(name).is_null() if v is None else ds.field(name) == v
            term = cond if term is None else term & cond
        scope = term if scope is None else scope | term
    assert scope is not None
    return scope


def _differing_keywords(a: str | None, b: str | None) -> list[str]:
    """Keywords of top-level DICOM JSON attributes whose values differ."""
    from etl.keywords import keyword_for_tag

    da = json.loads(a) if a else {}
    db = json.loads(b) if b else {}
    out = []
    for tag in sorted(set(da) | set(db)):
        if da.get(tag) != db.get(tag):
            out.append(keyword_for_tag(int(tag, 16)) or tag)
    return out
