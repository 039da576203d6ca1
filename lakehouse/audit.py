"""An append-only audit log in the vault: who read what, when, from which snapshot.

One JSON object per line in ``vault/audit.jsonl``, opened with O_APPEND and
fsync'ed, so concurrent writers interleave whole lines and a record survives a
crash once the call returns.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path

from lakehouse.errors import LakeError

AUDIT_FILE = "audit.jsonl"


class AuditError(LakeError):
    def __init__(self, path: Path, detail: str):
        self.path = str(path)
        self.detail = detail
        super().__init__(f"cannot write the audit log {path}: {detail}; the vault holder can "
                         "grant write access to it (every query is audited)")


def audit_path(lake_root: Path) -> Path:
    return Path(lake_root) / "vault" / AUDIT_FILE


def record(lake_root: Path | str, action: str, *, text: str = "", snapshot: int | None = None,
           rows: int | None = None, extra: dict | None = None) -> dict:
    """Append one audit record and return it."""
    path = audit_path(Path(lake_root))
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
    line = (json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise AuditError(path, exc.strerror or str(exc)) from None
    return entry


def read(lake_root: Path | str) -> list[dict]:
    path = audit_path(Path(lake_root))
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
