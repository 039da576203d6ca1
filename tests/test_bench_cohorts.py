"""bench/cohorts.py still runs, and its DuckDB specs and pandas filters still agree."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "cohorts.py"


@pytest.mark.slow
def test_cohort_benchmark_queries_agree_with_pandas(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--series", "20000", "--repeat", "1", "--skip-idc",
         "--workdir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["info"]["lake"]["series"] == 20000
    assert [r["data"] for r in report["rows"]] == ["lake"] * 10 + ["lake_cached"] * 10
    assert all(r["same"] for r in report["rows"])
    assert all(r["series"] > 0 for r in report["rows"])
