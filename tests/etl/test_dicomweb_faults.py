"""A DICOMweb server whose answers break: ingest from a real Orthanc behind a real HTTP
proxy on loopback (:mod:`tests.faultproxy`) that cuts answers short, closes connections,
drops or repeats parts, or answers with a login page.

What must hold: an instance whose answer broke is fetched again (in the same run when a
new attempt succeeds, else by the next run) and never reaches the lake half-written:
no quarantine row comes from the network, every instance of the PACS ends in the lake,
and every failure is one clear line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from catalog import open_lake
from etl import IngestConfig
from etl.errors import SourceError
from etl.sources import ingest_remote, parse_filters
from etl.sources.dicomweb import DicomWebSource, _value
from etl.sources.staging import FetchState
from lake_cli import main
from lakehouse import Lake
from tests.faultproxy import FAULTS, FaultProxy, request_kind

CONFIG = IngestConfig(scheduler="threads", workers=2, batch_files=64)
MR = parse_filters(["Modality=MR"])
CUT = "an answer ended before its closing boundary (the connection was closed early)"


@pytest.fixture(scope="module")
def mr(orthanc):
    """(SOPInstanceUIDs, {SeriesInstanceUID: instance count}) of the PACS' MR images."""
    series = orthanc.post("/tools/find", {"Level": "Series", "Query": {"Modality": "MR"},
                                          "Expand": True})
    counts = {s["MainDicomTags"]["SeriesInstanceUID"]: len(s["Instances"]) for s in series}
    return orthanc.instance_uids(Modality="MR"), counts


def _source(proxy: FaultProxy, **kw) -> DicomWebSource:
    return DicomWebSource(f"{proxy.url}/dicom-web", MR, backoff=0.01, timeout=5, **kw)


def _lake(path: Path) -> tuple[set[str], list[tuple[str, int]]]:
    """(SOPInstanceUIDs, quarantine reasons and counts) of a lake."""
    with open_lake(path) as cat:
        uids = {r[0] for r in cat.con.execute("SELECT SOPInstanceUID FROM instances")
                .fetchall()}
        quarantine = cat.con.execute("SELECT reason, count(*) FROM quarantine GROUP BY 1"
                                     ).fetchall()
    return uids, quarantine


def _first_attempt(fault: str, kinds: tuple[str, ...]):
    """A plan: ``fault`` on the first request of each path of the given kinds."""
    seen: set[str] = set()

    def plan(path: str, n: int) -> str | None:
        if request_kind(path) in kinds and path not in seen:
            seen.add(path)
            return fault
        return None
    return plan


@pytest.mark.parametrize("fault", ["close", "no-close", "short", "chunked-cut"])
def test_series_answers_cut_short_are_made_again_and_never_staged(orthanc, mr, tmp_path,
                                                                   fault):
    uids, series = mr
    with FaultProxy(orthanc.url, _first_attempt(fault, ("series",)), seed=3) as proxy:
        lake = Lake.create(tmp_path / "lake", profile="identified")
        pulled = ingest_remote(lake, _source(proxy), CONFIG)
        assert proxy.applied == {fault: len(series)}
    assert (pulled.listed, pulled.fetched, pulled.failed) == (len(uids), len(uids), 0)
    # the parts before the cut were staged and are written again, under the same names
    assert pulled.run.outcomes == {"ingested": len(uids), "duplicate": 0, "conflict": 0,
                                   "skipped": 0, "quarantined": 0}
    assert _lake(tmp_path / "lake") == (uids, [])


