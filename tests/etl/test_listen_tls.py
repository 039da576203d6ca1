"""`lake listen` over TLS (DICOM's secure transport): senders with a certificate our CA
signed get through; those without one, with another CA's, or speaking plain TCP are
refused after a failed handshake, counted and logged in one line; and a client that
connects and says nothing holds up no other sender."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from etl.sources.listen import AllowedCert, Listener, Sender
from etl.sources.tls import certificate_names, check_name_pattern, name_matches
from etl.sources.tls import server_context as tls_context
from lakehouse import Lake
from tests.etl.test_listen_faults import _ct, _listening, _outcomes
from tests.listening import stop
from tests.pacs import free_port
from tests.tlscerts import SCANNER_NAMES, Certs, make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _store(port: int, tls, title: str = "MODALITY", address: str = "127.0.0.1"
           ) -> int | str:
    """One CT image over TLS (``tls``: the client's context; None: plain TCP): the
    C-STORE status, or why there was no association."""
    from pynetdicom import AE

    ds = _ct()
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.network_timeout = 10  # a listener that hangs fails the test
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="LAKE",
                         tls_args=None if tls is None else (tls, "localhost"),
                         bind_address=(address, 0))
    if not assoc.is_established:
        return "no association"
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_mutual_tls_admits_only_certificates_our_ca_signed(tmp_path, certs, caplog):
    lake = Lake.create(tmp_path / "lake", profile="identified")
    ctx = tls_context(certs.pem("server"), certs.key("server"), certs.pem("ca"))
    with caplog.at_level(logging.WARNING), _listening(lake, tls=ctx) as (_l, port, result):
        silent = socket.create_connection(("127.0.0.1", port))  # says nothing
        try:
            assert _store(port, certs.client("client")) == 0
            assert _store(port, certs.client(None)) == "no association"
            assert _store(port, certs.client("stranger")) == "no association"
            assert _store(port, None) == "no association"
            assert _store(port, certs.client("client")) == 0
        finally:
            silent.close()
        deadline = time.monotonic() + 10
        while _l.stats.tls_failed < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    stats = result["stats"]
    # the three refused, and the silent client once it hung up
    assert (stats.tls_failed, stats.associations, stats.received) == (4, 2, 2)
    failed = [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert len(failed) == 4 and all(m.startswith("the TLS handshake with 127.0.0.1 failed (")
                                    and m.endswith("); connection closed") for m in failed)
    assert any("peer did not return a certificate" in m or "certificate required" in m
               for m in failed)
    assert any("wrong version number" in m for m in failed)  # plain TCP
    assert "Exception raised in user's" not in caplog.text
    assert _outcomes(tmp_path / "lake") == {"ingested": 1, "duplicate": 1}


def test_tls_without_a_ca_admits_any_tls_sender(tmp_path, certs):
    lake = Lake.create(tmp_path / "lake", profile="identified")
    ctx = tls_context(certs.pem("server"), certs.key("server"))
    with _listening(lake, tls=ctx) as (_l, port, result):
        assert _store(port, certs.client(None)) == 0
        assert _store(port, None) == "no association"
    assert (result["stats"].received, result["stats"].tls_failed) == (1, 1)


def test_silent_tls_clients_are_limited_per_address(tmp_path, certs, monkeypatch):
    """Clients that connect and never start their TLS handshake each hold a thread for
    the ACSE timeout: beyond 2 from one address (here), a new connection from it is
    closed at once, before any handshake; a TLS sender from another address gets
    through meanwhile, and from the same one once they hang up."""
    from etl.sources import listen
    from tests.etl.test_listen_limits import _closed_at_once, _connect, _wait_for

    monkeypatch.setattr(listen, "PENDING_PER_ADDRESS", 2)
    lake = Lake.create(tmp_path / "lake", profile="identified")
    ctx = tls_context(certs.pem("server"), certs.key("server"))
    with _listening(lake, tls=ctx) as (listener, port, result):
        silent = [_connect(port), _connect(port)]
        _wait_for(lambda: len(listener._unassociated) == 2)
        assert _closed_at_once(_connect(port))
        assert _store(port, certs.client(None), address="127.0.0.2") == 0
        for sock in silent:
            sock.close()
        _wait_for(lambda: not listener._unassociated)
        assert _store(port, certs.client(None)) == 0
    stats = result["stats"]
    assert (stats.connections_refused, stats.tls_failed, stats.received) == (1, 2, 2)


def test_certificate_names_and_patterns():
    cert = {"subject": ((("countryName", "NL"),), (("commonName", "CT Scanner 1"),)),
            "subjectAltName": (("DNS", "ct1.radiology.example.org"),
                               ("IP Address", "2001:DB8:0:0:0:0:0:10\n"),
                               ("email", "ct1@radiology.example.org"))}
    assert certificate_names(cert) == ["CT Scanner 1", "ct1.radiology.example.org",
                                       "2001:DB8:0:0:0:0:0:10", "ct1@radiology.example.org"]
    assert certificate_names({}) == []
    cases = [("ct scanner 1", "CT Scanner 1", True),
             ("CT Scanner", "CT Scanner 1", False),
             ("*.radiology.example.org", "ct1.radiology.example.org", True),
             ("*.RADIOLOGY.example.org", "CT1.radiology.Example.org", True),
             ("*.radiology.example.org", "radiology.example.org", False),
             ("*.radiology.example.org", "a.ct1.radiology.example.org", False),
             ("*.radiology.example.org", "ct1.radiology.example.org.evil.net", False),
             ("*.radiology.example.org", "*.radiology.example.org", True),  # as written
             ("*.example.org", "*.radiology.example.org", False),
             ("2001:db8::10", "2001:DB8:0:0:0:0:0:10", True),
             ("10.1.2.3", "10.1.2.3", True),
             ("10.1.2.3", "10.1.2.30", False),
             ("ct1@radiology.example.org", "CT1@radiology.example.org", True)]
    assert [name_matches(p, n) for p, n, _ in cases] == [want for _, _, want in cases]
    assert check_name_pattern("  *.example.org ") == "*.example.org"
    for bad in ["", "  ", "*", "*.", "ct*.example.org", "*.*.example.org", "a*b"]:
        with pytest.raises(ValueError, match="is not a certificate name"):
            check_name_pattern(bad)


def test_allowed_certificate_names(tmp_path, certs, caplog):
    """With allowed certificate names, a sender whose certificate (signed by our CA) gives
    none of them is closed after its handshake, counted and logged in one line; the
    names of the subject and of its alternative names are each enough."""
    lake = Lake.create(tmp_path / "lake", profile="identified")
    ctx = tls_context(certs.pem("server"), certs.key("server"), certs.pem("ca"))
    with caplog.at_level(logging.WARNING), \
            _listening(lake, tls=ctx, allow_certs=["*.Radiology.Example.org"]) as (_l, port,
                                                                                result):
        assert _store(port, certs.client("scanner")) == 0
        assert _store(port, certs.client("client")) == "no association"
        assert _store(port, certs.client("stranger")) == "no association"  # not our CA's
    stats = result["stats"]
    assert (stats.certificates_refused, stats.tls_failed, stats.associations,
            stats.received) == (1, 1, 1, 1)
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refused == ["refused a connection from 127.0.0.1: its certificate (client) names "
                       "no allowed sender (--allow-cert); closed"]
    for names in (["ct scanner 1"], [SCANNER_NAMES[1]], ["client", SCANNER_NAMES[2]]):
        with _listening(lake, tls=ctx, allow_certs=names) as (_l, port, result):
            assert _store(port, certs.client("scanner")) == 0
            assert _store(port, certs.client("client")) == \
                (0 if "client" in names else "no association")
        assert result["stats"].certificates_refused == (0 if "client" in names else 1)
    # names to check need certificates the CAs verified
    for tls in (None, tls_context(certs.pem("server"), certs.key("server"))):
        with pytest.raises(ValueError, match="need TLS that requires the senders'"):
            Listener(lake, "LAKE", free_port(), tls=tls, allow_certs=["client"])


def test_allowed_certificate_names_and_senders_both_apply(tmp_path, certs):
    """With ``--allow`` too, a sender must pass both: its address (before the handshake)
    and its certificate's names (after it)."""
    lake = Lake.create(tmp_path / "lake", profile="identified")
    ctx = tls_context(certs.pem("server"), certs.key("server"), certs.pem("ca"))
    with _listening(lake, tls=ctx, allow=[Sender.parse("@127.0.0.2")],
                    allow_certs=["client"]) as (_l, port, result):
        assert _store(port, certs.client("client"), address="127.0.0.1") == "no association"
        assert _store(port, certs.client("scanner"), address="127.0.0.2") == "no association"
        assert _store(port, certs.client("client"), address="127.0.0.2") == 0
    stats = result["stats"]
    assert (stats.connections_refused, stats.certificates_refused, stats.tls_failed,
            stats.associations, stats.received) == (1, 1, 0, 1, 1)


def test_allowed_certificate_names_with_ae_titles():
    cases = {"ct1.example.org": ("ct1.example.org", None),
             " ct1.example.org=CT1": ("ct1.example.org", "CT1"),
             "CT Scanner 1 = CT 1 ": ("CT Scanner 1", "CT 1"),
             "a=b=CT1": ("a=b", "CT1"),  # the title after the last =
             "*.example.org=ABCDEFGHIJKLMNOP": ("*.example.org", "ABCDEFGHIJKLMNOP")}
    assert {text: (a.pattern, a.title) for text, a in
            ((t, AllowedCert.parse(t)) for t in cases)} == cases
    for bad, why in [("ct1.example.org=", "'' in 'ct1.example.org=' is not an AE title"),
                     ("x= ", "'' in 'x= ' is not an AE title"),
                     ("x=ABCDEFGHIJKLMNOPQ", "'ABCDEFGHIJKLMNOPQ' in"),
                     ("x=A\\B", "is not an AE title"),
                     ("x=CT\u00e9", "is not an AE title"),
                     ("=CT1", "'' is not a certificate name"),
                     ("ct*.example.org=CT1", "'ct*.example.org' is not a certificate name")]:
        with pytest.raises(ValueError) as raised:
            AllowedCert.parse(bad)
        assert why in str(raised.value), (bad, str(raised.value))


def _associate(port: int, tls, title: str) -> str:
    """Associate as ``title`` over TLS and release: "established", or the rejection's
    (result, source, reason), or "no association"."""
    from pynetdicom import AE

    ae = AE(ae_title=title)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="LAKE", tls_args=(tls, "localhost"))
    if assoc.is_established:
        assoc.release()
        return "established"
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        return f"rejected {(rj.result, rj.result_source, rj.diagnostic)}"
    return "no association"


