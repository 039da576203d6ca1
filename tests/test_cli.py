"""The `lake` command, in process (main(argv)) and once as the installed console script."""

import csv
import io
import json
import os
import shutil
import subprocess
import sys

import pydicom
import pytest
from pydicom.data import get_testdata_file

from catalog import open_lake
from lake_cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_sql_formats(capsys, built_lake, truth):
    lake = str(built_lake[0])
    q = "SELECT Modality, count(*) AS n, min(StudyDate) AS first FROM studies GROUP BY 1 ORDER BY 1"
    code, out, _ = run(capsys, "sql", q, "--lake", lake, "--format", "json")
    assert code == 0
    rows = json.loads(out)
    assert {r["Modality"]: r["n"] for r in rows} == truth.studies_by_modality
    assert all(len(r["first"]) == 10 and r["first"][4] == "-" for r in rows)  # ISO dates

    code, out, _ = run(capsys, "sql", q, "--lake", lake, "--format", "csv")
    parsed = list(csv.reader(io.StringIO(out)))
    assert parsed[0] == ["Modality", "n", "first"]
    assert {r[0]: int(r[1]) for r in parsed[1:]} == truth.studies_by_modality

    code, out, _ = run(capsys, "sql", q, "--lake", lake)
    lines = out.splitlines()
    assert lines[0].split() == ["Modality", "n", "first"]
    assert lines[-1] == f"({len(truth.studies_by_modality)} rows)"


def test_lake_dir_from_environment(capsys, built_lake, monkeypatch):
    monkeypatch.setenv("LAKE_DIR", str(built_lake[0]))
    code, out, _ = run(capsys, "sql", "SELECT count(*) AS n FROM instances", "--format", "json")
    assert code == 0 and json.loads(out)[0]["n"] > 0


@pytest.mark.parametrize("argv, message", [
    (["sql", "SELECT * FROM nope"], "unknown table 'nope'"),
    (["sql", "SELEC 1"], "SQL error"),
    (["sql", "SELECT 1", "--lake", "/nonexistent/lake"], "no lake at /nonexistent/lake"),
    (["ingest", "/nonexistent/source"], "cannot read source /nonexistent/source"),
    (["status", "--lake", "/nonexistent/lake"], "lake init"),
])
def test_errors_are_one_line(capsys, lake_copy, argv, message):
    if "--lake" not in argv:  # a copy: a failed ingest is still recorded in ingest_runs
        argv = [*argv, "--lake", str(lake_copy)]
    code, _out, err = run(capsys, *argv)
    assert code == 1
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ingest", "--workers", "0", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "positive integer" in err


def test_init_ingest_status(capsys, tmp_path, monkeypatch):
    lake = tmp_path / "lk"
    code, out, _ = run(capsys, "init", str(lake), "--profile", "identified")
    assert code == 0 and "created identified lake" in out
    code, _, err = run(capsys, "init", str(lake))
    assert code == 1 and "already exists" in err
    code, out, _ = run(capsys, "init", str(tmp_path / "r"), "--key-file", str(tmp_path / "k"))
    assert code == 0 and "created research lake" in out and (tmp_path / "k").exists()
    code, _, err = run(capsys, "init", str(tmp_path / "r2"), "--key-file",
                       str(tmp_path / "r2" / "k"))
    assert code == 1 and "outside the lake folder" in err
    code, _, err = run(capsys, "init", str(tmp_path / "r3"), "--private-tag", "0x0010,X,0x01")
    assert code == 1 and "must be odd" in err and not (tmp_path / "r3").exists()
    code, _, _ = run(capsys, "init", str(tmp_path / "r4"), "--key-file", str(tmp_path / "k4"),
                     "--private-tag", "0x0019,GEMS_ACQU_01,0x23")
    assert code == 0
    from lakehouse import Lake

    assert Lake.open(tmp_path / "r4").config.private_allowlist == [
        {"group": "0x0019", "creator": "GEMS_ACQU_01", "element": "0x23"}]
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "a.dcm")
    (src / "junk.txt").write_text("hello")
    code, out, _ = run(capsys, "ingest", str(src), "--lake", str(lake), "--scheduler",
                       "synchronous", "--json", "--no-progress")
    summary = json.loads(out)
    assert summary["outcomes"]["ingested"] == 1
    assert summary["quarantine_reasons"] == {"not_dicom": 1}
    assert summary["summaries"] == "rebuilt"
    # a second file of another series: the summaries are updated (however much changed),
    # and the output says so
    from etl import summarize

    monkeypatch.setattr(summarize, "UPDATE_SHARE", 1.0)
    monkeypatch.setattr(summarize, "READ_SHARE", 1.0)
    shutil.copy(get_testdata_file("MR_small.dcm"), src / "b.dcm")
    (kept,) = (lake / "vault" / "walk").iterdir()  # the folder listings (etl.listings)
    before = kept.stat().st_mtime_ns
    code, out, _ = run(capsys, "ingest", str(src), "--lake", str(lake), "--scheduler",
                       "synchronous", "--no-progress", "--relist")
    assert code == 0 and kept.stat().st_mtime_ns > before  # listed again, and kept
    assert "  summaries updated: rows written to series 1, studies 1, patients 1, " \
        "dose_events 0" in out.splitlines()
    from lakehouse import storage

    listed = []
    real = storage.LocalStorage.listdir
    monkeypatch.setattr(storage.LocalStorage, "listdir",
                        lambda self, rel: listed.append(rel) or real(self, rel))
    code, out, _ = run(capsys, "status", "--lake", str(lake), "--json")
    status = json.loads(out)
    assert [r for r in listed if "snapshots" in r] == ["_lake/snapshots"]  # listed once
    assert (status["snapshot"], status["snapshots_kept"]) == (4, 5)
    assert status["tables"]["instances"] == 2
    assert status["quarantine_by_reason"] == {"not_dicom": 1}
    assert status["profile"] == "identified" and status["key_fingerprint"] is None
    runs = status["last_runs"]  # newest first; JSON values (no NaN for a missing number)
    assert [(r["status"], r["files_seen"], r["files_ingested"]) for r in runs[:2]] == [
        ("completed", 3, 1), ("completed", 2, 1)]
    assert all(isinstance(r["seconds"], float) for r in runs)
    code, out, _ = run(capsys, "status", "--lake", str(lake))
    assert "instances" in out and "not_dicom" in out


