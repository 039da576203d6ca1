"""Quality analytics against the generator's ground truth, on the session lake and on a
pseudonymized copy of it (keyed IDs, remapped UIDs, per-patient date shifts)."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import shutil
from collections import Counter

import pyarrow as pa
import pytest

from catalog import ReportError, open_lake, reports
from etl import ingest
from lakehouse import Lake, layout
from lakehouse.privacy import Pseudonymizer, read_key_file
from tests.conftest import fast_config

Z = 1.959963984540054


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson score interval, written out independently of the SQL."""
    p = k / n
    centre = p + Z * Z / (2 * n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + Z * Z / n)), min(1.0, (centre + half) / (1 + Z * Z / n))


def expected_pairs(truth, window: int) -> set[tuple[str, str, int]]:
    return {(r["study_uid"], r["prior_study_uid"], r["days"]) for r in truth.repeats
            if r["days"] <= window}


def pairs(table: pa.Table) -> set[tuple[str, str, int]]:
    return set(zip(table.column("StudyInstanceUID").to_pylist(),
                   table.column("prior_study_uid").to_pylist(),
                   table.column("days_since_prior").to_pylist(), strict=True))


def modality_of(truth, study_uid: str, cat) -> str:
    return cat.con.execute("SELECT Modality FROM studies WHERE StudyInstanceUID = ?",
                           [study_uid]).fetchall()[0][0]


# --- utilization ----------------------------------------------------------------

def test_utilization_counts_match_the_truth(cat, truth):
    by_mod = reports.utilization(cat, by=["Modality"]).to_pylist()
    assert {r["Modality"]: r["studies"] for r in by_mod} == truth.studies_by_modality
    assert sum(r["instances"] for r in by_mod) == truth.tables["instances"]
    assert sum(r["series"] for r in by_mod) == truth.tables["series"]
    by_year = reports.utilization(cat, by=["Modality", "year"])
    assert by_year.column_names[:2] == ["Modality", "year"]  # the order asked for
    assert sorted([r["Modality"], r["year"], r["studies"]] for r in by_year.to_pylist()) == \
        sorted(truth.studies_by_modality_year)
    # the equipment views add up to the same totals per period
    for view in ("utilization_daily", "utilization_weekly", "utilization_by_month"):
        n = cat.con.execute(f"SELECT sum(studies) FROM {view}").fetchall()[0][0]
        assert n == truth.tables["studies"], view


def test_weekday_names_come_in_week_order(cat):
    table = reports.utilization(cat, by=["weekday_name", "Modality"])
    names = list(dict.fromkeys(table.column("weekday_name").to_pylist()))
    expected = [d for d in reports.WEEKDAYS if d in names]
    assert names == expected and len(names) >= 5
    assert "_weekday_order" not in table.column_names
    n = cat.con.execute("SELECT count(*) FROM studies WHERE StudyDate IS NOT NULL").fetchall()[0][0]
    assert sum(table.column("studies").to_pylist()) == n


def test_utilization_date_range_and_drill_down(cat, truth):
    first_year = min(y for _, y, _ in truth.studies_by_modality_year)
    in_year = sum(n for _, y, n in truth.studies_by_modality_year if y == first_year)
    start, end = dt.date(first_year, 1, 1), dt.date(first_year, 12, 31)
    rows = reports.utilization(cat, by=["year"], date_from=start, date_to=end).to_pylist()
    assert rows == [{"year": first_year, "studies": in_year,
                     "series": rows[0]["series"], "instances": rows[0]["instances"]}]
    studies = reports.utilization_studies(cat, start, end.isoformat())
    assert studies.num_rows == in_year
    assert {d.year for d in studies.column("StudyDate").to_pylist()} == {first_year}


