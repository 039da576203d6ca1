"""An append-only audit log in the vault: who read what, when, from which snapshot.

One JSON object per line in ``vault/audit.jsonl``, opened with O_APPEND and
fsync'ed, so concurrent writers interleave whole lines and a record survives a
crash once the call returns. Objects cannot be appended to: on object storage
each record is an object of its own under ``vault/audit.jsonl.d/``, named by
time (see :meth:`lakehouse.storage.Storage.append_line`).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from lakehouse.errors import LakeError
from lakehouse.storage import Storage, open_storage

if TYPE_CHECKING:
    from lakehouse.tables import Lake

AUDIT_FILE = "audit.jsonl"


class AuditError(LakeError):
    def __init__(self, path: Path | str, detail: str):
        self.path = str(path)
        self.detail = detail
        super().__init__(f"cannot write the audit log {path}: {detail}; the vault holder can "
                         "grant write access to it (every query is audited)")


def audit_path(lake_root: Path) -> Path:
    return Path(lake_root) / AUDIT_REL


AUDIT_REL = f"vault/{AUDIT_FILE}"


def _storage(lake: Lake | Storage | Path | str) -> Storage:
    store = getattr(lake, "storage", lake)
    if isinstance(store, Storage):
        return store
    assert isinstance(store, Path | str)
    return open_storage(store)


def record(lake: Lake | Storage | Path | str, action: str, *, text: str = "",
           snapshot: int | None = None, rows: int | None = None,
           extra: dict | None = None) -> dict:
    """Append one audit record to the log of ``lake`` (a Lake, or its location) and
    return it."""
    store = _storage(lake)
    entry = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "os_user": _user(),
        "action": action,
        "text": text,
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "snapshot": snapshot,
        "rows": rows,
        **(extra or {}),
    }
    line = json.dumps(entry, ensure_ascii=False, sort_keys=True)
    try:
        store.append_line(AUDIT_REL, line)
    except OSError as exc:
        raise AuditError(store.uri(AUDIT_REL), exc.strerror or str(exc)) from None
    except LakeError as exc:
        raise AuditError(store.uri(AUDIT_REL), str(exc)) from None
    return entry


def read(lake: Lake | Storage | Path | str) -> list[dict]:
    return [json.loads(line) for line in _storage(lake).read_lines(AUDIT_REL)]


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
