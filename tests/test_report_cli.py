"""`lake report`, in process: formats, options, drill-down and one-line errors."""

import csv
import io
import json

import pytest

from lake_cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_repeats_json_by_modality(capsys, built_lake, truth):
    code, out, _ = run(capsys, "report", "repeats", "--lake", str(built_lake[0]),
                       "--format", "json")
    assert code == 0
    rows = json.loads(out)
    assert {r["Modality"]: r["studies"] for r in rows} == truth.studies_by_modality
    assert sum(r["repeats"] for r in rows) == sum(1 for r in truth.repeats if r["days"] <= 30)
    assert all(0 <= r["ci_low"] <= r["repeat_rate"] <= r["ci_high"] <= 1 for r in rows)


@pytest.mark.parametrize("window, days", [("30", ["0", "30"]), ("31", ["0", "30", "31"]),
                                          ("0", ["0"])])
def test_repeat_pairs_csv_with_a_window(capsys, built_lake, truth, window, days):
    code, out, err = run(capsys, "report", "repeats", "--lake", str(built_lake[0]),
                         "--studies", "--window", window, "--format", "csv")
    assert code == 0 and "identified lake" in err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert sorted(r["days_since_prior"] for r in rows) == days
    expected = {(r["study_uid"], r["prior_study_uid"]) for r in truth.repeats
                if r["days"] <= int(window)}
    assert {(r["StudyInstanceUID"], r["prior_study_uid"]) for r in rows} == expected
    assert {r["window_days"] for r in rows} == {window}


def test_utilization_table_by_columns_and_range(capsys, built_lake, truth):
    year = min(y for _, y, _ in truth.studies_by_modality_year)
    code, out, _ = run(capsys, "report", "utilization", "--lake", str(built_lake[0]),
                       "--by", "year,Modality", "--from", f"{year}-01-01",
                       "--to", f"{year}-12-31")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["year", "Modality", "studies", "series", "instances"]
    got = {(int(line.split()[0]), line.split()[1], int(line.split()[2]))
           for line in lines[2:-1]}
    assert got == {(y, m, n) for m, y, n in truth.studies_by_modality_year if y == year}
    assert lines[-1] == f"({len(got)} row{'s' if len(got) != 1 else ''})"


def test_retakes_and_their_views(capsys, built_lake, truth):
    lake = str(built_lake[0])
    code, out, _ = run(capsys, "report", "retakes", "--lake", lake, "--by", "BodyPartExamined",
                       "--format", "json")
    assert code == 0
    assert sum(r["retakes"] for r in json.loads(out)) == sum(truth.retakes.values())
    code, out, _ = run(capsys, "report", "retakes", "--lake", lake, "--studies",
                       "--format", "json")
    views = json.loads(out)
    assert {v["StudyInstanceUID"] for v in views} == set(truth.retakes)


def test_dose_exceedances_with_a_drl_file(capsys, built_lake, truth, tmp_path):
    drl = tmp_path / "levels.csv"
    drl.write_text("body_region,protocol,CTDIvol_mGy,DLP_mGycm,note\n"
                   "HEAD,,0.1,,everything exceeds\nCHEST,,0.1,,\nABDOMEN,,0.1,,\n"
                   "PELVIS,,0.1,,\n", encoding="utf-8")
    code, out, _ = run(capsys, "report", "dose", "--lake", str(built_lake[0]), "--drl",
                       str(drl), "--exceedances", "--format", "json")
    assert code == 0
    rows = json.loads(out)
    assert {r["StudyInstanceUID"] for r in rows} == \
        set(truth.dose_reports) | set(truth.ct_header_ctdivol)
    assert all(r["exceeds_CTDIvol"] and r["drl_CTDIvol"] == 0.1 for r in rows)
    code, out, _ = run(capsys, "report", "dose", "--lake", str(built_lake[0]), "--by",
                       "dose_source", "--format", "json")
    got = {r["dose_source"]: r["studies"] for r in json.loads(out)}
    assert got == {"report": len(truth.dose_reports), "header": len(truth.ct_header_ctdivol)}


def test_where_filters_rows(capsys, built_lake, truth):
    code, out, _ = run(capsys, "report", "repeats", "--lake", str(built_lake[0]), "--studies",
                       "--where", "Modality=CT", "--format", "json")
    assert code == 0
    same_day = [r for r in truth.repeats if r["days"] == 0]
    assert [r["StudyInstanceUID"] for r in json.loads(out)] == \
        [r["study_uid"] for r in same_day]


@pytest.mark.parametrize("argv, message", [
    (["repeats", "--by", "Modalty"], "unknown grouping column(s) 'Modalty'"),
    (["repeats", "--match", "Nope"], "unknown matching column(s) 'Nope'"),
    (["utilization", "--from", "2024-02-30"], "is not a date; use YYYY-MM-DD"),
    (["utilization", "--from", "2024-02-01", "--to", "2024-01-01"], "is after --to"),
    (["dose", "--drl", "/nonexistent/drl.csv"], "cannot read the DRL file"),
    (["retakes", "--where", "nope"], "is not COLUMN=VALUE"),
    (["retakes", "--where", "nope=1"], "unknown filter column(s) 'nope'"),
])
def test_report_errors_are_one_line(capsys, built_lake, argv, message):
    code, out, err = run(capsys, "report", *argv, "--lake", str(built_lake[0]))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and message in err


def test_usage_errors(capsys, built_lake):
    for argv, message in ((["report", "nonsense"], "invalid choice"),
                          (["report", "repeats", "--window", "-3"], "expected an integer >= 0")):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--lake", str(built_lake[0])])
        assert exc.value.code == 2 and message in capsys.readouterr().err
