"""Cohorts: specs against equivalent SQL, saving and reopening at a snapshot, drift,
the patient_timeline and series_idc views."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from pydicom.data import get_testdata_file

from catalog import cohorts, open_lake
from catalog import spec as specs
from catalog.errors import (
    CohortExistsError,
    CohortNameError,
    CohortNotFoundError,
    CohortQueryError,
    SpecError,
)
from catalog.spec import where
from etl import ingest
from lakehouse import Lake
from tests.conftest import fast_config

# (spec, the same cohort written by hand in SQL over the series / studies tables)
EQUIVALENT = [
    ({"modality": "CT"},
     "SELECT SeriesInstanceUID FROM series WHERE Modality = 'CT'"),
    ({"all": [{"modality": ["CT", "MR"]}, {"body_part": "head"}]},
     "SELECT SeriesInstanceUID FROM series WHERE Modality IN ('CT', 'MR') "
     "AND BodyPartExamined = 'HEAD'"),
    ({"any": [{"sex": "F"}, {"age": {"min": 80}}]},
     "SELECT s.SeriesInstanceUID FROM series s JOIN studies st USING (StudyInstanceUID) "
     "WHERE s.PatientSex = 'F' OR st.patient_age_years >= 80"),
    ({"all": [{"modality": "CT"}, {"not": {"text": "TOPOGRAM"}},
              {"slice_thickness": {"max": 2.5}}]},
     "SELECT SeriesInstanceUID FROM series WHERE Modality = 'CT' "
     "AND SeriesDescription NOT ILIKE '%topogram%' AND slice_thickness_max <= 2.5"),
    ({"all": [{"study_date": {"from": "2021-01-01", "to": "2022-12-31"}},
              {"manufacturer": "siemens"}, {"geometry": ["single_orientation"]}]},
     "SELECT SeriesInstanceUID FROM series WHERE StudyDate BETWEEN DATE '2021-01-01' "
     "AND DATE '2022-12-31' AND upper(Manufacturer) = 'SIEMENS' AND distinct_orientations = 1"),
    ({"all": [{"threshold": {"column": "instanceCount", "min": 10}},
              {"has_segmentation": False}]},
     "SELECT SeriesInstanceUID FROM series WHERE instanceCount >= 10"),
    # longitudinal: a study followed by one of the same modality and body part 1-31 days
    # later, for the same patient
    ({"all": [{"modality": ["CR", "DX", "CT", "MR", "US"]},
              {"followed_by": {"within_days": [1, 31],
                               "spec": {"modality": ["CR", "DX", "CT", "MR", "US"]}}}]},
     "SELECT DISTINCT a.SeriesInstanceUID FROM series a JOIN series b "
     "ON a.PatientID = b.PatientID AND a.StudyInstanceUID <> b.StudyInstanceUID "
     "WHERE a.Modality IN ('CR', 'DX', 'CT', 'MR', 'US') "
     "AND b.Modality IN ('CR', 'DX', 'CT', 'MR', 'US') "
     "AND b.StudyDate - a.StudyDate BETWEEN 1 AND 31"),
]


def _members(cat, definition):
    return cohorts.run(cat, definition).members


@pytest.mark.parametrize("spec, sql", EQUIVALENT, ids=lambda v: json.dumps(v)[:40])
def test_spec_and_equivalent_sql_give_the_same_series(cat, spec, sql):
    by_spec = _members(cat, cohorts.Definition.of(spec=spec))
    by_sql = _members(cat, cohorts.Definition.of(sql=sql))
    assert by_spec == by_sql
    assert by_spec  # every case selects something in the sample lake


@pytest.mark.parametrize("spec", [
    *(spec for spec, _ in EQUIVALENT),
    {"not": {"age": {"min": 40}}},
    {"any": [{"threshold": {"column": "patient_age_years", "max": 30}}, {"sex": "M"}]},
    {"followed_by": {"within_days": [0, 4000], "spec": {"all": [
        {"age": {"max": 90}}, {"not": {"has_segmentation": True}}]}}},
], ids=lambda v: json.dumps(v)[:40])
def test_members_query_selects_the_rows_query_series(cat, spec):
    """compile_spec(members=True) reads series alone (the age as a semi-join on studies):
    the same series as the rows of cohort_base."""
    selected = cohorts.members(cat, spec)
    assert selected == _members(cat, cohorts.Definition.of(spec=spec))
    assert 0 < len(selected) < cat.con.execute("SELECT count(*) FROM series").fetchall()[0][0]
    compiled = specs.compile_spec(spec, members=True)
    assert "cohort_base" not in compiled.sql and "ORDER BY" not in compiled.sql
    assert ("studies" in compiled.sql) == ("age" in json.dumps(spec))


def test_longitudinal_spec_finds_the_planted_repeats(cat, truth):
    spec = {"followed_by": {"within_days": [30, 31], "spec": {"modality": ["CR", "DX", "CT",
                                                                          "MR", "US", "MG"]}}}
    got = set(cohorts.run(cat, cohorts.Definition.of(spec=spec)).rows.column(
        "StudyInstanceUID").to_pylist())
    planted = {r["prior_study_uid"] for r in truth.repeats if r["days"] in (30, 31)}
    assert planted and planted <= got


def test_builder_yaml_and_dict_are_one_spec(tmp_path):
    built = (where.modality("CT") & where.body_part("CHEST") & ~where.text("topogram")
             ).followed_by(where.modality("CT"), (90, 400))
    path = tmp_path / "chest.yaml"
    path.write_text("""
