"""What the lake already holds, as compact in-memory key indexes for one ingest run.

An ingest asks three questions of the lake over and over: which discovered files
were already read unchanged (the vault's ``files``), which SOPInstanceUIDs are
already committed and with what checksum (``instances``), and which
original <-> pseudonym pairs the vault already has (``identifiers``). Asking
the tables each time scans a column that grows with the lake, once per wave or
per flush, so the driver's work would grow with the square of the archive.

Instead each table is scanned once per run, when first needed, into a
:class:`KeyIndex`: a 64-bit key per row (DuckDB's ``hash`` of the path, the
UID, the pair) with a 64-bit check value (a hash of what must also match: the
path with its size and mtime, the file's checksum; for vault pairs the lower
half of an MD5), 16 bytes per row, sorted for binary search. New rows of the
run are added as sorted chunks. A wrong answer needs two 64-bit values to
collide at once; and an instance whose key matches but whose check value
differs is looked up in the table itself before it is called a conflict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa

from lakehouse.duck import parquet_relation
from lakehouse.schemas import TABLES

if TYPE_CHECKING:
    from deltalake import DeltaTable

    from lakehouse.tables import Lake

#: Chunks of keys before they are merged into one sorted array.
MAX_CHUNKS = 8


class KeyIndex:
    """Sorted uint64 keys, each with a uint64 check value; lookups are vectorized."""

    def __init__(self) -> None:
        self._chunks: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return sum(len(k) for k, _ in self._chunks)

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        self._chunks.append((keys[order].astype(np.uint64), values[order].astype(np.uint64)))
        if len(self._chunks) > MAX_CHUNKS:
            keys = np.concatenate([k for k, _ in self._chunks])
            values = np.concatenate([v for _, v in self._chunks])
            order = np.argsort(keys, kind="stable")
            self._chunks = [(keys[order], values[order])]

    def lookup(self, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(present, match)``: whether each key is in the index, and whether one of its
        entries has the same check value."""
        present = np.zeros(len(keys), dtype=bool)
        match = np.zeros(len(keys), dtype=bool)
        for ck, cv in self._chunks:
            # one binary search (the key's first entry); a key held more than once has its
            # next entry equal too, and is looked at alone
            left = np.searchsorted(ck, keys, side="left")
            idx = np.minimum(left, len(ck) - 1)
            hits = ck[idx] == keys
            present |= hits
            after = np.minimum(idx + 1, len(ck) - 1)
            more = hits & (after > idx) & (ck[after] == keys)
            match |= hits & ~more & (cv[idx] == values)
            for i in np.flatnonzero(more):
                right = np.searchsorted(ck, keys[i], side="right")
                match[i] |= bool(np.any(cv[left[i]:right] == values[i]))
        return present, match


