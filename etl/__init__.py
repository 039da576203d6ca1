"""Extract, transform, load: DICOM files into the lake with Dask.

>>> from lakehouse import Lake
>>> from etl import ingest
>>> summary = ingest(Lake.open("lake"), "/data/pacs_export")
"""

from etl.config import IngestConfig
from etl.errors import REASONS, SKIP_REASONS, FileRejected, SourceError
from etl.headers import read_file
from etl.jobs import RunSummary, ingest

__all__ = [
    "REASONS",
    "SKIP_REASONS",
    "FileRejected",
    "IngestConfig",
    "RunSummary",
    "SourceError",
    "ingest",
    "read_file",
]
