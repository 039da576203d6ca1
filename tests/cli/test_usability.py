"""What a new user runs into: mistakes that must be one line, and outputs on edge cases.

In process (``main(argv)``), as tests/test_cli.py; the notebook server test starts the
installed command for real and stops it.
"""

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lake_cli import main

ROOT = Path(__file__).resolve().parents[2]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --- lake init: where a lake cannot go ---------------------------------------------------

def test_init_in_a_folder_with_other_files_says_so(capsys, tmp_path):
    folder = tmp_path / "papers"
    folder.mkdir()
    (folder / "draft.txt").write_text("mine")
    code, out, err = run(capsys, "init", str(folder), "--key-file", str(tmp_path / "k"))
    assert (code, out) == (1, "")
    assert err == (f"lake init: error: the folder {folder} is not empty (and holds no lake): "
                   "give a new or empty folder for the lake\n")
    assert sorted(p.name for p in folder.iterdir()) == ["draft.txt"]
    assert not (tmp_path / "k").exists()


def test_init_on_a_file_says_so(capsys, tmp_path):
    path = tmp_path / "afile"
    path.write_text("x")
    code, _, err = run(capsys, "init", str(path), "--key-file", str(tmp_path / "k"))
    assert code == 1
    assert err == (f"lake init: error: {path} is a file, not a folder: give a new or empty "
                   "folder for the lake\n")


