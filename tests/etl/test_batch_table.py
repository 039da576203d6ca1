"""A batch's table built column by column (etl.extract.batch_table) is the table that
``pa.Table.from_pylist`` makes of one dict per file: the same schema, values and nulls,
over the whole test corpus, for identified and research lakes."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest

from etl.config import IngestConfig
from etl.discover import FoundFile
from etl.extract import BATCH_SCHEMA, _read_one, batch_table, crashed_batch
from etl.headers import FileResult
from lakehouse.deid import Policy
from lakehouse.privacy import Pseudonymizer
from tests.etl import corpus as bad_inputs
from tests.etl.test_fastpath import corpus


def row_dict(r: FileResult, run_id: str, policy: Policy | None) -> dict:
    """One file's row as a dict (how batches were built before, the reference)."""
    row = dict(r.record) if r.status == "ok" else {}
    digest = r.sha256
    if policy is not None and digest is not None:
        digest = policy.p.file_digest(digest)
    row.update(
        path=r.path, mtime_ns=r.mtime_ns, status=r.status, reason=r.reason, message=r.message,
        file_size=r.size, file_sha256=digest, source_sha256=r.sha256, ingest_run_id=run_id,
        checksum_bytes=r.checksum_bytes,
    )
    return row


@pytest.fixture(scope="module")
def found(archive, tmp_path_factory) -> list[FoundFile]:
    extra = tmp_path_factory.mktemp("bad-inputs")
    bad_inputs.build(extra)
    out = []
    for p in corpus(archive[0]) + sorted(extra.rglob("*")):
        try:
            st = os.stat(p)
        except OSError as exc:  # the broken link: an io_error row
            out.append(FoundFile(str(p), 0, 0, error=str(exc)))
            continue
        if Path(p).is_file():
            out.append(FoundFile(str(p), st.st_size, st.st_mtime_ns))
    return out


@pytest.mark.parametrize("research", [False, True], ids=["identified", "research"])
def test_column_by_column_equals_from_pylist(found, research):
    policy = Policy(Pseudonymizer(bytes(range(32)))) if research else None
    results = [_read_one(f, IngestConfig(checksum="header"), policy) for f in found]
    statuses = {r.status for r in results}
    assert statuses == {"ok", "quarantined", "skipped"}
    for start in range(0, len(results), 128):  # batches as the workers build them
        batch = results[start:start + 128]
        got = batch_table(batch, "run-1", policy)
        want = pa.Table.from_pylist([row_dict(r, "run-1", policy) for r in batch],
                                    schema=BATCH_SCHEMA)
        assert got.schema == want.schema
        assert got.equals(want), [name for name in BATCH_SCHEMA.names
                                  if not got.column(name).equals(want.column(name))]
    assert batch_table([], "run-1", policy).equals(BATCH_SCHEMA.empty_table())
    if research:  # the research digest is keyed, the source digest is not
        ok = batch_table(results[:50], "run-1", policy).to_pylist()
        assert all(row["file_sha256"] != row["source_sha256"] for row in ok
                   if row["source_sha256"] is not None)


def test_crashed_rows_equal_from_pylist(found):
    files = found[:5]
    want = pa.Table.from_pylist(
        [row_dict(FileResult(f.path, f.size, f.mtime_ns, status="quarantined",
                             reason="worker_crash",
                             message="reading this file crashed the worker process; the rest "
                             "of its batch was read again without it"), "run-2", None)
         for f in files], schema=BATCH_SCHEMA)
    got = crashed_batch(files, "run-2")
    assert got.equals(want)
    assert got.column("reason").to_pylist() == ["worker_crash"] * 5
