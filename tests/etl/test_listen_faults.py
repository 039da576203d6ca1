"""The C-STORE listener (`lake listen`) with senders that misbehave and a lake that is
busy: two different instances sent with one UID, a sender killed in the middle of an
instance, associations aborted or refused, bytes that are not a dataset, and another
process writing to the lake when a batch is due or when the listener stops.

What must hold: whatever was acknowledged reaches the lake (ingested, or recorded as a
duplicate, a conflict or a quarantined file); nothing half-received is kept; the
listener goes on receiving whatever the lake is doing, and what it could not ingest is
ingested later, by itself or by the next listener.
"""

from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filereader import read_file_meta_info
from pydicom.uid import generate_uid

from catalog import open_lake
from etl import IngestConfig
from etl.sources import listen
from etl.sources.listen import Listener, ListenStats
from etl.sources.staging import OWNER
from lakehouse import Lake
from tests.listening import lake_listen, stop
from tests.pacs import free_port

CONFIG = IngestConfig(scheduler="threads", workers=2, batch_files=64)


@contextlib.contextmanager
def _listening(lake: Lake, **kw) -> Iterator[tuple[Listener, int, dict]]:
    """A listener on a free loopback port, running on a thread; on exit it is stopped
    and its :class:`ListenStats` are in the dict yielded, under ``"stats"``."""
    port = free_port()
    listener = Listener(lake, "LAKE", port, host="127.0.0.1", config=CONFIG,
                        batch_seconds=kw.pop("batch_seconds", 60), **kw)
    listener.start()
    stop, result = threading.Event(), {}
    t = threading.Thread(target=lambda: result.setdefault("stats", listener.run(stop)))
    t.start()
    try:
        yield listener, port, result
    finally:
        stop.set()
        listener.wake()
        t.join(120)
        assert not t.is_alive()


def _send(port: int, *datasets: pydicom.Dataset | Path, title: str = "MODALITY") -> list[int]:
    """C-STORE each dataset (or file, sent as its bytes) in one association: statuses."""
    from pynetdicom import AE, _config

    ae = AE(ae_title=title)
    for ds in datasets:
        meta = ds.file_meta if isinstance(ds, pydicom.Dataset) else read_file_meta_info(ds)
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="LAKE")
    assert assoc.is_established
    raw, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = raw
        assoc.release()


def _ct(**changes) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for k, v in changes.items():
        setattr(ds, k, v)
    return ds


def _staged(lake: Path) -> list[str]:
    """The files in the vault's staging, as ``<folder kind>/<file name>``."""
    root = lake / "vault" / "staging"
    return sorted(f"{p.relative_to(root).parts[0].rsplit('-', 2)[0]}/{p.name}"
                  for p in root.rglob("*") if p.is_file() and p.name != OWNER)


def _outcomes(lake: Path) -> dict[str, int]:
    with open_lake(lake, vault=True) as cat:
        return dict(cat.con.execute("SELECT outcome, count(*) FROM files GROUP BY 1")
                    .fetchall())


def _busy(path: Path):
    """Another process's write to the lake, as a context manager (the lake's lock)."""
    return Lake.open(path).writer("another-process")


def test_two_instances_sent_with_one_uid_both_reach_the_lake(tmp_path):
    """A modality sends an image, then a corrected one with the same SOPInstanceUID,
    then the first again: all three were acknowledged, so the lake must show all three
    (the first ingested, the corrected one a conflict, the repeat a duplicate)."""
    path = tmp_path / "lake"
    lake = Lake.create(path, profile="identified")
    first, corrected = _ct(), _ct(InstanceNumber=99)
    with _listening(lake) as (_, port, result):
        assert _send(port, first) == [0]
        assert _send(port, corrected, first) == [0, 0]
    stats: ListenStats = result["stats"]
    assert (stats.received, stats.batches) == (3, 1)
    assert (stats.ingested, stats.conflict, stats.duplicate) == (1, 1, 1)
    with open_lake(path) as cat:
        assert cat.counts()["instances"] == 1 and cat.counts()["conflicts"] == 1
        assert cat.con.execute('SELECT "InstanceNumber" FROM instances').fetchall() == [(1,)]
    uid = first.SOPInstanceUID
    assert stats.kept_in_staging == 1 and _staged(path) == [f"listen-kept/{uid}~2.dcm"]


