"""Ingest from a remote source: list, fetch what is new into staging, run the folder job.

The folder pipeline does the rest unchanged (safety checks, dedup, conflicts,
quarantine, pseudonymization), so a PACS source gives exactly the tables a
folder holding the same files would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyarrow.compute as pc

from etl.config import IngestConfig
from etl.jobs import Progress, RunSummary, ingest
from etl.sources.staging import FetchState, Staging
from lakehouse import Lake

log = logging.getLogger(__name__)

#: Outcomes whose content is in the lake: their staged copy is deleted.
DONE_OUTCOMES = ("ingested", "duplicate")


@dataclass
class PullSummary:
    """A remote ingest: what the source listed and delivered, and the folder run."""

    source: str
    listed: int = 0
    already_fetched: int = 0
    fetched: int = 0
    failed: int = 0
    fetch_seconds: float = 0.0
    staging: str | None = None
    kept_in_staging: int = 0
    state_file: str = ""
    run: RunSummary | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "source": self.source, "listed": self.listed,
            "already_fetched": self.already_fetched, "fetched": self.fetched,
            "failed": self.failed, "fetch_seconds": round(self.fetch_seconds, 3),
            "staging": self.staging, "kept_in_staging": self.kept_in_staging,
            "state_file": self.state_file,
            "run": self.run.to_dict() if self.run else None,
        }


class RemoteSource(Protocol):
    """What :func:`ingest_remote` needs of a source (DICOMweb, DIMSE)."""

    kind: str

    @property
    def key(self) -> str: ...

    def list_instances(self) -> Iterable[tuple[str, str, str]]: ...

    def fetch(self, todo: list[tuple[str, str, str]], staging: Staging,
              progress: Callable[[int, int], None] | None = None,
              listed: list[tuple[str, str, str]] | None = None) -> dict[str, str]:
        """Copy ``todo`` into ``staging`` (``listed``: everything listed, for sources
        that can fetch whole series); return {id: error} of what could not be fetched."""
        ...


def ingest_remote(lake: Lake, source: RemoteSource, config: IngestConfig | None = None,
                  progress: Progress | None = None,
                  key_file: Path | str | None = None) -> PullSummary:
    """Fetch the instances of ``source`` not fetched before, then ingest them."""
    lake.policy(key_file)  # a missing or wrong key stops the run before anything is fetched
    progress = progress or (lambda *_: None)
    state = FetchState.load(lake, source.key)
    out = PullSummary(source.key, state_file=str(state.path))
    t0 = time.perf_counter()
    listed = list(source.list_instances())
    out.listed = len(listed)
    todo = [item for item in listed if item[2] not in state.fetched]
    out.already_fetched = out.listed - len(todo)
    log.info("%d instances listed, %d fetched before, %d to fetch", out.listed,
             out.already_fetched, len(todo))
    staging = Staging(lake, source.kind)
    out.staging = str(staging.root)
    try:
        failed = source.fetch(todo, staging, lambda d, t: progress("fetch", d, t),
                              listed=listed) if todo else {}
        out.fetch_seconds = time.perf_counter() - t0
        out.failed = len(failed)
        out.fetched = len(todo) - len(failed)
        run = ingest(lake, staging.files, config, progress, key_file=key_file,
                     source_kind=source.kind)
    except BaseException:
        # what was fetched is not remembered (the state is saved below), so the next run
        # fetches it again: the staged copies would only stay in the vault
        staging.discard()
        raise
    out.run = run
    # remember what is now in the lake (or quarantined) and what must be retried
    for _study, _series, sop in todo:
        if sop in failed:
            state.failed[sop] = failed[sop]
        else:
            state.fetched[sop] = run.run_id
            state.failed.pop(sop, None)
    state.save()
    files = lake.read("files", columns=["path", "outcome", "ingest_run_id"])
    mine = files.filter(pc.equal(files.column("ingest_run_id"), run.run_id))
    done = {p for p, o in zip(mine.column("path").to_pylist(), mine.column("outcome").to_pylist(),
                              strict=True) if o in DONE_OUTCOMES}
    out.kept_in_staging = staging.clean(done)
    if out.kept_in_staging == 0:
        out.staging = None
    return out
