import pytest

from catalog import QueryError, open_lake
from lakehouse import UnknownTableError


def test_views_and_tables(cat):
    assert set(cat.tables) == {"instances", "series", "studies", "patients", "quarantine",
                               "conflicts", "ingest_runs", "dose_events", "series_geometry",
                               "image_stats", "radiomics_features", "feature_failures"}
    assert {"utilization_monthly", "repeat_exams", "dose_by_study"} <= set(cat.views)
    assert "radiomics_wide" in cat.views
    assert cat.df("SELECT count(*) AS n FROM radiomics_wide").n[0] == 0
    assert "files" not in cat.tables  # the vault is not attached by default


def test_bound_parameters(cat, truth):
    (pid, _name), *_ = truth.names.items()
    got = cat.arrow("SELECT count(*) AS n FROM patients WHERE PatientID = $pid", {"pid": pid})
    assert got.column("n").to_pylist() == [1]


def test_unknown_table_and_sql_errors(cat):
    with pytest.raises(UnknownTableError, match="nope"):
        cat.arrow("SELECT * FROM nope")
    with pytest.raises(QueryError, match="syntax error"):
        cat.arrow("SELEC 1")


def test_time_travel_to_an_earlier_snapshot(built_lake):
    with open_lake(built_lake[0], snapshot=0) as c:
        assert c.counts()["instances"] == 0
        assert c.snapshot.number == 0


def test_utilization_view_matches_studies(cat):
    total = cat.con.execute("SELECT sum(studies) FROM utilization_monthly").fetchall()[0][0]
    dated = cat.con.execute("SELECT count(*) FROM studies WHERE StudyDate IS NOT NULL"
                            ).fetchall()[0][0]
    assert total == dated
