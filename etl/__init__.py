"""Extract, transform, load: DICOM files into the lake with Dask.

>>> from lakehouse import Lake
>>> from etl import ingest
>>> summary = ingest(Lake.open("lake"), "/data/pacs_export")
>>> from etl import compute_features
>>> features = compute_features(Lake.open("lake"))   # geometry, image stats, radiomics
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lakehouse.lazy import exports

#: exported name -> the module that defines it (imported on first use: an ingest worker
#: imports only what reading files needs, not Dask's scheduler, Delta or DuckDB)
_EXPORTS = {
    "REASONS": "etl.errors",
    "SKIP_REASONS": "etl.errors",
    "FeatureError": "etl.errors",
    "FeaturesConfig": "etl.features",
    "FeaturesSummary": "etl.features",
    "FileRejected": "etl.errors",
    "IngestConfig": "etl.config",
    "RunSummary": "etl.jobs",
    "SourceError": "etl.errors",
    "compute_features": "etl.features",
    "ingest": "etl.jobs",
    "read_file": "etl.headers",
}

__all__ = [
    "REASONS",
    "SKIP_REASONS",
    "FeatureError",
    "FeaturesConfig",
    "FeaturesSummary",
    "FileRejected",
    "IngestConfig",
    "RunSummary",
    "SourceError",
    "compute_features",
    "ingest",
    "read_file",
]


__getattr__ = exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from etl.config import IngestConfig
    from etl.errors import REASONS, SKIP_REASONS, FeatureError, FileRejected, SourceError
    from etl.features import FeaturesConfig, FeaturesSummary, compute_features
    from etl.headers import read_file
    from etl.jobs import RunSummary, ingest
