"""A DICOM C-STORE receiver that ingests what it receives in micro-batches (pynetdicom).

Modalities and PACS send to it (C-STORE, or C-MOVE with it as destination).
Each instance is spooled to a file in ``vault/staging/listen-incoming-*/tmp/`` as it
arrives (memory does not grow with its size), then moved to
``vault/staging/listen-incoming-*/files/`` (fsync, rename) *before* the sender is told
Success; if it cannot be written the sender gets 0xA700 (out of resources) and keeps the
instance. Two instances
sent with the same SOPInstanceUID are both kept (the lake then records a
duplicate or a conflict). Every ``batch_seconds`` (or ``batch_files``
instances) the received files are moved to a batch folder and ingested by the
folder pipeline; quarantined ones stay there. A batch that cannot be ingested
(another process writing to the lake, a storage fault) goes back to the
received files and is tried again, after a wait that doubles up to
:data:`RETRY_MAX_SECONDS`; the listener goes on receiving. Files left by a
listener that was stopped or killed before ingesting them are picked up by the
next one. With an allow-list (:class:`Sender`), associations from other senders are
rejected before anything is negotiated; with allowed certificate names
(:class:`AllowedCert`, ``--allow-cert``), a TLS sender whose certificate gives none of them
is closed after its handshake, and one whose certificate is allowed for some AE titles
only has its association rejected when it calls as another.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from etl.config import IngestConfig
from etl.jobs import RunSummary, ingest, prestart
from etl.seen import Kept
from etl.sources.pull import DONE_OUTCOMES
from etl.sources.staging import OWNER, SPOOL_PREFIX, Staging, claim, place_new, spooled_to
from etl.sources.tls import certificate_names, check_name_pattern, failure, name_matches
from lakehouse import Lake

log = logging.getLogger(__name__)

SOURCE_KIND = "dimse-listen"
VERIFICATION = "1.2.840.10008.1.1"  # C-ECHO
#: the longest wait before a batch that could not be ingested is tried again
RETRY_MAX_SECONDS = 300.0
#: a spool file not written to for this long is of an instance whose association is gone
#: (pynetdicom aborts one silent for its network timeout, 60 s): it is removed
SPOOL_STALE_SECONDS = 600.0
ERRORS_KEPT = 100
#: connections not yet an association (a TLS handshake or an association request under
#: way) at a time, from one address and in all: each holds a thread for up to the ACSE
#: timeout (30 s) when its client says nothing; beyond, new ones are closed at once
PENDING_PER_ADDRESS = 8
PENDING_MAX = 64
#: a refused connection is logged at most once a minute per address
REFUSED_LOG_SECONDS = 60.0


@dataclass
class ListenStats:
    received: int = 0
    #: instances refused because they could not be stored (the sender keeps them)
    refused: int = 0
    #: TCP connections accepted (each to become an association, or closed)
    connections: int = 0
    associations: int = 0
    associations_rejected: int = 0
    associations_aborted: int = 0
    #: connections closed because their TLS handshake failed
    tls_failed: int = 0
    #: connections closed after the handshake: the sender's certificate names no
    #: ``--allow-cert`` name
    certificates_refused: int = 0
    #: connections closed at once: from an address --allow never admits, or beyond
    #: :data:`PENDING_PER_ADDRESS` / :data:`PENDING_MAX` not yet associations
    connections_refused: int = 0
    batches: int = 0
    ingested: int = 0
    duplicate: int = 0
    conflict: int = 0
    quarantined: int = 0
    skipped: int = 0
    kept_in_staging: int = 0
    #: batches that could not be ingested (their files were tried again later)
    failed_batches: int = 0
    #: received files not ingested when the listener stopped (the next one ingests them)
    not_ingested: int = 0
    #: the last :data:`ERRORS_KEPT` errors (a listener runs for months)
    errors: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        self.errors.append(text)
        del self.errors[:-ERRORS_KEPT]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Sender:
    """Who may send (``lake listen --allow``): an AE title, an address or network, or
    both: ``TITLE``, ``TITLE@ADDRESS``, ``@ADDRESS`` (an IP address, or a network such as
    ``10.1.0.0/16``)."""

    title: str | None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None

    @classmethod
    def parse(cls, text: str) -> Sender:
        title, at, address = text.partition("@")
        title = title.strip()
        if not is_ae_title(title) and (title or not at):
            raise ValueError(f"{text!r} is not a sender: expected TITLE (an AE title of up "
                             "to 16 ASCII characters), TITLE@ADDRESS or @ADDRESS")
        network = None
        if at:
            try:
                network = ipaddress.ip_network(address.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{address.strip()!r} in {text!r} is not an IP address or "
                                 "network (e.g. 10.1.2.3 or 10.1.0.0/16)") from None
        return cls(title or None, network)

    def admits(self, title: str, address: str) -> bool:
        if self.title is not None and title != self.title:
            return False
        if self.network is None:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # an IPv4 sender to a dual-stack socket
        return ip in self.network

    def may_admit(self, address: str) -> bool:
        """Whether an association from ``address`` may be admitted (by some title)."""
        return self.network is None or self.admits(self.title or "", address)


def is_ae_title(text: str) -> bool:
    """Whether ``text`` is a DICOM AE title (PS3.5 AE): 1 to 16 printable ASCII characters,
    no backslash, not only spaces."""
    return (bool(text.strip()) and len(text) <= 16 and "\\" not in text
            and all(" " <= ch <= "~" for ch in text))


@dataclass(frozen=True)
class AllowedCert:
    """Whose certificate may send (``lake listen --allow-cert NAME[=TITLE]``): a certificate
    name (:func:`etl.sources.tls.name_matches`) and, when given, the AE title a sender with
    that certificate must call as (several for one name: repeat it, one title each). Without
    a title, the certificate may call as any title (that ``--allow`` admits)."""

    pattern: str
    title: str | None = None

    @classmethod
    def parse(cls, text: str) -> AllowedCert:
        """``NAME`` or ``NAME=TITLE`` (the title after the last ``=``); ValueError if not."""
        name, eq, title = text.rpartition("=") if "=" in text else (text, "", "")
        if eq and not is_ae_title(title.strip()):
            raise ValueError(f"{title.strip()!r} in {text!r} is not an AE title: expected "
                             "NAME=TITLE, TITLE of 1 to 16 ASCII characters")
        return cls(check_name_pattern(name), title.strip() or None)


def _peer(event) -> str:
    """Who an association event is about: the calling AE title and its address."""
    requestor = event.assoc.requestor
    title = str(requestor.ae_title or "").strip() or "an unnamed AE"
    return f"{title} at {requestor.address}"


class Listener:
    """``start()`` opens the port; ``run(stop)`` ingests micro-batches until ``stop`` is set;
    then the server is shut down and a last batch ingests everything received."""

    def __init__(self, lake: Lake, ae_title: str, port: int, *, host: str = "0.0.0.0",
                 config: IngestConfig | None = None, key_file: Path | str | None = None,
                 batch_seconds: float = 10.0, batch_files: int = 1000,
                 allow: list[Sender] | None = None, tls: ssl.SSLContext | None = None,
                 allow_certs: list[AllowedCert | str] | None = None,
                 on_batch: Callable[[RunSummary], None] | None = None):
        lake.policy(key_file)  # a missing or wrong key stops before anything is received
        self.lake = lake
        self.ae_title = ae_title
        self.host, self.port = host, port
        self.config = config or IngestConfig()
        self.key_file = key_file
        self.batch_seconds = batch_seconds
        self.batch_files = batch_files
        self.on_batch = on_batch
        #: the senders whose associations are accepted (None: any)
        self.allow = allow or None
        #: TLS for every association (:func:`etl.sources.tls.server_context`; None: plain TCP)
        self.tls = tls
        #: the certificate names (:func:`etl.sources.tls.name_matches`) a sender's
        #: certificate must give, some with the AE titles it may call as (None: any
        #: certificate the TLS context verifies, as any title)
        self.allow_certs = [a if isinstance(a, AllowedCert) else AllowedCert.parse(a)
                            for a in allow_certs] if allow_certs else None
        if self.allow_certs is not None and (tls is None
                                             or tls.verify_mode != ssl.CERT_REQUIRED):
            raise ValueError("allowed certificate names need TLS that requires the senders' "
                             "certificates (--tls-cert with --tls-ca)")
        self.stats = ListenStats()
        self._lock = threading.Lock()
        self._pending = 0
        self._failures = 0  # batches failed in a row
        self._wake = threading.Event()
        #: connections not yet associations: the address and association of each
        self._unassociated: dict[int, tuple[str, Any]] = {}
        self._refused_logged: dict[str, tuple[float, int]] = {}  # address: (when, since)
        #: association -> (the AE titles its certificate may call as, the certificate's
        #: names), for a certificate allowed for some titles only (``AllowedCert.title``)
        self._cert_titles: weakref.WeakKeyDictionary[Any, tuple[set[str], list[str]]] = \
            weakref.WeakKeyDictionary()
        self._server: Any = None
        self._spooling = contextlib.ExitStack()
        #: the lake's indexes, kept from one batch to the next (not scanned at each)
        self._kept = Kept()
        # held (locked) while this listener lives: no other listener on this lake takes
        # it over; a listener that was killed holds nothing
        self.incoming = Staging(lake, "listen-incoming", hold=True)

    # -- the DICOM side --------------------------------------------------------
    def start(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        # memory does not grow with the size of the instances received
        self._spooling.enter_context(spooled_to(self.incoming.tmp))
        ae = AE(ae_title=self.ae_title)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION)
        handlers: list = [(evt.EVT_CONN_OPEN, self._on_connect),
                    (evt.EVT_CONN_CLOSE, self._on_close),
                    (evt.EVT_REQUESTED, self._on_requested),
                    (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_ACCEPTED, self._on_accepted),
                    (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_ABORTED, self._on_aborted)]
        self._server = ae.start_server((self.host, self.port), block=False,
                                       evt_handlers=handlers, ssl_context=self.tls)
        log.info("listening as %s on %s:%d", self.ae_title, self.host, self.port)
        # the workers' fork server imports the worker code now, not when the first batch
        # is due (about a second added to that batch's latency otherwise)
        prestart(self.config)

    def _on_store(self, event) -> int:
        sop = str(event.request.AffectedSOPInstanceUID or "") or f"no-uid-{time.time_ns()}"
        calling = str(event.assoc.requestor.ae_title).strip() or "unknown"
        day = datetime.now(UTC).strftime("%Y%m%d")
        try:
            self.incoming.receive(calling, day, sop, event, keep=True)
        except Exception as exc:  # never answer Success for what we could not keep
            why = (exc.strerror if isinstance(exc, OSError) and exc.strerror
                   else type(exc).__name__)
            with self._lock:
                self.stats.refused += 1
                self.stats.error(f"could not store an instance: {why}")
            log.error("could not store a received instance (%s); the sender was told "
                      "0xA700 and keeps it", why)
            return 0xA700
        with self._lock:
            self.stats.received += 1
            self._pending += 1
            if self._pending >= self.batch_files:
                self._wake.set()
        return 0x0000

    def _on_connect(self, event) -> None:
        """A new connection, on its own thread (pynetdicom's server starts one for each,
        which then starts the association's). Closed at once when it comes
        from an address no ``--allow`` sender has, or when too many from its address (or
        in all) are not yet associations: a client that connects and says nothing holds a
        thread for the ACSE timeout, so that many such clients would exhaust the listener.
        Then, with TLS, the handshake: a sender that fails it (no certificate, one no CA
        given signed, plain TCP) is counted, logged in one line, and its connection closed
        before anything is read; so is one whose certificate names no
        :attr:`allow_certs` name. A certificate allowed for some AE titles only has them
        noted for the association's request (:meth:`_on_requested`)."""
        address = str(event.address[0])
        with self._lock:
            self.stats.connections += 1
        why = self._admit(event.assoc, address)
        if why is not None:
            event.assoc.dul.socket.close()
            self._log_refused(address, why)
            return
        sock = event.assoc.dul.socket.socket
        if not isinstance(sock, ssl.SSLSocket):
            return
        timeout = sock.gettimeout()
        sock.settimeout(event.assoc.ae.acse_timeout)
        try:
            sock.do_handshake()
        except (OSError, ValueError) as exc:  # ssl.SSLError, a timeout, a reset
            self._associated(event)
            with self._lock:
                self.stats.tls_failed += 1
            log.warning("the TLS handshake with %s failed (%s); connection closed",
                        event.address[0], failure(exc, "the sender closed the connection",
                                                  "its certificate: "))
            event.assoc.dul.socket.close()
            return
        sock.settimeout(timeout)
        if self.allow_certs is not None:
            names = certificate_names(sock.getpeercert() or {})
            matched = [a for a in self.allow_certs
                       if any(name_matches(a.pattern, n) for n in names)]
            if matched and all(a.title is not None for a in matched):
                with self._lock:
                    self._cert_titles[event.assoc] = ({a.title for a in matched if a.title},
                                                      names)
            if not matched:
                self._associated(event)
                with self._lock:
                    self.stats.certificates_refused += 1
                shown = ", ".join(names) or "no name"
                self._log_refused(address, f"its certificate ({shown}) names no allowed "
                                  "sender (--allow-cert)")
                event.assoc.dul.socket.close()

    def _admit(self, assoc, address: str) -> str | None:
        """Count the connection of ``assoc`` from ``address`` as not yet an association;
        or why it is refused."""
        if self.allow is not None and not any(s.may_admit(address) for s in self.allow):
            why = "not an allowed address (--allow)"
        else:
            with self._lock:
                # a connection whose association's thread has ended is gone, its
                # closing reported or not (a thread not started yet is that of a
                # connection still in its TLS handshake)
                for key, (_, other) in list(self._unassociated.items()):
                    if other.is_established or (other.ident is not None
                                                and not other.is_alive()):
                        del self._unassociated[key]
                pending = [a for a, _ in self._unassociated.values()]
                if pending.count(address) >= PENDING_PER_ADDRESS:
                    why = (f"{PENDING_PER_ADDRESS} connections from it are not yet "
                           "associations")
                elif len(pending) >= PENDING_MAX:
                    why = f"{PENDING_MAX} connections are not yet associations"
                else:
                    self._unassociated[id(assoc)] = (address, assoc)
                    return None
        with self._lock:
            self.stats.connections_refused += 1
        return why

    def _log_refused(self, address: str, why: str) -> None:
        now = time.monotonic()
        with self._lock:
            last, since = self._refused_logged.get(address, (-REFUSED_LOG_SECONDS, 0))
            if now - last < REFUSED_LOG_SECONDS:
                self._refused_logged[address] = (last, since + 1)
                return
            self._refused_logged[address] = (now, 0)
        more = f" ({since} more since the last message)" if since else ""
        log.warning("refused a connection from %s: %s; closed%s", address, why, more)

    def _associated(self, event) -> None:
        """The connection of ``event`` is no longer waiting to become an association."""
        with self._lock:
            self._unassociated.pop(id(event.assoc), None)

    def _on_close(self, event) -> None:
        self._associated(event)
        dul = event.assoc.dul
        if getattr(getattr(dul, "state_machine", None), "current_state", None) == "Sta2":
            # closed before asking for an association (a port scan, a health check):
            # pynetdicom would keep the association's thread waiting for the request
            # until the ACSE timeout (30 s), counted among its associations (10 at most:
            # ten such connections made real senders "local limit exceeded"). It takes
            # None from this queue for that timeout: the thread ends now.
            dul.to_user_queue.put(None)

    def _on_requested(self, event) -> None:
        """Reject an association from a sender not in :attr:`allow`, or calling as an AE
        title its certificate is not allowed (:class:`AllowedCert`), as a PACS does a
        calling AE title it does not know (permanent; "calling AE title not
        recognized"), before anything is negotiated."""
        assoc = event.assoc
        title = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = assoc.requestor.address
        with self._lock:
            bound = self._cert_titles.get(assoc)
        if bound is not None and title not in bound[0]:
            why = (f"its certificate ({', '.join(bound[1]) or 'no name'}) may call as "
                   f"{', '.join(sorted(bound[0]))} only (--allow-cert)")
        elif self.allow is not None and not any(s.admits(title, address) for s in self.allow):
            why = "not an allowed sender (--allow)"
        else:
            return
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        assoc.kill()
        with self._lock:
            self.stats.associations_rejected += 1
        log.warning("rejected an association from %s at %s: %s", title or "an unnamed AE",
                    address, why)

    def _on_accepted(self, event) -> None:
        self._associated(event)
        with self._lock:
            self.stats.associations += 1

    def _on_rejected(self, event) -> None:
        self._associated(event)
        with self._lock:
            self.stats.associations_rejected += 1
        log.warning("rejected an association from %s", _peer(event))

    def _on_aborted(self, event) -> None:
        with self._lock:
            self.stats.associations_aborted += 1
        log.warning("an association from %s was aborted; instances it had not completed "
                    "were not acknowledged and stay with the sender", _peer(event))

    # -- the ingest side -------------------------------------------------------
    def run(self, stop: threading.Event) -> ListenStats:
        if self._server is None:
            self.start()
        self._recover_leftovers()
        try:
            while not stop.is_set():
                self._wake.wait(self._wait())
                self._wake.clear()
                if not stop.is_set():  # else the last batch, below
                    self._try_pending(False)
                    self._sweep_spool()
        finally:
            if self._server is not None:
                self._server.shutdown()
                self._server = None
            self._spooling.close()
            self._try_pending(True)
            left = self.incoming.clean(set())
            self.incoming.release()
            with self._lock:
                self.stats.not_ingested = left
            if left:
                log.warning("%d received files were not ingested; they are kept in %s and "
                            "the next `lake listen` ingests them", left, self.incoming.root)
        return self.stats

    def _sweep_spool(self) -> int:
        """Remove the spool files of instances never completed (their association was
        aborted: the sender keeps them) once stale; returns how many."""
        cutoff = time.time() - SPOOL_STALE_SECONDS
        removed = 0
        with contextlib.suppress(FileNotFoundError), os.scandir(self.incoming.tmp) as it:
            for entry in it:
                with contextlib.suppress(FileNotFoundError):
                    if entry.name.startswith(SPOOL_PREFIX) and \
                            entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
        if removed:
            log.info("removed %d instances never completed from the spool", removed)
        return removed

    def _wait(self) -> float:
        """Seconds until the next batch: ``batch_seconds``, doubled for each batch in a
        row that could not be ingested, at most :data:`RETRY_MAX_SECONDS`."""
        if not self._failures:
            return self.batch_seconds
        return min(self.batch_seconds * 2 ** min(self._failures, 30),
                   max(RETRY_MAX_SECONDS, self.batch_seconds))

    def _try_pending(self, last: bool) -> None:
        """:meth:`ingest_pending`; a batch that fails is logged and tried again later."""
        from lakehouse.errors import LakeBusyError, one_line

        try:
            self.ingest_pending()
        except Exception as exc:
            self._failures += 1
            why = one_line(str(exc) or type(exc).__name__, 300)
            with self._lock:
                self.stats.failed_batches += 1
                self.stats.error(why)
            when = "by the next `lake listen`" if last else f"in {self._wait():g} s"
            log.log(logging.WARNING if isinstance(exc, LakeBusyError) else logging.ERROR,
                    "a batch was not ingested (%s); its files are kept and tried again %s",
                    why, when, exc_info=log.isEnabledFor(logging.DEBUG))
        else:
            self._failures = 0

    def wake(self) -> None:
        """Make ``run`` look at its stop event now (e.g. from a signal handler)."""
        self._wake.set()

    def ingest_pending(self) -> RunSummary | None:
        """Move the received files to a batch folder and ingest them. When the ingest
        raises, the files not ingested go back to the received ones, and it raises."""
        files = [Path(d, n) for d, _, names in os.walk(self.incoming.files) for n in names]
        if not files:
            return None
        batch = Staging(self.lake, "listen-batch", hold=True)
        for f in files:
            dest = batch.files / f.relative_to(self.incoming.files)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dest)
        with self._lock:
            self._pending = max(0, self._pending - len(files))
        try:
            return self._ingest_batch(batch)
        except BaseException:
            back = self._take_back(batch.root, held=True)
            with self._lock:
                self._pending += back
            raise
        finally:
            batch.release()

    def _take_back(self, folder: Path, held: bool = False) -> int:
        """Move the files under ``folder/files`` to the received files (none replaced)
        and remove ``folder``; returns how many. Unless this listener ``held`` it, the
        folder is claimed first, and left alone when another listener holds it."""
        lock = None if held else claim(folder)
        if not held and lock is None:
            log.debug("%s is in use by another listener", folder.name)
            return 0
        try:
            n = 0
            for d, _, names in os.walk(folder / "files"):
                for name in names:
                    src = Path(d, name)
                    place_new(src, self.incoming.files / src.relative_to(folder / "files"))
                    n += 1
            Staging.remove_empty(folder)
        finally:
            if lock is not None:
                os.close(lock)
        return n

    def _ingest_batch(self, batch: Staging) -> RunSummary:
        run = ingest(self.lake, batch.files, self.config, key_file=self.key_file,
                     source_kind=SOURCE_KIND, kept=self._kept)
        import pyarrow.dataset as ds

        # this run's rows only: the statistics of ingest_run_id (run ids grow with time)
        # leave out the files of earlier runs, not read whole at every batch
        mine = self.lake.read("files", columns=["path", "outcome"],
                              filter=ds.field("ingest_run_id") == run.run_id)
        done = {p for p, o in zip(mine.column("path").to_pylist(),
                                  mine.column("outcome").to_pylist(), strict=True)
                if o in DONE_OUTCOMES}
        kept = batch.clean(done)
        if kept:  # what the pipeline did not take stays, out of the way of recovery
            with contextlib.suppress(OSError):
                os.unlink(batch.root / OWNER)
            batch.root.rename(batch.root.with_name(batch.root.name.replace("listen-batch",
                                                                            "listen-kept")))
        with self._lock:
            s = self.stats
            s.batches += 1
            s.kept_in_staging += kept
            for k in ("ingested", "duplicate", "conflict", "quarantined", "skipped"):
                setattr(s, k, getattr(s, k) + run.outcomes[k])
        log.info("batch %s: %d files, %d ingested", run.run_id, run.files_seen,
                 run.outcomes["ingested"])
        if self.on_batch:
            self.on_batch(run)
        return run

    def _recover_leftovers(self) -> None:
        """Files an earlier listener received and did not ingest: it was stopped while
        its last batch failed, or killed (not those of a listener still running)."""
        base = self.lake.work_dir() / "staging"
        for old in sorted(base.glob("listen-*")):
            if old == self.incoming.root or old.name.startswith("listen-kept"):
                continue
            n = self._take_back(old)
            if n:
                log.warning("recovered %d received files an earlier listener had not "
                            "ingested", n)
                with self._lock:
                    self._pending += n