def test_workload_matrix_covers_every_study(cat, truth):
    rows = reports.workload(cat).to_pylist()
    assert sum(r["studies"] for r in rows) == truth.tables["studies"]
    assert all(1 <= r["weekday"] <= 7 and 0 <= r["hour"] <= 23 for r in rows)
    # generated studies start between 07:00 and 14:00 (plus 3 h for the same-day repeat)
    assert {r["hour"] for r in rows} <= set(range(7, 18))


# --- repeat exams ---------------------------------------------------------------

def test_repeat_exams_default_definition(cat, truth):
    exams = reports.repeat_exams(cat)
    assert exams.num_rows == truth.tables["studies"]  # one row per study
    repeats = exams.filter(exams.column("is_repeat"))
    # days 0 and 30 are inside the 30-day window, day 31 is not
    assert pairs(repeats) == expected_pairs(truth, 30)
    assert len(expected_pairs(truth, 30)) == 2
    assert set(repeats.column("matched_keys").to_pylist()[0]) == {"Modality",
                                                                  "BodyPartExamined"}
    # the view is the same definition
    view = cat.con.execute("SELECT StudyInstanceUID, prior_study_uid, days_since_prior "
                           "FROM repeat_exams WHERE is_repeat").fetchall()
    assert set(view) == expected_pairs(truth, 30)


@pytest.mark.parametrize("window, days", [(0, [0]), (29, [0]), (30, [0, 30]),
                                          (31, [0, 30, 31]), (365, [0, 30, 31])])
def test_window_edges(cat, truth, window, days):
    got = reports.repeat_pairs(cat, definition=reports.RepeatDefinition(window_days=window))
    assert sorted(got.column("days_since_prior").to_pylist()) == days
    assert pairs(got) == expected_pairs(truth, window)


def test_same_day_repeat_is_the_later_study(cat, truth):
    (same_day,) = [r for r in truth.repeats if r["days"] == 0]
    row = cat.con.execute(
        "SELECT prior_study_uid, StudyTime > prior_study_time FROM repeat_exams "
        "WHERE StudyInstanceUID = ?", [same_day["study_uid"]]).fetchall()
    assert row == [(same_day["prior_study_uid"], True)]
    prior = cat.con.execute("SELECT is_repeat, prior_study_uid FROM repeat_exams "
                            "WHERE StudyInstanceUID = ?", [same_day["prior_study_uid"]]).fetchall()
    assert prior == [(False, None)]


def test_repeat_rates_with_wilson_intervals(cat, truth):
    rates = {r["Modality"]: r for r in reports.repeat_rates(cat, by=["Modality"]).to_pylist()}
    expected = Counter(modality_of(truth, s, cat) for s, _, _ in expected_pairs(truth, 30))
    assert {m: r["studies"] for m, r in rates.items()} == truth.studies_by_modality
    for m, r in rates.items():
        n, k = truth.studies_by_modality[m], expected.get(m, 0)
        assert r["repeats"] == k
        assert r["repeat_rate"] == pytest.approx(k / n)
        low, high = wilson(k, n)
        assert (r["ci_low"], r["ci_high"]) == (pytest.approx(low), pytest.approx(high))
        assert r["ci_low"] <= r["repeat_rate"] <= r["ci_high"]
    # by month: every repeat lands in the month of the repeat study
    monthly = reports.repeat_rates(cat, by=["Modality", "month"])
    assert sum(monthly.column("repeats").to_pylist()) == 2
    assert sum(monthly.column("studies").to_pylist()) == truth.tables["studies"]


def test_rates_drill_down_to_their_pairs(cat, truth):
    ct = reports.repeat_rates(cat, by=["Modality"], where=[reports.Filter.parse("Modality=CT")])
    behind = reports.repeat_pairs(cat, where=[reports.Filter("Modality", "CT")])
    assert ct.column("repeats").to_pylist() == [behind.num_rows] == [1]
    # a prior before --from still makes the study in range a repeat
    (thirty,) = [r for r in truth.repeats if r["days"] == 30]
    date = cat.con.execute("SELECT StudyDate FROM studies WHERE StudyInstanceUID = ?",
                           [thirty["study_uid"]]).fetchall()[0][0]
    got = reports.repeat_pairs(cat, date_from=date, date_to=date)
    assert pairs(got) == {(thirty["study_uid"], thirty["prior_study_uid"], 30)}


