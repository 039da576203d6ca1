"""Where instances pulled from a PACS land before the folder pipeline reads them.

Each pull gets its own folder under the lake's vault (owner-only; never under
``research/``; for a lake on object storage, under the lake's local working
folder, :meth:`lakehouse.Lake.work_dir`)::

    vault/staging/<kind>-<UTC time>-<random>/files/<study>/<series>/<instance>.dcm
    vault/staging/<kind>-<UTC time>-<random>/tmp/          partial downloads

A file is written under ``tmp/`` and renamed into ``files/`` once complete, so the
walker never sees half a file. After the run, files whose content is in the
lake (ingested, duplicate) are deleted; the others (quarantined, conflict,
skipped) stay for inspection, their outcome recorded in the vault file index.

What was already pulled from a source is remembered in the lake, in
``vault/sources/<source id>.json`` (original UIDs: vault only), so the next run
fetches only new instances; instances that could not be fetched are listed
there too and retried by the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from etl.errors import SourceError
from lakehouse import Lake
from lakehouse.schemas import VAULT
from lakehouse.storage import Storage

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^0-9A-Za-z._-]")


def _safe_name(text: str) -> str:
    """A file name from a UID (digits and dots); anything else becomes ``_``."""
    name = _SAFE.sub("_", text)[:100].lstrip(".")
    return name or "_"


def place_new(src: Path, dest: Path) -> Path:
    """Move the file ``src`` to ``dest`` without replacing a file there: when ``dest``
    exists, to the first free ``<stem>~2<suffix>``, ``~3``, ... next to it. Atomic where
    the file system has hard links (a link, then ``src`` unlinked); returns where."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    target, n = dest, 1
    while True:
        try:
            os.link(src, target)
        except FileExistsError:
            pass
        except OSError:  # no hard links here: test, then rename
            if not target.exists():
                os.replace(src, target)
                return target
        else:
            os.unlink(src)
            return target
        n += 1
        target = dest.with_name(f"{dest.stem}~{n}{dest.suffix}")


#: the name every file pynetdicom spools a received instance to starts with
SPOOL_PREFIX = "spool-"
_spool_folders: list[Path] = []
_chunked_before: list[bool] = []


def _spool_file(*args, **kwargs) -> _Spool:
    """pynetdicom's temporary file for an instance it receives: in the folder of the
    innermost :func:`spooled_to` still there, else in the temporary folder."""
    for folder in reversed(_spool_folders):
        if folder.is_dir():
            kwargs.update(dir=folder, prefix=SPOOL_PREFIX)
            break
    try:
        return _Spool(tempfile.NamedTemporaryFile(*args, **kwargs))
    except OSError as exc:  # not even created (no inode left, the folder unwritable)
        return _Spool(None, exc, os.path.join(kwargs.get("dir") or tempfile.gettempdir(),
                                              f"{SPOOL_PREFIX}unwritten-{secrets.token_hex(8)}"))


#: why each spool file that could not be written failed, by its path, until it is closed
_spool_errors: dict[str, OSError] = {}


class _Spool:
    """A spool file that takes pynetdicom's writes whatever happens: once a write fails
    (a full disk, a file size limit) it keeps the error for :meth:`Staging.receive`
    (which then refuses the instance: the sender gets 0xA700 and keeps it), gives back
    the space written so far and ignores the rest of the instance. pynetdicom itself lets
    the error end its reading thread, with a traceback, and the association with it."""

    def __init__(self, file, error: OSError | None = None, name: str = ""):
        self._file = file
        self.name = file.name if file is not None else name
        self.error: OSError | None = None
        if error is not None:
            self._fail(error)

    @property
    def file(self) -> _Spool:  # pynetdicom flushes ``.file``
        return self

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        _spool_errors[self.name] = exc
        if self._file is not None:
            with contextlib.suppress(OSError, ValueError):  # not the buffer: lost on close
                os.ftruncate(self._file.fileno(), 0)

    def write(self, data) -> int:
        if self.error is None:
            try:
                return self._file.write(data)
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        if self.error is None:
            try:
                self._file.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        _spool_errors.pop(self.name, None)
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()


def spool_error(path: str | os.PathLike) -> OSError | None:
    """Why the instance spooled to ``path`` could not be written (None: it was), told
    once (pynetdicom closes the spool files of a C-GET's instances only when it drops
    them, never through :meth:`_Spool.close`)."""
    return _spool_errors.pop(os.fspath(path), None)


