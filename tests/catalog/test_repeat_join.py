"""repeat_exams_for (a join of the exams whose patient and keys are seen twice, on a hash
of them) against a window over each patient's exams, written out here, on a random lake
for several definitions: every study's flag, prior, prior date and time, and days."""

from __future__ import annotations

import pytest

from catalog import open_lake, reports
from tests.catalog.test_repeat_rules import _bench_module

DEFINITIONS = [
    reports.RepeatDefinition(),
    reports.RepeatDefinition(window_days=0),
    reports.RepeatDefinition(window_days=31),
    reports.RepeatDefinition(window_days=400),
    reports.RepeatDefinition(match=("Modality",)),
    reports.RepeatDefinition(match=("Modality", "BodyPartExamined", "StationName")),
    reports.RepeatDefinition(match=("hour",)),  # an integer key, NULL-free in this lake
    reports.RepeatDefinition(exclude_localizers=False, exclude_derived=False,
                             exclude_secondary=False, exclude_non_image=False),
]


@pytest.fixture(scope="module")
def random_lake(tmp_path_factory):
    bench = _bench_module()
    path = tmp_path_factory.mktemp("repeat-join") / "lake"
    bench.build_lake(path, 3_000, seed=11, log=lambda _msg: None)
    with open_lake(path) as cat:
        yield cat


def by_window(cat, d: reports.RepeatDefinition) -> set[tuple]:
    """Each exam's immediate predecessor among the exams of its patient and keys (a LAG
    in the documented order), kept when it lies within the window."""
    keys = ", ".join(f'"{k}"' for k in d.match)  # names from DEFINITIONS above
    not_null = " AND ".join(f'"{k}" IS NOT NULL' for k in d.match)
    sql = f"""
    WITH e AS (FROM exam_studies(exclude_localizers := $l, exclude_derived := $d,
                                 exclude_secondary := $s, exclude_non_image := $n)),
    ordered AS (
        SELECT StudyInstanceUID, lag(StudyInstanceUID) OVER w AS p_uid,
               lag(StudyDate) OVER w AS p_date, lag(StudyTime) OVER w AS p_time
        FROM e
        WHERE PatientID IS NOT NULL AND StudyDate IS NOT NULL AND {not_null}
        WINDOW w AS (PARTITION BY PatientID, {keys}
                     ORDER BY StudyDate, StudyTime NULLS FIRST, StudyInstanceUID)
    )
    SELECT e.StudyInstanceUID, coalesce(o.p_date >= e.StudyDate - $w, false) AS is_repeat,
           CASE WHEN o.p_date >= e.StudyDate - $w THEN o.p_uid END,
           CASE WHEN o.p_date >= e.StudyDate - $w THEN o.p_date END,
           CASE WHEN o.p_date >= e.StudyDate - $w THEN o.p_time END,
           CASE WHEN o.p_date >= e.StudyDate - $w THEN e.StudyDate - o.p_date END
    FROM e LEFT JOIN ordered o USING (StudyInstanceUID)
    """
    params = {"l": d.exclude_localizers, "d": d.exclude_derived, "s": d.exclude_secondary,
              "n": d.exclude_non_image, "w": d.window_days}
    return set(cat.con.execute(sql, params).fetchall())


@pytest.mark.parametrize("definition", DEFINITIONS, ids=lambda d: repr(d)[17:-1])
def test_repeat_exams_equal_a_window_over_each_patient(random_lake, definition):
    got = reports.repeat_exams(random_lake, definition)
    rows = set(zip(*(got.column(c).to_pylist() for c in (
        "StudyInstanceUID", "is_repeat", "prior_study_uid", "prior_study_date",
        "prior_study_time", "days_since_prior")), strict=True))
    expected = by_window(random_lake, definition)
    assert len(rows) == got.num_rows == len(expected)
    assert rows == expected
    repeats = sum(r[1] for r in rows)
    assert repeats > (0 if definition.window_days == 0 else 10)  # not a vacuous comparison
    # the rates count the same repeats
    rates = reports.repeat_rates(random_lake, by=["Modality"], definition=definition)
    assert sum(rates.column("repeats").to_pylist()) == repeats
    assert sum(rates.column("studies").to_pylist()) == got.num_rows


def test_same_day_repeats_are_in_the_random_lake(random_lake):
    """The window-0 case above is not empty: same-day repeats (ordered by time)."""
    same_day = reports.repeat_exams(random_lake, reports.RepeatDefinition(window_days=0))
    assert 0 < sum(same_day.column("is_repeat").to_pylist()) < 50