def test_matching_keys_and_exclusions(cat, truth):
    wider = reports.RepeatDefinition(match=("Modality", "BodyPartExamined", "StudyDescription"))
    assert pairs(reports.repeat_pairs(cat, definition=wider)) == expected_pairs(truth, 30)
    kept = reports.RepeatDefinition(exclude_localizers=False, exclude_derived=False,
                                    exclude_secondary=False, exclude_non_image=False)
    assert reports.repeat_exams(cat, kept).num_rows == truth.tables["studies"]
    with pytest.raises(ReportError, match="unknown matching column"):
        reports.repeat_pairs(cat, definition=reports.RepeatDefinition(match=("Modalty",)))
    with pytest.raises(ReportError, match="at least one key"):
        reports.repeat_pairs(cat, definition=reports.RepeatDefinition(match=()))
    with pytest.raises(ReportError, match="whole number of days"):
        reports.repeat_pairs(cat, definition=reports.RepeatDefinition(window_days=-1))


def test_report_arguments_are_checked(cat):
    with pytest.raises(ReportError, match="unknown grouping column"):
        reports.repeat_rates(cat, by=["Modality; DROP TABLE studies"])
    with pytest.raises(ReportError, match="is not a date"):
        reports.utilization(cat, date_from="2024-02-30")
    with pytest.raises(ReportError, match="is after"):
        reports.utilization(cat, date_from="2024-02-01", date_to="2024-01-01")
    with pytest.raises(ReportError, match="COLUMN=VALUE"):
        reports.Filter.parse("Modality")


# --- retakes --------------------------------------------------------------------

def test_retakes_match_the_truth(cat, truth):
    assert truth.retakes  # the generator made some
    got = reports.retakes(cat)
    per_study = Counter()
    for study, n in zip(got.column("StudyInstanceUID").to_pylist(),
                        got.column("retakes").to_pylist(), strict=True):
        per_study[study] += n
    assert dict(per_study) == truth.retakes
    # each retaken view keeps its first image and lists the others
    for r in got.to_pylist():
        assert len(r["sop_instance_uids"]) == r["images"] == r["retakes"] + 1
    rates = reports.retake_rates(cat, by=["Modality"]).to_pylist()
    for r in rates:
        images = truth.instances_by_modality[r["Modality"]]
        retaken = sum(n for s, n in truth.retakes.items()
                      if modality_of(truth, s, cat) == r["Modality"])
        assert (r["images"], r["retakes"]) == (images, retaken)
        assert (r["ci_low"], r["ci_high"]) == tuple(pytest.approx(v)
                                                    for v in wilson(retaken, images))
    assert {r["Modality"] for r in rates} <= {"CR", "DX", "MG"}
    by_station = reports.retake_rates(cat)  # default grouping: StationName
    assert by_station.column_names[0] == "StationName"
    assert sum(by_station.column("retakes").to_pylist()) == sum(truth.retakes.values())


# --- dose -----------------------------------------------------------------------

def test_dose_events_equal_the_reports(cat, truth):
    rows = cat.df("SELECT * FROM dose_events ORDER BY StudyInstanceUID, event_index")
    assert truth.dose_reports and truth.ct_header_ctdivol
    got: dict[str, list[dict]] = {}
    for r in rows.to_dict("records"):
        got.setdefault(r["StudyInstanceUID"], []).append(r)
    assert set(got) == set(truth.dose_reports)
    for study, report in truth.dose_reports.items():
        events = got[study]
        assert [e["event_index"] for e in events] == list(range(1, len(events) + 1))
        assert [{"event_uid": e["IrradiationEventUID"],
                 "acquisition_type": e["acquisition_type"],
                 "protocol": e["acquisition_protocol"],
                 "target_region": e["target_region"],
                 "phantom": e["phantom_type"],
                 "ctdivol": e["CTDIvol"],
                 "dlp": e["DLP"]} for e in events] == report["events"]
        assert {e["accumulated_DLP"] for e in events} == {report["accumulated_dlp"]}


