"""What `lake listen` holds and whom it accepts: every received instance is spooled to a
file as it arrives (the listener's memory does not grow with the instances' size) and
kept byte for byte; with ``--allow``, associations from other senders are rejected
before anything is negotiated."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import pytest

from etl.sources.listen import Sender
from etl.sources.staging import Staging, spooled_to
from lakehouse import Lake
from tests.etl.test_listen_faults import _ct, _listening, _outcomes, _send
from tests.listening import lake_listen, stop
from tests.pacs import free_port


@contextlib.contextmanager
def _store_scp(on_store):
    """A pynetdicom storage SCP (AE title LAKE) on a free loopback port whose C-STOREs go
    to ``on_store``: the port."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    ae = AE(ae_title="LAKE")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield port
    finally:
        server.shutdown()


def _received(lake: Lake, ds: pydicom.Dataset, spool: Path | None) -> bytes:
    """``ds`` sent to a pynetdicom SCP whose handler stages it with ``Staging.receive``:
    held in memory (``spool`` None), or spooled to files in ``spool``. The staged bytes."""

    from pynetdicom import _config

    staging = Staging(lake, "spool-test")

    def on_store(event) -> int:
        staging.receive("st", "se", str(event.request.AffectedSOPInstanceUID), event)
        return 0x0000

    with _store_scp(on_store) as port:
        with contextlib.ExitStack() as stack:
            if spool is not None:
                assert stack.enter_context(spooled_to(spool))
                assert _config.STORE_RECV_CHUNKED_DATASET
            assert _send(port, ds) == [0]
        assert not _config.STORE_RECV_CHUNKED_DATASET  # as it was
    (staged,) = staging.files.rglob("*.dcm")
    return staged.read_bytes()


def test_a_spooled_instance_is_staged_byte_for_byte(tmp_path):
    """Renamed from the spool file on the same file system, copied from another (a
    tmpfs): the same bytes as when pynetdicom held the instance in memory; no spool file
    is left."""
    lake = Lake.create(tmp_path / "lake", profile="identified")
    ds = _ct()
    same = tmp_path / "spool"
    same.mkdir()
    other = Path(tempfile.mkdtemp(dir="/dev/shm")) if os.path.isdir("/dev/shm") else None
    if other is None or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system (/dev/shm) to spool to")
    try:
        held = _received(lake, ds, None)
        assert pydicom.dcmread(pydicom.filebase.DicomBytesIO(held)).SOPInstanceUID == \
            ds.SOPInstanceUID
        assert _received(lake, ds, same) == held
        assert _received(lake, ds, other) == held
        assert list(same.iterdir()) == [] and list(other.iterdir()) == []
    finally:
        other.rmdir()


def _peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_listener_memory_does_not_grow_with_the_instance_size(tmp_path):
    """A 96 MB instance raised the listener's peak memory by about twice its size when
    pynetdicom held it; spooled, by a few MB."""
    path = tmp_path / "lake"
    Lake.create(path, profile="identified")
    side = 7168  # 7168 x 7168 x 2 bytes: 98 MB of pixel data
    big = _ct(Rows=side, Columns=side, PixelData=bytes(side * side * 2))
    big.save_as(tmp_path / "big.dcm")
    del big
    with lake_listen(path) as (proc, port):
        before = _peak_kib(proc.pid)
        assert _send(port, tmp_path / "big.dcm") == [0]
        grew = _peak_kib(proc.pid) - before
        code, out, err = stop(proc)
    assert code == 0, err
    assert grew < 32 * 1024, f"peak memory grew by {grew} KiB"
    assert "1 instances received" in out and _outcomes(path) == {"ingested": 1}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_an_instance_that_cannot_be_spooled_is_refused_and_nothing_is_left(tmp_path):
    """The listener cannot write a file beyond 1 MiB (as on a full disk): a 4 MB instance
    is refused with 0xA700 (out of resources; the sender keeps it), counted and logged in
    one line, its partial spool file removed; the instances before and after it, in the
    same association, are received and ingested."""
    path = tmp_path / "lake"
    Lake.create(path, profile="identified")
    big = _ct(Rows=1448, Columns=1448, PixelData=bytes(1448 * 1448 * 2),
              SOPInstanceUID="1.2.3.4.5.6.7.8.9")
    small = _ct()
    with lake_listen(path, file_size_limit=1 << 20) as (proc, port):
        assert _send(port, small, big, _ct(SOPInstanceUID="1.2.3.4.5.6.7.8.10")) == \
            [0, 0xA700, 0]
        spool = [p for p in (path / "vault" / "staging").rglob("spool-*")]
        code, out, err = stop(proc)
    assert code == 0, err
    assert spool == []
    assert "2 instances received" in out and "1 refused" in out, out
    assert _outcomes(path) == {"ingested": 2}
    assert "Traceback" not in err, err
    assert [line for line in err.splitlines() if "could not store" in line] == [
        "ERROR etl.sources.listen: could not store a received instance (File too large); "
        "the sender was told 0xA700 and keeps it"], err


