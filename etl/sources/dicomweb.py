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
import re
import ssl
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from etl.errors import SourceError
from etl.sources.staging import Staging
from etl.sources.tls import closed_by, failure

log = logging.getLogger(__name__)

STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
RETRY_STATUS = (429, 500, 502, 503, 504)
T = TypeVar("T")


def _tls_adapter(ctx: ssl.SSLContext):
    """requests' HTTP adapter whose connections use ``ctx`` (the CAs it trusts, the
    certificate it presents)."""
    from requests.adapters import HTTPAdapter

    class TlsAdapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            kwargs["ssl_context"] = ctx
            return super().init_poolmanager(*args, **kwargs)

        def proxy_manager_for(self, *args, **kwargs):
            kwargs["ssl_context"] = ctx
            return super().proxy_manager_for(*args, **kwargs)

    return TlsAdapter


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
    #: HTTPS with our own trust and certificate (:func:`etl.sources.tls.client_context`);
    #: None: requests' defaults
    tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

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
        adapter = (HTTPAdapter if self.tls is None else _tls_adapter(self.tls))(
            max_retries=retry, pool_maxsize=max(4, self.threads))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        client = DICOMwebClient(self.url, session=session, timeout=self.timeout)
        client.set_http_retry_params(retry=False)  # urllib3 retries, with backoff
        return client

    def _explain(self, exc: Exception) -> SourceError:
        import requests
        from requests.exceptions import ChunkedEncodingError, JSONDecodeError

        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            code = exc.response.status_code
            hint = {401: "authentication required", 403: "access refused",
                    404: "no DICOMweb service at this URL (check the path, e.g. /dicom-web)",
                    }.get(code, exc.response.reason or "error")
            return SourceError(self.url, f"the server answered HTTP {code} ({hint})")
        if isinstance(exc, _WrongAnswer):
            return SourceError(self.url, str(exc))
        if isinstance(exc, ChunkedEncodingError):
            exc = _BrokenAnswer(_BROKE_OFF)
        if isinstance(exc, _BrokenAnswer):
            return SourceError(self.url, f"{exc}, after {self.retries} attempts")
        if isinstance(exc, JSONDecodeError):
            return SourceError(self.url, "the server's search answer is not valid JSON, after "
                                         f"{self.retries} attempts (cut short, or not a "
                                         "DICOMweb service at this URL?)")
        if isinstance(exc, requests.exceptions.SSLError):
            why = failure(exc, closed_by("the server"))
            return SourceError(self.url, f"the TLS handshake failed ({why}); "
                                         "check --tls-ca "
                                         "(the CAs of the server's certificate) and "
                                         "--tls-cert / --tls-key (ours, if it asks for one)")
        if isinstance(exc, requests.ConnectionError | requests.Timeout):
            return SourceError(self.url, f"cannot connect after {self.retries} attempts "
                                         f"({type(exc).__name__}); is the server running "
                                         "and reachable?")
        # no message: it may quote UIDs of the request
        return SourceError(self.url, f"unexpected {type(exc).__name__} from the client")

    # -- listing ---------------------------------------------------------------
    def list_instances(self) -> Iterator[tuple[str, str, str]]:
        """(study, series, instance) UIDs of every instance the filters select."""
        from requests.exceptions import ChunkedEncodingError, JSONDecodeError

        client = self._client()
        broke = (JSONDecodeError, ChunkedEncodingError)
        unusable = 0
        try:
            series = self._again(lambda: client.search_for_series(
                search_filters=dict(self.filters), get_remaining=True), broke)
            for s in series:
                study_uid, series_uid = _value(s, STUDY_UID), _value(s, SERIES_UID)
                if not study_uid or not series_uid:
                    unusable += 1
                    continue
                found = self._again(partial(client.search_for_instances, study_uid,
                                            series_uid, get_remaining=True), broke)
                for i in found:
                    sop = _value(i, SOP_UID)
                    if sop:
                        yield study_uid, series_uid, sop
                    else:
                        unusable += 1
        except Exception as exc:  # requests' and the client's errors -> one clear line
            raise self._explain(exc) from None
        if unusable:
            log.warning("%d search results of %s had no usable UID (none, or one that cannot "
                        "go into a URL) and were left out", unusable, self.url)

    def _again(self, call: Callable[[], T], broke: tuple[type[Exception], ...]) -> T:
        """``call()``, made again (with the backoff) while it fails with ``broke``: an
        answer whose body broke off. Failures of the request itself are urllib3's to
        retry (the session's adapter), and are not retried twice."""
        for attempt in range(self.retries):
            try:
                return call()
            except broke:
                if attempt + 1 >= self.retries:
                    raise
                log.debug("answer broke off; retrying", exc_info=True)
                time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

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
                    n = self._again(lambda: _retrieve_series_raw(local.client, staging,
                                                                 study, series), _BODY_BROKE)
                    if n != len(sops):  # the series changed since it was listed
                        raise _SeriesChanged(f"the series answer held {n} instances, "
                                             f"{len(sops)} were listed; retried next run")
                else:
                    self._again(lambda: _retrieve_raw(local.client, staging, study, series,
                                                      sops[0]), _BODY_BROKE)
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


