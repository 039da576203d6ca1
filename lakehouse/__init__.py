"""The lake itself: table schemas, Delta commits, snapshots, provenance.

Imports no other package of the project; ``etl`` and ``catalog`` build on it.

The names below are imported on first use, so that a process that needs only
part of the package (an ingest worker: the schemas and the privacy policy)
does not pay for importing the Delta and DuckDB bindings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lakehouse.lazy import exports

#: exported name -> the module that defines it
_EXPORTS = {
    "TABLES": "lakehouse.schemas",
    "Column": "lakehouse.schemas",
    "Lake": "lakehouse.tables",
    "LakeConfig": "lakehouse.config",
    "LakeError": "lakehouse.errors",
    "LakeWriter": "lakehouse.tables",
    "NoLakeError": "lakehouse.errors",
    "Snapshot": "lakehouse.tables",
    "TableSpec": "lakehouse.schemas",
    "UnknownTableError": "lakehouse.errors",
}

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


__getattr__ = exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from lakehouse.config import LakeConfig
    from lakehouse.errors import LakeError, NoLakeError, UnknownTableError
    from lakehouse.schemas import TABLES, Column, TableSpec
    from lakehouse.tables import Lake, LakeWriter, Snapshot
