"""DIMSE against a real Orthanc on loopback: `lake ingest dimse://` (C-FIND + C-GET) and
the C-STORE listener (`lake listen`), fed by Orthanc and by a pynetdicom sender.
(No throughput figures: C-STORE between local peers takes 60-120 ms per file here.)"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from catalog import open_lake
from etl import IngestConfig
from etl.sources import ingest_remote, parse_filters, resolve
from etl.sources.listen import Listener
from lake_cli import main
from lakehouse import Lake
from tests.listening import lake_listen, stop
from tests.pacs import free_port

CONFIG = IngestConfig(scheduler="threads", workers=2, batch_files=64)
#: columns that differ between a DIMSE copy and the file (the receiver writes the file meta)
FILE_COLUMNS = ("file_size", "file_sha256", "checksum_bytes")


def _rows(lake: Path, uids: set[str]) -> list[tuple]:
    with open_lake(lake) as cat:
        cols = [c for c in cat.table("instances").columns
                if c not in (*FILE_COLUMNS, "ingest_run_id")]
        rows = cat.table("instances").select(*[f'"{c}"' for c in cols]).fetchall()
    i = cols.index("SOPInstanceUID")
    return sorted((r for r in rows if r[i] in uids), key=repr)


def test_c_find_and_c_get_ingest_is_incremental(orthanc, built_lake, truth, tmp_path):
    wanted = orthanc.instance_uids(Modality="MG")
    n = len(wanted)
    assert n == truth.instances_by_modality["MG"] > 1
    path = tmp_path / "lake"
    lake = Lake.create(path, profile="identified")
    source = resolve(f"dimse://ORTHANC@127.0.0.1:{orthanc.dicom_port}",
                     parse_filters(["Modality=MG"]))
    pulled = ingest_remote(lake, source, CONFIG)
    assert (pulled.listed, pulled.fetched, pulled.failed) == (n, n, 0)
    assert pulled.run.outcomes["ingested"] == n and pulled.run.files_seen == n
    # the same rows as the folder ingest, but for the file's own bytes (meta header)
    assert _rows(path, wanted) == _rows(built_lake[0], wanted)
    assert len(_rows(path, wanted)) == n
    with open_lake(path) as cat:
        assert cat.con.execute("SELECT DISTINCT source_kind FROM ingest_runs").fetchall() == \
            [("dimse",)]

    again = ingest_remote(lake, source, CONFIG)
    assert (again.listed, again.already_fetched, again.fetched) == (n, n, 0)

    # the series grows by one instance: only it is retrieved (an IMAGE-level C-GET)
    ds = pydicom.dcmread(next(iter(_files_of(built_lake[0], wanted))))
    ds.SOPInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.10.1338.")
    ds.InstanceNumber = 99
    buf = tmp_path / "new.dcm"
    ds.save_as(buf)
    added = orthanc.upload(buf.read_bytes())
    assert added
    try:
        third = ingest_remote(lake, source, CONFIG)
    finally:  # the session's PACS holds the archive again
        orthanc.delete(f"/instances/{added}")
    assert (third.listed, third.already_fetched, third.fetched) == (n + 1, n, 1)
    assert third.run.outcomes["ingested"] == 1
    with open_lake(path) as cat:
        assert cat.counts()["instances"] == n + 1


def _files_of(lake: Path, uids: set[str]) -> list[str]:
    with open_lake(lake, vault=True) as cat:
        return [p for p, u in cat.con.execute(
            "SELECT path, SOPInstanceUID FROM files WHERE outcome = 'ingested' ORDER BY 1"
        ).fetchall() if u in uids]


def test_unreachable_pacs_is_one_line(tmp_path, capsys):
    path = tmp_path / "lake"
    Lake.create(path, profile="identified")
    t0 = time.monotonic()
    code = main(["ingest", f"dimse://PACS@127.0.0.1:{free_port()}", "--lake", str(path),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "C-FIND: no association, cannot connect (Connection refused)" in err
    assert time.monotonic() - t0 < 10
    code = main(["ingest", "dimse://PACS@nowhere", "--lake", str(path)])
    assert code == 1 and "expected dimse://AE_TITLE@HOST:PORT" in capsys.readouterr().err


def test_listener_ingests_what_orthanc_and_a_modality_send(orthanc, built_lake, tmp_path):
    from pynetdicom import AE

    path = tmp_path / "lake"
    lake = Lake.create(path, profile="identified")
    # a file an earlier listener received but did not ingest before it was killed
    leftover = path / "vault" / "staging" / "listen-incoming-old" / "files" / "X" / "d"
    leftover.mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), leftover / "ct.dcm")

    port = free_port()
    batches = []
    listener = Listener(lake, "LAKE", port, host="127.0.0.1", config=CONFIG,
                        batch_seconds=0.5, on_batch=batches.append)
    listener.start()
    stop = threading.Event()
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("stats", listener.run(stop)))
    t.start()
    try:
        # Orthanc pushes the DX instances (C-STORE SCU, as for a C-MOVE)
        dx = orthanc.find(Modality="DX")
        orthanc.put("/modalities/LAKE", {"AET": "LAKE", "Host": "127.0.0.1", "Port": port})
        job = orthanc.post("/modalities/LAKE/store", {"Resources": dx, "Synchronous": True})
        assert job["FailedInstancesCount"] == 0 and job["InstancesCount"] == len(dx) > 1
        # a modality sends an instance without StudyInstanceUID: received, then quarantined
        bad = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        del bad.StudyInstanceUID
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(bad.SOPClassUID, bad.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="LAKE")
        assert assoc.is_established
        assert assoc.send_c_store(bad).Status == 0x0000
        assoc.release()
    finally:
        stop.set()
        listener.wake()
        t.join(60)
    stats = result["stats"]
    assert stats.received == len(dx) + 1 and stats.refused == 0
    assert stats.associations >= 2 and stats.associations_rejected == 0
    assert (stats.ingested, stats.quarantined) == (len(dx) + 1, 1)  # DX + the leftover; the bad one
    assert stats.kept_in_staging == 1 and stats.batches == len(batches) >= 1
    with open_lake(path) as cat:
        assert cat.counts()["instances"] == len(dx) + 1
        assert cat.con.execute("SELECT reason FROM quarantine").fetchall() == \
            [("missing_uid:StudyInstanceUID",)]
        kinds = {r[0] for r in cat.con.execute("SELECT source_kind FROM ingest_runs").fetchall()}
        assert kinds == {"dimse-listen"}
    assert _rows(path, orthanc.instance_uids(Modality="DX")) == \
        _rows(built_lake[0], orthanc.instance_uids(Modality="DX"))
    staging = path / "vault" / "staging"
    kept = [p for p in staging.rglob("*") if p.is_file()]
    assert len(kept) == 1 and kept[0].parts[-5].startswith("listen-kept-")
    assert not (staging / "listen-incoming-old").exists()


def test_listen_cli_refuses_a_port_in_use(tmp_path, capsys):
    import socket

    path = tmp_path / "lake"
    Lake.create(path, profile="identified")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        code = main(["listen", "--port", str(s.getsockname()[1]), "--ae-title", "LAKE",
                     "--host", "127.0.0.1", "--lake", str(path)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "cannot listen on 127.0.0.1" in err


@pytest.mark.slow
def test_lake_listen_command_until_sigterm(tmp_path):
    """The installed command in its own process: receive, ingest, stop on SIGTERM."""
    from pynetdicom import AE

    path = tmp_path / "lake"
    Lake.create(path, profile="identified")
    with lake_listen(path) as (proc, port):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="LAKE")
        assert assoc.is_established and assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        code, out, err = stop(proc)
    assert code == 0, err
    assert "stopped: 1 instances received, 0 refused" in out and "ingested 1" in out
    with open_lake(path) as cat:
        assert cat.counts()["instances"] == 1
