"""`lake cohort save | list | show | diff | export`, in process."""

import json

import pytest

from lake_cli import main
from lakehouse import Lake


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cohort_commands(capsys, lake_copy, tmp_path):
    lake = str(lake_copy)
    spec = tmp_path / "chest.yaml"
    spec.write_text("all:\n  - modality: [CT, CR, DX]\n  - body_part: CHEST\n",
                    encoding="utf-8")
    code, out, _ = run(capsys, "cohort", "save", "chest", "--spec", str(spec), "--lake", lake)
    latest = Lake.open(lake_copy).snapshot().number
    assert code == 0 and out.startswith("saved cohort chest: ")
    assert f"at lake snapshot {latest} " in out
    code, out, _ = run(capsys, "cohort", "save", "ct", "--sql",
                       "SELECT SeriesInstanceUID FROM series WHERE Modality = 'CT'",
                       "--lake", lake)
    assert code == 0

    code, out, _ = run(capsys, "cohort", "list", "--json", "--lake", lake)
    listed = json.loads(out)
    assert [c["name"] for c in listed] == ["chest", "ct"]
    assert listed[0]["definition"]["spec"] == {"all": [{"modality": ["CT", "CR", "DX"]},
                                                       {"body_part": "CHEST"}]}

    code, out, _ = run(capsys, "cohort", "show", "chest", "--json", "--lake", lake)
    shown = json.loads(out)
    assert shown["reproduced"] is True and shown["latest"]["same"] is True
    assert shown["row_count"] == listed[0]["row_count"] > 0

    code, out, _ = run(capsys, "cohort", "diff", "chest", "ct", "--json", "--lake", lake)
    d = json.loads(out)
    assert d["grain"] == "series" and d["removed"] and d["added"]  # CR/DX chest vs CT

    # pinned to the empty first snapshot: everything CT is "added" since
    code, out, _ = run(capsys, "cohort", "save", "ct0", "--snapshot", "0", "--sql",
                       "SELECT SeriesInstanceUID FROM series WHERE Modality = 'CT'",
                       "--lake", lake)
    assert "0 series rows at lake snapshot 0 " in out
    code, out, _ = run(capsys, "cohort", "diff", "ct0", "--json", "--lake", lake)
    drift = json.loads(out)
    assert drift["removed"] == [] and len(drift["added"]) == listed[1]["row_count"] > 0

    code, out, _ = run(capsys, "cohort", "export", "ct", "--to", str(tmp_path / "out"),
                       "--as", "manifest", "--json", "--lake", lake)
    summary = json.loads(out)
    assert code == 0 and summary["as"] == "manifest" and summary["files"] == 5
    assert (tmp_path / "out" / "SHA256SUMS").is_file()


@pytest.mark.parametrize("argv, message", [
    (["cohort", "show", "nope"], "no saved cohort 'nope'"),
    (["cohort", "save", "x"], "give the cohort as --sql QUERY or --spec FILE"),
    (["cohort", "save", "x", "--spec", "/nonexistent.yaml"], "cannot read spec file"),
    (["cohort", "save", "x", "--sql", "SELECT 1 AS one"], "a cohort needs one row per series"),
    (["cohort", "save", "a/b", "--sql", "SELECT 1"], "invalid cohort name"),
    (["cohort", "export", "nope", "--to", "/tmp/x"], "no saved cohort 'nope'"),
])
def test_cohort_errors_are_one_line(capsys, lake_copy, argv, message):
    code, out, err = run(capsys, *argv, "--lake", str(lake_copy))
    assert code == 1 and out == ""
    assert message in err and err.count("\n") == 1
