"""DICOMweb ingest against a real Orthanc on loopback: QIDO-RS lists, WADO-RS fetches the
exact bytes, the folder pipeline ingests them; incremental; clear errors."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from catalog import open_lake
from etl import IngestConfig
from etl.sources import ingest_remote, parse_filters, resolve
from lake_cli import main
from lakehouse import Lake
from tests.etl.cluster import lake_content
from tests.pacs import free_port

CONFIG = IngestConfig(scheduler="threads", workers=2, batch_files=64)


def _uids(lake: Path, where: str = "TRUE", params: list | None = None) -> set[str]:
    with open_lake(lake) as cat:
        return {r[0] for r in cat.con.execute(
            f"SELECT SOPInstanceUID FROM instances WHERE {where}", params or []).fetchall()}


def test_dicomweb_ingest_equals_the_folder_ingest_and_is_incremental(orthanc, built_lake,
                                                                     tmp_path):
    in_pacs = orthanc.instance_uids()
    assert len(in_pacs) > 100
    path = tmp_path / "lake"
    lake = Lake.create(path, profile="identified")
    pulled = ingest_remote(lake, resolve(f"dicomweb+{orthanc.dicomweb}"), CONFIG)
    assert (pulled.listed, pulled.already_fetched, pulled.fetched, pulled.failed) == \
        (len(in_pacs), 0, len(in_pacs), 0)
    run = pulled.run
    assert run.files_seen == len(in_pacs)
    assert run.outcomes == {"ingested": len(in_pacs), "duplicate": 0, "conflict": 0,
                            "skipped": 0, "quarantined": 0}
    assert _uids(path) == in_pacs
    # the bytes WADO-RS delivered are the files' bytes: every row equals the folder lake's
    ours = lake_content(path)["instances"]
    folder = [r for r in lake_content(built_lake[0])["instances"]
              if any(v in in_pacs for v in r if isinstance(v, str))]
    assert ours == folder
    with open_lake(path) as cat:
        assert cat.con.execute("SELECT source_kind FROM ingest_runs").fetchall() == \
            [("dicomweb",)]
    # staging lived in the vault and is gone (everything was ingested)
    assert pulled.staging is None and pulled.kept_in_staging == 0
    assert list((path / "vault" / "staging").iterdir()) == []
    with open_lake(path, vault=True) as cat:
        paths = [r[0] for r in cat.con.execute("SELECT path FROM files").fetchall()]
    assert all(p.startswith(str(path / "vault" / "staging")) for p in paths)

    # a second run fetches nothing
    again = ingest_remote(lake, resolve(f"dicomweb+{orthanc.dicomweb}"), CONFIG)
    assert (again.listed, again.already_fetched, again.fetched) == \
        (len(in_pacs), len(in_pacs), 0)
    assert again.run.files_seen == 0 and sum(again.run.outcomes.values()) == 0

    # a new instance in the PACS: only it is fetched
    added = orthanc.upload(Path(get_testdata_file("MR_small.dcm")).read_bytes())
    assert added
    try:
        third = ingest_remote(lake, resolve(f"dicomweb+{orthanc.dicomweb}"), CONFIG)
    finally:  # the session's PACS holds the archive again
        orthanc.delete(f"/instances/{added}")
    assert (third.listed, third.already_fetched, third.fetched) == \
        (len(in_pacs) + 1, len(in_pacs), 1)
    assert third.run.outcomes["ingested"] == 1
    assert len(_uids(path)) == len(in_pacs) + 1
    state = json.loads(Path(third.state_file).read_text())
    assert len(state["fetched"]) == len(in_pacs) + 1 and state["failed"] == {}
    assert Path(third.state_file).is_relative_to(path / "vault")


def test_cli_filters_and_since(orthanc, built_lake, tmp_path, capsys):
    in_pacs = orthanc.instance_uids()
    path = tmp_path / "lake"
    Lake.create(path, profile="identified")
    code = main(["ingest", f"dicomweb+{orthanc.dicomweb}", "--lake", str(path),
                 "--filter", "Modality=CT", "--since", "2022-01-01", "--scheduler", "threads",
                 "--json", "--no-progress"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    expected = _uids(built_lake[0], "Modality = 'CT' AND StudyDate >= DATE '2022-01-01'") \
        & in_pacs
    assert 0 < len(expected) < len(in_pacs)
    assert out["listed"] == out["fetched"] == len(expected)
    assert out["run"]["outcomes"]["ingested"] == len(expected)
    assert _uids(path) == expected
    code = main(["ingest", f"dicomweb+{orthanc.dicomweb}", "--lake", str(path),
                 "--filter", "Modality=CT", "--since", "2022-01-01", "--no-progress"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0] == (f"dicomweb dicomweb+{orthanc.dicomweb}: {len(expected)} listed, "
                        f"{len(expected)} fetched before, 0 fetched now in "
                        f"{lines[0].rsplit(' in ', 1)[1]}")
    assert lines[1].startswith("run ") and " 0 files seen " in lines[1]


def test_filters_are_validated():
    assert parse_filters(["Modality=MR", "BodyPartExamined=HEAD"], "2020-02-03") == (
        ("BodyPartExamined", "HEAD"), ("Modality", "MR"), ("StudyDate", "20200203-"))
    for bad, since, message in ((["Modalty=CT"], None, "not a DICOM keyword"),
                                (["Modality"], None, "expected KEY=VALUE"),
                                ([], "03/02/2020", "expected a date")):
        try:
            parse_filters(bad, since)
        except Exception as exc:
            assert message in str(exc)
        else:
            raise AssertionError(f"{bad} {since} accepted")


def test_unreachable_server_is_one_line(tmp_path, capsys):
    path = tmp_path / "lake"
    Lake.create(path, profile="identified")
    url = f"dicomweb+http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    t0 = time.monotonic()
    code = main(["ingest", url, "--lake", str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "cannot connect after 4 attempts" in err and "is the server running" in err
    assert time.monotonic() - t0 < 10
    assert not (path / "vault" / "staging").exists()  # nothing staged, nothing ingested


def test_a_refusing_server_is_one_line(orthanc, tmp_path, capsys):
    path = tmp_path / "lake"
    Lake.create(path, profile="identified")
    code = main(["ingest", f"dicomweb+{orthanc.url}/not-dicom-web", "--lake", str(path),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "HTTP 404" in err and "no DICOMweb service at this URL" in err


@pytest.mark.slow
def test_research_lake_from_dicomweb_keeps_originals_in_the_vault(orthanc, tmp_path):
    path = tmp_path / "lake"
    key = tmp_path / "lake.key"
    lake = Lake.create(path, key_file=key)
    pulled = ingest_remote(lake, resolve(f"dicomweb+{orthanc.dicomweb}",
                                         parse_filters(["Modality=MR"])), CONFIG, key_file=key)
    assert pulled.fetched > 0 and pulled.run.outcomes["ingested"] == pulled.fetched
    originals = set(json.loads(Path(pulled.state_file).read_text())["fetched"])
    research = b"".join(Path(d, f).read_bytes() for d, _, fs in os.walk(path / "research")
                        for f in fs)
    assert not any(uid.encode() in research for uid in originals)
    assert all(u.startswith("2.25.") for u in _uids(path))


class _FlakyProxy:
    """A real HTTP server on loopback in front of Orthanc: answers 503 to the first
    ``unavailable`` requests, 500 to the retrieval of series ``broken``, and forwards
    everything else."""

    def __init__(self, target: str, unavailable: int = 0, broken: str | None = None):
        import http.server
        import threading
        import urllib.request

        self.requests = 0
        self.unavailable, self.broken = unavailable, broken
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                proxy.requests += 1
                if proxy.requests <= proxy.unavailable:
                    self.send_error(503)
                    return
                if proxy.broken and self.path.endswith(f"/series/{proxy.broken}"):
                    self.send_error(500)
                    return
                req = urllib.request.Request(target + self.path,
                                             headers={"Accept": self.headers["Accept"] or "*/*"})
                with urllib.request.urlopen(req, timeout=30) as r:
                    body = r.read()
                    self.send_response(r.status)
                    self.send_header("Content-Type", r.headers["Content-Type"])
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_retries_with_backoff_and_failed_instances_are_retried_next_run(orthanc, tmp_path):
    uids = orthanc.instance_uids(Modality="MR")
    n = len(uids)
    series = orthanc.post("/tools/find", {"Level": "Series", "Query": {"Modality": "MR"},
                                          "Expand": True})
    broken = series[0]["MainDicomTags"]["SeriesInstanceUID"]
    k = len(series[0]["Instances"])
    assert 1 < k < n
    proxy = _FlakyProxy(orthanc.url, unavailable=2, broken=broken)
    try:
        path = tmp_path / "lake"
        lake = Lake.create(path, profile="identified")
        source = resolve(f"dicomweb+{proxy.url}/dicom-web", parse_filters(["Modality=MR"]))
        t0 = time.monotonic()
        pulled = ingest_remote(lake, source, CONFIG)
        # two 503s were retried (0.25 s, then 0.5 s later); the broken series failed
        # after 4 attempts and is not lost: its instances are listed for the next run
        assert time.monotonic() - t0 >= 0.75
        assert (pulled.listed, pulled.fetched, pulled.failed) == (n, n - k, k)
        assert pulled.run.outcomes["ingested"] == n - k
        state = json.loads(Path(pulled.state_file).read_text())
        assert len(state["failed"]) == k
        assert all("HTTP 500" in e for e in state["failed"].values())
        proxy.broken = None  # the server recovers
        again = ingest_remote(lake, source, CONFIG)
        assert (again.listed, again.already_fetched, again.fetched, again.failed) == \
            (n, n - k, k, 0)
        assert again.run.outcomes["ingested"] == k
        assert json.loads(Path(again.state_file).read_text())["failed"] == {}
        assert _uids(path) == uids
    finally:
        proxy.close()