def test_instance_answers_cut_short_are_made_again(orthanc, mr, tmp_path):
    uids, series = mr
    lake = Lake.create(tmp_path / "lake", profile="identified")
    # one instance of each series fetched before: the others are fetched one by one
    state = FetchState.load(lake, f"dicomweb+{orthanc.url}/dicom-web")
    with FaultProxy(orthanc.url, _first_attempt("close", ("instance",)), seed=4) as proxy:
        source = _source(proxy)
        listed = list(source.list_instances())
        first = {}
        for _study, se, sop in listed:
            first.setdefault(se, sop)
        state = FetchState.load(lake, source.key)
        state.fetched = dict.fromkeys(first.values(), "before")
        state.save()
        pulled = ingest_remote(lake, source, CONFIG)
        n = len(uids) - len(series)
        assert proxy.applied == {"close": n}
    assert (pulled.listed, pulled.already_fetched, pulled.fetched, pulled.failed) == \
        (len(uids), len(series), n, 0)
    assert _lake(tmp_path / "lake") == (uids - set(first.values()), [])


def test_a_series_that_always_breaks_off_is_fetched_by_the_next_run(orthanc, mr, tmp_path):
    uids, series = mr
    broken = sorted(series)[0]
    k = series[broken]

    def plan(path: str, n: int) -> str | None:
        return "close" if request_kind(path) == "series" and broken in path else None

    with FaultProxy(orthanc.url, plan, seed=5) as proxy:
        lake = Lake.create(tmp_path / "lake", profile="identified")
        pulled = ingest_remote(lake, _source(proxy), CONFIG)
        assert proxy.applied == {"close": 4}  # every attempt
        assert (pulled.fetched, pulled.failed) == (len(uids) - k, k)
        state = json.loads(Path(pulled.state_file).read_text())
        assert list(state["failed"].values()) == [f"{CUT}, after 4 attempts"] * k
        # the parts before each cut were complete: they are in the lake, nothing was
        # quarantined, and they are fetched again next time (duplicates)
        got, quarantine = _lake(tmp_path / "lake")
        assert quarantine == [] and got <= uids
        proxy.plan = lambda path, n: None  # the network mends
        again = ingest_remote(lake, _source(proxy), CONFIG)
    assert (again.already_fetched, again.fetched, again.failed) == (len(uids) - k, k, 0)
    assert again.run.outcomes["ingested"] + again.run.outcomes["duplicate"] == k
    assert _lake(tmp_path / "lake") == (uids, [])
    assert json.loads(Path(again.state_file).read_text())["failed"] == {}


def test_random_faults_lose_nothing_and_quarantine_nothing(orthanc, mr, tmp_path):
    """Any answer may break (seeded): runs go on until one fetches everything; then the
    lake holds exactly the PACS' instances and nothing the network damaged."""
    uids, _series = mr
    # content damaged inside intact framing ("garbage") cannot be told by HTTP; a stall
    # is a read timeout that urllib3 retries (slow to test)
    faults = [f for f in FAULTS if f not in ("garbage", "stall")]
    rng = random.Random(11)

    def plan(path: str, n: int) -> str | None:
        return rng.choice(faults) if rng.random() < 0.4 else None

    lake = Lake.create(tmp_path / "lake", profile="identified")
    errors, runs = [], 0
    with FaultProxy(orthanc.url, plan, seed=12) as proxy:
        while runs < 10:
            runs += 1
            try:
                pulled = ingest_remote(lake, _source(proxy), CONFIG)
            except SourceError as exc:
                errors.append(str(exc))
                continue
            if pulled.failed == 0:
                break
        applied = proxy.applied
    assert _lake(tmp_path / "lake") == (uids, [])
    state = json.loads(Path(pulled.state_file).read_text())
    assert set(state["failed"]) == set() and set(state["fetched"]) == uids
    assert not list((tmp_path / "lake" / "vault" / "staging").rglob("*.dcm"))
    assert all("\n" not in e and "unexpected" not in e for e in errors), errors
    assert sum(applied.values()) >= 15 and len(applied) >= 7, applied