all:
  - modality: CT
  - body_part: CHEST
  - not: {text: topogram}
  - followed_by:
      within_days: [90, 400]
      spec: {modality: CT}
""", encoding="utf-8")
    assert specs.load(path) == specs.normalize(built)
    assert specs.normalize(yaml.safe_load(path.read_text())) == specs.normalize(built)
    compiled = specs.compile_spec(built)
    assert compiled.params == ["CT", "CHEST", "topogram", "topogram", "CT", 90, 400]
    assert "topogram" not in compiled.sql and "CHEST" not in compiled.sql  # bound, not formatted


@pytest.mark.parametrize("spec, message", [
    ({"modality": 3}, "spec.modality: expected a modality"),
    ({"all": []}, "spec.all: expected a non-empty list"),
    ({"bodypart": "CHEST"}, "unknown criterion 'bodypart'"),
    ({"age": {"min": 90, "max": 10}}, "min 90 is greater than max 10"),
    ({"threshold": {"column": "x; DROP TABLE series", "min": 1}}, "unknown numeric column"),
    ({"study_date": {"from": "2020-13-01"}}, "expected a date YYYY-MM-DD"),
    ({"followed_by": {"within_days": [10, 5], "spec": {"modality": "CT"}}}, "0 <= lo <= hi"),
    ({"modality": "CT", "sex": "F"}, "exactly one key"),
])
def test_invalid_specs_say_what_is_wrong(spec, message):
    with pytest.raises(SpecError, match="cohort spec: .*" + message.replace("(", r"\(")
                       .replace("[", r"\[")):
        specs.normalize(spec)


def test_sql_cohorts_must_be_one_row_per_series_or_study(cat):
    with pytest.raises(CohortQueryError, match="a cohort needs one row per series"):
        cohorts.run(cat, cohorts.Definition.of(sql="SELECT Modality FROM series"))
    with pytest.raises(CohortQueryError, match="add DISTINCT or GROUP BY StudyInstanceUID"):
        cohorts.run(cat, cohorts.Definition.of(sql="SELECT StudyInstanceUID FROM series"))
    study = cohorts.run(cat, cohorts.Definition.of(
        sql="SELECT DISTINCT StudyInstanceUID FROM series WHERE Modality = 'CT'"))
    assert study.grain == "study" and study.key == "StudyInstanceUID"


def test_save_ingest_more_reopen_gives_the_saved_rows(lake_copy, tmp_path):
    saved = cohorts.save(lake_copy, "ct", spec={"modality": "CT"}, description="all CT")
    cohorts.save(lake_copy, "ct_sql", sql="SELECT * FROM series WHERE Modality = 'CT'")
    before = cohorts.open_cohort(lake_copy, "ct").rows()
    assert saved.row_count == before.num_rows > 0
    assert cohorts.names(lake_copy) == ["ct", "ct_sql"]
    assert cohorts.open_cohort(lake_copy, "ct").drift().same

    more = tmp_path / "more"
    more.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), more / "ct.dcm")
    summary = ingest(Lake.open(lake_copy), more, fast_config())
    assert summary.snapshot > saved.snapshot

    reopened = cohorts.open_cohort(lake_copy, "ct")
    assert reopened.saved == saved
    assert reopened.rows().equals(before)  # time travel: exactly the saved rows
    drift = reopened.drift()
    assert not drift.same and len(drift.added) == 1 and drift.removed == []
    with open_lake(lake_copy) as cat:
        new_uid = cat.con.execute("SELECT SeriesInstanceUID FROM series WHERE "
                                  "Modality = 'CT' AND SeriesInstanceUID NOT IN "
                                  "(SELECT unnest(?))", [before.column(
                                      "SeriesInstanceUID").to_pylist()]).fetchall()
    assert drift.added == [new_uid[0][0]]
    # vacuum keeps what published snapshots reference: the saved rows survive it
    from lakehouse.vacuum import vacuum

    vacuum(Lake.open(lake_copy), retention_hours=0)
    assert cohorts.open_cohort(lake_copy, "ct").rows().equals(before)
    # the SQL cohort (all columns) reproduces too, and both saved cohorts agree
    assert cohorts.open_cohort(lake_copy, "ct_sql").result().members_sha256 == \
        saved.members_sha256
    assert cohorts.diff(lake_copy, "ct", "ct_sql").added == []


def test_saved_file_and_store_errors(lake_copy):
    cohorts.save(lake_copy, "mr", spec=where.modality("MR"))
    data = json.loads((lake_copy / "_lake" / "cohorts" / "mr.json").read_text())
    assert data["definition"] == {"kind": "spec", "sql": None, "spec": {"modality": "MR"}}
    assert data["snapshot"] == Lake.open(lake_copy).snapshot().number
    assert len(data["rows_sha256"]) == 64 and data["grain"] == "series"
    with pytest.raises(CohortExistsError, match="--replace"):
        cohorts.save(lake_copy, "mr", spec=where.modality("MR"))
    cohorts.save(lake_copy, "mr", spec=where.modality("CT"), replace=True)
    with pytest.raises(CohortNotFoundError, match="saved cohorts: mr"):
        cohorts.load(lake_copy, "nope")
    with pytest.raises(CohortNameError):
        cohorts.save(lake_copy, "../escape", sql="SELECT 1")
    cohorts.delete(lake_copy, "mr")
    assert cohorts.names(lake_copy) == []


def test_patient_timeline_shows_the_planted_repeat_intervals(cat, truth):
    rows = {r["StudyInstanceUID"]: r for r in cat.arrow(
        "SELECT * FROM patient_timeline").to_pylist()}
    assert len(rows) == cat.con.execute(
        "SELECT count(*) FROM studies WHERE PatientID IS NOT NULL").fetchall()[0][0]
    assert truth.repeats
    for rep in truth.repeats:
        assert rows[rep["study_uid"]]["same_modality_body_part_days"] == rep["days"]
    firsts = [r for r in rows.values() if r["study_index"] == 1]
    assert all(r["days_since_previous"] is None and r["days_since_first"] == 0 for r in firsts)


def test_series_idc_has_the_columns_and_types_of_idc_index(cat):
    idc = pytest.importorskip(
        "idc_index_data", reason="idc-index-data is not installed: pip install "
        "'imaging-lakehouse[test]' to compare series_idc with IDC's series index")
    parquet = str(idc.IDC_INDEX_PARQUET_FILEPATH)
    ours = [r[:2] for r in cat.con.execute("DESCRIBE series_idc").fetchall()]
    theirs = [r[:2] for r in cat.con.execute(
        "DESCRIBE SELECT * FROM read_parquet(?)", [parquet]).fetchall()]
    assert ours == theirs
    counts = dict(cat.con.execute(
        "SELECT collection_id = 'local', count(*) FROM (SELECT * FROM series_idc "
        "UNION ALL BY NAME SELECT * FROM read_parquet(?)) GROUP BY 1", [parquet]).fetchall())
    n_series = cat.con.execute("SELECT count(*) FROM series").fetchall()[0][0]
    n_idc = cat.con.execute("SELECT count(*) FROM read_parquet(?)", [parquet]).fetchall()[0][0]
    assert counts == {True: n_series, False: n_idc}
    ct = cat.con.execute("SELECT StudyDate, SeriesNumber, sop_class_name FROM series_idc "
                         "WHERE Modality = 'CT' LIMIT 1").fetchall()[0]
    assert len(ct[0]) == 10 and ct[0][4] == "-" and ct[2] == "CT Image Storage"


DCMQI = Path(__file__).resolve().parents[3] / "shared" / "data" / "dcmqi-ct-seg"


def test_has_segmentation_on_a_real_ct_and_seg(lake_copy, tmp_path):
    if not DCMQI.is_dir():
        pytest.skip(f"the dcmqi CT + SEG test data is not at {DCMQI} (shared/data)")
    src = tmp_path / "dcmqi"
    shutil.copytree(DCMQI / "ct-3slice", src / "ct")
    shutil.copy(DCMQI / "liver.dcm", src / "liver.dcm")
    ingest(Lake.open(lake_copy), src, fast_config())
    with open_lake(lake_copy) as c:
        seg_study = c.con.execute("SELECT StudyInstanceUID FROM series WHERE Modality = 'SEG'"
                                  ).fetchall()
        assert len(seg_study) == 1
        ct_with_seg = cohorts.run(c, cohorts.Definition.of(
            spec=where.modality("CT") & where.has_segmentation())).rows
        assert ct_with_seg.column("StudyInstanceUID").to_pylist() == [seg_study[0][0]]
        assert ct_with_seg.column("instanceCount").to_pylist() == [3]
        without = cohorts.run(c, cohorts.Definition.of(
            spec=where.modality("CT") & where.has_segmentation(False))).members
        all_ct = c.con.execute("SELECT count(*) FROM series WHERE Modality = 'CT'"
                               ).fetchall()[0][0]
        assert len(without) == all_ct - 1


def test_a_saved_result_that_no_longer_reproduces_is_an_error(lake_copy):
    from catalog.errors import CohortIntegrityError

    cohorts.save(lake_copy, "ct", spec={"modality": "CT"})
    cohorts.save(lake_copy, "ct_studies",
                 sql="SELECT DISTINCT StudyInstanceUID FROM series WHERE Modality = 'CT'")
    with pytest.raises(CohortQueryError, match="compare cohorts of the same grain"):
        cohorts.diff(lake_copy, "ct", "ct_studies")
    path = lake_copy / "_lake" / "cohorts" / "ct.json"
    data = json.loads(path.read_text())
    data["rows_sha256"] = "0" * 64  # as if the snapshot's data had been rewritten
    path.write_text(json.dumps(data))
    with pytest.raises(CohortIntegrityError, match="cannot be reproduced"):
        cohorts.open_cohort(lake_copy, "ct").rows()
