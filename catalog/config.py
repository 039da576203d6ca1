"""Query-side settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogConfig:
    #: DuckDB worker threads (None: DuckDB's default, the CPU count).
    threads: int | None = None
    #: DuckDB memory limit, e.g. "4GB" (None: DuckDB's default, 80% of RAM).
    memory_limit: str | None = None
    #: Also attach the identified vault tables (needs read access to vault/).
    vault: bool = False
