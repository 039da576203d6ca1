"""`lake ingest dimse+tls://` against a real Orthanc whose DICOM port speaks TLS only and
asks for a certificate our test CA signed (and `dicomweb+https://` through an HTTPS proxy
in front of it that asks the same): with ours, the pull ingests what it holds; without
one, with the system's CAs only, or in plain TCP, one line says why."""

from __future__ import annotations

import urllib.error

import pytest
from pydicom.data import get_testdata_file

from etl.sources.tls import server_context
from lake_cli import main
from lakehouse import Lake
from tests.faultproxy import FaultProxy
from tests.pacs import orthanc_missing, run_orthanc
from tests.tlscerts import Certs, make_certs


@pytest.fixture(scope="module")
def tls_orthanc(tmp_path_factory):
    why = orthanc_missing()
    if why:
        pytest.skip(why)
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    with run_orthanc(tls=certs.folder) as server:
        for name in ("CT_small.dcm", "MR_small.dcm"):
            with open(get_testdata_file(name), "rb") as fh:
                assert server.upload(fh.read())
        yield server, certs


def _ingest(capsys, url: str, lake, *options: str) -> tuple[int, str, str]:
    code = main(["ingest", url, "--lake", str(lake), "--no-progress", *options])
    out, err = capsys.readouterr()
    return code, out, err


def test_dimse_over_tls(tls_orthanc, tmp_path, capsys):
    server, certs = tls_orthanc
    certs: Certs
    path = tmp_path / "lake"
    Lake.create(path, profile="identified")
    url = f"dimse+tls://ORTHANC@127.0.0.1:{server.dicom_port}"
    ca = ["--tls-ca", str(certs.pem("ca"))]
    mine = ["--tls-cert", str(certs.pem("client")), "--tls-key", str(certs.key("client"))]

    code, out, err = _ingest(capsys, url, path, *ca)  # no certificate of ours
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert "C-FIND: no association, the TLS handshake failed (" in err
    assert "certificate required" in err or "handshake failure" in err or \
        "the PACS closed the connection during the handshake (does it ask for a " \
        "certificate of ours?)" in err, err

    code, out, err = _ingest(capsys, url, path, *mine)  # the system's CAs only
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert "the TLS handshake failed (the PACS' certificate: " in err, err
    assert "unable to get local issuer certificate" in err or "self-signed" in err, err

    code, out, err = _ingest(capsys, url.replace("dimse+tls", "dimse"), path)  # plain TCP
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert "C-FIND: the association was aborted by the peer" in err

    code, out, err = _ingest(capsys, url.replace("dimse+tls", "dimse"), path, *ca)
    assert (code, err) == (1, "lake ingest: error: --tls-ca, --tls-cert and --tls-key apply "
                              "to dimse+tls:// and dicomweb+https:// sources\n")

    code, out, err = _ingest(capsys, url, path, *ca, *mine)
    assert code == 0, err
    assert "2 listed, 0 fetched before, 2 fetched now" in out, out
    assert "ingested 2, duplicate 0, conflict 0, skipped 0, quarantined 0" in out
    assert Lake.open(path).read("instances").num_rows == 2


def test_dicomweb_over_https(tls_orthanc, tmp_path, capsys):
    """The same Orthanc's DICOMweb behind an HTTPS proxy that asks for a certificate our
    CA signed (Orthanc's own HTTPS is not usable here)."""
    server, certs = tls_orthanc
    path = tmp_path / "lake"
    Lake.create(path, profile="identified")
    tls = server_context(certs.pem("server"), certs.key("server"), certs.pem("ca"))
    with FaultProxy(server.url, lambda _path, _n: None, tls=tls) as proxy:
        url = f"dicomweb+{proxy.url}/dicom-web"
        ca = ["--tls-ca", str(certs.pem("ca"))]
        mine = ["--tls-cert", str(certs.pem("client")), "--tls-key", str(certs.key("client"))]

        code, out, err = _ingest(capsys, url, path, *mine)  # the system's CAs only
        assert (code, out) == (1, "") and err.count("\n") == 1, err
        assert "the TLS handshake failed (certificate verify failed: " in err, err

        code, out, err = _ingest(capsys, url, path, *ca)  # no certificate of ours
        assert (code, out) == (1, "") and err.count("\n") == 1, err
        # the server's alert, or (timing) only its closing the connection
        assert "the TLS handshake failed (tlsv13 alert certificate required); check " \
               "--tls-ca" in err or "the TLS handshake failed (the server closed the " \
               "connection during the handshake (does it ask for a certificate of ours?))" \
               in err, err

        code, out, err = _ingest(capsys, url, path, *ca, *mine)
        assert code == 0, err
        assert "2 listed, 0 fetched before, 2 fetched now" in out, out
    assert Lake.open(path).read("instances").num_rows == 2


def test_orthanc_sends_to_the_listener_over_tls(tls_orthanc, tmp_path):
    """Orthanc pushes over DICOM TLS (C-STORE SCU, as for a C-MOVE), presenting its
    certificate: the listener, asking for one our CA signed, that names 127.0.0.1 (one
    of its subject alternative names) and calls as Orthanc's AE title, receives and
    ingests; allowed for another title only, Orthanc's association is rejected."""
    from tests.etl.test_listen_faults import _listening, _outcomes
    from tests.pacs import AE_TITLE

    server, certs = tls_orthanc
    lake = Lake.create(tmp_path / "lake", profile="identified")
    tls = server_context(certs.pem("server"), certs.key("server"), certs.pem("ca"))
    ids = server.get("/instances")
    with _listening(lake, tls=tls, allow_certs=[f"127.0.0.1={AE_TITLE}"]) as (_l, port, result):
        server.put("/modalities/LAKE", {"AET": "LAKE", "Host": "127.0.0.1", "Port": port,
                                        "UseDicomTls": True})
        job = server.post("/modalities/LAKE/store", {"Resources": ids, "Synchronous": True})
        assert (job["FailedInstancesCount"], job["InstancesCount"]) == (0, 2)
    stats = result["stats"]
    assert (stats.received, stats.tls_failed, stats.certificates_refused,
            stats.associations) == (2, 0, 0, 1)
    assert _outcomes(tmp_path / "lake") == {"ingested": 2}
    with _listening(lake, tls=tls, allow_certs=["127.0.0.1=CT1"]) as (_l, port, result):
        server.put("/modalities/LAKE", {"AET": "LAKE", "Host": "127.0.0.1", "Port": port,
                                        "UseDicomTls": True})
        with pytest.raises(urllib.error.HTTPError):  # Orthanc's answer: the store failed
            server.post("/modalities/LAKE/store", {"Resources": ids, "Synchronous": True})
    stats = result["stats"]
    assert (stats.received, stats.associations, stats.associations_rejected) == (0, 0, 1)
