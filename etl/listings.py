"""The folder listings of a source's last walk, kept so that the next walk lists again
only the folders that changed since.

A no-op rerun of a large archive is mostly its walk: a ``stat`` per entry and a
listing per folder (at 100,000 files in 20,700 folders, the listings are a third of
the walk). A folder's names change only when an entry is added, removed or renamed,
and each of those changes the folder's mtime and ctime. So a folder whose device,
inode, mtime and ctime are those recorded with its last listing has the same names,
and the walk takes them from here instead of listing it. Every entry is still
``stat``-ed: a file changed in place changes neither its folder's mtime nor its
listing, only its own size and mtime, which the files index compares.

A listing is reused only when it was taken more than :data:`SETTLE_NS` after the
folder's last change (its ctime): the clock file systems stamp changes with ticks
coarsely, so a change made in the same tick as an earlier one, but after the listing,
would leave the folder's times as recorded (git's "racy" index entries). ctime cannot
be set back by a program (``touch``, ``rsync -t``) the way mtime can. A folder whose
times are zero (a file system that does not keep them) is always listed.

The listings of one source, for one lake, are one Arrow IPC file in the lake's
working folder (:meth:`lakehouse.tables.Lake.work_dir`, owner-only: the names are the
archive's own and may identify patients). Losing it costs one full walk, nothing else.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

#: A listing is reused only when taken this long after its folder's last change.
SETTLE_NS = 2_000_000_000
#: Folders per record batch of the file (new listings are written as they come).
BATCH_FOLDERS = 4096
#: The file's format; a file of another format is ignored (and replaced).
FORMAT = "1"

SCHEMA = pa.schema([
    ("folder", pa.string()),
    ("dev", pa.uint64()),
    ("ino", pa.uint64()),
    ("mtime_ns", pa.int64()),
    ("ctime_ns", pa.int64()),
    ("listed_at_ns", pa.int64()),
    ("names", pa.list_(pa.string())),
], metadata={"format": FORMAT})


def listings_path(work_dir: Path, source: str) -> Path:
    """Where the listings of ``source`` (an absolute folder path) are kept."""
    key = hashlib.sha256(os.fsencode(source)).hexdigest()[:32]
    return work_dir / "walk" / f"{key}.arrow"


class Listings:
    """The listings of the last walk (read from ``path``, when there is one and ``reuse``)
    and those of this walk (written to ``path`` by :meth:`save`, when any folder was
    listed anew)."""

    def __init__(self, path: Path, reuse: bool = True):
        self.path = path
        self._batches: list[pa.RecordBatch] = []
        # folder -> (batch, row) of the listings reusable; each batch's (dev, ino,
        # mtime_ns, ctime_ns) columns
        self._index: dict[str, tuple[int, int]] = {}
        self._keys: list[tuple[list[int], ...]] = []
        self._reusable: list[np.ndarray] = []  # each batch's rows that may be reused
        #: the names in the listings that may be reused
        self.reusable_names = 0
        self._names_of: tuple[int, list[str], list[int]] | None = None
        self._reused: list[tuple[int, int]] = []
        self._fresh: dict[str, list] = {name: [] for name in SCHEMA.names}
        self._fresh_count = 0
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._tmp: Path | None = None
        self._broken = False  # a name Arrow cannot hold: nothing is saved this time
        if reuse:
            self._load()

    @property
    def reused(self) -> int:
        """Folders whose listing this walk took from the last one."""
        return len(self._reused)

    @property
    def listed(self) -> int:
        """Folders this walk listed anew."""
        return self._fresh_count

    def _load(self) -> None:
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(self.path)))
            if reader.schema.metadata != SCHEMA.metadata or not reader.schema.equals(SCHEMA):
                log.info("ignoring the folder listings in %s: an older format", self.path)
                return
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                batch.validate(full=True)  # damaged behind an intact footer
                self._batches.append(batch)
                # a listing taken too soon after its folder's last change is not reused
                # (the folder's times, compared with these, are then the same too), nor
                # one of a file system that keeps no folder times (zero)
                mtime, ctime, listed_at = (batch.column(c).to_numpy() for c in (3, 4, 5))
                reusable = (listed_at - np.maximum(mtime, ctime) > SETTLE_NS) \
                    & (np.minimum(mtime, ctime) > 0)
                # columns, not a tuple per folder: a third of the time of the load
                self._keys.append(tuple(batch.column(c).to_pylist() for c in range(1, 5)))
                rows = np.flatnonzero(reusable)
                self._index.update(zip(
                    itertools.compress(batch.column(0).to_pylist(), reusable),
                    zip(itertools.repeat(b), rows.tolist()), strict=True))
                self._reusable.append(rows)
                counts = np.diff(batch.column(6).offsets.to_numpy())
                self.reusable_names += int(counts[rows].sum())
        except FileNotFoundError:
            return
        except (OSError, pa.ArrowException, ValueError) as exc:
            log.warning("ignoring the folder listings kept in %s: %s", self.path, exc)
            self._batches, self._index, self._keys, self._reusable = [], {}, [], []
            self.reusable_names = 0

    # -- during the walk -------------------------------------------------------
    def get(self, folder: str, dev: int, ino: int, mtime_ns: int,
            ctime_ns: int) -> list[str] | None:
        """The sorted names of ``folder`` (whose ``stat`` gave these device, inode and times)
        as last listed, or None when it must be listed again (never listed, changed since,
        or listed too soon after a change)."""
        known = self._index.get(folder)
        if known is None:
            return None
        b, row = known
        devs, inos, mtimes, ctimes = self._keys[b]
        if mtimes[row] != mtime_ns or ctimes[row] != ctime_ns or inos[row] != ino \
                or devs[row] != dev:
            return None
        self._reused.append((b, row))
        return self._names(b, row)

    def tree(self) -> tuple[pa.Array, pa.Array]:
        """``(folders, names)`` of every listing that may be reused (large strings, and
        large lists of them): what :mod:`etl.statahead` is given to ``stat`` ahead."""
        folders, names = [], []
        for batch, rows in zip(self._batches, self._reusable, strict=True):
            part = batch.take(pa.array(rows, pa.int64()))
            folders.append(part.column(0).cast(pa.large_string()))
            names.append(part.column(6).cast(pa.large_list(pa.large_string())))
        if not folders:
            return pa.array([], pa.large_string()), pa.array([], pa.large_list(pa.large_string()))
        return pa.concat_arrays(folders), pa.concat_arrays(names)

    def _names(self, b: int, row: int) -> list[str]:
        # the names of one batch at a time as Python strings: the walk asks for the
        # folders in the order they were written, so one batch serves many questions
        if self._names_of is None or self._names_of[0] != b:
            names = self._batches[b].column(6)
            offsets = names.offsets.to_numpy()
            self._names_of = (b, names.flatten().to_pylist(), (offsets - offsets[0]).tolist())
        _, values, offsets = self._names_of
        return values[offsets[row]:offsets[row + 1]]

    def put(self, folder: str, dev: int, ino: int, mtime_ns: int, ctime_ns: int,
            listed_at_ns: int, names: list[str]) -> None:
        """Record a listing of ``folder`` taken now (``listed_at_ns``: just before it), with
        the device, inode and times of its ``stat``."""
        if self._broken:
            return
        fresh = self._fresh
        fresh["folder"].append(folder)
        fresh["dev"].append(dev)
        fresh["ino"].append(ino)
        fresh["mtime_ns"].append(mtime_ns)
        fresh["ctime_ns"].append(ctime_ns)
        fresh["listed_at_ns"].append(listed_at_ns)
        fresh["names"].append(names)
        self._fresh_count += 1
        if len(fresh["folder"]) >= BATCH_FOLDERS:
            self._write_fresh()

    # -- after the walk --------------------------------------------------------
    def _write(self, batch: pa.RecordBatch) -> None:
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            self._writer = pa.ipc.new_file(str(self._tmp), SCHEMA)
            os.chmod(self._tmp, 0o600)
        self._writer.write_batch(batch)

    def _write_fresh(self) -> None:
        fresh = self._fresh
        if not fresh["folder"]:
            return
        try:
            batch = pa.record_batch([pa.array(fresh[f.name], f.type) for f in SCHEMA],
                                    schema=SCHEMA)
        except (UnicodeEncodeError, pa.ArrowException) as exc:
            # a name that is not UTF-8 (Python keeps its bytes as surrogates): the walk
            # goes on, and this source's listings are not kept
            log.info("folder listings of this source not kept: %s", exc)
            self.discard()
            self._broken = True
            return
        finally:
            self._fresh = {name: [] for name in SCHEMA.names}
        self._write(batch)

    def save(self) -> None:
        """Keep this walk's listings for the next one: those listed anew and those reused
        (the folders no longer walked are dropped). Nothing is written when no folder was
        listed anew. Atomic: the next walk sees the old file or the new one."""
        if self._broken or not self._fresh_count:
            return
        self._write_fresh()
        if self._broken:
            return
        by_batch: dict[int, list[int]] = {}
        for b, row in self._reused:
            by_batch.setdefault(b, []).append(row)
        for b, rows in by_batch.items():
            self._write(self._batches[b].take(pa.array(rows, pa.int64())))
        assert self._writer is not None and self._tmp is not None
        self._writer.close()
        self._writer = None
        os.replace(self._tmp, self.path)
        self._tmp = None
        # what a walk killed while writing left (one writer per lake: none is running)
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            stale.unlink(missing_ok=True)

    def discard(self) -> None:
        """Drop what this walk wrote (a walk that did not end: its listings are partial)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