def test_a_batch_due_while_another_process_writes_is_ingested_after(tmp_path, caplog):
    path = tmp_path / "lake"
    lake = Lake.create(path, profile="identified")
    a, b = _ct(), _ct(SOPInstanceUID=generate_uid())
    with caplog.at_level(logging.WARNING, logger="etl.sources.listen"), \
            _listening(lake, batch_seconds=0.3) as (listener, port, result):
        with _busy(path):
            assert _send(port, a) == [0]
            deadline = time.monotonic() + 30
            while listener.stats.failed_batches < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _send(port, b) == [0]  # still receiving
            assert listener.stats.batches == 0
        deadline = time.monotonic() + 60  # the retry waits 0.3 s x 2^failures
        while listener.stats.ingested < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    stats = result["stats"]
    assert (stats.received, stats.ingested, stats.not_ingested) == (2, 2, 0)
    assert stats.failed_batches >= 2 and set(stats.errors) == {
        f"another process is writing to the lake at {path}; wait for it to finish (readers "
        "are not blocked)"}
    assert "a batch was not ingested (another process is writing to the lake" in caplog.text
    assert "its files are kept and tried again in " in caplog.text
    assert _outcomes(path) == {"ingested": 2} and _staged(path) == []


def test_the_workers_fork_server_starts_with_the_listener(tmp_path):
    """A listener whose batches run in the process pool starts the workers' fork server
    (which imports the worker code, about a second) when it starts listening, not when
    its first batch is due; with threads it starts none. In a fresh interpreter, where
    no server runs yet."""
    Lake.create(tmp_path / "lake", profile="identified")
    code = (
        "import sys\n"
        "from etl import IngestConfig, workerserver\n"
        "from etl.sources.listen import Listener\n"
        "from lakehouse import Lake\n"
        "from tests.pacs import free_port\n"
        "lake = Lake.open(sys.argv[1])\n"
        "for scheduler in ('threads', 'processes'):\n"
        "    listener = Listener(lake, 'LAKE', free_port(), host='127.0.0.1',\n"
        "                        config=IngestConfig(scheduler=scheduler))\n"
        "    listener.start()\n"
        "    print(scheduler, workerserver.SERVER._forkserver_pid is not None)\n"
        "    listener._server.shutdown()\n"
        "    listener.incoming.release()\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "lake")],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.stdout.splitlines() == ["threads False", "processes True"], done.stderr


def test_batches_keep_the_lakes_indexes(tmp_path):
    """A listener's batches take the lake's index of instances from the batch before
    (not a scan of the whole table each time), and a copy of an instance an earlier
    batch ingested is still a duplicate."""
    path = tmp_path / "lake"
    lake = Lake.create(path, profile="identified")
    a, b = _ct(), _ct(SOPInstanceUID=generate_uid())
    with _listening(lake, batch_files=1, batch_seconds=60) as (listener, port, result):
        for n, ds in enumerate((a, b, a), 1):
            assert _send(port, ds) == [0]
            deadline = time.monotonic() + 60
            while listener.stats.batches < n and time.monotonic() < deadline:
                time.sleep(0.05)
    assert (result["stats"].batches, result["stats"].ingested,
            result["stats"].duplicate) == (3, 2, 1)
    assert (listener._kept.taken, listener._kept.missed) == (2, 1)
    assert _outcomes(path) == {"ingested": 2, "duplicate": 1}


def test_what_a_stopped_listener_could_not_ingest_the_next_one_ingests(tmp_path, caplog):
    path = tmp_path / "lake"
    lake = Lake.create(path, profile="identified")
    ds = _ct()
    with caplog.at_level(logging.WARNING, logger="etl.sources.listen"), _busy(path), \
            _listening(lake) as (_, port, result):
        assert _send(port, ds) == [0]
    stats = result["stats"]
    assert (stats.received, stats.batches, stats.failed_batches, stats.not_ingested) == \
        (1, 0, 1, 1)
    assert "tried again by the next `lake listen`" in caplog.text
    assert "1 received files were not ingested; they are kept in" in caplog.text
    assert _staged(path) == [f"listen-incoming/{ds.SOPInstanceUID}.dcm"]
    with _listening(lake) as (_, _port, result):
        pass
    assert (result["stats"].ingested, result["stats"].not_ingested) == (1, 0)
    assert _outcomes(path) == {"ingested": 1} and _staged(path) == []


def test_a_leftover_and_a_new_instance_with_one_name_are_both_kept(tmp_path):
    """A listener stopped with a file not ingested; the next one receives another
    instance under the same name before it takes over the leftover."""
    path = tmp_path / "lake"
    lake = Lake.create(path, profile="identified")
    with _busy(path), _listening(lake) as (_, port, _result):
        assert _send(port, _ct()) == [0]
    listener = Listener(lake, "LAKE", port, host="127.0.0.1", config=CONFIG)
    listener.start()
    try:
        assert _send(port, _ct(InstanceNumber=7)) == [0]
        stop = threading.Event()
        stop.set()
        stats = listener.run(stop)  # takes over the leftover, ingests, stops
    finally:
        if listener._server is not None:
            listener._server.shutdown()
    assert (stats.received, stats.ingested, stats.conflict, stats.not_ingested) == (1, 1, 1, 0)
    assert _outcomes(path) == {"ingested": 1, "conflict": 1}


_SENDER = """
import sys
import pydicom
from pynetdicom import AE
ds = pydicom.dcmread(sys.argv[2])
ae = AE(ae_title="DYING")
ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="LAKE")
print(assoc.is_established, flush=True)
assoc.send_c_store(ds)
"""


def test_a_sender_killed_in_the_middle_of_an_instance_leaves_nothing(tmp_path, caplog,
                                                                     monkeypatch):
    """The sender's process dies after the listener has read a few fragments of a 32 MB
    instance: nothing of it is kept or acknowledged; the listener goes on."""
    from pynetdicom import evt

    path = tmp_path / "lake"
    lake = Lake.create(path, profile="identified")
    big = _ct(Rows=4096, Columns=4096, PixelData=bytes(4096 * 4096 * 2))
    big.save_as(tmp_path / "big.dcm")
    before = set(Path(tempfile.gettempdir()).glob("tmp*.dcm"))
    fragments, dead = threading.Event(), threading.Event()
    seen = 0

    def on_pdu(event) -> None:  # on the association's thread: it reads no more meanwhile
        nonlocal seen
        if type(event.pdu).__name__ == "P_DATA_TF":
            seen += 1
            if seen == 3:
                fragments.set()
                dead.wait(30)

    with caplog.at_level(logging.WARNING), _listening(lake) as (listener, port, result):
        listener._server.bind(evt.EVT_PDU_RECV, on_pdu)
        sender = subprocess.Popen([sys.executable, "-c", _SENDER, str(port),
                                   str(tmp_path / "big.dcm")],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert sender.stdout is not None and sender.stdout.readline() == "True\n"
            assert fragments.wait(60)
        finally:
            sender.kill()
            sender.wait()
            dead.set()
        deadline = time.monotonic() + 30
        while listener.stats.associations_aborted < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        # what had arrived is in the listener's spool (the vault), not the system's
        # temporary folder; once stale, it is removed while the listener runs
        (partial,) = listener.incoming.tmp.glob("spool-*.dcm")
        assert 0 < partial.stat().st_size < 32 * 2**20
        assert not set(Path(tempfile.gettempdir()).glob("tmp*.dcm")) - before
        monkeypatch.setattr(listen, "SPOOL_STALE_SECONDS", 0.0)
        listener.wake()
        deadline = time.monotonic() + 30
        while partial.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not partial.exists()
        assert _send(port, _ct()) == [0]
    stats = result["stats"]
    assert (stats.associations, stats.associations_aborted) == (2, 1)
    assert (stats.received, stats.ingested, stats.quarantined) == (1, 1, 0)
    assert "an association from DYING at 127.0.0.1 was aborted" in caplog.text
    assert "Exception raised in user's" not in caplog.text  # no handler failed
    assert _staged(path) == []


def test_associations_beyond_the_limit_are_refused_and_counted(tmp_path, caplog):
    from pynetdicom import AE

    path = tmp_path / "lake"
    lake = Lake.create(path, profile="identified")
    with caplog.at_level(logging.WARNING), _listening(lake) as (listener, port, result):
        limit = listener._server.ae.maximum_associations
        ae = AE(ae_title="GREEDY")
        ae.add_requested_context("1.2.840.10008.1.1")
        held = [ae.associate("127.0.0.1", port, ae_title="LAKE") for _ in range(limit + 1)]
        assert [a.is_established for a in held] == [True] * limit + [False]
        for a in held[:limit]:
            a.release()
    stats = result["stats"]
    assert (stats.associations, stats.associations_rejected) == (limit, 1)
    assert "rejected an association from GREEDY at 127.0.0.1" in caplog.text
    assert "Exception raised in user's" not in caplog.text


def test_bytes_that_are_not_a_dataset_are_quarantined_and_kept(tmp_path):
    """A sender sends a valid command with a data set of random bytes (sent as they
    are): acknowledged, so kept and quarantined with its reason."""
    from pydicom.filewriter import write_file_meta_info

    path = tmp_path / "lake"
    lake = Lake.create(path, profile="identified")
    meta = _ct().file_meta
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta)
    buf.write(bytes(range(256)) * 20)
    (tmp_path / "garbage.dcm").write_bytes(buf.getvalue())
    with _listening(lake) as (_, port, result):
        assert _send(port, tmp_path / "garbage.dcm") == [0]
    stats = result["stats"]
    assert (stats.received, stats.quarantined, stats.kept_in_staging) == (1, 1, 1)
    with open_lake(path) as cat:
        reasons = cat.con.execute("SELECT reason FROM quarantine").fetchall()
    assert len(reasons) == 1 and reasons[0][0] != ""
    assert _staged(path) == [f"listen-kept/{meta.MediaStorageSOPInstanceUID}.dcm"]


@pytest.mark.slow
def test_lake_listen_stopped_while_the_lake_is_busy_says_what_is_kept(tmp_path):
    """The command in its own process, stopped (SIGTERM) while another process writes to
    the lake: exit 0, a line saying what is kept; the next `lake listen` ingests it."""
    path = tmp_path / "lake"
    Lake.create(path, profile="identified")
    with lake_listen(path) as (proc, port), _busy(path):
        assert _send(port, _ct()) == [0]
        code, out, err = stop(proc)
    assert code == 0, err
    assert "stopped: 1 instances received, 0 refused" in out
    assert "; 1 batches failed and were tried again" in out
    assert "1 received files are not ingested yet (the last batch failed: see the error " \
           "above); they are kept, and the next `lake listen` on this lake ingests them " \
           "first" in out
    assert "a batch was not ingested (another process is writing to the lake" in err
    with lake_listen(path) as (proc, _port):
        code, out, err = stop(proc)
    assert code == 0, err
    assert "ingested 1" in out and "not ingested" not in out
    assert _outcomes(path) == {"ingested": 1} and _staged(path) == []


def test_the_wait_after_failed_batches_doubles_up_to_a_limit(tmp_path):
    from etl.sources.listen import RETRY_MAX_SECONDS

    lake = Lake.create(tmp_path / "lake", profile="identified")
    listener = Listener(lake, "LAKE", free_port(), batch_seconds=2)
    waits = []
    for failures in (0, 1, 2, 8, 9, 10_000):
        listener._failures = failures
        waits.append(listener._wait())
    assert waits == [2, 4, 8, RETRY_MAX_SECONDS, RETRY_MAX_SECONDS, RETRY_MAX_SECONDS] \
        and RETRY_MAX_SECONDS == 300
    slow = Listener(lake, "LAKE", free_port(), batch_seconds=600)
    slow._failures = 3
    assert slow._wait() == 600  # never more often than asked


def test_a_second_listener_on_the_lake_leaves_the_first_ones_files_alone(tmp_path):
    """Two listeners on one lake (two ports): the second, starting, takes over only what
    a stopped or killed listener left, not what the first has received meanwhile."""
    path = tmp_path / "lake"
    lake = Lake.create(path, profile="identified")
    with _listening(lake) as (_, port, first):
        assert _send(port, _ct()) == [0]
        with _listening(lake) as (_, _port, second):
            pass
    assert (second["stats"].ingested, second["stats"].batches) == (0, 0)
    assert (first["stats"].received, first["stats"].ingested) == (1, 1)
    assert _outcomes(path) == {"ingested": 1} and _staged(path) == []


def test_an_instance_that_cannot_be_stored_is_refused_and_stays_with_the_sender(tmp_path,
                                                                               caplog):
    """The received files' folder cannot be written (here its temporary folder is a
    file): the sender is told 0xA700 (out of resources), nothing is kept; once it can
    be written again, the same instance is received."""
    import shutil

    path = tmp_path / "lake"
    lake = Lake.create(path, profile="identified")
    ds = _ct()
    with caplog.at_level(logging.ERROR, logger="etl.sources.listen"), \
            _listening(lake) as (listener, port, result):
        tmp = listener.incoming.tmp
        shutil.rmtree(tmp)
        tmp.write_bytes(b"in the way")
        assert _send(port, ds) == [0xA700]
        tmp.unlink()
        tmp.mkdir()
        assert _send(port, ds) == [0]
    stats = result["stats"]
    assert (stats.refused, stats.received, stats.ingested) == (1, 1, 1)
    assert stats.errors == ["could not store an instance: Not a directory"]
    assert "could not store a received instance (Not a directory); the sender was told " \
           "0xA700 and keeps it" in caplog.text
    assert _outcomes(path) == {"ingested": 1} and _staged(path) == []


def test_a_listener_keeps_only_its_last_errors():
    from etl.sources.listen import ERRORS_KEPT

    stats = ListenStats()
    for i in range(ERRORS_KEPT + 5):
        stats.error(f"error {i}")
    assert stats.errors == [f"error {i}" for i in range(5, ERRORS_KEPT + 5)]