@contextlib.contextmanager
def spooled_to(folder: Path) -> Iterator[bool]:
    """While inside, pynetdicom writes every instance it receives (C-STORE, also within a
    C-GET) to a file in ``folder`` as it arrives, instead of holding it in memory: held,
    a 256 MB instance raised the receiver's peak memory by 528 MB. ``folder`` is a
    staging folder's ``tmp`` (owner-only, in the vault, on the staging's file system: the
    file is renamed into place by :meth:`Staging.receive`); the spool files of instances
    never completed (an aborted association) are removed with it, never left in the
    system's temporary folder. Process-wide (pynetdicom's own setting; the innermost
    folder wins). Yields False, and instances stay in memory, with a pynetdicom that
    cannot spool this way."""
    from pynetdicom import _config, dimse_messages

    if not callable(getattr(dimse_messages, "NamedTemporaryFile", None)):
        yield False
        return
    if not _spool_folders:
        _chunked_before[:] = [_config.STORE_RECV_CHUNKED_DATASET]
    dimse_messages.NamedTemporaryFile = _spool_file  # type: ignore[attr-defined,assignment]
    _config.STORE_RECV_CHUNKED_DATASET = True
    _spool_folders.append(folder)
    try:
        yield True
    finally:
        _spool_folders.remove(folder)
        if not _spool_folders:
            _config.STORE_RECV_CHUNKED_DATASET = _chunked_before[0]


#: the file a process holds locked (``flock``) while a staging folder is its own
OWNER = ".owner"


