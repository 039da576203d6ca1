"""Errors of the catalog (query side)."""

from __future__ import annotations

from lakehouse.errors import LakeError, UnknownTableError

__all__ = [
    "CohortExistsError",
    "CohortIntegrityError",
    "CohortNameError",
    "CohortNotFoundError",
    "CohortQueryError",
    "ExportError",
    "QueryError",
    "ReportError",
    "SpecError",
    "UnknownTableError",
]


class QueryError(LakeError):
    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(f"SQL error: {detail}")


class ReportError(LakeError):
    """A report asked for something the lake cannot answer (unknown column, bad date, ...)."""

    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(detail)


class SpecError(LakeError):
    """A declarative cohort spec that does not validate."""

    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(f"cohort spec: {detail}")


class CohortNameError(LakeError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f"invalid cohort name {name!r}: use 1-64 letters, digits, '_', '-' "
                         "or '.', starting with a letter or digit")


class CohortNotFoundError(LakeError):
    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = known
        hint = f"saved cohorts: {', '.join(known)}" if known else "no cohort is saved yet"
        super().__init__(f"no saved cohort {name!r} ({hint}); save one with "
                         "`lake cohort save NAME --sql ...` or `--spec FILE`")


class CohortExistsError(LakeError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f"a cohort named {name!r} is already saved; choose another name "
                         "or pass --replace")


class CohortQueryError(LakeError):
    """A cohort query whose result is not one row per series or study."""

    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(f"cohort query: {detail}")


class CohortIntegrityError(LakeError):
    """A saved cohort whose pinned snapshot no longer gives the saved result."""

    def __init__(self, name: str, snapshot: int, expected: str, actual: str):
        self.name = name
        self.snapshot = snapshot
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"cohort {name!r} at snapshot {snapshot} hashes to {actual[:12]}, not the saved "
            f"{expected[:12]}: the lake's history was rewritten (vacuumed or restored); "
            "the saved rows cannot be reproduced from this lake")


class ExportError(LakeError):
    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(f"export: {detail}")
