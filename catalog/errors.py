"""Errors of the catalog (query side)."""

from __future__ import annotations

from lakehouse.errors import LakeError, UnknownTableError

__all__ = ["QueryError", "ReportError", "UnknownTableError"]


class QueryError(LakeError):
    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(f"SQL error: {detail}")


class ReportError(LakeError):
    """A report asked for something the lake cannot answer (unknown column, bad date, ...)."""

    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(detail)