def test_a_login_page_instead_of_dicomweb_is_one_line(orthanc, tmp_path, capsys):
    path = tmp_path / "lake"
    Lake.create(path, profile="identified")
    with FaultProxy(orthanc.url, lambda path, n: "html") as proxy:
        code = main(["ingest", f"dicomweb+{proxy.url}/dicom-web", "--lake", str(path),
                     "--no-progress"])
        assert proxy.applied == {"html": 4}  # the search, made again three times
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.endswith("the server's search answer is not valid JSON, after 4 attempts "
                        "(cut short, or not a DICOMweb service at this URL?)\n")


def test_a_login_page_instead_of_an_instance_is_retried_next_run(orthanc, mr, tmp_path):
    uids, series = mr
    k = len(series) // 2
    broken = sorted(series)[:k]

    def plan(path: str, n: int) -> str | None:
        return "html" if request_kind(path) == "series" and \
            any(se in path for se in broken) else None

    with FaultProxy(orthanc.url, plan) as proxy:
        lake = Lake.create(tmp_path / "lake", profile="identified")
        pulled = ingest_remote(lake, _source(proxy), CONFIG)
        assert proxy.applied == {"html": k}  # a whole answer: not made again
        lost = sum(series[se] for se in broken)
        assert (pulled.fetched, pulled.failed) == (len(uids) - lost, lost)
        state = json.loads(Path(pulled.state_file).read_text())
        assert set(state["failed"].values()) == {
            "the server answered text/html, not DICOM (a login page or a proxy in the way?)"}
        proxy.plan = lambda path, n: "html" if request_kind(path) == "series" else None
        with pytest.raises(SourceError) as err:  # nothing at all could be fetched
            ingest_remote(lake, _source(proxy), CONFIG)
        assert str(err.value).endswith("no instance could be fetched (the server answered "
                                       "text/html, not DICOM (a login page or a proxy in the "
                                       "way?))")
        # that run left nothing in the vault's staging, and remembered nothing
        assert list((tmp_path / "lake" / "vault" / "staging").iterdir()) == []
        assert json.loads(Path(pulled.state_file).read_text()) == state
        proxy.plan = lambda path, n: None
        again = ingest_remote(lake, _source(proxy), CONFIG)
    assert (again.already_fetched, again.fetched, again.failed) == (len(uids) - lost, lost, 0)
    assert _lake(tmp_path / "lake") == (uids, [])


def test_a_damaged_state_file_is_one_line(orthanc, tmp_path, capsys):
    path = tmp_path / "lake"
    lake = Lake.create(path, profile="identified")
    url = f"dicomweb+{orthanc.dicomweb}"
    state = FetchState.load(lake, url)
    state.save()
    where = Path(state.path)
    for damage in (b'{"fetched": {"1.2.3": "run"', b"\xff\xfe", b'["not", "a", "state"]'):
        where.write_bytes(damage)
        code = main(["ingest", url, "--lake", str(path), "--no-progress",
                     "--filter", "Modality=MR"])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1, err
        assert str(where) in err and "move" in err and "Traceback" not in err
    assert not list((path / "vault").rglob("staging/*"))  # nothing was fetched


def test_search_results_without_a_usable_uid_are_left_out():
    assert _value({"00080018": {"vr": "UI", "Value": ["1.2.840.5"]}}, "00080018") == \
        "1.2.840.5"
    assert _value({"00080018": {"vr": "UI", "Value": ["1.2.3 \x00"]}}, "00080018") == "1.2.3"
    for item in ({}, {"00080018": {"vr": "UI"}}, {"00080018": {"vr": "UI", "Value": []}},
                 {"00080018": {"vr": "UI", "Value": [None]}},
                 {"00080018": {"vr": "UI", "Value": [12]}}, {"00080018": "1.2"},
                 {"00080018": {"vr": "UI", "Value": ["1.2/../../studies"]}},
                 {"00080018": {"vr": "UI", "Value": ["1.2?x=1"]}}):
        assert _value(item, "00080018") is None, item
    with pytest.raises(Exception, match="not a list of DICOM JSON objects"):
        _value("00080018", "00080018")
