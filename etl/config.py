"""Ingest configuration: typed, documented, one place."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

from etl.errors import SchedulerError

#: The per-file path's first read of a header-only read (its buffer then grows, doubling,
#: only as its walk needs), and the most the batch path reads of a file (its first read
#: is ``etl.batchread.FIRST_BYTES``).
HEAD_BYTES = 32 * 1024
#: The schedulers of this machine's own processes or threads.
LOCAL_SCHEDULERS = ("processes", "threads", "synchronous")
#: A distributed scheduler's address: ``[protocol://]host:port``.
_ADDRESS = re.compile(r"^([a-z][a-z0-9+]*://)?[^\s/:]+(:\d+)?$|^([a-z][a-z0-9+]*://)\[[0-9a-fA-F:]+\](:\d+)?$")


def check_scheduler(scheduler: str) -> None:
    """Raise SchedulerError unless ``scheduler`` is a local scheduler's name or looks like
    a distributed scheduler's address (checked before a run reads anything, so that a
    typo is reported even when there is nothing new to read)."""
    if scheduler in (*LOCAL_SCHEDULERS, "local-cluster"):
        return
    if "://" not in scheduler and ":" not in scheduler:
        raise SchedulerError(scheduler, "not a scheduler name (processes, threads, "
                             "synchronous, local-cluster) or address (tcp://host:8786)")
    if not _ADDRESS.match(scheduler):
        raise SchedulerError(scheduler, "not an address of the form tcp://host:8786")


@dataclass(frozen=True)
class IngestConfig:
    #: Files per Dask task. Per-task overhead is milliseconds, so batches are a
    #: hundred files or more (never one task per file); smaller batches shorten the
    #: tail of each wave, when one worker finishes its last batch and the other waits.
    #: A batch read column by column (``columnar``) costs about 4 ms on its own
    #: whatever its size: 0.03 ms per file at 128 files, 0.01 at 512.
    batch_files: int = 512
    #: A batch also closes once what its worker reads of its files adds up to this many
    #: bytes: whole files for whole-file checksums, else at most each file's first 32 KB.
    batch_bytes: int = 128 * 1024 * 1024
    #: Batches in flight per worker; a wave is ``workers * batches_per_worker`` (the
    #: run's first wave: one batch per worker, so that they start at once).
    batches_per_worker: int = 8
    #: Buffered instance rows before they are committed to the lake. A commit writes a
    #: file per (Modality, year) partition it holds: fewer, larger commits leave fewer
    #: files for every later scan (at 100,012 small files: 154 files instead of 257 at
    #: 20,000, the driver 1-1.3 CPU-s less, its peak memory 150 MB more).
    flush_rows: int = 40_000
    #: Buffered DICOM JSON bytes before a commit (bounds the driver's memory).
    flush_bytes: int = 192 * 1024 * 1024
    #: At a commit that is not the run's last, the rows of the smallest (Modality, year)
    #: partitions, up to this share of ``flush_rows`` and of ``flush_bytes``, are held
    #: back for the next commit (with their files' vault rows): rows of a partition
    #: then gather into fewer, larger Parquet files while the buffer stays within
    #: ``flush_rows`` / ``flush_bytes``. 0 writes every buffered row at each commit.
    hold_share: float = 0.25
    #: Local worker processes (default: CPU count).
    workers: int | None = None
    #: ``processes`` (default), ``threads``, ``synchronous``, ``local-cluster`` or the
    #: address of a running distributed scheduler (``tcp://host:8786``).
    scheduler: str = "processes"
    #: Seconds to wait for a distributed scheduler to answer before giving up
    #: (an unreachable ``tcp://`` address fails with SchedulerError after this long).
    scheduler_timeout: float = 10.0
    #: Deepest sequence nesting accepted before a file is quarantined.
    max_depth: int = 64
    #: Binary values (OB/OW/UN/...) longer than this are left out of the DICOM JSON.
    bulk_data_threshold: int = 1024
    #: What file checksums cover, ``header`` or ``full``; :func:`etl.jobs.ingest` sets
    #: it from the lake's configuration (``LakeConfig.checksum``).
    checksum: str = "full"
    #: Read each batch column by column (:mod:`etl.batchread`: the element walk of the
    #: whole batch in compiled code, each distinct element decoded once), files it
    #: cannot take file by file; False reads every file file by file (the reference
    #: the batch path is tested against). The rows are the same.
    columnar: bool = True
    #: Take the names of a source folder unchanged since the last run (same device, inode,
    #: mtime and ctime) from that run's walk instead of listing it again
    #: (:mod:`etl.listings`); every file is still ``stat``-ed. False lists every folder
    #: (and keeps those listings for the next run).
    reuse_listings: bool = True
    #: At the end of a run, a table the run wrote to is compacted (as ``lake optimize``
    #: does: the rows do not change) once that takes this many small files
    #: (``etl.jobs.COMPACT_SMALL_BYTES``) away: nightly runs and ``lake listen``'s
    #: micro-batches add a file to every partition they touch, and every later run and
    #: query pays per file. Tiered: small files are merged with files of about their size,
    #: and a partition's much larger file (2 MiB or more) only once they add up to half its
    #: size (``lakehouse.optimize.TIER_RATIO``), so that a listener's batches do not
    #: rewrite the lake's partitions. 0: never (``lake optimize`` still compacts on demand, each
    #: partition's small files into one).
    compact_files: int = 16

    def resolved_workers(self) -> int:
        return self.workers or os.cpu_count() or 1

    def to_dict(self) -> dict:
        return asdict(self)