def test_dose_by_study_uses_reports_then_headers(cat, truth):
    rows = {r["StudyInstanceUID"]: r for r in reports.dose_studies(cat).to_pylist()}
    assert len(rows) == truth.studies_by_modality["CT"]
    assert set(rows) == set(truth.dose_reports) | set(truth.ct_header_ctdivol)
    for study, report in truth.dose_reports.items():
        r = rows[study]
        assert r["dose_source"] == "report"
        assert r["events"] == len(report["events"])
        assert r["CTDIvol_max"] == max(e["ctdivol"] for e in report["events"])
        assert r["DLP_total"] == pytest.approx(sum(e["dlp"] for e in report["events"]))
        assert r["accumulated_DLP"] == report["accumulated_dlp"]
        assert r["protocols"] == sorted({e["protocol"] for e in report["events"]})
    for study, ctdivol in truth.ct_header_ctdivol.items():
        r = rows[study]
        assert (r["dose_source"], r["CTDIvol_max"], r["DLP_total"], r["events"]) == \
            ("header", ctdivol, None, 0)


def test_dose_reference_levels(cat, truth, tmp_path):
    drl = tmp_path / "drl.csv"
    drl.write_text("# local levels\nbody_region,protocol,CTDIvol_mGy,DLP_mGycm,note\n"
                   "head,,45,690,site\nHEAD,%routine%,46,680,routine head\n"
                   "CHEST,,10,,\nABDOMEN,,,300,\nPELVIS,,8,300,\n", encoding="utf-8")
    levels = {"HEAD": (46.0, 680.0), "CHEST": (10.0, None), "ABDOMEN": (None, 300.0),
              "PELVIS": (8.0, 300.0)}
    body = dict(cat.con.execute("SELECT StudyInstanceUID, BodyPartExamined FROM studies "
                                "WHERE Modality = 'CT'").fetchall())
    expected = set()
    for study, part in body.items():
        report = truth.dose_reports.get(study)
        ctdivol = (max(e["ctdivol"] for e in report["events"]) if report
                   else truth.ct_header_ctdivol[study])
        dlp = sum(e["dlp"] for e in report["events"]) if report else None
        if part == "HEAD" and not report:  # header-only studies have no protocol: site level
            limit_c, limit_d = 45.0, 690.0
        else:
            limit_c, limit_d = levels[part]
        if (limit_c and ctdivol > limit_c) or (limit_d and dlp and dlp > limit_d):
            expected.add(study)
    got = reports.dose_exceedances(cat, drl=drl)
    assert set(got.column("StudyInstanceUID").to_pylist()) == expected
    assert expected  # the levels above were chosen so that some studies exceed them
    summary = reports.dose_summary(cat, drl=drl)
    assert sum(summary.column("above_drl").to_pylist()) == len(expected)
    assert sum(summary.column("studies").to_pylist()) == truth.studies_by_modality["CT"]
    # the shipped example levels load and apply to every generated body region
    default = reports.read_drl()
    assert set(default.column("body_region").to_pylist()) >= {"HEAD", "CHEST", "ABDOMEN",
                                                              "PELVIS"}
    studies = reports.dose_studies(cat)
    assert studies.column("drl_body_region").null_count == 0