class _BrokenAnswer(Exception):
    """An answer cut short: its body broke off (the connection closed or timed out), or
    ended before its closing boundary (made again). The message says which."""


_BROKE_OFF = "the connection broke off during an answer"


class _WrongAnswer(Exception):
    """An answer that is whole but not what was asked (not made again); its message
    quotes nothing of the answer but its media type."""


_ACCEPT_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9.+/-]{1,60}")

#: what reading a WADO-RS answer raises when its body breaks off (the request itself was
#: answered; urllib3 retries the requests that fail before an answer)
_BODY_BROKE = (_BrokenAnswer,)


class _Tracked:
    """An answer as dicomweb-client's multipart decoder reads it (streamed), noting when
    its body has ended and whether the closing boundary came (the decoder checks
    neither: at the end of the body it gives the bytes after the last boundary as a
    part)."""

    def __init__(self, response, boundary: bytes):
        self.response = response
        self.headers = response.headers
        self.close = b"--" + boundary + b"--"
        self.ended = self.closed = False

    def __enter__(self) -> _Tracked:
        return self

    def __exit__(self, *exc) -> None:
        self.response.close()

    def iter_content(self, chunk_size: int | None = None) -> Iterator[bytes]:
        import requests

        tail = b""
        try:
            for chunk in self.response.iter_content(chunk_size=chunk_size):
                if not self.closed:
                    seen = tail + chunk
                    self.closed = self.close in seen
                    tail = seen[-len(self.close):]
                yield chunk
        except requests.RequestException as exc:
            raise _BrokenAnswer(_BROKE_OFF) from exc
        self.ended = True


def _boundary(content_type: str) -> bytes | None:
    for item in content_type.split(";")[1:]:
        attr, _, value = item.strip().partition("=")
        if attr.lower() == "boundary" and value.strip('"'):
            return value.strip('"').encode("utf-8")
    return None


def _instances(client, url: str) -> Iterator[bytes]:
    """The instances of a WADO-RS answer, each only when it is known whole: a multipart
    part once the next boundary has arrived, a single-part answer as a whole body (its
    Content-Length is checked by urllib3). A multipart answer whose body ends without
    its closing boundary was cut short (:class:`_BrokenAnswer`): the part the end of
    the body closes is not given."""
    import requests

    response = client._http_get(url, headers={"Accept": _ACCEPT_ANY}, stream=True)
    ctype = response.headers.get("Content-Type", "")
    media = ctype.split(";")[0].strip().lower()
    boundary = _boundary(ctype)
    if media == "application/dicom" or (media == "multipart/related" and not boundary):
        try:  # a non-compliant single-part answer
            yield response.content
        except requests.RequestException as exc:
            raise _BrokenAnswer(_BROKE_OFF) from exc
        return
    if media != "multipart/related" or boundary is None:
        response.close()
        shown = media if _MEDIA_TYPE.fullmatch(media) else "an unknown media type"
        raise _WrongAnswer(f"the server answered {shown}, not DICOM (a login page or a "
                           "proxy in the way?)")
    tracked = _Tracked(response, boundary)
    cut = _BrokenAnswer("an answer ended before its closing boundary (the connection was "
                        "closed early)")
    parts = client._decode_multipart_message(tracked, stream=True)
    while True:
        try:
            part = next(parts)
        except StopIteration:
            break
        except ValueError:  # a part without a blank line after its headers
            if tracked.ended and not tracked.closed:
                raise cut from None
            raise _WrongAnswer("a part of the server's multipart answer has no headers") \
                from None
        if tracked.ended:
            raise cut
        yield part
    if not tracked.closed:
        raise cut


def _retrieve_series_raw(client, staging: Staging, study: str, series: str) -> int:
    """WADO-RS Retrieve Series, each part written byte for byte as it arrives (memory
    holds one instance at a time); returns the number of instances written. The
    files are named by their position in the answer (the pipeline reads the UIDs); an
    answer made again after breaking off writes the same names."""
    from dicomweb_client.web import _Transaction

    url = client._get_series_url(_Transaction.RETRIEVE, study, series)
    n = 0
    for part in _instances(client, url):
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
    parts = list(_instances(client, url))
    if len(parts) != 1:
        raise _WrongAnswer(f"the answer for one instance held {len(parts)} parts")
    staging.write(study, series, sop, parts[0])


#: a UID as it may go into a WADO-RS path: DICOM UIDs are digits and dots (PS3.5 9.1);
#: a server's non-conforming UID is taken when nothing in it could change the path
_PATH_SAFE = re.compile(r"[^/?#%\\\s\x00-\x1f\x7f]{1,128}")


def _value(item: object, tag: str) -> str | None:
    """The first value of ``tag`` in a search result (DICOM JSON), None when it has none
    or it could not be a UID in a URL path."""
    if not isinstance(item, dict):
        raise _WrongAnswer("a search answer is not a list of DICOM JSON objects")
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    if not isinstance(values, list) or not values or not isinstance(values[0], str):
        return None
    uid = values[0].strip(" \x00")
    return uid if _PATH_SAFE.fullmatch(uid) else None
