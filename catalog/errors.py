"""Errors of the catalog (query side)."""

from __future__ import annotations

from lakehouse.errors import LakeError, UnknownTableError

__all__ = ["QueryError", "UnknownTableError"]


class QueryError(LakeError):
    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(f"SQL error: {detail}")
