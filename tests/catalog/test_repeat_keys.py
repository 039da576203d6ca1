"""Repeat exams matched on the protocol too, and the per-study instance kinds the
exclusions read, against the generator's ground truth and the instances themselves."""

from __future__ import annotations

import itertools
import json

import pytest

from catalog import ReportError, reports
from lake_cli import main
from tests.catalog.test_repeat_rules import kind
from tests.catalog.test_reports import pairs

WITH_PROTOCOL = ("Modality", "BodyPartExamined", "protocol")


def protocol_pairs(truth, window: int) -> set[tuple[str, str, int]]:
    return {(r["study_uid"], r["prior_study_uid"], r["days"]) for r in truth.repeats
            if r["days"] <= window and r["protocol"] == r["prior_protocol"]}


def test_series_and_studies_carry_the_protocol(cat, truth):
    studies = dict(cat.con.execute("SELECT StudyInstanceUID, ProtocolName FROM studies")
                   .fetchall())
    for r in truth.repeats:
        assert studies[r["study_uid"]] == r["protocol"]
        assert studies[r["prior_study_uid"]] == r["prior_protocol"]
    assert None not in studies.values()
    # the dose reports (SR) have none: their series' ProtocolName is NULL, the study's
    # comes from its images
    by_modality = dict(cat.con.execute(
        "SELECT Modality, count(ProtocolName) FROM series GROUP BY ALL").fetchall())
    assert by_modality["SR"] == 0 and by_modality["CT"] > 0
    mismatched = cat.con.execute(
        "SELECT count(*) FROM series s JOIN studies t USING (StudyInstanceUID) "
        "WHERE s.Modality <> 'SR' AND s.ProtocolName IS DISTINCT FROM t.ProtocolName"
    ).fetchall()
    assert mismatched == [(0,)]


@pytest.mark.parametrize("window", [0, 30, 31])
def test_matching_on_the_protocol(cat, truth, window):
    d = reports.RepeatDefinition(window_days=window, match=WITH_PROTOCOL)
    got = reports.repeat_pairs(cat, definition=d)
    assert pairs(got) == protocol_pairs(truth, window)
    # the 30-day pair changes protocol: a repeat by default, not when protocols must match
    default = pairs(reports.repeat_pairs(
        cat, definition=reports.RepeatDefinition(window_days=window)))
    assert pairs(got) == {p for p in default if p[2] != 30}
    assert set(got.column("matched_keys").to_pylist()[0]) == {
        "Modality", "BodyPartExamined", "ProtocolName"}
    # the alias names the column; the column name works too
    spelled_out = reports.RepeatDefinition(
        window_days=window, match=("Modality", "BodyPartExamined", "ProtocolName"))
    assert reports.repeat_pairs(cat, definition=spelled_out).to_pylist() == got.to_pylist()
    rates = reports.repeat_rates(cat, by=["Modality"], definition=d).to_pylist()
    assert sum(r["repeats"] for r in rates) == len(protocol_pairs(truth, window))


def test_protocol_and_its_alias_together_is_an_error(cat):
    with pytest.raises(ReportError, match="repeat a name"):
        reports.repeat_pairs(cat, definition=reports.RepeatDefinition(
            match=("Modality", "protocol", "ProtocolName")))


def test_cli_keys_with_protocol(capsys, built_lake, truth):
    code = main(["report", "repeats", "--lake", str(built_lake[0]), "--keys",
                 "Modality,BodyPartExamined,protocol", "--window", "31", "--studies",
                 "--format", "json"])
    out = capsys.readouterr().out
    assert code == 0
    rows = json.loads(out)
    assert {(r["StudyInstanceUID"], r["prior_study_uid"], r["days_since_prior"])
            for r in rows} == protocol_pairs(truth, 31)
    assert all(json.loads(r["matched_values"])["ProtocolName"] == r["ProtocolName"]
               for r in rows)


def test_instance_kinds_are_the_kinds_of_the_instances(cat):
    rows = cat.con.execute("SELECT StudyInstanceUID, ImageType, SOPClassUID, Modality "
                           "FROM instances").fetchall()
    expected: dict[str, int] = {}
    for study, image_type, sop_class, modality in rows:
        expected[study] = expected.get(study, 0) | 1 << kind(image_type or [], sop_class or "",
                                                             modality or "")
    got = dict(cat.con.execute("SELECT StudyInstanceUID, instance_kinds FROM studies")
               .fetchall())
    assert got == expected
    # the archive has plain images, localizers and non-image (SR) instances
    assert {k for v in got.values() for k in range(16) if v >> k & 1} >= {0, 1, 8}


@pytest.mark.parametrize("flags", list(itertools.product([True, False], repeat=4)))
def test_exam_studies_for_every_exclusion_set(cat, flags):
    """A study is an exam when one of its instances escapes every exclusion asked for."""
    localizers, derived, secondary, non_image = flags
    excluded = localizers + 2 * derived + 4 * secondary + 8 * non_image
    rows = cat.con.execute("SELECT StudyInstanceUID, ImageType, SOPClassUID, Modality "
                           "FROM instances").fetchall()
    expected = {study for study, image_type, sop_class, modality in rows
                if kind(image_type or [], sop_class or "", modality or "") & excluded == 0}
    got = cat.con.execute(
        "SELECT StudyInstanceUID FROM exam_studies(exclude_localizers := ?, "
        "exclude_derived := ?, exclude_secondary := ?, exclude_non_image := ?)",
        list(flags)).fetchall()
    assert {s for (s,) in got} == expected
