"""An object store as a source: ``s3://bucket/prefix`` (any fsspec URL) through fsspec/s3fs.

Objects below the prefix are listed with their ETag (or size and modification
time); objects not fetched before, or changed since, are copied into the
staging folder under their key (so walk order, and therefore which of two
copies of an instance counts first, is the same as for a folder with those
files) and the folder pipeline ingests them. A changed object is fetched again
(and becomes a conflict if its SOPInstanceUID is already in the lake).

Storage options (credentials, ``client_kwargs={"endpoint_url": ...}`` for
S3-compatible stores) come from a JSON file (``lake ingest --storage-options
FILE`` or ``$LAKE_STORAGE_OPTIONS``), else from s3fs' usual environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``...).
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from etl.errors import SourceError
from etl.sources.staging import Staging

log = logging.getLogger(__name__)

#: Objects fetched per concurrent request batch.
CHUNK = 64


@dataclass(frozen=True)
class ObjectStoreSource:
    kind = "s3"
    #: ``s3://bucket/prefix``
    url: str
    storage_options: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def key(self) -> str:
        return self.url.rstrip("/")

    def _fs(self):
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        except ImportError as exc:
            raise SourceError(self.url, f"{exc}; install s3fs: pip install s3fs") from None
        return fs, path.rstrip("/")

    def list_instances(self) -> Iterator[tuple[str, str, str]]:
        """(relative folder, file name, ``key<TAB>version``) of every object."""
        fs, root = self._fs()
        try:
            found = fs.find(root, detail=True)
        except FileNotFoundError:
            raise SourceError(self.url, "no such bucket or prefix") from None
        except PermissionError:
            raise SourceError(self.url, "access denied (check the credentials in the "
                                        "storage options)") from None
        except OSError as exc:
            raise SourceError(self.url, f"cannot list: {type(exc).__name__} "
                                        f"({exc})"[:300]) from None
        for key in sorted(found):
            info = found[key]
            if info.get("type") == "directory":
                continue
            version = str(info.get("ETag") or f"{info.get('size')}:{info.get('LastModified')}")
            rel = posixpath.relpath(key, root)
            yield posixpath.dirname(rel), posixpath.basename(rel), f"{key}\t{version}"

    def fetch(self, todo: list[tuple[str, str, str]], staging: Staging,
              progress: Callable[[int, int], None] | None = None,
              listed: list[tuple[str, str, str]] | None = None) -> dict[str, str]:
        fs, _root = self._fs()
        failed: dict[str, str] = {}
        done = 0
        for i in range(0, len(todo), CHUNK):
            chunk = todo[i:i + CHUNK]
            keys = [item[2].split("\t", 1)[0] for item in chunk]
            data = fs.cat(keys, on_error="return")
            for (folder, name, ident), key in zip(chunk, keys, strict=True):
                value = data.get(key)
                if isinstance(value, bytes | bytearray):
                    staging.write_relative(posixpath.join(folder, name), bytes(value))
                else:
                    failed[ident] = f"{type(value).__name__}: {value}"[:300]
            done += len(chunk)
            if progress:
                progress(done, len(todo))
        if todo and len(failed) == len(todo):
            raise SourceError(self.url, f"no object could be read "
                                        f"({next(iter(failed.values()))})")
        return failed