def test_certificates_allowed_for_some_ae_titles(tmp_path, certs, caplog):
    """``NAME=TITLE``: a sender whose certificate is allowed for some AE titles only and
    calls as another has its association rejected as a PACS rejects an unknown calling AE
    title (permanent, "calling AE title not recognized"), counted and logged in one line;
    a name repeated allows each of its titles; a certificate also allowed by a name
    without a title may call as any; ``--allow`` still applies as well."""
    lake = Lake.create(tmp_path / "lake", profile="identified")
    ctx = tls_context(certs.pem("server"), certs.key("server"), certs.pem("ca"))
    allow = ["*.radiology.example.org=CT1", "ct scanner 1=CT2", "client"]
    with caplog.at_level(logging.WARNING), \
            _listening(lake, tls=ctx, allow_certs=allow) as (_l, port, result):
        assert _store(port, certs.client("scanner"), title="CT1") == 0
        assert _store(port, certs.client("scanner"), title="CT2") == 0
        assert _associate(port, certs.client("scanner"), "MR1") == "rejected (1, 1, 3)"
        assert _associate(port, certs.client("scanner"), "ct1") == "rejected (1, 1, 3)"
        assert _store(port, certs.client("client"), title="MR1") == 0  # any title
    stats = result["stats"]
    assert (stats.associations, stats.associations_rejected, stats.certificates_refused,
            stats.received) == (3, 2, 0, 3)
    rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    names = f"CT Scanner 1, {SCANNER_NAMES[0]}, 2001:DB8:0:0:0:0:0:10, {SCANNER_NAMES[2]}"
    assert rejected == [f"rejected an association from {t} at 127.0.0.1: its certificate "
                        f"({names}) may call as CT1, CT2 only (--allow-cert)"
                        for t in ("MR1", "ct1")]
    # the same certificate allowed by another of its names without a title: any title
    with _listening(lake, tls=ctx, allow_certs=["ct scanner 1=CT1", SCANNER_NAMES[1]]) \
            as (_l, port, result):
        assert _associate(port, certs.client("scanner"), "MR1") == "established"
    # --allow as well: the title must pass both
    with _listening(lake, tls=ctx, allow=[Sender.parse("CT2")],
                    allow_certs=["ct scanner 1=CT1", "ct scanner 1=CT2"]) as (_l, port, result):
        assert _associate(port, certs.client("scanner"), "CT1") == "rejected (1, 1, 3)"
        assert _associate(port, certs.client("scanner"), "CT2") == "established"
        assert _associate(port, certs.client("scanner"), "CT3") == "rejected (1, 1, 3)"
    assert (result["stats"].associations, result["stats"].associations_rejected) == (1, 2)


