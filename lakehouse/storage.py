"""Where a lake lives: a local folder, or a prefix on S3-compatible object storage.

Everything the lake writes besides Delta commits (its manifest, snapshots, the
writer's lock, Parquet data files, the audit log) goes through one
:class:`Storage`: :class:`LocalStorage` (a folder: atomic rename, ``flock``,
owner-only permissions, exactly as lakes have always been) or
:class:`ObjectStorage` (``s3://bucket/prefix`` through fsspec/s3fs: an object
PUT is atomic, the snapshot sequence and the writer's lease are protected by
conditional PUTs, ``If-None-Match`` / ``If-Match``). Delta commits go through
``deltalake`` with :attr:`Storage.delta_options`; deltalake writes each commit
file with ``If-None-Match: *``, so two commits never claim one version.

Storage options of an object store are fsspec/s3fs options (``key``, ``secret``,
``token``, ``client_kwargs={"endpoint_url": ..., "region_name": ...}``); they
are translated once for deltalake (``AWS_ACCESS_KEY_ID``, ...). With no options
both libraries read the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``...).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from lakehouse.errors import LakeAccessError, LakeBusyError, LakeError, one_line

log = logging.getLogger(__name__)

#: URL schemes of object stores a lake can live on.
OBJECT_SCHEMES = ("s3", "s3a")
#: How long a writer's lease on an object-store lake lasts without renewal.
DEFAULT_LEASE_SECONDS = 120.0


class StorageError(LakeError):
    """The lake's storage refused or failed an operation."""

    def __init__(self, url: str, detail: str):
        self.url = url
        self.detail = detail
        super().__init__(f"lake storage {url}: {detail}")


class LockLostError(LakeError):
    """A writer's lease on an object-store lake was taken over (it stalled past its lease)."""

    def __init__(self, url: str):
        self.url = url
        super().__init__(f"the write lease on {url} was lost (this writer stalled longer than "
                         "its lease and another writer took over); nothing more was committed "
                         "or published by this run: run it again")


def is_object_url(location: object) -> bool:
    return isinstance(location, str) and location.split("://", 1)[0] in OBJECT_SCHEMES \
        and "://" in location


def open_storage(location: Path | str | Storage, options: dict | None = None) -> Storage:
    """The storage of a lake location: a :class:`Storage` as is, ``s3://...`` an object
    store (with fsspec ``options``), anything else a local folder."""
    if isinstance(location, Storage):
        return location
    if is_object_url(location):
        return ObjectStorage(str(location), options)
    return LocalStorage(Path(location))


