"""The source files of ingested instances, read again for their pixels.

An image's features are computed from its source file, found through the vault's
``files`` table long after the ingest read it. The file may have changed since: a
folder exported again over the old one, a file replaced by another instance (of
another patient, even). Features must come from the instance the lake holds, so
every read checks the file against what the ingest recorded, as ``lake cohort
export`` does: its size and the SHA-256 of its first ``checksum_bytes`` (the header,
or the whole file; :mod:`lakehouse.checksums`).
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from lakehouse.checksums import as_ingested, sha256_prefix


class Source(NamedTuple):
    """An ingested instance's source file and what the ingest recorded of it."""

    path: str
    #: plain SHA-256 of the first ``covered`` bytes (all of them when None)
    sha256: str
    covered: int | None
    size: int


class SourceChangedError(Exception):
    """The file at a source path is no longer the one the lake ingested."""


def source_from_row(row: dict) -> Source:
    """The :class:`Source` of a vault ``files`` row (``path``, ``source_sha256`` or, in
    identified lakes, ``file_sha256``, ``checksum_bytes``, ``file_size``)."""
    return Source(row["path"], row.get("source_sha256") or row["file_sha256"],
                  row.get("checksum_bytes"), row["file_size"])


_CHANGED = ("the source file changed since it was ingested (its size or checksum "
            "differs): ingest its folder again")


def read_source(src: Source) -> bytes:
    """The file's bytes, when they are the ones ingested; else SourceChangedError."""
    _crash_hook(src.path)
    data = Path(src.path).read_bytes()
    if not as_ingested(data, src.sha256, src.covered, src.size):
        raise SourceChangedError(_CHANGED)
    return data


def _crash_hook(path: str) -> None:
    """Test hook (never set in production), as the ingest's: a worker process reading a
    file whose name contains ``LAKE_TEST_CRASH_MARKER`` exits at once, as a decoder's
    segfault would."""
    marker = os.environ.get("LAKE_TEST_CRASH_MARKER")
    if marker and marker in os.path.basename(path) \
            and multiprocessing.parent_process() is not None:
        os._exit(70)


def checked_path(src: Source) -> str:
    """The file's path, once checked as :func:`read_source` checks it, reading no more of
    it than its checksum covers: for a read of its header only."""
    if os.stat(src.path).st_size != src.size \
            or sha256_prefix(src.path, src.covered) != src.sha256:
        raise SourceChangedError(_CHANGED)
    return src.path


def open_source(src: Source | str | Path) -> io.BytesIO | str:
    """What ``pydicom.dcmread`` reads for ``src``: an ingested instance's bytes, checked
    (:func:`read_source`); a plain path (a mask file named on the command line) as it is."""
    if isinstance(src, Source):
        return io.BytesIO(read_source(src))
    return str(src)


@contextlib.contextmanager
def quietly() -> Iterator[None]:
    """pydicom's and highdicom's warnings about what they tolerate in a file, kept quiet.

    A features run reads thousands of files in worker processes, where the command's
    own filter does not reach; their warnings would flood the console (a truncated
    pixel item, excess frames) and some quote raw header values. A file they cannot
    read is a failure row with its message; what they tolerate is read as they read it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="pydicom")
        warnings.filterwarnings("ignore", module="highdicom")
        yield