def test_dictionary_matches_the_readme(capsys):
    from pathlib import Path

    _code, out, _ = run(capsys, "dictionary")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert out.strip() in readme, "README data dictionary is stale: run `lake dictionary`"


def test_ingest_of_a_folder_in_its_own_process_leaves_pandas_out(tmp_path):
    """`lake ingest` of a folder, as the `lake` program runs it, never imports pandas
    (pyarrow and DuckDB would, only to look for pandas objects: 0.3-0.4 s of every run)
    or jinja2 (Dask would, for its notebook displays),
    nor the worker code (the batch path's numba code: the worker processes run it), nor
    pydicom (0.2 s: the research lake's policy is made only to be handed to the workers),
    on a first run and on a rerun that reads nothing; numpy's BLAS starts no threads
    (:func:`etl.leaveout.one_blas_thread`); main() called by a program leaves the
    program's imports as they were."""
    lake, src, key = tmp_path / "lk", tmp_path / "src", tmp_path / "lake.key"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(name), src / name)
    assert main(["init", str(lake), "--key-file", str(key)]) == 0
    argv = ["lake", "ingest", str(src), "--lake", str(lake), "--no-progress", "--json"]
    code = ("import os, sys, lake_cli\n"
            f"sys.argv = {argv!r}\n"
            "rc = lake_cli.main()\n"
            "left = [f for f in sys.meta_path if type(f).__module__ == 'etl.leaveout']\n"
            "print(rc, 'pandas' in sys.modules, 'jinja2' in sys.modules, len(left),\n"
            "      any(m in sys.modules for m in ('numba', 'etl.extract', 'etl.batchread',\n"
            "                                 'pydicom')),\n"
            "      os.environ.get('OPENBLAS_NUM_THREADS'))\n")
    env = {**{k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"},
           "LAKE_KEY_FILE": str(key)}
    finders = len(sys.meta_path)
    for read, unchanged, conflicts in ((2, 0, 0), (0, 2, 0), (0, 2, 1)):
        if conflicts:  # a changed copy of an instance: its attributes named without pydicom
            ds = pydicom.dcmread(src / "CT_small.dcm")
            ds.SeriesDescription = "changed"
            ds.save_as(src / "CT_small_changed.dcm")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        *report, last = r.stdout.splitlines()
        # no pandas nor jinja2, and the finder gone after the command (the process could
        # go on); numpy's BLAS without threads of its own
        assert last == "0 False False 0 False 1"
        summary = json.loads("\n".join(report))
        assert (summary["outcomes"]["ingested"], summary["files_unchanged"],
                summary["outcomes"].get("conflict", 0)) == (read, unchanged, conflicts)
    with open_lake(lake) as cat:
        assert cat.con.execute("SELECT differing_keywords FROM conflicts").fetchall() == [
            (["SeriesDescription"],)]
    # in this process (a program calling main()), nothing is left out
    assert main([*argv[1:], "--key-file", str(key)]) == 0
    assert len(sys.meta_path) == finders


def test_installed_command_end_to_end(tmp_path):
    """The console script, as a user runs it (a fresh process, a real Dask process pool)."""
    exe = shutil.which("lake") or str(__import__("pathlib").Path(sys.executable).parent / "lake")
    lake = tmp_path / "lk"
    src = tmp_path / "src"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(name), src / name)
    key = tmp_path / "lake.key"
    subprocess.run([exe, "init", str(lake), "--key-file", str(key)], check=True,
                   capture_output=True)
    r = subprocess.run([exe, "ingest", str(src), "--lake", str(lake)], capture_output=True,
                       text=True, env={**os.environ, "LAKE_KEY_FILE": str(key)}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "ingested 2" in r.stdout
    r = subprocess.run([exe, "sql", "SELECT Modality FROM studies ORDER BY 1", "--lake",
                        str(lake), "--format", "json"], capture_output=True, text=True)
    assert json.loads(r.stdout) == [{"Modality": "CT"}, {"Modality": "MR"}]
    r = subprocess.run([exe, "sql", "SELECT * FROM nope", "--lake", str(lake)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "unknown table" in r.stderr
