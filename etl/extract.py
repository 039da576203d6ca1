"""The work of one Dask task: a batch of files in, one Arrow table out.

Pure with respect to the lake: it reads files and returns rows, nothing else.
Every file gives exactly one row, whatever happens to it.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from etl.config import IngestConfig
from etl.discover import FoundFile
from etl.headers import FileResult, read_file
from lakehouse import deid
from lakehouse.deid import Policy
from lakehouse.schemas import INSTANCES

log = logging.getLogger(__name__)

#: Test hook (never set in production): a worker reading a file whose name contains
#: this string exits at once, as a segfault in a parser would.
_CRASH_MARKER = os.environ.get("LAKE_TEST_CRASH_MARKER", "")

#: The first threshold of the garbage collector in a worker process (Python's default:
#: 700). A batch keeps the headers and records of its files alive until its table is
#: built, and the memos keep the values of a series, so with the default each batch
#: of 128 files set off about five young and a few older collections, each walking
#: those survivors: 0.013 (identified) and 0.022 ms (research) of CPU per small file,
#: measured with ``gc.callbacks``. With this threshold a worker collects about once
#: every 2,500 files: 0.002 and 0.004 ms. Reference counting frees every object the
#: worker code makes (it makes no cycles); the collector only bounds stray cycles.
WORKER_GC_THRESHOLD = 20_000
#: Whether this process is a worker of a local pool (:func:`start_worker` ran).
_IN_WORKER = False


def start_worker(crash_marker: str | None = None, started: str | None = None) -> None:
    """Set up a worker process of a local process pool before its first batch (the
    pool's ``initializer``): the collector's first threshold to
    :data:`WORKER_GC_THRESHOLD`; the driver's test hook (a worker forked from a server
    started earlier has that server's environment, not the driver's); a line with its
    pid appended to ``started``, the driver's sign that a worker got this far. Never
    called in the driver."""
    global _CRASH_MARKER, _IN_WORKER
    gc.set_threshold(WORKER_GC_THRESHOLD, *gc.get_threshold()[1:])
    _IN_WORKER = True
    if crash_marker is not None:
        _CRASH_MARKER = crash_marker
    if started:
        fd = os.open(started, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)


def after_batch() -> None:
    """In a worker process of a local pool, after each batch: what outlives the batch
    (the memos of distinct elements, pseudonyms, contexts: hundreds of thousands of
    objects) is moved out of the collector's generations, as the fork server moved
    what it imported. Each later collection then walks only the objects of the batch
    being read: at 16,384 small research files, 0.05-0.15 s of collections with
    :data:`WORKER_GC_THRESHOLD` alone, 0.01 s with this. The memos hold no reference
    cycles, so none is left uncollected: reference counting frees what they drop."""
    if _IN_WORKER:
        gc.freeze()


def warm_up() -> None:
    """Load what a worker's first batch would load: the batch path's compiled code (from
    numba's cache, without its registries: :func:`etl.batchwalk.lean_cache_loads`; a
    cache miss compiles, for seconds) and pyarrow's check for pandas on its
    first conversion of Python values (which imports pandas where it can: 0.3 CPU-s).
    The workers of a local pool are forked from a server process that did this once,
    with pandas and scipy left out (``etl.preload``). Also the research policy's tables
    of tags (:func:`lakehouse.deid.tag_actions`)."""
    from etl import batchread, batchwalk

    deid.tag_actions()
    deid.well_known_uids()
    with batchwalk.lean_cache_loads():
        batchwalk.walk([b""], [0])
        data = np.frombuffer(bytes(16), dtype=np.uint8)
        at = np.zeros(1, dtype=np.int64)
        batchread._distinct(data, at, at + 4, np.zeros(1, dtype=np.uint8))
    pa.array([0])


#: Columns describing the file itself and what happened to it.
FILE_FIELDS = [
    pa.field("path", pa.string()),
    pa.field("mtime_ns", pa.int64()),
    pa.field("status", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("message", pa.string()),
    pa.field("source_sha256", pa.string()),
]
ID_MAP = pa.list_(pa.struct([("kind", pa.string()), ("original", pa.string()),
                             ("pseudonym", pa.string())]))
#: One row per file: the file fields, every instances column (null unless ok), and
#: in research lakes the original <-> pseudonym pairs of the file (for the vault).
BATCH_SCHEMA = pa.schema(FILE_FIELDS + [f.remove_metadata() for f in INSTANCES.schema()]
                         + [pa.field("id_map", ID_MAP)])


#: Columns of ``BATCH_SCHEMA`` that describe the file (the rest come from its record).
_FILE_COLUMNS = frozenset({"path", "mtime_ns", "status", "reason", "message", "file_size",
                           "file_sha256", "source_sha256", "ingest_run_id", "checksum_bytes"})
#: The record of a file that was not read (every record column null).
_NO_RECORD: dict = {}


def extract_batch(files: Sequence[FoundFile], config: IngestConfig, run_id: str,
                  policy: Policy | None = None) -> pa.Table:
    if not config.columnar:
        return batch_table([_read_one(f, config, policy) for f in files], run_id, policy)
    # the batch path (etl.batchread) reads what it can; every other file is read here,
    # file by file (never a file marked by the crash test hook: that one must crash)
    hooked = [i for i, f in enumerate(files) if crash_marked(f.path)]
    candidates = [f for i, f in enumerate(files) if i not in hooked] if hooked else files
    try:
        # imported here: a driver that never reads a batch itself never loads numba
        from etl.batchread import read_batch

        read, table = read_batch(candidates, config, run_id, policy, BATCH_SCHEMA)
    except (Exception, MemoryError) as exc:  # never a lost batch: every file file by file
        log.warning("the batch path failed (%s); this batch is read file by file",
                    type(exc).__name__)
        read, table = [], BATCH_SCHEMA.empty_table()
    if hooked:
        keep = [i for i in range(len(files)) if i not in hooked]
        read = [keep[i] for i in read]
    if len(read) == len(files):
        return table
    done = set(read)
    rest = [i for i in range(len(files)) if i not in done]
    rows = batch_table([_read_one(files[i], config, policy) for i in rest], run_id, policy)
    if not read:
        return rows
    position = np.empty(len(files), dtype=np.int64)
    position[np.asarray(read + rest, dtype=np.int64)] = np.arange(len(files))
    return pa.concat_tables([table, rows]).take(pa.array(position))


def crash_marked(path: str) -> bool:
    """Whether the test hook ``LAKE_TEST_CRASH_MARKER`` marks this file."""
    return bool(_CRASH_MARKER) and _CRASH_MARKER in os.path.basename(path)


def batch_table(results: Sequence[FileResult], run_id: str, policy: Policy | None) -> pa.Table:
    """One row per result, built column by column: the file's columns, then each record
    column (null unless the file is ``ok``), in ``BATCH_SCHEMA`` order. The same table as
    ``pa.Table.from_pylist`` of one dict per file (``tests/etl/test_batch_table.py``),
    without the per-file dicts."""
    records = [r.record if r.status == "ok" else _NO_RECORD for r in results]
    digests = [r.sha256 for r in results]
    file_columns = {
        "path": [r.path for r in results],
        "mtime_ns": [r.mtime_ns for r in results],
        "status": [r.status for r in results],
        "reason": [r.reason for r in results],
        "message": [r.message for r in results],
        "file_size": [r.size for r in results],
        # research lakes: a keyed digest (a plain one would find a file's row)
        "file_sha256": digests if policy is None else
        [None if d is None else policy.p.file_digest(d) for d in digests],
        "source_sha256": digests,
        "ingest_run_id": [run_id] * len(results),
        "checksum_bytes": [r.checksum_bytes for r in results],
    }
    arrays = []
    for field in BATCH_SCHEMA:
        name = field.name
        values = file_columns[name] if name in _FILE_COLUMNS else \
            [rec.get(name) for rec in records]
        arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=BATCH_SCHEMA)


def _read_one(f: FoundFile, config: IngestConfig, policy: Policy | None) -> FileResult:
    if f.error is not None:
        return FileResult(f.path, f.size, f.mtime_ns, status="quarantined", reason="io_error",
                          message=f.error)
    if crash_marked(f.path):
        os._exit(70)  # test hook: this file kills its worker process
    try:
        return read_file(f.path, f.size, f.mtime_ns, max_depth=config.max_depth,
                         bulk_data_threshold=config.bulk_data_threshold, policy=policy,
                         checksum=config.checksum)
    except (Exception, RecursionError, MemoryError) as exc:  # one file never ends a batch
        reason = {RecursionError: "too_deep", MemoryError: "out_of_memory"}.get(
            type(exc), "parse_error")
        # no path and no value in the log: both may identify a patient
        log.warning("unexpected %s while reading a file; it is quarantined (%s)",
                    type(exc).__name__, reason)
        return FileResult(f.path, f.size, f.mtime_ns, status="quarantined",
                          reason=reason, message=f"{type(exc).__name__}: {exc}"[:300])


def crashed_batch(files: Sequence[FoundFile], run_id: str) -> pa.Table:
    """Rows for a file whose reading crashed its worker (found by retrying its batch)."""
    return batch_table([FileResult(f.path, f.size, f.mtime_ns, status="quarantined",
                                   reason="worker_crash",
                                   message="reading this file crashed the worker process; "
                                   "the rest of its batch was read again without it")
                        for f in files], run_id, None)
