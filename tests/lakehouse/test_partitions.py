"""``lakehouse.tables._partitions``: one sort, slices per (Modality, study_year) group."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from lakehouse.schemas import TABLES
from lakehouse.tables import _partitions

SPEC = TABLES["instances"]


def _reference(table: pa.Table) -> dict[tuple, list[dict]]:
    """Rows of each partition, in input order, computed row by row."""
    out: dict[tuple, list[dict]] = {}
    for row in table.to_pylist():
        key = tuple(None if row[k] is None else str(row[k]) for k in SPEC.partition_by)
        out.setdefault(key, []).append(row)
    return out


def _split(table: pa.Table) -> dict[tuple, list[dict]]:
    got: dict[tuple, list[dict]] = {}
    for values, part in _partitions(table, SPEC):
        key = tuple(values[k] for k in SPEC.partition_by)
        assert list(values) == list(SPEC.partition_by)
        assert key not in got, f"partition {key} yielded twice"
        got[key] = part.to_pylist()
    return got


def test_groups_keep_row_order_and_nulls_are_their_own_partition():
    modality = ["CT", "MR", None, "CT", "MR", "CT", None, "SEG", "CT", None]
    year = [2019, 2019, 2020, None, 2019, 2019, 2020, None, 2021, None]
    table = pa.table({"n": list(range(10)), "Modality": modality,
                      "study_year": pa.array(year, pa.int32())})
    got = _split(table)
    assert got == _reference(table)
    assert [r["n"] for r in got[("CT", "2019")]] == [0, 5]
    assert [r["n"] for r in got[(None, "2020")]] == [2, 6]
    assert [r["n"] for r in got[(None, None)]] == [9]
    assert [r["n"] for r in got[("SEG", None)]] == [7]
    assert sum(len(v) for v in got.values()) == 10
    assert len(got) == 7


def test_chunked_columns_and_one_partition():
    chunks = [pa.table({"n": [i, i + 1], "Modality": ["CT", "MR"],
                        "study_year": pa.array([2000 + i, 2000], pa.int32())})
              for i in range(0, 40, 2)]
    table = pa.concat_tables(chunks)
    assert table.column("Modality").num_chunks == 20
    assert _split(table) == _reference(table)
    assert len(_split(table)) == 21

    one = pa.table({"n": [3, 1, 2], "Modality": ["US"] * 3,
                    "study_year": pa.array([1999] * 3, pa.int32())})
    parts = list(_partitions(one, SPEC))
    assert len(parts) == 1
    assert parts[0][0] == {"Modality": "US", "study_year": "1999"}
    assert parts[0][1].column("n").to_pylist() == [3, 1, 2]
    assert list(_partitions(one.slice(0, 0), SPEC)) == []


def test_waves_in_partition_order_are_split_without_a_copy():
    """The ingest puts each wave's rows in partition order (group_order); a buffer of
    such waves is split into slices of its runs, sharing the waves' memory."""
    from lakehouse.tables import MIN_RUN_ROWS, group_order

    rng = np.random.default_rng(7)
    waves = []
    for w in range(4):
        n = 600
        wave = pa.table({"n": np.arange(w * n, (w + 1) * n),
                         "Modality": rng.choice(["CT", "MR", "US"], n).tolist(),
                         "study_year": pa.array(rng.choice([2019, 2020], n), pa.int32())})
        order = group_order(wave, list(SPEC.partition_by))
        assert sorted(order.tolist()) == list(range(n))
        waves.append(wave.take(pa.array(order)))
    table = pa.concat_tables(waves)
    assert table.num_rows >= 4 * 6 * MIN_RUN_ROWS  # runs long enough to be sliced
    got = _split(table)
    assert got == _reference(table)
    assert len(got) == 6
    inputs = {c.buffers()[1].address: c.buffers()[1].size for c in table.column("n").chunks}
    for _, part in _partitions(table, SPEC):
        for chunk in part.column("n").chunks:
            address = chunk.buffers()[1].address
            assert any(a <= address < a + size for a, size in inputs.items())
    # within a partition, the rows of each wave stay in walk order
    for rows in got.values():
        ns = [r["n"] for r in rows]
        assert ns == sorted(ns)
