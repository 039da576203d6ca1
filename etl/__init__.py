"""Extract, transform, load: DICOM files into the lake with Dask.

>>> from lakehouse import Lake
>>> from etl import ingest
>>> summary = ingest(Lake.open("lake"), "/data/pacs_export")
>>> from etl import compute_features
>>> features = compute_features(Lake.open("lake"))   # geometry, image stats, radiomics
"""

from etl.config import IngestConfig
from etl.errors import REASONS, SKIP_REASONS, FeatureError, FileRejected, SourceError
from etl.features import FeaturesConfig, FeaturesSummary, compute_features
from etl.headers import read_file
from etl.jobs import RunSummary, ingest

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