def test_a_spool_file_that_cannot_even_be_created_refuses_its_instance(tmp_path,
                                                                        monkeypatch):
    """No spool file can be created (here: no space left for one): the instance is
    refused (0xA700) with the reason, and the next one, once a file can be created, is
    received. No file is left in the spool folder."""
    import errno

    lake = Lake.create(tmp_path / "lake", profile="identified")
    staging = Staging(lake, "spool-test")
    answers: list[str] = []

    def on_store(event) -> int:
        try:
            staging.receive("st", "se", str(event.request.AffectedSOPInstanceUID), event)
        except OSError as exc:
            answers.append(exc.strerror)
            return 0xA700
        answers.append("stored")
        return 0x0000

    real = tempfile.NamedTemporaryFile
    full = [True]

    def named(*args, **kwargs):
        if full[0]:
            full[0] = False
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    with _store_scp(on_store) as port, spooled_to(staging.tmp):
        monkeypatch.setattr(tempfile, "NamedTemporaryFile", named)
        assert _send(port, _ct(), _ct(SOPInstanceUID="1.2.3.4.5.6.7.8.10")) == [0xA700, 0]
    assert answers == ["No space left on device", "stored"]
    assert [p.name for p in staging.files.rglob("*.dcm")] == ["1.2.3.4.5.6.7.8.10.dcm"]
    assert list(staging.tmp.iterdir()) == []


def test_senders_not_allowed_are_rejected_before_anything_is_negotiated(tmp_path, caplog):
    """Allowed: CT1 from anywhere, MR2 from 10.0.0.0/8, any title from 127.0.0.2. CT1
    (from 127.0.0.1) and ANY (from 127.0.0.2) are accepted; MR2 from 127.0.0.1 and OTHER
    are rejected as calling AE titles not recognized, and send nothing."""
    from pynetdicom import AE

    lake = Lake.create(tmp_path / "lake", profile="identified")
    allow = [Sender.parse(s) for s in ("CT1", "MR2@10.0.0.0/8", "@127.0.0.2")]

    def associate(port: int, title: str, address: str = "127.0.0.1"):
        ae = AE(ae_title=title)
        ae.add_requested_context("1.2.840.10008.1.1")
        return ae.associate("127.0.0.1", port, ae_title="LAKE", bind_address=(address, 0))

    with caplog.at_level(logging.WARNING), \
            _listening(lake, allow=allow) as (_listener, port, result):
        refused = [associate(port, "MR2"), associate(port, "OTHER")]
        for a in refused:
            assert (a.is_established, a.is_rejected) == (False, True)
            rj = a.acceptor.primitive
            assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
        accepted = associate(port, "ANY", "127.0.0.2")
        assert accepted.is_established
        accepted.release()
        assert _send(port, _ct(), title="CT1") == [0]
    stats = result["stats"]
    assert (stats.associations, stats.associations_rejected, stats.received) == (2, 2, 1)
    assert "rejected an association from MR2 at 127.0.0.1: not an allowed sender " \
           "(--allow)" in caplog.text
    assert "rejected an association from OTHER at 127.0.0.1" in caplog.text
    assert "Exception raised in user's" not in caplog.text


def _connect(port: int, address: str = "127.0.0.1"):
    import socket

    return socket.create_connection(("127.0.0.1", port), source_address=(address, 0))


def _closed_at_once(sock) -> bool:
    """Whether the listener closed ``sock`` (said nothing, hung up) within 5 s."""
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


def _echo(port: int, address: str = "127.0.0.1") -> bool:
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="LAKE", bind_address=(address, 0))
    if not assoc.is_established:
        return False
    try:
        return assoc.send_c_echo().Status == 0
    finally:
        assoc.release()


