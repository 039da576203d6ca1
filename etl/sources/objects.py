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
    #: what the listing said of each object: ident -> (size, MD5 from a plain ETag)
    _listed: dict = field(default_factory=dict, hash=False, compare=False, repr=False)

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
            ident = f"{key}\t{version}"
            size = info.get("size")
            self._listed[ident] = (size if isinstance(size, int) else None,
                                   _md5_of(info.get("ETag")))
            yield posixpath.dirname(rel), posixpath.basename(rel), ident

    def fetch(self, todo: list[tuple[str, str, str]], staging: Staging,
              progress: Callable[[int, int], None] | None = None,
              listed: list[tuple[str, str, str]] | None = None) -> dict[str, str]:
        fs, _root = self._fs()
        failed: dict[str, str] = {}
        done = 0
        check = _Check()
        for i in range(0, len(todo), CHUNK):
            chunk = todo[i:i + CHUNK]
            keys = [item[2].split("\t", 1)[0] for item in chunk]
            data = fs.cat(keys, on_error="return")
            for (folder, name, ident), key in zip(chunk, keys, strict=True):
                value = data.get(key)
                again = not isinstance(value, bytes | bytearray)
                if again:  # an error: read it once more, for the last time
                    try:
                        value = fs.cat_file(key)
                    except Exception as exc:
                        failed[ident] = f"{type(exc).__name__}: {exc}"[:250] + \
                            ", twice; retried next run"
                        continue
                size, md5 = self._listed.get(ident, (None, None))
                why = check.why_not(fs, key, bytes(value), size, md5, reread=not again)
                if isinstance(why, str):
                    failed[ident] = why
                else:
                    staging.write_relative(posixpath.join(folder, name), why)
            done += len(chunk)
            if progress:
                progress(done, len(todo))
        if todo and len(failed) == len(todo):
            raise SourceError(self.url, f"no object could be read "
                                        f"({next(iter(failed.values()))})")
        return failed


def _md5_of(etag: object) -> str | None:
    """The MD5 an S3 ETag gives of an object's bytes: a plain ETag (a single PUT) is the
    hex MD5; a multipart upload's (``...-N``) is not, and neither is an SSE-KMS or SSE-C
    encrypted object's, which looks plain (see :class:`_Check`)."""
    text = str(etag or "").strip('"').lower()
    return text if len(text) == 32 and all(c in "0123456789abcdef" for c in text) else None


class _Check:
    """Are the bytes read an object as listed? Their size must be the listed size (a
    body cut short without an error is not the object), and where the ETag is an MD5,
    their MD5 must be it (bytes damaged in transfer). An object that fails is read once
    more. An object whose size is right and whose MD5 differs, read the same twice, has
    an ETag that is not an MD5 (an encrypted object): its bytes are taken, and the
    run's other ETags are not checked either."""

    def __init__(self) -> None:
        self.etags_are_md5 = True

    def _why(self, value: bytes, size: int | None, md5: str | None) -> str | None:
        import hashlib

        if size is not None and len(value) != size:
            return f"read {len(value)} bytes of the {size} listed"
        if md5 is not None and self.etags_are_md5 and hashlib.md5(value).hexdigest() != md5:
            return "the bytes read do not match the object's ETag (MD5)"
        return None

    def why_not(self, fs, key: str, value: bytes, size: int | None,
                md5: str | None, reread: bool = True) -> bytes | str:
        """The object's bytes (``value`` or, if ``reread``, a second read), or why they
        are not it."""
        why = self._why(value, size, md5)
        if why is None:
            return value
        if not reread:  # ``value`` is the second read already
            return f"{why}, after a failed read; retried next run"
        try:
            again = fs.cat_file(key)
        except Exception as exc:  # the first read's reason stands
            log.debug("reading %s again failed: %s", key, type(exc).__name__)
            again = None
        if isinstance(again, bytes):
            if self._why(again, size, md5) is None:
                return again
            if again == value and self._why(value, size, None) is None:
                log.info("the ETags of %s are not MD5s of the objects (encrypted objects?): "
                         "not checked", key)
                self.etags_are_md5 = False
                return value
        return f"{why}, twice (cut short or damaged in transfer, or changed since it was " \
               "listed); retried next run"