def test_init_under_a_file_is_one_line(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "lake"
    code, _, err = run(capsys, "init", str(target), "--key-file", str(tmp_path / "k"))
    assert code == 1 and one_line(err)
    assert err == (f"lake init: error: Not a directory ({target}): a file is in the way where "
                   "a folder should be: choose another path\n")


def test_init_in_an_empty_folder_still_works(capsys, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    code, out, _ = run(capsys, "init", str(folder), "--key-file", str(tmp_path / "k"))
    assert code == 0 and out.startswith(f"created research lake at {folder}\n")


# --- lake sql: inputs and outputs --------------------------------------------------------

def test_sql_empty_query_is_an_error(capsys, built_lake):
    code, out, err = run(capsys, "sql", "  \n", "--lake", str(built_lake[0]))
    assert (code, out) == (1, "")
    assert err.startswith("lake sql: error: the query is empty: give a SQL statement")
    assert one_line(err)


EDGE = ("SELECT 'nan'::DOUBLE AS n, 'inf'::DOUBLE AS i, -('inf'::DOUBLE) AS mi, "
        "sum(instance_count) AS s, 1.25::DECIMAL(5, 2) AS d, INTERVAL 3 DAY AS iv, "
        "INTERVAL '1 month 2 days 1.5 seconds' AS iv2, ['nan'::DOUBLE, 2.0] AS l, "
        "DATE '2020-02-29' AS day, TIME '07:05:00' AS t FROM studies")


def test_sql_json_is_strict_json(capsys, built_lake, truth):
    code, out, _ = run(capsys, "sql", EDGE, "--lake", str(built_lake[0]), "--format", "json")
    assert code == 0

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    rows = json.loads(out, parse_constant=no_constants)
    instances = sum(truth.instances_by_modality.values())
    assert rows == [{"n": None, "i": None, "mi": None, "s": instances, "d": 1.25,
                     "iv": "P3D", "iv2": "P1M2DT1.5S", "l": [None, 2.0],
                     "day": "2020-02-29", "t": "07:05:00"}]
    assert isinstance(rows[0]["s"], int)  # a HUGEINT sum is an integer, not 2053.0


def test_sql_csv_edge_values(capsys, built_lake, truth):
    q = (EDGE + " UNION ALL SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL")
    code, out, _ = run(capsys, "sql", q, "--lake", str(built_lake[0]), "--format", "csv")
    assert code == 0
    instances = sum(truth.instances_by_modality.values())
    assert list(csv.reader(io.StringIO(out))) == [
        ["n", "i", "mi", "s", "d", "iv", "iv2", "l", "day", "t"],
        ["nan", "inf", "-inf", str(instances), "1.25", "P3D", "P1M2DT1.5S",
         "[null, 2.0]", "2020-02-29", "07:05:00"],
        ["", "", "", "", "", "", "", "", "", ""],
    ]


def test_sql_csv_quoting_round_trips(capsys, built_lake):
    q = ("SELECT 'a,b' AS comma, 'say \"hi\"' AS quote, 'line1' || chr(10) || 'line2' AS nl, "
         "'Müller^Jürgen' AS name")
    code, out, _ = run(capsys, "sql", q, "--lake", str(built_lake[0]), "--format", "csv")
    assert code == 0
    assert list(csv.reader(io.StringIO(out))) == [
        ["comma", "quote", "nl", "name"], ["a,b", 'say "hi"', "line1\nline2", "Müller^Jürgen"]]


def test_sql_table_aligns_wide_characters(capsys, built_lake):
    q = ("SELECT * FROM (VALUES ('山田^太郎', 1), ('Yamada^Tarou', 22), ('홍^길동', 333)) "
         "AS t(name, n)")
    code, out, _ = run(capsys, "sql", q, "--lake", str(built_lake[0]))
    assert code == 0
    assert out.splitlines() == [
        "name          n",
        "------------  ---",
        "山田^太郎     1",
        "Yamada^Tarou  22",
        "홍^길동       333",
        "(3 rows)",
    ]


def test_sql_table_clips_wide_text_to_the_column_limit(capsys, built_lake):
    code, out, _ = run(capsys, "sql", "SELECT repeat('山', 40) AS x", "--lake",
                       str(built_lake[0]))
    assert code == 0
    cell = out.splitlines()[2]
    assert cell == "山" * 29 + "…"  # 58 columns + the ellipsis: within 60


def test_report_json_is_strict_json(capsys, built_lake):
    code, out, _ = run(capsys, "report", "repeats", "--lake", str(built_lake[0]), "--format",
                       "json", "--by", "Modality", "--from", "1900-01-01")
    assert code == 0
    rows = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert rows and all(isinstance(r["studies"], int) for r in rows)


# --- cohorts ----------------------------------------------------------------------------

def test_cohort_key_that_is_not_text_is_one_line(capsys, lake_copy):
    code, out, err = run(capsys, "cohort", "save", "numbers", "--sql",
                         "SELECT 1 AS SeriesInstanceUID", "--lake", str(lake_copy))
    assert (code, out) == (1, "")
    assert err == ("lake cohort: error: cohort query: the query's SeriesInstanceUID column is "
                   "int32, not text: select the lake's SeriesInstanceUID (a UID string) from "
                   "series or studies\n")


def test_cohort_export_onto_a_file_is_one_line(capsys, lake_copy, tmp_path):
    code, _, _ = run(capsys, "cohort", "save", "ct", "--sql",
                     "SELECT SeriesInstanceUID FROM series WHERE Modality = 'CT'",
                     "--lake", str(lake_copy))
    assert code == 0
    target = tmp_path / "afile"
    target.write_text("x")
    code, out, err = run(capsys, "cohort", "export", "ct", "--to", str(target), "--lake",
                         str(lake_copy), "--no-progress")
    assert (code, out) == (1, "")
    assert err == (f"lake cohort: error: File exists ({target}): a file is in the way where "
                   "a folder should be: choose another path\n")


def test_manifest_export_does_not_claim_files_written(capsys, lake_copy, tmp_path):
    run(capsys, "cohort", "save", "ct", "--sql",
        "SELECT SeriesInstanceUID FROM series WHERE Modality = 'CT'", "--lake", str(lake_copy))
    code, out, _ = run(capsys, "cohort", "export", "ct", "--to", str(tmp_path / "m"), "--lake",
                       str(lake_copy), "--no-progress")
    assert code == 0
    assert "written" not in out and out.endswith("; 5 files in SHA256SUMS\n")


# --- lake notebook ----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_notebook_on_a_busy_port_is_one_line(capsys, built_lake):
    pytest.importorskip("jupyterlab")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = run(capsys, "notebook", "--lake", str(built_lake[0]), "--port",
                             str(port), "--no-browser")
    assert (code, out) == (1, "")
    assert err == (f"lake notebook: error: port {port} on 127.0.0.1 is in use (another "
                   "JupyterLab?): pass --port N\n")


def test_notebook_prints_the_address_to_open(built_lake, tmp_path):
    """The installed command starts JupyterLab (also as root, as in many containers) and
    prints an address with the access token that the server accepts."""
    pytest.importorskip("jupyterlab")
    exe = shutil.which("lake") or str(Path(sys.executable).parent / "lake")
    port = _free_port()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_DATA_DIR": str(tmp_path / "d")}
    env.pop("JUPYTER_TOKEN", None)
    proc = subprocess.Popen([exe, "notebook", "--lake", str(built_lake[0]), "--port", str(port),
                             "--no-browser"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    try:
        first = proc.stdout.readline()
        second = proc.stdout.readline()
        prefix = f"JupyterLab at http://127.0.0.1:{port}/lab?token="
        assert first.startswith(prefix), first
        token = first.strip()[len(prefix):]
        assert len(token) >= 32
        assert second.startswith(f"  lake {built_lake[0]} (LAKE_DIR); notebooks in "
                                 f"{ROOT / 'notebooks'}")
        status = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/api/status?token={token}", timeout=5) as r:
                    status = r.status
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        assert proc.poll() is None, "JupyterLab exited"
        assert status == 200
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5)
        assert refused.value.code == 403
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents/"
                                    f"01_lake_overview.py?token={token}&type=notebook",
                                    timeout=30) as r:
            assert json.loads(r.read())["type"] == "notebook"  # .py opens as a notebook
    finally:
        proc.send_signal(signal.SIGTERM)  # `lake notebook` passes it on to JupyterLab
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
    with socket.socket() as s:  # the server is gone with it
        assert s.connect_ex(("127.0.0.1", port)) != 0


# --- reports on a research lake ---------------------------------------------------------

SHIFTED = ("# research lake: each patient's dates are shifted by 1 to 260 weeks, so "
           "--from/--to and day/week/month/year groups use shifted dates (intervals, "
           "weekdays and hours are exact); calendar trends need an identified lake\n")


def test_report_on_calendar_time_of_a_research_lake_says_dates_are_shifted(capsys, tmp_path,
                                                                            built_lake):
    lake = tmp_path / "research"
    assert run(capsys, "init", str(lake), "--key-file", str(tmp_path / "k"))[0] == 0
    code, out, err = run(capsys, "report", "utilization", "--lake", str(lake))  # by month
    assert (code, err) == (0, SHIFTED)
    assert out.splitlines()[0].split() == ["month", "Modality", "studies", "series",
                                           "instances"]
    code, _, err = run(capsys, "report", "repeats", "--from", "2020-01-01", "--lake", str(lake))
    assert (code, err) == (0, SHIFTED)
    code, _, err = run(capsys, "report", "repeats", "--by", "Modality", "--lake", str(lake))
    assert (code, err) == (0, "")  # rates by modality are exact
    code, _, err = run(capsys, "report", "utilization", "--by", "weekday,hour", "--lake",
                       str(lake))
    assert (code, err) == (0, "")
    code, _, err = run(capsys, "report", "utilization", "--lake", str(built_lake[0]))
    assert (code, err) == (0, "")  # identified: real dates


# --- option values that made no sense were accepted ---------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["vacuum", "--retention-hours", "-5"], "argument --retention-hours: expected a number "
     ">= 0, got '-5'"),
    (["vacuum", "--retention-hours", "nan"], "argument --retention-hours: expected a number "
     ">= 0, got 'nan'"),
    (["optimize", "--small-mb", "-1"], "argument --small-mb: expected a positive number, "
     "got '-1'"),
    (["optimize", "--target-mb", "0"], "argument --target-mb: expected a positive number, "
     "got '0'"),
    (["ingest", "x", "--scheduler-timeout", "inf"], "argument --scheduler-timeout: expected "
     "a positive number, got 'inf'"),
])
def test_nonsense_option_values_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--lake", "/nonexistent/lake"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == f"lake {argv[0]}: error: {message} (see `lake {argv[0]} --help`)\n"


