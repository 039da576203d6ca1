"""The lake itself: table schemas, Delta commits, snapshots, provenance.

Imports no other package of the project; ``etl`` and ``catalog`` build on it.
"""

from lakehouse.config import LakeConfig
from lakehouse.errors import LakeError, NoLakeError, UnknownTableError
from lakehouse.schemas import TABLES, Column, TableSpec
from lakehouse.tables import Lake, LakeWriter, Snapshot

__all__ = [
    "TABLES",
    "Column",
    "Lake",
    "LakeConfig",
    "LakeError",
    "LakeWriter",
    "NoLakeError",
    "Snapshot",
    "TableSpec",
    "UnknownTableError",
]
