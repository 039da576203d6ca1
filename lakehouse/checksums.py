"""File checksums as the lake records them: SHA-256 of a file's first N bytes.

A lake's ``checksum`` setting decides N at ingest (``header``: the bytes before
the Pixel Data element; ``full``: the whole file) and every row records it as
``checksum_bytes``; whoever checks a file later (``lake verify --sources``,
cohort export) hashes the same prefix.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def sha256_prefix(path: Path | str, nbytes: int | None = None) -> str:
    """Hex SHA-256 of the first ``nbytes`` bytes of the file (all of it when None)."""
    h = hashlib.sha256()
    left = nbytes
    with open(path, "rb") as fh:
        while left is None or left > 0:
            chunk = fh.read(_CHUNK if left is None else min(_CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def data_sha256(data: bytes, nbytes: int | None = None) -> str:
    """Hex SHA-256 of the first ``nbytes`` of ``data`` (all of it when None)."""
    view = memoryview(data)
    return hashlib.sha256(view if nbytes is None else view[:nbytes]).hexdigest()


def as_ingested(data: bytes, sha256: str, nbytes: int | None, size: int) -> bool:
    """Whether ``data`` (a whole file) is the file an ingest recorded: its ``size``, and
    ``sha256`` of its first ``nbytes`` (the row's plain checksum and ``checksum_bytes``)."""
    return len(data) == size and data_sha256(data, nbytes) == sha256


__all__ = ["as_ingested", "data_sha256", "sha256_prefix"]