def test_lake_listen_with_tls(tmp_path, certs):
    """The installed command: wrong TLS options are one line each; with them right it says
    it listens with TLS, receives from a sender with a certificate, and counts a plain
    sender in its totals."""
    path = tmp_path / "lake"
    Lake.create(path, profile="identified")
    exe = str(Path(sys.executable).parent / "lake")
    base = [exe, "listen", "--ae-title", "LAKE", "--host", "127.0.0.1", "--lake", str(path),
            "--scheduler", "synchronous", "--batch-seconds", "60"]
    (tmp_path / "not.pem").write_text("not a certificate\n")
    for extra, why in [
            (["--tls-ca", str(certs.pem("ca"))], "--tls-key and --tls-ca need --tls-cert"),
            (["--tls-cert", str(tmp_path / "none.pem")],
             f"cannot use {tmp_path / 'none.pem'} as the TLS certificate and its key (No "
             "such file or directory)"),
            (["--tls-cert", str(certs.pem("server")), "--tls-key", str(certs.key("server")),
              "--tls-ca", str(tmp_path / "not.pem")],
             f"cannot use {tmp_path / 'not.pem'} as the TLS CA certificates ("),
            (["--tls-cert", str(certs.pem("server")), "--tls-key", str(certs.key("server")),
              "--allow-cert", "client"], "--allow-cert needs --tls-cert and --tls-ca: "),
            (["--allow-cert", "ct*.example.org"], "argument --allow-cert: 'ct*.example.org' "
             "is not a certificate name: expected"),
            (["--allow-cert", "client=ABCDEFGHIJKLMNOPQ"], "argument --allow-cert: "
             "'ABCDEFGHIJKLMNOPQ' in 'client=ABCDEFGHIJKLMNOPQ' is not an AE title: expected "
             "NAME=TITLE, TITLE of 1 to 16 ASCII characters")]:
        done = subprocess.run([*base, "--port", str(free_port()), *extra],
                              capture_output=True, text=True, timeout=60)
        # 2: argparse's own code for an argument it refuses
        assert (done.returncode, done.stdout) == (2 if "argument" in why else 1, ""), \
            done.stderr
        assert done.stderr.startswith(f"lake listen: error: {why}"), done.stderr
        assert done.stderr.count("\n") == 1
    port = free_port()
    proc = subprocess.Popen([*base, "--port", str(port), "--tls-cert", str(certs.pem("server")),
                             "--tls-key", str(certs.key("server")),
                             "--tls-ca", str(certs.pem("ca")), "--allow-cert",
                             "client=MODALITY"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(
            f"listening as LAKE on 127.0.0.1:{port} (TLS, senders must present a "
            "certificate), ingesting every 60 s or 1000 instances, with 1 allowed "
            "certificate names (1 for an AE title only);")
        assert _store(port, certs.client("client")) == 0
        assert _store(port, certs.client("client"), title="OTHER") == "no association"
        assert _store(port, None) == "no association"
        assert _store(port, certs.client("scanner")) == "no association"
        code, out, err = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err
    assert "1 associations, 1 rejected, 0 aborted, 1 failed the TLS handshake, 1 refused " \
           "for their certificate's names (--allow-cert);" in out
    assert "refused a connection from 127.0.0.1: its certificate (CT Scanner 1, " \
           f"{SCANNER_NAMES[0]}, 2001:DB8:0:0:0:0:0:10, {SCANNER_NAMES[2]}) names no " \
           "allowed sender (--allow-cert); closed" in err
    assert "rejected an association from OTHER at 127.0.0.1: its certificate (client) may " \
           "call as MODALITY only (--allow-cert)" in err
    assert "WARNING etl.sources.listen: the TLS handshake with 127.0.0.1 failed (wrong " \
           "version number); connection closed" in err
    assert _outcomes(path) == {"ingested": 1}