class Hasher:
    """64-bit keys and check values of Arrow columns, computed by DuckDB."""

    def __init__(self) -> None:
        self._con: duckdb.DuckDBPyConnection | None = None

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The connection, made when first used (25-40 ms)."""
        if self._con is None:
            # one thread: the driver shares the cores with the workers
            self._con = duckdb.connect(config={"threads": 1})
        return self._con

    def close(self) -> None:
        if self._con is not None:
            self._con.close()

    def keys(self, source: pa.Table | object, key_sql: str, check_sql: str,
             where: str = "true", params: Sequence = ()) -> tuple[np.ndarray, np.ndarray]:
        """``(key_sql, check_sql)`` (two UBIGINT expressions) over the rows of ``source``
        (an Arrow table or dataset) that ``where`` keeps (with ``params``; the SQL
        expressions are the module's own, never user input)."""
        self.con.register("src", source)
        try:
            out = self.con.execute(
                f"SELECT {key_sql} AS k, {check_sql} AS v FROM src WHERE {where}",
                list(params)).fetchnumpy()
        finally:
            self.con.unregister("src")
        return (np.asarray(out["k"], dtype=np.uint64), np.asarray(out["v"], dtype=np.uint64))

    def table_keys(self, lake: Lake, name: str, dt: DeltaTable, key_sql: str,
                   check_sql: str, where: str = "true", params: Sequence = ()
                   ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`keys` over the version ``dt`` of the table ``name``. DuckDB reads the
        Parquet files of a local lake itself: two to five times faster than through a
        pyarrow dataset, which costs a millisecond or more per file (a lake of many small
        files: daily runs). A lake on object storage, or a version DuckDB cannot read
        as it is (:func:`lakehouse.duck.parquet_relation`), goes through the dataset."""
        found = parquet_relation(self.con, dt, TABLES[name], lake.profile, "/") \
            if lake.local else None
        if found is not None:
            found[0].create_view("table_src", replace=True)
            try:
                out = self.con.execute(
                    f"SELECT {key_sql} AS k, {check_sql} AS v FROM table_src WHERE {where}",
                    list(params)).fetchnumpy()
            except duckdb.BinderException:
                pass  # a column added to the table after its files: nulls in the dataset
            else:
                return (np.asarray(out["k"], dtype=np.uint64),
                        np.asarray(out["v"], dtype=np.uint64))
        return self.keys(lake.arrow_dataset(name, dt), key_sql, check_sql, where, params)


class Kept:
    """The indexes of :data:`KEYS` tables, kept from one ingest run to the next by a
    process that runs many into one lake (a listener's micro-batches). Each run would
    otherwise scan the whole table again (measured at 100,000 files: 0.27 s for
    ``instances``, 0.14 s for ``identifiers``, per batch): a run takes the index back
    instead, as of the version its run left, and it still holds the table's rows when
    every commit since only moved rows (``dataChange`` false: compaction) or touched
    none; otherwise (another process added rows, a commit's log cleaned up) the run scans
    the table as before. A run hands its indexes back only once it has published
    (:meth:`put`): one that failed may have indexed rows no snapshot holds."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[str, int, KeyIndex]] = {}
        #: how often :meth:`take` gave an index back, and how often it could not
        self.taken = 0
        self.missed = 0

    def take(self, lake: Lake, name: str, version: int) -> KeyIndex | None:
        """The index of table ``name`` at ``version`` (None: none kept that is right
        for it). It is the caller's until it puts it back."""
        held = self._held.pop(name, None)
        if held is not None:
            location, at, index = held
            if location == lake.location and at <= version \
                    and same_rows(lake, name, at, version):
                self.taken += 1
                return index
        self.missed += 1
        return None

    def put(self, lake: Lake, name: str, version: int, index: KeyIndex) -> None:
        """Keep ``index``: the keys of table ``name`` at ``version``, of ``lake``."""
        self._held[name] = (lake.location, version, index)


def same_rows(lake: Lake, name: str, before: int, after: int) -> bool:
    """Whether versions ``before`` and ``after`` (not earlier) of table ``name`` hold the
    same rows: every commit between them that adds or removes files only moves rows
    (``dataChange`` false, as compaction does). False when a commit cannot be read (its
    log cleaned up after a checkpoint)."""
    return all(kind in ("none", "moved") for kind in lake.commit_kinds(name, before, after))


#: The keys of each question (DuckDB SQL over the table's own columns).
#: ``files``: the path; checked against path, size and mtime (a file that could not be read
#: before never matches, so it is tried again).
FILE_KEY = ("hash(path)", "hash(path, file_size, mtime_ns, coalesce(reason = 'io_error', false))")
#: ``instances``: the SOPInstanceUID, checked against the file's checksum.
INSTANCE_KEY = ("hash(SOPInstanceUID)", "hash(file_sha256)")
#: ``identifiers``: the pair's kind and pseudonym (the original follows from them); a
#: wrongly "known" pair would be missing from the vault, so its check is cryptographic.
PAIR_KEY = ("hash(kind, pseudonym)", "md5_number_lower(concat_ws(chr(0), kind, pseudonym))")
#: The tables whose indexes :class:`Kept` keeps between runs, with their keys.
KEYS = {"instances": INSTANCE_KEY, "identifiers": PAIR_KEY}


def under(source: str, folder: bool) -> tuple[str, list[str]]:
    """A condition on ``path`` (with its parameters) that keeps the files of a walk of
    ``source`` (an absolute path, as the walk gives its files): the file itself, or the
    paths below the folder as a range of strings (``[source/, source0)``), which the
    Parquet files' statistics of ``path`` answer for the row groups of other folders:
    those are never decoded."""
    if not folder:
        return "path = ?", [source]
    if not source.endswith("/"):
        source += "/"
    return "path >= ? AND path < ?", [source, source[:-1] + chr(ord(source[-1]) + 1)]