def test_missing_input_file_is_one_line(capsys, built_lake, tmp_path):
    missing = tmp_path / "result.csv"
    code, out, err = run(capsys, "reidentify", "--csv", str(missing), "--columns", "PatientID",
                         "--lake", str(built_lake[0]))
    assert (code, out) == (1, "")
    assert err == f"lake reidentify: error: No such file or directory ({missing}): check the path\n"


# --- PACS sources that cannot be reached ------------------------------------------------

@pytest.mark.slow  # the installed command twice, with 3 s of DICOMweb retry backoff
@pytest.mark.parametrize("url, message", [
    ("dicomweb+http://127.0.0.1:{port}/dicom-web",
     "cannot connect after 4 attempts (ConnectionError); is the server running and reachable?"),
    ("dimse://LAKE@127.0.0.1:{port}",
     "C-FIND: no association, cannot connect (Connection refused); is the PACS running and "
     "reachable?"),
])
def test_unreachable_pacs_is_one_line(tmp_path, url, message):
    """The installed command, so that log output reaches stderr as a user sees it: urllib3's
    retry warnings (they name request paths, which carry original UIDs) and pynetdicom's
    association errors stay off the console; the error line says it all."""
    exe = shutil.which("lake") or str(Path(sys.executable).parent / "lake")
    lake = tmp_path / "lake"
    assert main(["init", str(lake), "--profile", "identified"]) == 0
    source = url.format(port=_free_port())  # nothing listens there
    r = subprocess.run([exe, "ingest", source, "--lake", str(lake), "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    shown = source.removeprefix("dicomweb+")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == f"lake ingest: error: cannot read source {shown}: {message}\n"


class _ClosedPipe(io.StringIO):
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


def test_output_into_a_closed_pipe_is_not_an_error(capsys, built_lake, monkeypatch):
    """`lake report ... | head -3`: the reader stopped reading, nothing went wrong."""
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    code = main(["report", "dose", "--studies", "--format", "csv", "--lake", str(built_lake[0])])
    assert code == 0
    assert capsys.readouterr().err == "# identified lake: results may contain patient identifiers\n"


# --- lake features ----------------------------------------------------------------------

def test_features_of_a_study_cohort(capsys, lake_copy):
    """`--cohort` with a cohort of studies computes every image series of those studies
    (it crashed with a TypeError)."""
    q = "SELECT StudyInstanceUID FROM studies WHERE Modality = 'MR' ORDER BY 1 LIMIT 1"
    assert run(capsys, "cohort", "save", "one_mr", "--sql", q, "--lake", str(lake_copy))[0] == 0
    code, out, _ = run(capsys, "sql", f"SELECT count(*) AS n FROM series WHERE StudyInstanceUID "
                       f"IN ({q}) AND Modality = 'MR'", "--lake", str(lake_copy), "--format",
                       "json")
    n = json.loads(out)[0]["n"]
    assert n >= 2
    code, out, err = run(capsys, "features", "--cohort", "one_mr", "--scheduler", "synchronous",
                         "--lake", str(lake_copy))
    assert code == 0, err
    assert f": {n} series ({n} regular volumes, {n} with image statistics), 0 masks" in out


@pytest.mark.parametrize("title", ["THIS_IS_WAY_TOO_LONG_AE", "", "   ", "A\\B", "ÄRZTE"])
def test_listen_with_an_invalid_ae_title_is_a_usage_error(capsys, title):
    with pytest.raises(SystemExit) as exc:
        main(["listen", "--port", str(_free_port()), "--ae-title", title, "--lake",
              "/nonexistent/lake"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        "lake listen: error: argument --ae-title: expected an AE title of 1 to 16 ASCII "
        f"characters (no backslash), got {title!r} (see `lake listen --help`)\n")


# --- a damaged lake ---------------------------------------------------------------------

def test_a_removed_table_folder_is_one_line_and_verify_names_it(capsys, lake_copy):
    shutil.rmtree(lake_copy / "research" / "studies")
    code, out, err = run(capsys, "status", "--lake", str(lake_copy))
    assert (code, out) == (1, "")
    assert err.startswith("lake status: error: a table of the lake cannot be read: ")
    assert err.endswith("; `lake verify` lists what is damaged (restore that from a backup); "
                        "if it lists nothing, the storage failed to answer: run the command "
                        "again\n")
    assert one_line(err)
    code, out, _ = run(capsys, "verify", "--lake", str(lake_copy))
    assert code == 1
    lines = out.splitlines()
    assert lines[1].startswith("  studies: research/studies: unreadable: the table (version ")
    assert lines[2:] == ["1 problems: restore the files named from a backup (or ingest the "
                         "sources again)"]


def test_a_removed_commit_is_one_line_and_verify_names_it(capsys, lake_copy):
    log_dir = lake_copy / "research" / "series" / "_delta_log"
    last = sorted(log_dir.glob("*.json"))[-1]
    last.unlink()
    code, out, err = run(capsys, "sql", "SELECT count(*) FROM series", "--lake", str(lake_copy))
    assert (code, out) == (1, "")
    assert err.startswith("lake sql: error: a table of the lake cannot be read: ")
    assert one_line(err)
    code, out, _ = run(capsys, "verify", "--lake", str(lake_copy))
    assert code == 1 and "  series: research/series: unreadable: the table (version " in out


def test_output_encoding_that_cannot_write_a_name_is_one_line(capsys, built_lake, monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="latin-1"))
    code = main(["sql", "SELECT '山田^太郎' AS name", "--lake", str(built_lake[0])])
    assert code == 1
    assert capsys.readouterr().err == (
        "# identified lake: this result may contain patient identifiers\n"
        "lake sql: error: the output holds characters that the output encoding (latin-1) "
        "cannot write: use a UTF-8 locale (LANG=C.UTF-8) or set PYTHONIOENCODING=utf-8\n")


# --- reidentify --csv -------------------------------------------------------------------

@pytest.fixture(scope="module")
def research_lake(tmp_path_factory):
    from pydicom.data import get_testdata_file

    root = tmp_path_factory.mktemp("research")
    src = root / "src"
    src.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "ct.dcm")
    lake = root / "lake"
    key = root / "lake.key"
    assert main(["init", str(lake), "--key-file", str(key)]) == 0
    assert main(["ingest", str(src), "--lake", str(lake), "--key-file", str(key),
                 "--scheduler", "synchronous", "--no-progress"]) == 0
    return lake


def test_reidentify_reads_a_spreadsheet_csv_with_a_byte_order_mark(capsys, research_lake,
                                                                   tmp_path):
    capsys.readouterr()
    code, out, _ = run(capsys, "sql", "SELECT PatientID FROM studies", "--lake",
                       str(research_lake), "--format", "csv")
    assert code == 0
    exported = tmp_path / "result.csv"
    exported.write_bytes(b"\xef\xbb\xbf" + out.encode("utf-8"))  # as Excel saves CSV UTF-8
    code, out, err = run(capsys, "reidentify", "--csv", str(exported), "--columns",
                         "PatientID", "--lake", str(research_lake), "--format", "json")
    assert code == 0, err
    assert [(r["kind"], r["original"]) for r in json.loads(out)] == [("PatientID", "1CT1")]


def test_reidentify_csv_not_in_utf8_is_one_line(capsys, research_lake, tmp_path):
    latin = tmp_path / "latin1.csv"
    latin.write_bytes("PatientID,Name\nX,Müller\n".encode("latin-1"))
    code, out, err = run(capsys, "reidentify", "--csv", str(latin), "--columns", "PatientID",
                         "--lake", str(research_lake))
    assert (code, out) == (1, "")
    assert err.startswith(f"lake reidentify: error: cannot read {latin} as a CSV file in UTF-8 (")
    assert err.endswith("): save it as CSV UTF-8\n") and one_line(err)


def test_dose_reference_levels_saved_by_a_spreadsheet(capsys, built_lake, tmp_path):
    """The README says: copy catalog/drl_default.csv, put your levels in. Saved from a
    spreadsheet as CSV UTF-8 it starts with a byte-order mark."""
    default = (ROOT / "catalog" / "drl_default.csv").read_bytes()
    edited = tmp_path / "drl.csv"
    edited.write_bytes(b"\xef\xbb\xbf" + default)
    lake = str(built_lake[0])
    code, expected, _ = run(capsys, "report", "dose", "--lake", lake, "--format", "csv")
    assert code == 0
    code, out, err = run(capsys, "report", "dose", "--drl", str(edited), "--lake", lake,
                         "--format", "csv")
    assert (code, out) == (0, expected), err


def test_reidentify_says_which_pseudonyms_are_unknown(capsys, research_lake):
    capsys.readouterr()
    code, out, _ = run(capsys, "sql", "SELECT PatientID FROM studies", "--lake",
                       str(research_lake), "--format", "json")
    known = json.loads(out)[0]["PatientID"]
    code, out, err = run(capsys, "reidentify", known, "NOT-A-PSEUDONYM", "--lake",
                         str(research_lake), "--format", "json")
    assert code == 0
    assert [(r["pseudonym"], r["original"]) for r in json.loads(out)] == [
        (known, "1CT1"), ("NOT-A-PSEUDONYM", None)]
    assert err == ("# 1 of 2 pseudonyms are not in this lake's vault (a pseudonym of another "
                   "lake or key, or a value that is not a pseudonym)\n")
    code, out, err = run(capsys, "reidentify", "NOT-A-PSEUDONYM", "--lake", str(research_lake))
    assert code == 1 and err.startswith("# 1 of 1 pseudonyms are not in this lake's vault")


def test_init_identified_with_a_key_file_is_refused(capsys, tmp_path):
    code, out, err = run(capsys, "init", str(tmp_path / "lake"), "--profile", "identified",
                         "--key-file", str(tmp_path / "k"))
    assert (code, out) == (1, "")
    assert err == ("lake init: error: --key-file is for research lakes: an identified lake "
                   "keeps identifiers as found and uses no key; leave --key-file out\n")
    assert not (tmp_path / "lake").exists() and not (tmp_path / "k").exists()


def test_lake_create_in_a_non_empty_folder_is_not_called_an_existing_lake(tmp_path):
    from lakehouse import Lake
    from lakehouse.errors import FolderNotEmptyError

    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "notes.txt").write_text("x")
    with pytest.raises(FolderNotEmptyError, match="is not empty and holds no lake"):
        Lake.create(tmp_path / "f", profile="identified")
    with pytest.raises(ValueError, match="a key file is for research lakes"):
        Lake.create(tmp_path / "g", profile="identified", key_file=tmp_path / "k")


