"""A DICOMweb server as a source: QIDO-RS lists, WADO-RS fetches (dicomweb-client).

Series are searched with QIDO-RS (the filters and ``since`` apply there: study
and series attributes both work at the series level), then the instances of
each series; only instances not fetched by an earlier run are retrieved with
WADO-RS (a whole series in one request when all of it is new, else instance by
instance), in the transfer syntax they are stored in (``transfer-syntax=*``), as
the exact bytes the server holds (so the same file ingested from a folder is a
duplicate, not a conflict). HTTP requests are retried with exponential backoff
(connection errors, 429, 500, 502, 503, 504).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from etl.errors import SourceError
from etl.sources.staging import Staging

log = logging.getLogger(__name__)

STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
RETRY_STATUS = (429, 500, 502, 503, 504)


@dataclass(frozen=True)
class DicomWebSource:
    kind = "dicomweb"
    #: the service root, e.g. http://pacs:8042/dicom-web
    url: str
    #: QIDO-RS search filters (DICOM keyword -> value), ``since`` included
    filters: tuple[tuple[str, str], ...] = ()
    #: attempts per HTTP request (1 = no retry)
    retries: int = 4
    #: first backoff in seconds; doubles with each retry
    backoff: float = 0.25
    #: seconds to wait for a connection or a response
    timeout: float = 30.0
    #: parallel WADO-RS requests
    threads: int = 4

    @property
    def key(self) -> str:
        """Identifies the source across runs (what was fetched is remembered per key)."""
        return f"dicomweb+{self.url}"

    def _client(self):
        import requests
        from dicomweb_client import DICOMwebClient
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        session = requests.Session()
        retry = Retry(total=self.retries - 1, connect=self.retries - 1, read=self.retries - 1,
                      status=self.retries - 1, backoff_factor=self.backoff,
                      status_forcelist=RETRY_STATUS, allowed_methods={"GET"},
                      raise_on_status=False)
        adapter = HTTPAdapter(max_retries=retry, pool_maxsize=max(4, self.threads))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        client = DICOMwebClient(self.url, session=session, timeout=self.timeout)
        client.set_http_retry_params(retry=False)  # urllib3 retries, with backoff
        return client

    def _explain(self, exc: Exception) -> SourceError:
        import requests

        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            code = exc.response.status_code
            hint = {401: "authentication required", 403: "access refused",
                    404: "no DICOMweb service at this URL (check the path, e.g. /dicom-web)",
                    }.get(code, exc.response.reason or "error")
            return SourceError(self.url, f"the server answered HTTP {code} ({hint})")
        if isinstance(exc, requests.ConnectionError | requests.Timeout):
            return SourceError(self.url, f"cannot connect after {self.retries} attempts "
                                         f"({type(exc).__name__}); is the server running "
                                         "and reachable?")
        # no message: it may quote UIDs of the request
        return SourceError(self.url, f"unexpected {type(exc).__name__} from the client")

    # -- listing ---------------------------------------------------------------
    def list_instances(self) -> Iterator[tuple[str, str, str]]:
        """(study, series, instance) UIDs of every instance the filters select."""
        client = self._client()
        try:
            series = client.search_for_series(search_filters=dict(self.filters),
                                              get_remaining=True)
            for s in series:
                study_uid, series_uid = _value(s, STUDY_UID), _value(s, SERIES_UID)
                if not study_uid or not series_uid:
                    continue
                for i in client.search_for_instances(study_uid, series_uid,
                                                     get_remaining=True):
                    sop = _value(i, SOP_UID)
                    if sop:
                        yield study_uid, series_uid, sop
        except Exception as exc:  # requests' and the client's errors -> one clear line
            raise self._explain(exc) from None

    # -- fetching --------------------------------------------------------------
    def fetch(self, todo: list[tuple[str, str, str]], staging: Staging,
              progress: Callable[[int, int], None] | None = None,
              listed: list[tuple[str, str, str]] | None = None) -> dict[str, str]:
        """Retrieve ``todo`` into ``staging``; return {instance UID: error} of failures.

        A series whose listed instances are all in ``todo`` is retrieved with one
        series-level request (a multipart answer, streamed part by part to disk);
        the others instance by instance. A failure (after retries) does not stop the
        others; when nothing at all could be fetched, the first error is raised.
        """
        per_series = Counter((st, se) for st, se, _sop in (listed or todo))
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        for st, se, sop in todo:
            groups[(st, se)].append(sop)
        jobs: list[tuple[bool, str, str, list[str]]] = []
        for (st, se), sops in groups.items():
            if len(sops) > 1 and len(sops) == per_series[(st, se)]:
                jobs.append((True, st, se, sops))
            else:
                jobs.extend((False, st, se, [sop]) for sop in sops)
        local = threading.local()
        failed: dict[str, str] = {}
        done = 0
        lock = threading.Lock()

        def one(job: tuple[bool, str, str, list[str]]) -> None:
            nonlocal done
            if not hasattr(local, "client"):
                local.client = self._client()
            whole, study, series, sops = job
            try:
                if whole:
                    n = _retrieve_series_raw(local.client, staging, study, series)
                    if n != len(sops):  # the series changed since it was listed
                        raise _SeriesChanged(f"the series answer held {n} instances, "
                                             f"{len(sops)} were listed; retried next run")
                else:
                    _retrieve_raw(local.client, staging, study, series, sops[0])
            except _SeriesChanged as exc:
                with lock:
                    failed.update(dict.fromkeys(sops, str(exc)))
            except Exception as exc:
                err = self._explain(exc)
                with lock:
                    failed.update(dict.fromkeys(sops, err.detail))
            with lock:
                done += len(sops)
                if progress:
                    progress(done, len(todo))

        with ThreadPoolExecutor(self.threads, thread_name_prefix="wado") as pool:
            list(pool.map(one, jobs))
        if todo and len(failed) == len(todo):
            raise SourceError(self.url, f"no instance could be fetched "
                                        f"({next(iter(failed.values()))})")
        return failed


class _SeriesChanged(Exception):
    pass


_ACCEPT_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _retrieve_series_raw(client, staging: Staging, study: str, series: str) -> int:
    """WADO-RS Retrieve Series, each part written byte for byte as it arrives (memory
    holds one instance at a time); returns the number of instances written. The
    files are named by their position in the answer (the pipeline reads the UIDs)."""
    from dicomweb_client.web import _Transaction

    url = client._get_series_url(_Transaction.RETRIEVE, study, series)
    response = client._http_get(url, headers={"Accept": _ACCEPT_ANY}, stream=True)
    n = 0
    for part in client._decode_multipart_message(response, stream=True):
        staging.write(study, series, f"part-{n:06d}", part)
        n += 1
    return n


def _retrieve_raw(client, staging: Staging, study: str, series: str, sop: str) -> None:
    """WADO-RS Retrieve Instance, written byte for byte.

    dicomweb-client's public ``retrieve_instance`` parses the bytes with pydicom (which
    must never see unvetted input: that is etl.safety's job, on the workers), so this
    uses the client's own request and multipart decoding and keeps the raw part.
    """
    from dicomweb_client.web import _Transaction

    url = client._get_instances_url(_Transaction.RETRIEVE, study, series, sop)
    response = client._http_get(url, headers={"Accept": _ACCEPT_ANY})
    if response.headers.get("Content-Type", "").startswith("application/dicom"):
        parts = [response.content]  # a non-compliant single-part answer
    else:
        parts = list(client._decode_multipart_message(response, stream=False))
    if len(parts) != 1:
        raise ValueError(f"expected one instance, the server sent {len(parts)} parts")
    staging.write(study, series, sop, parts[0])


def _value(item: dict, tag: str) -> str | None:
    v = item.get(tag, {}).get("Value")
    return str(v[0]) if v else None