class Storage:
    """The lake's files, addressed by relative POSIX paths (``_lake/lake.json``)."""

    #: True for a local folder
    local: bool = True
    #: the lake's location as the user writes it (a folder, or ``s3://bucket/prefix``)
    url: str = ""
    #: options for deltalake (None: its defaults)
    delta_options: dict[str, str] | None = None

    def uri(self, rel: str = "") -> str:
        """A table or file location as deltalake and DuckDB take it."""
        raise NotImplementedError

    def arrow_filesystem(self, rel: str) -> Any:
        """A ``pyarrow.fs`` file system rooted at ``rel`` (a table's folder), native to
        Arrow: deltalake's default for its datasets, a Python file system, aborts the
        interpreter at exit in most runs once a dataset of it was scanned (``terminate
        called without an active exception``; delta-io/delta-rs#2184, apache/arrow#34314:
        an Arrow thread still calling into Python when the interpreter finalizes)."""
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def is_empty(self) -> bool:
        """True when nothing is stored at the lake's location yet."""
        raise NotImplementedError

    def listdir(self, rel: str) -> list[str]:
        """Names of the entries directly under ``rel`` (empty when it does not exist)."""
        raise NotImplementedError

    def read_bytes(self, rel: str) -> bytes:
        raise NotImplementedError

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_bytes(self, rel: str, data: bytes, exclusive: bool = False,
                    sync: bool = True) -> None:
        """Write ``rel`` atomically: readers see the old content or all of the new.
        ``exclusive``: fail with FileExistsError when ``rel`` exists; ``sync``: on disk
        before this returns (a local file; an object PUT always is)."""
        raise NotImplementedError

    def write_json(self, rel: str, data: dict, exclusive: bool = False) -> None:
        body = json.dumps(data, indent=2, sort_keys=True).encode("utf-8")
        self.write_bytes(rel, body, exclusive)

    def remove(self, rel: str) -> None:
        raise NotImplementedError

    def makedirs(self, rel: str, private: bool = False) -> None:
        """Create a folder (``private``: owner-only) where folders exist."""

    def files(self, rel: str) -> Iterator[tuple[str, int, float]]:
        """(path relative to ``rel``, size, modification time) of every file below ``rel``."""
        raise NotImplementedError

    def open(self, rel: str, mode: str = "rb") -> IO[Any]:
        raise NotImplementedError

    def append_line(self, rel: str, line: str) -> None:
        """Append one line to a log (``rel``), durable once this returns."""
        raise NotImplementedError

    def read_lines(self, rel: str) -> list[str]:
        raise NotImplementedError

    def discard_partial(self, rel: str) -> None:
        """Remove partial files a killed writer left below ``rel``."""

    def lock(self, rel: str, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> WriterLock:
        raise NotImplementedError

    def duckdb_filesystem(self) -> Any | None:
        """The fsspec filesystem DuckDB must register to read the lake's files (None:
        DuckDB reads them itself)."""
        return None

    def __str__(self) -> str:
        return self.url


class WriterLock:
    """Held by the one writer of a lake."""

    #: set by :meth:`acquire`: the writer before released the lock after
    #: :meth:`leave_clean`, so it left no partial file (a writer that dies leaves them)
    left_clean = False

    def acquire(self) -> None:
        raise NotImplementedError

    def leave_clean(self) -> None:
        """Say that this writer leaves no partial file when it releases the lock (a writer
        that dies holding it may)."""

    def check(self) -> None:
        """Raise :class:`LockLostError` when the lock is no longer this writer's."""

    def release(self) -> None:
        raise NotImplementedError


# --- a local folder -------------------------------------------------------------------

class LocalStorage(Storage):
    local = True

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)

    def path(self, rel: str = "") -> Path:
        return self.root / rel if rel else self.root

    def uri(self, rel: str = "") -> str:
        return str(self.path(rel))

    def arrow_filesystem(self, rel: str) -> Any:
        import pyarrow.fs as pafs

        return pafs.SubTreeFileSystem(str(self.path(rel)), pafs.LocalFileSystem())

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def is_empty(self) -> bool:
        return not self.root.exists() or not any(self.root.iterdir())

    def listdir(self, rel: str) -> list[str]:
        p = self.path(rel)
        return sorted(x.name for x in p.iterdir()) if p.is_dir() else []

    def read_bytes(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def write_bytes(self, rel: str, data: bytes, exclusive: bool = False,
                    sync: bool = True) -> None:
        path = self.path(rel)
        if exclusive and path.exists():  # the writer's flock makes check-then-write safe
            raise FileExistsError(errno.EEXIST, "exists", str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".staging-{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                if sync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def remove(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)

    def makedirs(self, rel: str, private: bool = False) -> None:
        p = self.path(rel)
        p.mkdir(parents=True, exist_ok=True)
        if private:
            os.chmod(p, 0o700)

    def files(self, rel: str) -> Iterator[tuple[str, int, float]]:
        base = self.path(rel)
        for dirpath, _dirnames, filenames in os.walk(base):
            for fn in filenames:
                full = os.path.join(dirpath, fn)
                st = os.stat(full)
                yield os.path.relpath(full, base), st.st_size, st.st_mtime

    def open(self, rel: str, mode: str = "rb") -> IO[Any]:
        return open(self.path(rel), mode)

    def append_line(self, rel: str, line: str) -> None:
        # O_APPEND + fsync: concurrent writers interleave whole lines
        fd = os.open(self.path(rel), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line.rstrip("\n") + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_lines(self, rel: str) -> list[str]:
        p = self.path(rel)
        if not p.exists():
            return []
        return [x for x in p.read_text(encoding="utf-8").splitlines() if x]

    def discard_partial(self, rel: str) -> None:
        for tmp in self.path(rel).rglob(".staging-*"):
            tmp.unlink(missing_ok=True)

    def lock(self, rel: str, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> WriterLock:
        return _FileLock(self.path(rel), self.url)


class _FileLock(WriterLock):
    """An exclusive ``flock`` on a file of the lake (released by the kernel when the
    process dies). The file says :data:`_RELEASED_CLEAN` while no writer holds it after
    one that called :meth:`leave_clean`; a writer empties it when it takes the lock, so a
    writer that died leaves it empty."""

    def __init__(self, path: Path, url: str):
        self.path = path
        self.url = url
        self._fh: IO[str] | None = None
        self._clean = False

    def acquire(self) -> None:
        try:
            fh = open(self.path, "a+")  # noqa: SIM115 (held until release)
        except PermissionError as exc:
            raise LakeAccessError(self.url, "write", "the write lock "
                                  f"{self.path.name} cannot be opened: "
                                  f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise LakeBusyError(self.url) from None
        self._fh = fh
        try:
            fh.seek(0)
            self.left_clean = fh.read(64) == _RELEASED_CLEAN
            self._say("")
        except BaseException:
            self.release()
            raise

    def leave_clean(self) -> None:
        self._clean = True

    def _say(self, text: str) -> None:
        assert self._fh is not None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(text)
        self._fh.flush()

    def release(self) -> None:
        if self._fh is not None:
            try:
                if self._clean:
                    self._say(_RELEASED_CLEAN)
            finally:
                fcntl.flock(self._fh, fcntl.LOCK_UN)
                self._fh.close()
                self._fh = None
                self._clean = False


#: what the lock file of a local lake says after a writer that left no partial file
_RELEASED_CLEAN = "released clean\n"


# --- an object store ------------------------------------------------------------------

def delta_options(fsspec_options: dict) -> dict[str, str]:
    """deltalake (object_store) options from fsspec/s3fs options; unset ones are left to
    the environment, which deltalake reads itself."""
    out: dict[str, str] = {}
    client = dict(fsspec_options.get("client_kwargs") or {})
    pairs = {"AWS_ACCESS_KEY_ID": fsspec_options.get("key"),
             "AWS_SECRET_ACCESS_KEY": fsspec_options.get("secret"),
             "AWS_SESSION_TOKEN": fsspec_options.get("token"),
             "AWS_ENDPOINT_URL": fsspec_options.get("endpoint_url")
             or client.get("endpoint_url"),
             "AWS_REGION": client.get("region_name") or fsspec_options.get("region_name")}
    out.update({k: str(v) for k, v in pairs.items() if v})
    endpoint = out.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") \
        or os.environ.get("AWS_ENDPOINT_URL") or ""
    if endpoint.startswith("http://"):
        out["AWS_ALLOW_HTTP"] = "true"  # a plain-HTTP endpoint (MinIO on a LAN, moto)
    if not out.get("AWS_REGION") and not os.environ.get("AWS_REGION") \
            and not os.environ.get("AWS_DEFAULT_REGION"):
        out["AWS_REGION"] = "us-east-1"  # S3-compatible stores ignore it; AWS redirects
    return out


class ObjectStorage(Storage):
    """``s3://bucket/prefix`` through fsspec/s3fs."""

    local = False

    def __init__(self, url: str, options: dict | None = None):
        scheme, rest = url.split("://", 1)
        rest = rest.strip("/")
        if not rest or rest.startswith("/"):
            raise StorageError(url, "expected s3://BUCKET/PREFIX")
        self.scheme = scheme
        self.prefix = rest  # bucket/prefix, as fsspec addresses it
        self.url = f"{scheme}://{rest}"
        self.options = dict(options or {})
        self.delta_options = delta_options(self.options)
        self._fs: Any = None

    @property
    def fs(self) -> Any:
        if self._fs is None:
            try:
                import fsspec

                # no listing cache: other processes write the lake too; an instance of its
                # own: a cached one may carry another endpoint (the environment changed)
                self._fs = fsspec.filesystem(self.scheme, skip_instance_cache=True,
                                             **{"use_listings_cache": False, **self.options})
            except ImportError as exc:
                raise StorageError(self.url, f"{exc}; install s3fs: "
                                             "pip install 'imaging-lakehouse[s3]'") from None
        return self._fs

    def fs_path(self, rel: str = "") -> str:
        return posixpath.join(self.prefix, rel) if rel else self.prefix

    def uri(self, rel: str = "") -> str:
        return f"{self.scheme}://{self.fs_path(rel)}"

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, FileExistsError):
            raise
        except PermissionError:
            raise StorageError(self.url, f"{what}: access denied (check the credentials: "
                                         "AWS_ACCESS_KEY_ID / the storage options)") from None
        except Exception as exc:  # OSError, or the client's own (endpoint unreachable, ...)
            raise StorageError(self.url, one_line(f"{what}: {type(exc).__name__}: {exc}",
                                                  300)) from None

    def check_bucket(self) -> None:
        bucket = self.prefix.split("/", 1)[0]
        try:
            found = self._call("check the bucket", self.fs.exists, bucket)
        except FileNotFoundError:
            found = False
        if not found:
            raise StorageError(self.url, f"bucket {bucket!r} does not exist or cannot be "
                                         "listed; create it first (e.g. `aws s3 mb "
                                         f"s3://{bucket}`, or with MinIO `mc mb`)")

    def exists(self, rel: str) -> bool:
        return bool(self._call("exists", self.fs.exists, self.fs_path(rel)))

    def is_empty(self) -> bool:
        try:
            return not self._call("list", self.fs.ls, self.prefix, refresh=True)
        except FileNotFoundError:
            return True

    def listdir(self, rel: str) -> list[str]:
        try:
            entries = self._call("list", self.fs.ls, self.fs_path(rel), refresh=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def read_bytes(self, rel: str) -> bytes:
        return bytes(self._call("read", self.fs.cat_file, self.fs_path(rel)))

    def write_bytes(self, rel: str, data: bytes, exclusive: bool = False,
                    sync: bool = True) -> None:
        # one PUT: the object appears whole or not at all
        mode = "create" if exclusive else "overwrite"
        try:
            self._call("write", self.fs.pipe_file, self.fs_path(rel), data, mode=mode)
        except (FileExistsError, StorageError) as exc:
            if not exclusive or (isinstance(exc, StorageError)
                                 and "PreconditionFailed" not in exc.detail):
                raise
            if self._holds(rel, data):
                return
            raise FileExistsError(errno.EEXIST, "exists", self.uri(rel)) from None

    def _holds(self, rel: str, data: bytes) -> bool:
        """Does ``rel`` hold exactly ``data``? An exclusive PUT refused because the object
        exists may have been our own: the client retries a PUT whose answer it lost (the
        connection broke after the store had written it), and the retry finds it."""
        try:
            held = bytes(self.fs.cat_file(self.fs_path(rel)))
        except Exception:  # the refusal stands
            return False
        if held == data:
            log.info("%s: an earlier attempt of this write succeeded (its answer was lost)",
                     self.uri(rel))
        return held == data

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call("delete", self.fs.rm_file, self.fs_path(rel))

    def files(self, rel: str) -> Iterator[tuple[str, int, float]]:
        base = self.fs_path(rel)
        try:
            found = self._call("list", self.fs.find, base, detail=True)
        except FileNotFoundError:
            return
        for key, info in sorted(found.items()):
            if info.get("type") == "directory":
                continue
            modified = info.get("LastModified")
            mtime = modified.timestamp() if isinstance(modified, datetime) else 0.0
            yield posixpath.relpath(key, base), int(info.get("size") or 0), mtime

    def open(self, rel: str, mode: str = "rb") -> IO[Any]:
        return self._call("open", self.fs.open, self.fs_path(rel), mode)

    def append_line(self, rel: str, line: str) -> None:
        # objects cannot be appended to: one object per line, named so they sort in time
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        self.write_bytes(f"{rel}.d/{stamp}-{uuid.uuid4().hex[:12]}.jsonl",
                         (line.rstrip("\n") + "\n").encode("utf-8"), exclusive=True)

    def read_lines(self, rel: str) -> list[str]:
        names = [n for n in self.listdir(f"{rel}.d") if n.endswith(".jsonl")]
        if not names:
            return []
        paths = [self.fs_path(f"{rel}.d/{n}") for n in names]
        data = self._call("read", self.fs.cat, paths)
        return [x for p in paths for x in data[p].decode("utf-8").splitlines() if x]

    def lock(self, rel: str, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> WriterLock:
        return LeaseLock(self, rel, lease_seconds)

    def duckdb_filesystem(self) -> Any:
        return _immutable_files(self.fs)

    def arrow_filesystem(self, rel: str) -> Any:
        """Arrow's own S3 client, with the options deltalake gets (unset ones from the
        environment, as both read it)."""
        import pyarrow.fs as pafs

        opts = self.delta_options or {}
        kw: dict[str, Any] = {}
        endpoint = opts.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") \
            or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            scheme, _, rest = endpoint.partition("://")
            kw.update(endpoint_override=rest.rstrip("/") if rest else scheme,
                      scheme=scheme if rest else "https")
        if opts.get("AWS_ACCESS_KEY_ID"):
            kw.update(access_key=opts["AWS_ACCESS_KEY_ID"],
                      secret_key=opts.get("AWS_SECRET_ACCESS_KEY"),
                      session_token=opts.get("AWS_SESSION_TOKEN"))
        region = opts.get("AWS_REGION") or os.environ.get("AWS_REGION") \
            or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kw["region"] = region
        return pafs.SubTreeFileSystem(posixpath.join(self.prefix, rel),
                                      pafs.S3FileSystem(**kw))


#: Bytes of data files a DuckDB connection keeps in memory (least recently used dropped).
READ_CACHE_BYTES = 256 * 2**20


def _immutable_files(fs: Any, max_bytes: int = READ_CACHE_BYTES) -> Any:
    """A read-only fsspec filesystem over ``fs`` for DuckDB.

    DuckDB opens a Parquet file several times while it binds views and runs a query,
    each time asking for its size and modification time: one round trip each, seconds
    per view on object storage. The lake's data files never change once written (a
    write adds new files), so their details are asked once and their bytes fetched
    once and kept, up to ``max_bytes`` in all (larger files are read in ranges).
    """
    from fsspec import AbstractFileSystem

    class ImmutableFiles(AbstractFileSystem):
        protocol = tuple(fs.protocol) if isinstance(fs.protocol, tuple | list) \
            else (fs.protocol,)
        cachable = False

        def __init__(self):
            super().__init__()
            self._info: dict[str, dict] = {}
            self._data: OrderedDict[str, bytes] = OrderedDict()
            self._held = 0
            self._mutex = threading.Lock()

        @classmethod
        def _strip_protocol(cls, path):
            return fs._strip_protocol(path)

        def info(self, path, **kwargs):
            p = self._strip_protocol(path)
            if p not in self._info:
                self._info[p] = fs.info(p)
            return self._info[p]

        def modified(self, path):
            return fs.modified(path) if "LastModified" not in self.info(path) \
                else self.info(path)["LastModified"]

        def ls(self, path, detail=True, **kwargs):
            return fs.ls(path, detail=detail, **kwargs)

        def glob(self, path, **kwargs):
            p = self._strip_protocol(path)
            if any(c in p for c in "*?["):
                return fs.glob(path, **kwargs)
            try:  # a file's own name (how DuckDB expands each file of a list)
                self.info(p)
            except FileNotFoundError:
                return []
            return [p]

        def _open(self, path, mode="rb", **kwargs):
            if "r" not in mode or "+" in mode:
                raise PermissionError(f"read-only: {path}")
            p = self._strip_protocol(path)
            with self._mutex:
                data = self._data.get(p)
                if data is not None:
                    self._data.move_to_end(p)
                    return io.BytesIO(data)
            size = int(self.info(p).get("size") or 0)
            if size > max_bytes // 4:
                return fs.open(p, "rb", **kwargs)
            data = fs.cat_file(p)
            with self._mutex:
                if p not in self._data:
                    self._data[p] = data
                    self._held += len(data)
                while self._held > max_bytes and len(self._data) > 1:
                    _old, dropped = self._data.popitem(last=False)
                    self._held -= len(dropped)
            return io.BytesIO(data)

    return ImmutableFiles()


class LeaseLock(WriterLock):
    """A lock object with a lease, taken and renewed by conditional PUTs.

    Taking it: ``PUT If-None-Match: *``; when it exists and its lease has expired (its
    holder died), ``PUT If-Match: <its ETag>``, so of several writers taking over one
    wins. A thread renews the lease every third of its length (``If-Match`` on our own
    ETag); a renewal that fails means another writer took over, and :meth:`check`
    (called before every commit and publish) stops this writer. When the last renewal
    is older than two thirds of the lease (the process was paused, the network was
    down), :meth:`check` renews synchronously before saying yes. Expiry compares the
    holder's clock with ours: clocks must agree to well within the lease (NTP).
    """

    def __init__(self, storage: ObjectStorage, rel: str, lease_seconds: float):
        self.storage = storage
        self.rel = rel
        self.lease = float(lease_seconds)
        self.owner = uuid.uuid4().hex
        self._etag: str | None = None
        self._lost = False
        self._renewed = 0.0  # time.monotonic() of the last successful PUT
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "host": socket.gethostname(),
                           "pid": os.getpid(), "renewed_at": now,
                           "expires_at": now + self.lease,
                           "lease_seconds": self.lease}).encode("utf-8")

    def _put(self, **condition) -> str:
        started = time.monotonic()
        s = self.storage
        out = s.fs.pipe_file(s.fs_path(self.rel), self._body(), **condition)
        etag = (out or {}).get("ETag") if isinstance(out, dict) else None
        if not etag:
            etag = s.fs.info(s.fs_path(self.rel), refresh=True)["ETag"]
        self._renewed = started
        return str(etag)

    def _ours(self) -> str | None:
        """The lock object's ETag when it names this lock as owner: a conditional PUT of
        ours that the store did, though its answer was lost (the client's retry was then
        refused: the object existed, or its ETag had changed)."""
        s = self.storage
        path = s.fs_path(self.rel)
        try:
            info = s.fs.info(path, refresh=True)
            held = json.loads(s.fs.cat_file(path))
        except (OSError, ValueError):
            return None
        if not isinstance(held, dict) or held.get("owner") != self.owner:
            return None
        log.info("the write lock of %s: an earlier attempt of this PUT succeeded (its "
                 "answer was lost)", s.url)
        self._renewed = time.monotonic()
        return str(info["ETag"])

    def acquire(self) -> None:
        s = self.storage
        try:
            self._etag = self._put(mode="create")
        except FileExistsError:
            self._etag = self._ours()
            if self._etag is None:
                self._take_over()
        except OSError as exc:
            raise StorageError(s.url, f"cannot take the write lock: {exc}"[:300]) from None
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name="lake-lease")
        self._thread.start()

    def _take_over(self) -> None:
        s = self.storage
        path = s.fs_path(self.rel)
        try:
            info = s.fs.info(path, refresh=True)
            held = json.loads(s.fs.cat_file(path))
        except FileNotFoundError:  # released meanwhile: try once more from the start
            try:
                self._etag = self._put(mode="create")
                return
            except FileExistsError:
                raise LakeBusyError(s.url) from None
        except (OSError, ValueError) as exc:
            raise StorageError(s.url, f"unreadable write lock {self.rel}: {exc}"[:300]) from None
        expires = float(held.get("expires_at", 0))
        if expires > time.time():
            raise LeaseHeldError(s.url, held, expires)
        log.warning("taking over the write lock of %s: its holder (%s, pid %s) let the lease "
                    "expire at %s", s.url, held.get("host"), held.get("pid"),
                    datetime.fromtimestamp(expires, UTC).isoformat(timespec="seconds"))
        try:
            self._etag = self._put(IfMatch=info["ETag"])
        except OSError:  # PreconditionFailed: another writer took it first (or we did)
            self._etag = self._ours()
            if self._etag is None:
                raise LakeBusyError(s.url) from None

    def _renew(self) -> None:
        """Renew the lease (the caller holds the mutex); a refusal means it was lost."""
        if self._lost or self._etag is None:
            return
        try:
            self._etag = self._put(IfMatch=self._etag)
        except OSError as exc:
            if "PreconditionFailed" in str(exc) or "412" in str(exc) \
                    or getattr(exc, "errno", None) == errno.EINVAL:
                ours = self._ours()
                if ours is not None:
                    self._etag = ours
                    return
                self._lost = True
                log.error("the write lease on %s was taken over", self.storage.url)
                return
            # a transient error: the lease still runs; try again next period
            log.warning("could not renew the write lease on %s: %s", self.storage.url, exc)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease / 3):
            with self._mutex:
                self._renew()
                if self._lost:
                    return

    def check(self) -> None:
        with self._mutex:
            if not self._lost and time.monotonic() - self._renewed > self.lease * 2 / 3:
                self._renew()
            if not self._lost and time.monotonic() - self._renewed > self.lease:
                self._lost = True  # could not renew in time: another writer may have it
            if self._lost:
                raise LockLostError(self.storage.url)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            if self._lost or self._etag is None:
                return
            s = self.storage
            path = s.fs_path(self.rel)
            with contextlib.suppress(OSError):
                # only our own lock (a takeover changed its ETag)
                if str(s.fs.info(path, refresh=True)["ETag"]) == self._etag:
                    s.fs.rm_file(path)
            self._etag = None


class LeaseHeldError(LakeBusyError):
    def __init__(self, url: str, held: dict, expires: float):
        LakeError.__init__(
            self, f"another process ({held.get('host')}, pid {held.get('pid')}) holds the "
                  f"write lease on {url} until "
                  f"{datetime.fromtimestamp(expires, UTC).isoformat(timespec='seconds')}; "
                  "wait for it to finish, or, if it died, for the lease to expire "
                  "(readers are not blocked)")
        self.path = url
        self.holder = held
        self.expires_at = expires


def load_options(path: Path | str | None) -> dict:
    """fsspec storage options from a JSON file (None: no file, no options)."""
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StorageError(str(path), f"cannot read storage options: {exc}") from None
    if not isinstance(data, dict):
        raise StorageError(str(path), "storage options must be a JSON object")
    return data
