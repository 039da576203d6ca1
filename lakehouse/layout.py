"""Where things are in a lake folder.

```
<lake>/
  _lake/lake.json          what the lake is (profile, format version)
  _lake/snapshots/N.json   lake snapshot N: the Delta version of every table
  _lake/cohorts/NAME.json  a saved cohort, pinned to a snapshot
  _lake/write.lock         held by the one writer
  research/<table>/        pseudonymized Delta tables (what researchers query)
  <table>/_lake_checksums.json  checksums of data files whose commits `lake vacuum`
                           cleaned from the table's Delta log
  vault/<table>/           identified material, owner-only permissions
```

A lake snapshot pins one version of every table, so readers see all tables as
of the same committed moment even though Delta commits are per table.
"""

from __future__ import annotations

from pathlib import Path

from lakehouse.schemas import TABLES

META_DIR = "_lake"
MANIFEST = "lake.json"
SNAPSHOTS = "snapshots"
COHORTS = "cohorts"
LOCK = "write.lock"
#: in a table's folder: the checksums its cleaned log commits recorded
CARRIED_CHECKSUMS = "_lake_checksums.json"


def meta_dir(root: Path) -> Path:
    return root / META_DIR


def manifest_path(root: Path) -> Path:
    return meta_dir(root) / MANIFEST


def snapshots_dir(root: Path) -> Path:
    return meta_dir(root) / SNAPSHOTS


def snapshot_path(root: Path, number: int) -> Path:
    return snapshots_dir(root) / f"{number:010d}.json"


def cohorts_dir(root: Path) -> Path:
    return meta_dir(root) / COHORTS


def lock_path(root: Path) -> Path:
    return meta_dir(root) / LOCK


def table_path(root: Path, name: str) -> Path:
    spec = TABLES[name]
    return root / spec.zone / name


def zone_path(root: Path, zone: str) -> Path:
    return root / zone

