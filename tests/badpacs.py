"""A small DIMSE PACS on loopback that misbehaves on request (pynetdicom): it answers
C-FIND and C-GET for the datasets it holds, and ``faults`` (a set of names) make it
answer the way broken or hostile peers do.

- ``find-no-series``: C-FIND series answers without SeriesInstanceUID;
- ``find-no-class``: C-FIND instance answers without SOPClassUID;
- ``find-empty-uid``: C-FIND instance answers with an empty SOPInstanceUID;
- ``find-bad-uid``: C-FIND answers whose UIDs could change a path (``../x``);
- ``find-abort``: the association aborted during a C-FIND;
- ``get-half``: C-GET sends half the instances, then reports Success;
- ``get-renamed``: C-GET sends each instance under another AffectedSOPInstanceUID;
- ``get-abort``: the association aborted after the first C-STORE of a C-GET;
- ``get-fail``: C-GET ends with status 0xA701 after sending nothing;
- ``get-silent``: C-GET sends nothing and never answers (the client's timeout).
"""

from __future__ import annotations

import copy
import threading
import time

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.pacs import free_port

FAULTS = ("find-no-series", "find-no-class", "find-empty-uid", "find-bad-uid", "find-abort",
          "get-half", "get-renamed", "get-abort", "get-fail", "get-silent")
AE_TITLE = "BADPACS"


class BadPacs:
    def __init__(self, datasets: list[Dataset], faults: set[str] | None = None,
                 silent: float = 3.0):
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.sop_class import (
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
        )

        self.datasets = datasets
        self.faults = set(faults or ())
        self.silent = silent
        self.stop = threading.Event()
        ae = AE(ae_title=AE_TITLE)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        for cls in sorted({str(ds.SOPClassUID) for ds in datasets}):
            ae.add_supported_context(cls, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        ae.network_timeout = ae.dimse_timeout = ae.acse_timeout = 10
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_FIND, self._find), (evt.EVT_C_GET, self._get)])

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()

    def __enter__(self) -> BadPacs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def url(self) -> str:
        return f"dimse://{AE_TITLE}@127.0.0.1:{self.port}"

    def _match(self, q: Dataset) -> list[Dataset]:
        out = []
        for ds in self.datasets:
            if q.get("StudyInstanceUID") and ds.StudyInstanceUID != q.StudyInstanceUID:
                continue
            if q.get("SeriesInstanceUID") and ds.SeriesInstanceUID != q.SeriesInstanceUID:
                continue
            if q.get("SOPInstanceUID") and ds.SOPInstanceUID != q.SOPInstanceUID:
                continue
            if q.get("Modality") and ds.Modality != q.Modality:
                continue
            out.append(ds)
        return out

    def _find(self, event):
        q = event.identifier
        matches = self._match(q)
        if "find-abort" in self.faults:
            event.assoc.abort()
            return
        if q.QueryRetrieveLevel == "SERIES":
            seen = {}
            for ds in matches:
                seen.setdefault(ds.SeriesInstanceUID, ds)
            for ds in seen.values():
                r = Dataset()
                r.QueryRetrieveLevel = "SERIES"
                r.StudyInstanceUID = ds.StudyInstanceUID
                if "find-no-series" not in self.faults:
                    r.SeriesInstanceUID = ds.SeriesInstanceUID
                if "find-bad-uid" in self.faults:
                    r.StudyInstanceUID = "../../" + ds.StudyInstanceUID
                yield 0xFF00, r
            return
        for ds in matches:
            r = Dataset()
            r.QueryRetrieveLevel = "IMAGE"
            r.StudyInstanceUID = ds.StudyInstanceUID
            r.SeriesInstanceUID = ds.SeriesInstanceUID
            r.SOPInstanceUID = "" if "find-empty-uid" in self.faults else ds.SOPInstanceUID
            if "find-no-class" not in self.faults:
                r.SOPClassUID = ds.SOPClassUID
            yield 0xFF00, r

    def _get(self, event):
        matches = self._match(event.identifier)
        if "get-silent" in self.faults:
            time.sleep(self.silent)
            event.assoc.abort()
            return
        if "get-fail" in self.faults:
            yield len(matches)
            yield 0xA701, None
            return
        if "get-half" in self.faults:
            matches = matches[:len(matches) // 2]
        yield len(matches)
        for i, ds in enumerate(matches):
            if "get-abort" in self.faults and i == 1:
                event.assoc.abort()
                return
            if "get-renamed" in self.faults:
                ds = copy.deepcopy(ds)
                ds.SOPInstanceUID = generate_uid()
            yield 0xFF00, ds