def test_bad_drl_files_are_clear_errors(cat, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("region,CTDIvol_mGy\nHEAD,40\n", encoding="utf-8")
    with pytest.raises(ReportError, match="lacks body_region"):
        reports.dose_exceedances(cat, drl=bad)
    bad.write_text("body_region,protocol,CTDIvol_mGy,DLP_mGycm\nHEAD,,forty,\n",
                   encoding="utf-8")
    with pytest.raises(ReportError, match="'forty' is not a positive number"):
        reports.dose_exceedances(cat, drl=bad)
    with pytest.raises(ReportError, match="cannot read the DRL file"):
        reports.dose_exceedances(cat, drl=tmp_path / "missing.csv")


# --- a research lake of the same archive ------------------------------------------

@pytest.fixture(scope="module")
def research(archive, tmp_path_factory):
    """The session archive ingested into a research lake: keyed pseudonyms, remapped UIDs,
    per-patient date shifts, an allow-listed header (dose reports: coded and numeric
    content only)."""
    root = tmp_path_factory.mktemp("research")
    key = root / "lake.key"
    lake = Lake.create(root / "lake", profile="research", key_file=key)
    ingest(lake, archive[0], fast_config(), key_file=key)
    with open_lake(root / "lake") as c:
        yield c, Pseudonymizer(read_key_file(key))


def test_research_lake_gives_the_same_figures(cat, research, truth):
    rcat, pseudo = research
    assert rcat.lake.profile == "research"
    assert "PatientName" not in rcat.table("studies").columns
    for window, match in itertools.product((0, 30, 31), (
            reports.DEFAULT_REPEATS.match, ("Modality", "BodyPartExamined", "protocol"))):
        d = reports.RepeatDefinition(window_days=window, match=match)
        assert reports.repeat_rates(rcat, by=["Modality"], definition=d).to_pylist() == \
            reports.repeat_rates(cat, by=["Modality"], definition=d).to_pylist()
        mapped = {(pseudo.uid(s), pseudo.uid(p), days)
                  for s, p, days in expected_pairs(truth, window)
                  if "protocol" not in match or days != 30}  # the pair that changes protocol
        assert pairs(reports.repeat_pairs(rcat, definition=d)) == mapped
    assert reports.retake_rates(rcat, by=["Modality"]).to_pylist() == \
        reports.retake_rates(cat, by=["Modality"]).to_pylist()
    assert reports.utilization(rcat, by=["Modality"]).to_pylist() == \
        reports.utilization(cat, by=["Modality"]).to_pylist()
    keep = ["dose_source", "events", "CTDIvol_max", "DLP_total", "accumulated_DLP",
            "target_regions", "exceeds"]
    ours = {pseudo.uid(r["StudyInstanceUID"]): {k: r[k] for k in keep}
            for r in reports.dose_studies(cat).to_pylist()}
    theirs = {r["StudyInstanceUID"]: {k: r[k] for k in keep}
              for r in reports.dose_studies(rcat).to_pylist()}
    assert theirs == ours and len(theirs) == truth.studies_by_modality["CT"]


def test_a_lake_made_before_dose_events_reads_and_ingests(lake_copy, archive):
    """A lake whose snapshots predate the dose_events table: the catalog shows it empty,
    the next writer creates it, and the next ingest fills it."""
    shutil.rmtree(lake_copy / "research" / "dose_events")
    for snap in layout.snapshots_dir(lake_copy).glob("*.json"):
        data = json.loads(snap.read_text())
        data["versions"].pop("dose_events", None)
        snap.write_text(json.dumps(data))
    with open_lake(lake_copy) as c:
        assert c.counts()["dose_events"] == 0
        assert reports.dose_studies(c).column("dose_source").to_pylist().count("report") == 0
    lake = Lake.open(lake_copy)
    with lake.writer("rebuild") as w:  # what an ingest does when instances changed
        w.extra.pop("summaries_from", None)
        w.publish("forget the summaries")
    ingest(lake, archive[0], fast_config())
    with open_lake(lake_copy) as c:
        assert c.counts()["dose_events"] > 0
