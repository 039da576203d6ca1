"""Sources beyond a folder: a PACS over DICOMweb or DIMSE, an object store.

``resolve(text)`` turns what the user typed into a source:

- a path: a folder (or file), ingested by :func:`etl.ingest` directly;
- ``dicomweb+http://host:port/dicom-web`` (or ``dicomweb+https://``): QIDO-RS and
  WADO-RS (:mod:`etl.sources.dicomweb`);
- ``dimse://AE@host:port``: C-FIND and C-GET (:mod:`etl.sources.dimse`);
  ``dimse+tls://AE@host:port`` over TLS;
- ``s3://bucket/prefix`` (and other fsspec URLs): objects through fsspec/s3fs
  (:mod:`etl.sources.objects`).

Remote sources are pulled into a staging folder in the vault and ingested by the
folder pipeline (:func:`ingest_remote`).
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from etl.errors import SourceError
from etl.sources.pull import PullSummary, ingest_remote

__all__ = ["PullSummary", "SourceError", "ingest_remote", "load_storage_options",
           "parse_filters", "resolve"]

_DIMSE = re.compile(r"^dimse(?P<tls>\+tls)?://(?P<ae>[^@/]{1,16})@(?P<host>[^:/]+):"
                    r"(?P<port>\d{1,5})/?$")


def parse_filters(items: list[str] | None, since: str | None = None
                  ) -> tuple[tuple[str, str], ...]:
    """``KEY=VALUE`` strings (DICOM keywords) and an ISO date into query filters."""
    out: dict[str, str] = {}
    for item in items or []:
        from pydicom.datadict import tag_for_keyword  # only with filters: a PACS source
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SourceError("--filter", f"expected KEY=VALUE, got {item!r}")
        if tag_for_keyword(key) is None:
            raise SourceError("--filter", f"{key!r} is not a DICOM keyword (e.g. Modality, "
                                          "StudyDate, BodyPartExamined)")
        out[key] = value
    if since:
        try:
            day = dt.date.fromisoformat(since)
        except ValueError:
            raise SourceError("--since", f"expected a date YYYY-MM-DD, got {since!r}") from None
        out["StudyDate"] = f"{day:%Y%m%d}-"
    return tuple(sorted(out.items()))


def resolve(text: str, filters: tuple[tuple[str, str], ...] = (),
            storage_options: dict | None = None, tls=None):
    """The source named by ``text``: a Path for a folder, else a remote source object
    (``storage_options``: fsspec options of an object-store source; ``tls``: the
    ``ssl.SSLContext`` of a ``dimse+tls://`` or ``dicomweb+https://`` source, None:
    the defaults)."""
    if text.startswith(("dicomweb+http://", "dicomweb+https://")):
        from etl.sources.dicomweb import DicomWebSource

        url = text[len("dicomweb+"):].rstrip("/")
        return DicomWebSource(url, filters, tls=tls if url.startswith("https://") else None)
    if text.startswith(("dimse://", "dimse+tls://")):
        from etl.sources.dimse import DimseSource

        m = _DIMSE.match(text)
        if not m or not 0 < int(m["port"]) < 65536:
            raise SourceError(text, "expected dimse://AE_TITLE@HOST:PORT (or dimse+tls://)")
        if m["tls"] and tls is None:
            from etl.sources.tls import client_context

            tls = client_context()
        return DimseSource(m["ae"], m["host"], int(m["port"]), filters,
                           tls=tls if m["tls"] else None)
    if text.startswith(("s3://", "s3a://", "gs://", "gcs://", "az://", "abfs://")):
        from etl.sources.objects import ObjectStoreSource

        if filters:
            raise SourceError(text, "--filter and --since apply to PACS sources only")
        return ObjectStoreSource(text, dict(storage_options or {}))
    if re.match(r"^[a-z][a-z0-9+.-]*://", text):
        raise SourceError(text, "unknown kind of source; use a folder, "
                                "dicomweb+http://HOST:PORT/PATH or dimse://AE@HOST:PORT (dimse+tls://)")
    if filters:
        raise SourceError(text, "--filter and --since apply to PACS sources only")
    return Path(text)


def load_storage_options(path: str | Path | None) -> dict:
    """fsspec storage options from a JSON file (None: no file, empty options)."""
    import json

    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SourceError(str(path), f"cannot read storage options: {exc}") from None
    if not isinstance(data, dict):
        raise SourceError(str(path), "storage options must be a JSON object")
    return data
