"""DESIGN.md's layering: lakehouse imports no project package; etl and catalog build on it
and not on each other; synth is standalone."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"lakehouse", "etl", "catalog", "synth"}
ALLOWED = {
    "lakehouse": set(),
    "etl": {"lakehouse"},
    "catalog": {"lakehouse"},
    "synth": set(),
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & PACKAGES


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    for path in (ROOT / package).rglob("*.py"):
        bad = imported_packages(path) - ALLOWED[package] - {package}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_an_ingest_worker_imports_only_what_reading_files_needs():
    """A spawned worker imports ``etl.extract`` (and what unpickling its task needs):
    not the Delta, DuckDB, pandas or distributed bindings of the driver (each worker
    would pay for them at every run)."""
    import subprocess
    import sys

    code = ("import sys, etl.extract, etl.config, etl.discover, lakehouse.deid; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'deltalake', 'duckdb', 'pandas', 'distributed', 'dask', 'SimpleITK'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