def claim(root: Path) -> int | None:
    """Lock the staging folder ``root`` for this process: the lock's file descriptor
    (close it to release), or None when another holder has it (another listener's
    folder; a second claim in the same process fails too). A holder that died holds
    nothing: the kernel releases its locks."""
    import fcntl

    try:
        fd = os.open(root / OWNER, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:  # the folder is gone: nothing to claim
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class Staging:
    """One pull's staging folder (created on construction, owner-only). With ``hold``
    it appears already locked by this process (:func:`claim`; :meth:`release`), so that
    no other process takes it over while it is in use."""

    def __init__(self, lake: Lake, kind: str, *, hold: bool = False):
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        base = lake.work_dir() / "staging"
        base.mkdir(mode=0o700, exist_ok=True)
        name = f"{kind}-{stamp}-{secrets.token_hex(4)}"
        self.root = base / name
        self.files = self.root / "files"
        self.tmp = self.root / "tmp"
        self._held: int | None = None
        # made whole (and locked) under a hidden name, then renamed into view
        made = base / f".{name}" if hold else self.root
        (made / "files").mkdir(parents=True, mode=0o700)
        (made / "tmp").mkdir(mode=0o700)
        if hold:
            self._held = claim(made)
            os.rename(made, self.root)

    def release(self) -> None:
        """Unlock this folder (see ``hold``)."""
        if self._held is not None:
            os.close(self._held)
            self._held = None

    def path_for(self, study: str, series: str, instance: str) -> Path:
        return self.files / _safe_name(study) / _safe_name(series) / f"{_safe_name(instance)}.dcm"

    def write(self, study: str, series: str, instance: str, data: bytes, *,
              keep: bool = False) -> Path:
        """Write one instance atomically (temporary file, fsync, rename); returns where.
        A file already at its name is replaced (the same instance fetched again), or with
        ``keep`` kept, this one written next to it (:func:`place_new`): a sender may send
        two different instances with one UID, and both must reach the lake."""
        return self._write(self.path_for(study, series, instance), data, keep)

    def write_relative(self, rel: str, data: bytes) -> Path:
        """Write a file under ``files/`` at the relative path ``rel`` (an object key)."""
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if not parts or ".." in parts or any("\0" in p for p in parts):
            raise ValueError(f"unsafe relative path {rel!r}")
        return self._write(self.files.joinpath(*parts), data)

    def receive(self, study: str, series: str, instance: str, event, *,
                keep: bool = False) -> Path:
        """:meth:`write` the instance of a C-STORE request pynetdicom received (``event``):
        moved (or copied) from the file it was spooled to as it arrived
        (:func:`spooled_to`), or its bytes where it was held in memory."""
        try:
            spooled = event.dataset_path  # None, or no such attribute: held in memory
        except AttributeError:
            spooled = None
        dest = self.path_for(study, series, instance)
        if spooled is None:
            return self._write(dest, event.encoded_dataset(), keep)
        error = spool_error(spooled)
        if error is not None:  # a part of it was never written
            raise error
        return self._write(dest, Path(spooled), keep)

    def _write(self, dest: Path, data: bytes | Path, keep: bool = False) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._staged(data)
        try:
            if keep:
                return place_new(Path(tmp), dest)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return dest

    def _staged(self, data: bytes | Path) -> str:
        """A complete file under ``tmp/``, on disk, holding ``data`` (bytes, or a file that
        is moved): a file already there (spooled by :func:`spooled_to`) as it is, anything
        else written to a temporary file here."""
        if isinstance(data, Path) and data.parent == self.tmp:
            with open(data, "rb") as fh:
                os.fsync(fh.fileno())
            return str(data)
        fd, tmp = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                if isinstance(data, Path):
                    with open(data, "rb") as src:
                        shutil.copyfileobj(src, fh, 1 << 20)
                else:
                    fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if isinstance(data, Path):
            os.unlink(data)
        return tmp

    def discard(self) -> None:
        """Remove this staging folder and everything in it."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.release()

    @staticmethod
    def remove_empty(root: Path) -> None:
        """Remove a staging folder's temporary files, its lock file and empty folders
        (and the folder itself when nothing is left in it)."""
        shutil.rmtree(root / "tmp", ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(root / OWNER)
        for folder, _dirs, _names in os.walk(root, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(folder)

    def clean(self, done_paths: set[str]) -> int:
        """Delete the staged files in ``done_paths`` (their content is in the lake), the
        temporary folder and empty folders; return how many files are kept."""
        kept = 0
        for folder, _dirs, names in os.walk(self.files, topdown=False):
            for name in names:
                p = os.path.join(folder, name)
                if p in done_paths:
                    os.unlink(p)
                else:
                    kept += 1
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only succeeds when empty
        shutil.rmtree(self.tmp, ignore_errors=True)
        if kept == 0:
            shutil.rmtree(self.root, ignore_errors=True)
            self.release()
        return kept


@dataclass
class FetchState:
    """What one source has delivered so far (kept in the vault)."""

    #: where the state is (shown to the user): a file, or an object's URL
    path: str
    source: str
    #: SOPInstanceUID (as the source knows it) -> run id that fetched it
    fetched: dict[str, str] = field(default_factory=dict)
    #: SOPInstanceUID -> last error, for instances to retry next time
    failed: dict[str, str] = field(default_factory=dict)
    storage: Storage | None = field(default=None, repr=False, compare=False)
    rel: str = ""

    @classmethod
    def load(cls, lake: Lake, source: str) -> FetchState:
        sid = hashlib.sha256(source.encode()).hexdigest()[:16]
        folder = f"{VAULT}/sources"
        lake.storage.makedirs(folder, private=True)
        rel = f"{folder}/{sid}.json"
        where = lake.storage.uri(rel)
        try:
            data = json.loads(lake.storage.read_text(rel))
        except FileNotFoundError:
            return cls(where, source, storage=lake.storage, rel=rel)
        except (ValueError, OSError) as exc:  # UnicodeDecodeError and JSONDecodeError
            raise SourceError(source, f"cannot read what earlier runs fetched, {where} "
                                      f"({type(exc).__name__}); move the file away to fetch "
                                      "everything again (what the lake holds is then a "
                                      "duplicate)") from None
        fetched, failed = (data.get(k) if isinstance(data, dict) else None
                           for k in ("fetched", "failed"))
        if not isinstance(fetched, dict) or not isinstance(failed, dict):
            raise SourceError(source, f"{where} is not a state file of this tool (no "
                                      "'fetched' and 'failed' objects); move it away to fetch "
                                      "everything again")
        return cls(where, source, {str(k): str(v) for k, v in fetched.items()},
                   {str(k): str(v) for k, v in failed.items()}, storage=lake.storage, rel=rel)

    def save(self) -> None:
        data = {"source": self.source, "updated_at": datetime.now(UTC).isoformat(),
                "fetched": dict(sorted(self.fetched.items())),
                "failed": dict(sorted(self.failed.items()))}
        assert self.storage is not None
        # written whole: a temporary file renamed, or one object PUT
        self.storage.write_bytes(self.rel, json.dumps(data, indent=0).encode("utf-8"))
