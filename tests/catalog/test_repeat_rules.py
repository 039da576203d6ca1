"""The repeat-exam rules on a hand-made lake: ties, missing values, exclusions, the window,
and the pandas implementation of bench/analytics.py agreeing with the SQL on a random lake."""

from __future__ import annotations

import datetime as dt
import importlib.util
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog import open_lake, reports
from catalog.errors import QueryError
from lakehouse import Lake

D = dt.date(2024, 3, 1)
LOCALIZER = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
AXIAL = ["ORIGINAL", "PRIMARY", "AXIAL"]
DERIVED = ["DERIVED", "PRIMARY", "MPR"]
SC = "1.2.840.10008.5.1.4.1.1.7"
CT = "1.2.840.10008.5.1.4.1.1.2"

# (study uid, patient, modality, body part, date, time, [(ImageType, SOP class, Modality)])
STUDIES = [
    # same patient, same day, same time: ordered by UID as text ("1.10" < "1.3" < "1.4")
    ("1.3", "P1", "CT", "HEAD", D, "10:00:00", [(AXIAL, CT, "CT")]),
    ("1.10", "P1", "CT", "HEAD", D, "10:00:00", [(AXIAL, CT, "CT")]),
    ("1.4", "P1", "CT", "HEAD", D, "10:00:00", [(AXIAL, CT, "CT")]),
    # a study without a time sorts before the timed ones of its day
    ("2.1", "P2", "CT", "CHEST", D, "08:00:00", [(AXIAL, CT, "CT")]),
    ("2.2", "P2", "CT", "CHEST", D, None, [(AXIAL, CT, "CT")]),
    # a missing body part never matches
    ("3.1", "P3", "CT", None, D, "09:00:00", [(AXIAL, CT, "CT")]),
    ("3.2", "P3", "CT", None, D + dt.timedelta(days=1), "09:00:00", [(AXIAL, CT, "CT")]),
    # only a localizer, only derived images, only a secondary capture: not exams by default
    ("4.1", "P4", "CT", "PELVIS", D, "09:00:00", [(AXIAL, CT, "CT")]),
    ("4.2", "P4", "CT", "PELVIS", D + dt.timedelta(days=2), "09:00:00",
     [(LOCALIZER, CT, "CT")]),
    ("4.3", "P4", "CT", "PELVIS", D + dt.timedelta(days=3), "09:00:00", [(DERIVED, CT, "CT")]),
    ("4.4", "P4", "CT", "PELVIS", D + dt.timedelta(days=4), "09:00:00", [(AXIAL, SC, "CT")]),
    # a localizer and images: an exam, 10 days after 4.1
    ("4.5", "P4", "CT", "PELVIS", D + dt.timedelta(days=10), "09:00:00",
     [(LOCALIZER, CT, "CT"), (AXIAL, CT, "CT")]),
    # other patient, same keys and day: not a repeat
    ("5.1", "P5", "CT", "PELVIS", D + dt.timedelta(days=10), "09:00:00", [(AXIAL, CT, "CT")]),
]


def kind(image_type: list[str], sop_class: str, modality: str) -> int:
    """studies.instance_kinds' kind of one instance, written out independently of the SQL."""
    return (("LOCALIZER" in image_type) + 2 * ("DERIVED" in image_type)
            + 4 * ("SECONDARY" in image_type or sop_class == SC or sop_class.startswith(SC + "."))
            + 8 * (modality in ("SR", "KO", "PR", "REG", "SEG", "RTSTRUCT", "DOC")))


#: how the studies table holds instance_kinds: as the summary writes it; null (a lake
#: summarized before the column existed, then rewritten); absent from the files (the
#: files of such a lake): the exclusions give the same exams in each case
KINDS = ("written", "null", "absent")


