"""A PACS over DIMSE as a source: C-FIND lists, C-GET retrieves (pynetdicom).

``dimse://AE@HOST:PORT`` (``dimse+tls://`` over TLS): series are found with a Study Root
C-FIND at SERIES level (the filters apply there), their instances with a C-FIND at IMAGE level;
instances not fetched before are retrieved with C-GET over the same kind of
association (the PACS sends them back as C-STORE sub-operations, which land in
the staging folder: written, fsync'ed and renamed before we answer Success).
A series whose instances are all new is retrieved with one SERIES-level C-GET,
otherwise instance by instance. C-GET needs no inbound port on our side (C-MOVE
would need the PACS to know us as a destination: use ``lake listen`` for that).

The file meta information is written by the receiver (DIMSE does not carry the
sender's), so a DIMSE copy of a file differs from the file in its first bytes:
the lake's checksum of the same instance differs between a folder and a DIMSE
ingest.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from etl.errors import SourceError
from etl.sources.staging import Staging, spooled_to
from etl.sources.tls import handshake_error

log = logging.getLogger(__name__)
#: a UID as a C-FIND answer may give it: DICOM UIDs are digits and dots (PS3.5 9.1), but
#: a PACS may hold non-conforming ones, which are asked for as they are
_UID = re.compile(r"[^\x00-\x1f\x7f\\]{1,64}")

#: Our AE title when we call the PACS.
CALLING_AE = "LAKE"
#: Presentation contexts an association may propose (DICOM limit: 128).
MAX_CONTEXTS = 128
#: Study Root Query/Retrieve Information Model - FIND and - GET (PS3.4 C.6.2)
FIND = "1.2.840.10008.5.1.4.1.2.2.1"
GET = "1.2.840.10008.5.1.4.1.2.2.3"


@dataclass(frozen=True)
class DimseSource:
    kind = "dimse"
    #: the PACS' AE title
    ae_title: str
    host: str
    port: int
    #: C-FIND keys (DICOM keyword -> value), ``since`` included
    filters: tuple[tuple[str, str], ...] = ()
    calling_ae: str = CALLING_AE
    #: seconds to wait for an association, a response, or network activity
    timeout: float = 30.0
    #: TLS (``dimse+tls://``; :func:`etl.sources.tls.client_context`); None: plain TCP
    tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> str:
        return f"dimse://{self.ae_title}@{self.host}:{self.port}"

    def _fail(self, what: str, assoc) -> SourceError:
        import socket

        try:  # pynetdicom reports a refused connection as an abort: tell them apart
            socket.create_connection((self.host, self.port), timeout=self.timeout).close()
            reachable = ""
        except OSError as exc:
            reachable = exc.strerror or type(exc).__name__
        tls = None if reachable or self.tls is None else \
            handshake_error(self.tls, self.host, self.port, self.timeout)
        if reachable:
            detail = f"{what}: no association, cannot connect ({reachable}); is the PACS " \
                     "running and reachable?"
        elif tls:
            detail = f"{what}: no association, the TLS handshake failed ({tls}); check " \
                     "--tls-ca (the CAs of the PACS' certificate) and --tls-cert / --tls-key " \
                     "(ours, if the PACS asks for one)"
        elif assoc.is_rejected:
            detail = f"{what}: the association was rejected (check the AE titles: we call " \
                     f"{self.ae_title} as {self.calling_ae})"
        else:
            detail = f"{what}: the association was aborted by the peer"
        return SourceError(self.key, detail)

    def _associate(self, ae, **kwargs):
        """An association with the PACS (over TLS with :attr:`tls`)."""
        return ae.associate(self.host, self.port, ae_title=self.ae_title,
                            tls_args=None if self.tls is None else (self.tls, self.host),
                            **kwargs)

    def _ae(self):
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        return ae

    # -- listing ---------------------------------------------------------------
    def list_instances(self) -> Iterator[tuple[str, str, str]]:
        for study, series, sop, _cls in self._find():
            yield study, series, sop

    def _find(self) -> list[tuple[str, str, str, str]]:
        """(study, series, instance, SOP class) of every instance the filters select."""
        from pydicom.dataset import Dataset
        ae = self._ae()
        ae.add_requested_context(FIND)
        assoc = self._associate(ae)
        if not assoc.is_established:
            raise self._fail("C-FIND", assoc)
        out = []
        try:
            q = Dataset()
            q.QueryRetrieveLevel = "SERIES"
            q.StudyInstanceUID = ""
            q.SeriesInstanceUID = ""
            for k, v in self.filters:
                setattr(q, k, v)
            unusable = 0
            series = []
            for ds in self._responses(assoc.send_c_find(q, FIND), "C-FIND series"):
                study, ser = _uid(ds, "StudyInstanceUID"), _uid(ds, "SeriesInstanceUID")
                if study and ser:
                    series.append((study, ser))
                else:
                    unusable += 1
            for study, ser in series:
                q = Dataset()
                q.QueryRetrieveLevel = "IMAGE"
                q.StudyInstanceUID = study
                q.SeriesInstanceUID = ser
                q.SOPInstanceUID = ""
                q.SOPClassUID = ""
                for ds in self._responses(assoc.send_c_find(q, FIND), "C-FIND instances"):
                    sop = _uid(ds, "SOPInstanceUID")
                    if sop:  # the SOP class may be missing: the C-GET then cannot take it
                        out.append((study, ser, sop, _uid(ds, "SOPClassUID") or ""))
                    else:
                        unusable += 1
        finally:
            if assoc.is_established:
                assoc.release()
        if unusable:
            log.warning("%d C-FIND answers of %s had no usable UID and were left out",
                        unusable, self.key)
        return out

    def _responses(self, responses, what: str):
        for status, identifier in responses:
            # pynetdicom gives an empty status on a timeout, an abort or an invalid answer
            if status is None or "Status" not in status:
                raise SourceError(self.key, f"{what}: no response within {self.timeout:g} s "
                                            "or the association was aborted")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                if identifier is not None:
                    yield identifier
            elif code != 0x0000:
                raise SourceError(self.key, f"{what} failed with status 0x{code:04X}")

    # -- fetching --------------------------------------------------------------
    def fetch(self, todo: list[tuple[str, str, str]], staging: Staging,
              progress: Callable[[int, int], None] | None = None,
              listed: list[tuple[str, str, str]] | None = None) -> dict[str, str]:
        """C-GET ``todo`` into ``staging``; return {instance UID: error} of instances that
        did not arrive (they are retried by the next run)."""
        from pydicom.dataset import Dataset
        from pynetdicom import ALL_TRANSFER_SYNTAXES, build_role, evt
        listing = self._find()  # again: SOP classes, and which series are wholly new
        found = {sop: cls for _st, _se, sop, cls in listing}
        listed_per_series = Counter((st, se) for st, se, _sop, _cls in listing)
        wanted = {sop: (st, se) for st, se, sop in todo}
        classes = sorted({found[sop] for sop in wanted if found.get(sop)})
        if len(classes) + 1 > MAX_CONTEXTS:
            classes = classes[:MAX_CONTEXTS - 1]
            log.warning("more SOP classes than one association can carry; the instances "
                        "of the others are retried by the next run")
        received: set[str] = set()
        errors: dict[str, str] = {}
        lock = threading.Lock()

        def on_store(event) -> int:
            sop = str(event.request.AffectedSOPInstanceUID)
            where = wanted.get(sop)
            if where is None:  # not asked for (a series C-GET of a partly known series)
                return 0x0000
            try:
                staging.receive(where[0], where[1], sop, event)
            except OSError as exc:
                with lock:
                    errors[sop] = f"could not be written: {exc.strerror or exc}"
                return 0xA700  # out of resources: the PACS keeps it and reports the failure
            with lock:
                received.add(sop)
                if progress:
                    progress(len(received), len(todo))
            return 0x0000

        with spooled_to(staging.tmp):  # memory does not grow with instance size
            ae = self._ae()
            ae.add_requested_context(GET)
            for c in classes:
                ae.add_requested_context(c, ALL_TRANSFER_SYNTAXES)
            roles = [build_role(c, scp_role=True) for c in classes]
            assoc = self._associate(ae, ext_neg=roles,
                                    evt_handlers=[(evt.EVT_C_STORE, on_store)])
            if not assoc.is_established:
                raise self._fail("C-GET", assoc)
            try:
                by_series: dict[tuple[str, str], list[str]] = defaultdict(list)
                for st, se, sop in todo:
                    by_series[(st, se)].append(sop)
                for (st, se), sops in by_series.items():
                    q = Dataset()
                    q.StudyInstanceUID = st
                    q.SeriesInstanceUID = se
                    if len(sops) == listed_per_series[(st, se)]:
                        q.QueryRetrieveLevel = "SERIES"
                        self._get(assoc, q, GET, errors, sops)
                    else:
                        for sop in sops:
                            q.QueryRetrieveLevel = "IMAGE"
                            q.SOPInstanceUID = sop
                            self._get(assoc, q, GET, errors, [sop])
            finally:
                if assoc.is_established:
                    assoc.release()
        failed = {sop: errors.get(sop, "not received" if found.get(sop) else
                                  "the PACS did not give its SOP Class UID (C-FIND), so it "
                                  "cannot be asked for")
                  for sop in wanted if sop not in received}
        if todo and len(failed) == len(todo):
            raise SourceError(self.key, f"no instance could be retrieved "
                                        f"({next(iter(failed.values()))})")
        return failed

    def _get(self, assoc, query, model, errors: dict[str, str], sops: list[str]) -> None:
        if not assoc.is_established:  # aborted during an earlier C-GET
            for sop in sops:
                errors.setdefault(sop, "C-GET: the association was aborted")
            return
        for status, _identifier in assoc.send_c_get(query, model):
            if status is None or "Status" not in status:
                for sop in sops:
                    errors.setdefault(sop, "C-GET: no response or association aborted")
                return
            code = int(status.Status)
            if code not in (0x0000, 0xFF00, 0xFF01, 0xB000):
                for sop in sops:
                    errors.setdefault(sop, f"C-GET failed with status 0x{code:04X}")


def _uid(ds, keyword: str) -> str | None:
    """A UID of a C-FIND answer; None when missing, empty, longer than 64 characters, or
    holding control characters or a backslash."""
    try:
        value = ds.get(keyword)
    except Exception:  # an element the answer encoded wrongly
        return None
    text = str(value).strip(" \x00") if value is not None else ""
    return text if _UID.fullmatch(text) else None