def test_a_misspelt_scheduler_is_an_error_even_with_nothing_to_read(capsys, research_lake,
                                                                    tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run(capsys, "ingest", str(empty), "--lake", str(research_lake),
                         "--scheduler", "proceses", "--no-progress")
    assert (code, out) == (1, "")
    assert err == ("lake ingest: error: cannot use Dask scheduler proceses: not a scheduler "
                   "name (processes, threads, synchronous, local-cluster) or address "
                   "(tcp://host:8786); start one with `dask scheduler` or leave out "
                   "--scheduler to run locally\n")


def test_csv_writes_booleans_as_sql_does(capsys, research_lake):
    code, out, _ = run(capsys, "sql", "SELECT true AS yes, false AS no, NULL::BOOLEAN AS unknown",
                       "--lake", str(research_lake), "--format", "csv")
    assert (code, out) == (0, "yes,no,unknown\ntrue,false,\n")


# --- a lake whose storage does not answer properly ----------------------------------------

#: messages as deltalake (object_store, with a Rust backtrace) and DuckDB (an exception its
#: fsspec file system raised) give them, seen with a fault proxy in front of moto
_OBJECT_STORE = ("Kernel error -> Generic S3 error\n          \x1b[31m↳\x1b[0m Error performing "
                 "GET http://127.0.0.1:1/lakes/r/_delta_log/_last_checkpoint in 5ms - HTTP "
                 "error\n           \x1b[31m↳\x1b[0m request or response body error\n"
                 "            \x1b[31m↳\x1b[0m error reading a body from connection\n"
                 "             \x1b[31m↳\x1b[0m end of file before message length reached\n")
_BACKTRACE = ("Kernel error: Json error: Truncated record whilst reading string\n\n"
              "Stack backtrace:\n   0: <unknown>\n   1: <unknown>\n   2: clone3\n"
              "             at ./misc/../sysdeps/unix/sysv/linux/x86_64/clone3.S:81:0\n")
_DUCKDB = ("Traceback (most recent call last):\n  File \"/x/aiobotocore/httpchecksum.py\", "
           "line 91, in read\nFlexibleChecksumError: Expected checksum azrfgA== did not match "
           "calculated checksum: OPVOTA==")


def test_library_messages_become_one_line():
    from lakehouse.errors import one_line as flat
    from lakehouse.errors import storage_fault

    assert flat(_OBJECT_STORE) == (
        "Kernel error -> Generic S3 error: Error performing GET http://127.0.0.1:1/lakes/r/"
        "_delta_log/_last_checkpoint in 5ms - HTTP error … end of file before message "
        "length reached")
    assert flat(_BACKTRACE) == "Kernel error: Json error: Truncated record whilst reading string"
    assert flat(_DUCKDB) == ("FlexibleChecksumError: Expected checksum azrfgA== did not match "
                             "calculated checksum: OPVOTA==")
    assert flat("x" * 500, 100) == "x" * 99 + "…"
    assert storage_fault(flat(_OBJECT_STORE)) and storage_fault(flat(_DUCKDB))
    assert not storage_fault(flat(_BACKTRACE))
    assert not storage_fault("Generic DeltaTable error: Schema error: no field named x")


@pytest.mark.parametrize("raised, start", [
    (lambda: OSError(_OBJECT_STORE), "lake status: error: the lake's storage did not answer "
                                     "properly: Kernel error -> Generic S3 error: "),
    ("deltalake", "lake status: error: the lake's storage did not answer properly: Kernel "),
    ("duckdb", "lake status: error: the lake's storage did not answer properly: "
               "FlexibleChecksumError: "),
])
def test_a_storage_that_does_not_answer_is_one_line_that_says_run_again(capsys, monkeypatch,
                                                                        raised, start):
    import lake_cli

    def fail(args):
        if raised == "deltalake":
            from deltalake.exceptions import DeltaError
            raise DeltaError(_OBJECT_STORE)
        if raised == "duckdb":
            import duckdb
            raise duckdb.IOException(_DUCKDB)
        raise raised()

    monkeypatch.setattr(lake_cli, "cmd_status", fail)
    code, out, err = run(capsys, "status")
    assert (code, out) == (1, "") and one_line(err) and "\x1b" not in err
    assert err.startswith(start), err
    assert err.endswith("run the command again (a failed run leaves the lake as it was)\n")


def test_vacuum_expires_old_snapshots_and_keeps_those_cohorts_pin(capsys, lake_copy):
    from lakehouse import Lake

    numbers = Lake.open(lake_copy).snapshot_numbers()
    assert len(numbers) >= 3
    pinned, latest = numbers[1], numbers[-1]
    code, _, err = run(capsys, "cohort", "save", "early", "--snapshot", str(pinned), "--sql",
                       "SELECT SeriesInstanceUID FROM series", "--lake", str(lake_copy))
    assert code == 0, err
    expired = [n for n in numbers if n not in (pinned, latest)]
    code, out, err = run(capsys, "vacuum", "--expire-days", "0", "--dry-run", "--lake",
                         str(lake_copy))
    assert code == 0, err
    assert out.splitlines()[0] == (
        f"would expire {len(expired)} snapshots published more than 0 days ago "
        f"({_ranges(expired)}); kept 1 older ones that saved cohorts pin (early)")
    assert Lake.open(lake_copy).snapshot_numbers() == numbers
    code, out, err = run(capsys, "vacuum", "--expire-days", "0", "--lake", str(lake_copy))
    assert code == 0, err
    assert out.splitlines()[0].startswith(f"expired {len(expired)} snapshots published")
    lake = Lake.open(lake_copy)
    assert lake.snapshot_numbers() == [pinned, latest]
    code, out, err = run(capsys, "status", "--lake", str(lake_copy))
    assert code == 0, err
    assert f"snapshot  {latest} ({lake.snapshot(latest).created_at}); 2 kept since " \
           f"{lake.snapshot(pinned).created_at}\n" in out
    code, out, err = run(capsys, "cohort", "show", "early", "--lake", str(lake_copy))
    assert code == 0, err  # reproduced at its snapshot, the hash checked
    code, out, err = run(capsys, "sql", "SELECT 1", "--snapshot", str(expired[-1]), "--lake",
                         str(lake_copy))
    assert (code, out) == (1, "") and one_line(err)
    assert f"snapshot {expired[-1]} is no longer kept (`lake vacuum --expire-days` expired " \
           f"it); 2 snapshots are kept, the latest is {latest}" in err


def _ranges(numbers: list[int]) -> str:
    from lake_cli import _ranges as ranges

    assert ranges([1, 2, 3, 5, 7, 8]) == "1-3, 5, 7-8" and ranges([4]) == "4"
    return ranges(numbers)