@pytest.fixture(scope="module", params=KINDS)
def small(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("rules") / "lake"
    lake = Lake.create(path)
    studies, instances = [], []
    for uid, patient, mod, part, date, time, images in STUDIES:
        kinds = 0
        for image_type, sop_class, modality in images:
            kinds |= 1 << kind(image_type, sop_class, modality)
        studies.append({"StudyInstanceUID": uid, "PatientID": patient, "Modality": mod,
                        "BodyPartExamined": part, "StudyDate": date, "StudyTime": time,
                        "series_count": 1, "instance_count": len(images),
                        "instance_kinds": kinds if request.param == "written" else None,
                        "study_year": date.year})
        for i, (image_type, sop_class, modality) in enumerate(images, start=1):
            instances.append({"StudyInstanceUID": uid, "SeriesInstanceUID": f"{uid}.1",
                              "SOPInstanceUID": f"{uid}.1.{i}", "PatientID": patient,
                              "Modality": modality, "BodyPartExamined": part,
                              "StudyDate": date, "ImageType": image_type,
                              "SOPClassUID": sop_class, "study_year": date.year})
    with lake.writer("hand-made") as w:
        w.append("studies", pa.Table.from_pylist(studies))
        w.append("instances", pa.Table.from_pylist(instances))
        w.publish()
    if request.param == "absent":  # files written before the column was declared
        for f in (path / "research" / "studies").rglob("*.parquet"):
            pq.write_table(pq.read_table(f).drop_columns(["instance_kinds"]), f)
    with open_lake(path) as cat:
        assert cat.con.execute("SELECT count(instance_kinds) FROM studies").fetchall() == [
            (len(STUDIES) if request.param == "written" else 0,)]
        assert ("instance_kinds" in cat.con.table("_delta_studies").columns) == (
            request.param != "absent")
        yield cat


def flags(cat, definition=reports.DEFAULT_REPEATS) -> dict[str, tuple]:
    t = reports.repeat_exams(cat, definition)
    return {r["StudyInstanceUID"]: (r["is_repeat"], r["prior_study_uid"], r["days_since_prior"])
            for r in t.to_pylist()}


def test_ties_nulls_and_exclusions(small):
    got = flags(small)
    assert got == {
        "1.10": (False, None, None), "1.3": (True, "1.10", 0), "1.4": (True, "1.3", 0),
        "2.2": (False, None, None), "2.1": (True, "2.2", 0),
        "3.1": (False, None, None), "3.2": (False, None, None),
        "4.1": (False, None, None), "4.5": (True, "4.1", 10),
        "5.1": (False, None, None),
    }


def test_exclusions_are_parameters(small):
    keep_all = reports.RepeatDefinition(exclude_localizers=False, exclude_derived=False,
                                        exclude_secondary=False)
    got = flags(small, keep_all)
    assert {k: v for k, v in got.items() if k.startswith("4.")} == {
        "4.1": (False, None, None), "4.2": (True, "4.1", 2), "4.3": (True, "4.2", 1),
        "4.4": (True, "4.3", 1), "4.5": (True, "4.4", 6)}
    only_derived_kept = reports.RepeatDefinition(exclude_derived=False)
    got = flags(small, only_derived_kept)
    assert got["4.3"] == (True, "4.1", 3) and "4.2" not in got and "4.4" not in got


def test_window_and_matching(small):
    assert flags(small, reports.RepeatDefinition(window_days=9))["4.5"] == (False, None, None)
    assert flags(small, reports.RepeatDefinition(window_days=10))["4.5"] == (True, "4.1", 10)
    # matching on Modality alone lets the missing body parts match each other
    got = flags(small, reports.RepeatDefinition(match=("Modality",)))
    assert got["3.2"] == (True, "3.1", 1)
    rates = reports.repeat_rates(small, by=["PatientID"]).to_pylist()
    assert {r["PatientID"]: (r["studies"], r["repeats"]) for r in rates} == {
        "P1": (3, 2), "P2": (2, 1), "P3": (2, 0), "P4": (2, 1), "P5": (1, 0)}


def _bench_module():
    path = Path(__file__).resolve().parents[2] / "bench" / "analytics.py"
    spec = importlib.util.spec_from_file_location("bench_analytics", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_instances_are_read_only_for_studies_without_kinds(small, tmp_path):
    """Where every study has instance_kinds, the repeat exams never read `instances`: the
    catalog empties legacy_kind_instances when it opens, and queries keep working once the
    instances files are gone; where studies lack it, their instances are read."""
    copy = tmp_path / "lake"
    shutil.copytree(small.lake.root, copy)
    written = small.con.execute("SELECT count(instance_kinds) FROM studies").fetchall()[0][0] > 0
    with open_lake(copy) as cat:
        before = flags(cat)
        legacy = cat.con.execute(
            "SELECT StudyInstanceUID FROM legacy_kind_instances ORDER BY 1").fetchall()
        # the localizer of 4.2 and of 4.5, the derived 4.3, the secondary capture 4.4
        assert legacy == ([] if written else [("4.2",), ("4.3",), ("4.4",), ("4.5",)])
        for f in (copy / "research" / "instances").rglob("*.parquet"):
            f.unlink()
        if written:
            assert flags(cat) == before
            assert reports.repeat_rates(cat, by=["Modality"]).column("repeats").to_pylist() \
                == [4]
        else:
            with pytest.raises(QueryError):
                flags(cat)


def test_sql_agrees_with_an_independent_pandas_version(tmp_path):
    """bench/analytics.py's pandas computation on a random 5,000-study lake."""
    bench = _bench_module()
    built = bench.build_lake(tmp_path / "lake", 5_000, seed=3, log=lambda _msg: None)
    assert built["instances"] > 50_000
    lake = Lake.open(tmp_path / "lake")
    with open_lake(tmp_path / "lake") as cat:
        duck_rates = reports.repeat_rates(cat, by=["Modality", "month"])
        duck_util = reports.utilization(cat, by=["month", *bench.ROLLUP])
    pd_rates = bench.pandas_repeats(bench.pandas_load_repeats(lake))
    pd_util = bench.pandas_rollup(bench.pandas_load_rollup(lake))
    check = bench.agree(duck_rates, pd_rates, duck_util, pd_util)
    assert check["rates"] and check["rollup"] and check["repeats"] > 100