def _wait_for(condition, seconds: float = 10) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_silent_connections_are_limited_per_address_and_in_all(tmp_path, monkeypatch, caplog):
    """At most 2 connections per address (3 in all, here) may wait without becoming an
    association: beyond, a new connection is closed at once, counted, and logged once a
    second per address here (once a minute by default) with how many were not logged.
    Senders from other addresses, and from the same one once its silent connections are
    gone, associate as before; clients that connect and hang up (a port scan) hold
    nothing."""
    from etl.sources import listen

    monkeypatch.setattr(listen, "PENDING_PER_ADDRESS", 2)
    monkeypatch.setattr(listen, "PENDING_MAX", 3)
    monkeypatch.setattr(listen, "REFUSED_LOG_SECONDS", 1.0)
    lake = Lake.create(tmp_path / "lake", profile="identified")
    with caplog.at_level(logging.WARNING, logger="etl.sources.listen"), \
            _listening(lake) as (listener, port, result):
        for n in range(1, 11):  # connected and hung up: nothing held, in a moment
            _connect(port).close()
            _wait_for(lambda: listener.stats.connections == n  # noqa: B023
                      and not listener._unassociated
                      and not listener._server.active_associations, 5)
        silent = [_connect(port), _connect(port)]
        _wait_for(lambda: len(listener._unassociated) == 2)
        assert listener.stats.connections_refused == 0
        assert _closed_at_once(_connect(port))
        assert _closed_at_once(_connect(port))
        assert _echo(port, "127.0.0.2")  # another address
        silent.append(_connect(port, "127.0.0.2"))
        _wait_for(lambda: len(listener._unassociated) == 3)
        assert listener.stats.connections_refused == 2
        assert _closed_at_once(_connect(port, "127.0.0.3"))  # 3 in all
        time.sleep(1.1)
        assert _closed_at_once(_connect(port))
        for sock in silent:
            sock.close()
        _wait_for(lambda: not listener._unassociated)
        assert _echo(port) and _echo(port, "127.0.0.3")  # once they are gone
        _wait_for(lambda: not listener._server.active_associations, 5)
    stats = result["stats"]
    assert (stats.connections, stats.connections_refused, stats.associations) == \
        (10 + 2 + 2 + 1 + 1 + 1 + 1 + 2, 4, 3)
    assert [r.getMessage() for r in caplog.records if "refused a connection" in
            r.getMessage()] == [
        "refused a connection from 127.0.0.1: 2 connections from it are not yet "
        "associations; closed",
        "refused a connection from 127.0.0.3: 3 connections are not yet associations; "
        "closed",
        "refused a connection from 127.0.0.1: 2 connections from it are not yet "
        "associations; closed (1 more since the last message)"]


def test_a_connection_from_an_address_no_sender_has_is_closed_at_once(tmp_path, caplog):
    """With ``--allow @127.0.0.2`` only, a connection from 127.0.0.1 is closed before
    anything is read (no association request, no TLS handshake, no thread held)."""
    lake = Lake.create(tmp_path / "lake", profile="identified")
    with caplog.at_level(logging.WARNING, logger="etl.sources.listen"), \
            _listening(lake, allow=[Sender.parse("@127.0.0.2")]) as (_l, port, result):
        assert _closed_at_once(_connect(port))
        assert not _echo(port)
        assert _echo(port, "127.0.0.2")
    stats = result["stats"]
    assert (stats.connections_refused, stats.associations_rejected,
            stats.associations) == (2, 0, 1)
    assert "refused a connection from 127.0.0.1: not an allowed address (--allow); " \
           "closed" in caplog.text


@pytest.mark.parametrize(("text", "title", "network"), [
    ("CT1", "CT1", None), ("CT1@10.1.2.3", "CT1", "10.1.2.3/32"),
    ("@10.1.0.0/16", None, "10.1.0.0/16"), ("@10.1.2.3/16", None, "10.1.0.0/16"),
    ("PACS@::1", "PACS", "::1/128")])
def test_sender_specs(text, title, network):
    sender = Sender.parse(text)
    assert (sender.title, None if sender.network is None else str(sender.network)) == \
        (title, network)


def test_sender_admits_by_title_and_address():
    assert Sender.parse("CT1").admits("CT1", "192.0.2.7")
    assert not Sender.parse("CT1").admits("CT2", "192.0.2.7")
    assert Sender.parse("@10.1.0.0/16").admits("ANY", "10.1.200.3")
    assert Sender.parse("@10.1.0.0/16").admits("ANY", "::ffff:10.1.200.3")  # dual stack
    assert not Sender.parse("@10.1.0.0/16").admits("ANY", "10.2.0.1")
    assert not Sender.parse("CT1@10.1.2.3").admits("CT1", "10.1.2.4")
    assert not Sender.parse("@10.1.0.0/16").admits("ANY", "not an address")


def test_a_wrong_allow_is_one_line_before_anything_listens(tmp_path):
    exe = str(Path(sys.executable).parent / "lake")
    for spec, why in [("@", "'' in '@' is not an IP address or network"),
                      ("CT@10.1.2", "'10.1.2' in 'CT@10.1.2' is not an IP address"),
                      ("A" * 17, f"'{'A' * 17}' is not a sender: expected TITLE")]:
        done = subprocess.run([exe, "listen", "--port", str(free_port()), "--ae-title", "LAKE",
                               "--lake", str(tmp_path / "none"), "--allow", spec],
                              capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr.startswith(f"lake listen: error: argument --allow: {why}"), \
            done.stderr
        assert done.stderr.count("\n") == 1
