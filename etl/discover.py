"""Find the files of a source folder: recursive, deterministic, loop-safe.

Walk order is depth first with the entries of each folder sorted by name; it
decides which of two copies of an instance counts as the first. Symbolic links
to folders are followed once (a folder reached again, through a loop or a
second link, is not walked twice). A folder that cannot be listed
(permissions) is yielded itself, with its error, so that the run reports it.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from etl.errors import SourceError

if TYPE_CHECKING:
    from etl.listings import Listings
    from etl.statahead import Results, StatAhead

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FoundFile:
    path: str
    size: int
    mtime_ns: int
    #: Set when the file could not even be stat'ed (broken link, permissions), or when
    #: ``path`` is a folder that could not be listed.
    error: str | None = None

    def __reduce__(self):
        # a plain tuple: the dataclass default for frozen slots pickles through
        # ``dataclasses.fields`` per object (a third of the cost of sending a batch)
        return FoundFile, (self.path, self.size, self.mtime_ns, self.error)


class FileBatch(list):
    """The files of one task: a list of :class:`FoundFile` that pickles as four columns.
    A batch travels to a worker process as one object; pickled file by file, cloudpickle
    (Dask's) called back into Python for every file: 3.7 µs per file of the driver's CPU
    against 0.3 µs as columns, and 2.1 against 0.6 µs to unpickle in the worker."""

    __slots__ = ()

    def __reduce__(self):
        errors = {i: f.error for i, f in enumerate(self) if f.error is not None}
        return _file_batch, ([f.path for f in self], [f.size for f in self],
                             [f.mtime_ns for f in self], errors)


def _file_batch(paths: list[str], sizes: list[int], mtimes: list[int],
                errors: dict[int, str]) -> FileBatch:
    batch = FileBatch(map(FoundFile, paths, sizes, mtimes))
    for i, error in errors.items():
        batch[i] = FoundFile(paths[i], sizes[i], mtimes[i], error)
    return batch


@dataclass
class WalkStats:
    folders: int = 0
    folders_unreadable: int = 0
    loops_skipped: int = 0


#: Files per chunk of :func:`walk_columns` for :func:`walk` (which yields them one by one).
WALK_CHUNK = 256


@dataclass(slots=True)
class Found:
    """A chunk of the files of a walk, in walk order, as columns (no object per file):
    ``errors`` maps a position in the chunk to the error of that entry (a file that could
    not be stat'ed, or a folder that could not be listed; its size and mtime are 0)."""

    paths: list[str]
    sizes: list[int]
    mtimes: list[int]
    errors: dict[int, str]

    def __len__(self) -> int:
        return len(self.paths)

    def file(self, i: int) -> FoundFile:
        return FoundFile(self.paths[i], self.sizes[i], self.mtimes[i], self.errors.get(i))


def walk(source: Path | str, stats: WalkStats | None = None) -> Iterator[FoundFile]:
    """Yield every file below ``source`` (or ``source`` itself when it is a file)."""
    for found in walk_columns(source, stats, WALK_CHUNK):
        for i in range(len(found)):
            yield found.file(i)


def walk_columns(source: Path | str, stats: WalkStats | None = None,
                 chunk: int = 20_000, listings: Listings | None = None,
                 first: int | None = None,
                 stat_ahead: tuple[Callable[[], object], Callable[[], object]] | None = None,
                 ) -> Iterator[Found]:
    """The files of :func:`walk`, in the same order, in chunks of ``chunk`` files (the last
    one smaller; never empty), found as the chunks are taken. ``first``: the size of the
    first chunk, when it should come sooner (default ``chunk``).

    One ``stat`` per entry (following links) and one listing per folder, nothing else:
    an entry's ``stat`` also gives a folder's device and inode (the loop check), and the
    walk keeps its place in each open folder on a stack of its own rather than in a
    generator per folder level (a file found eight levels down went through eight
    generators).

    ``listings``: the folder listings of the last walk of this source; a folder unchanged
    since is not listed again (:mod:`etl.listings`), and this walk's listings are saved
    there when the walk ends (not when it is abandoned).

    ``stat_ahead``: two functions, called when a second process starts to ``stat`` ahead
    of the walk (the second core is then its) and when the walk ends or is abandoned."""
    root = Path(source)
    stats = stats if stats is not None else WalkStats()
    try:
        st = os.stat(root)
    except OSError as exc:
        raise SourceError(str(root), exc.strerror or str(exc)) from None
    if stat.S_ISREG(st.st_mode):
        yield Found([str(root.absolute())], [st.st_size], [st.st_mtime_ns], {})
        return
    if not stat.S_ISDIR(st.st_mode):
        raise SourceError(str(root), "not a folder or a regular file")
    if not os.access(root, os.R_OK | os.X_OK):
        raise SourceError(str(root), "permission denied")
    top = str(root.absolute())
    chunks = (first or chunk, chunk)
    if listings is None:
        yield from _walk(top, st, stats, chunks, None, None)
        return
    from etl.statahead import StatAhead  # numpy and Arrow: only with listings

    ahead = StatAhead.start(listings.reusable_names, listings.tree)
    if ahead is not None and stat_ahead is not None:
        stat_ahead[0]()
    try:
        yield from _walk(top, st, stats, chunks, listings, ahead)
        listings.save()
    finally:
        listings.discard()  # nothing left to drop once saved
        if ahead is not None:
            try:
                ahead.close()
            finally:
                if stat_ahead is not None:
                    stat_ahead[1]()
            log.debug("%d folders stat-ed ahead by a second process", ahead.taken)


def _walk(top: str, st: os.stat_result, stats: WalkStats, chunks: tuple[int, int],
          listings: Listings | None, ahead: StatAhead | None) -> Iterator[Found]:
    chunk, later = chunks  # the first chunk's size, then the others'
    seen: set[tuple[int, int]] = set()
    paths: list[str] = []
    sizes: list[int] = []
    mtimes: list[int] = []
    errors: dict[int, str] = {}

    def listing(folder: str, dev: int, ino: int, mtime: int,
                ctime: int) -> tuple[list[str], Results | None] | None:
        """The sorted names in ``folder``, with their ``stat`` results when the second
        process has them (None: already walked, or not listable)."""
        key = (dev, ino)
        if key in seen:
            stats.loops_skipped += 1
            log.debug("folder %s already walked (link loop or second link)", folder)
            return None
        seen.add(key)
        stats.folders += 1
        if listings is not None:
            names = listings.get(folder, dev, ino, mtime, ctime)
            if names is not None:
                return names, None if ahead is None else ahead.get(folder, len(names))
            listed_at = time.time_ns()  # just before the listing
        try:
            names = os.listdir(folder)
        except OSError as exc:
            stats.folders_unreadable += 1
            log.warning("cannot list a folder of the source: %s", exc.strerror or exc)
            # the folder itself is reported (an io_error quarantine row, read again by the
            # next run): the files it holds are unknown, never silently left out
            errors[len(paths)] = f"folder cannot be listed: {exc.strerror or exc}"
            paths.append(folder)
            sizes.append(0)
            mtimes.append(0)
            return None
        names.sort()
        if listings is not None:
            listings.put(folder, dev, ino, mtime, ctime, listed_at, names)
        return names, None

    # each open folder: [its path with a trailing separator, its sorted names, next
    # index, its entries' stat results from the second process or None]
    opened = listing(top, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    stack: list[list] = [] if opened is None else \
        [[os.path.join(top, ""), opened[0], 0, opened[1]]]
    is_reg, is_dir, stat_of = stat.S_ISREG, stat.S_ISDIR, os.stat
    while stack:
        frame = stack[-1]
        prefix, names, i, ready = frame
        n = len(names)
        if ready is not None:
            modes, rsizes, rmtimes, devs, inos, ctimes, base, plain = ready
            if plain:  # regular files only, every one stat-ed: a chunk's room at a time
                while i < n:
                    k = min(n - i, chunk - len(paths))
                    paths += [prefix + name for name in names[i:i + k]]
                    sizes += rsizes[base + i:base + i + k]
                    mtimes += rmtimes[base + i:base + i + k]
                    i += k
                    if len(paths) >= chunk:
                        yield Found(paths, sizes, mtimes, errors)
                        paths, sizes, mtimes, errors = [], [], [], {}
                        chunk = later
                stack.pop()
                continue
        while i < n:
            path = prefix + names[i]
            i += 1
            if ready is not None and (mode := modes[j := base + i - 1]):
                size, mtime = rsizes[j], rmtimes[j]
            else:
                j = -1
                try:
                    est = stat_of(path)
                except OSError as exc:
                    errors[len(paths)] = exc.strerror or str(exc)
                    paths.append(path)
                    sizes.append(0)
                    mtimes.append(0)
                    continue
                mode, size, mtime = est.st_mode, est.st_size, est.st_mtime_ns
            if is_reg(mode):
                paths.append(path)
                sizes.append(size)
                mtimes.append(mtime)
                if len(paths) >= chunk:
                    yield Found(paths, sizes, mtimes, errors)
                    paths, sizes, mtimes, errors = [], [], [], {}
                    chunk = later
            elif is_dir(mode):
                sub = listing(path, int(devs[j]), int(inos[j]), mtime, int(ctimes[j])) \
                    if j >= 0 else listing(path, est.st_dev, est.st_ino, mtime, est.st_ctime_ns)
                if sub is not None:
                    frame[2] = i
                    stack.append([path + "/", sub[0], 0, sub[1]])
                    break
            # sockets, fifos and devices are not files of an archive: ignored
        else:
            stack.pop()
        if len(paths) >= chunk:
            yield Found(paths, sizes, mtimes, errors)
            paths, sizes, mtimes, errors = [], [], [], {}
            chunk = later
    if paths:
        yield Found(paths, sizes, mtimes, errors)


def tally(source: Path | str) -> Iterator[int]:
    """How many files :func:`walk` would yield, folder by folder (one number per folder
    listed; their sum is the count), without a ``stat`` per file: the type of an entry
    comes with its folder's listing, and only links and entries of unknown type are
    looked at further. For the progress bar's total; a few times cheaper than a walk."""
    root = Path(source)
    try:
        st = os.stat(root)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode):
        yield 1
    elif stat.S_ISDIR(st.st_mode):
        yield from _tally_dir(str(root.absolute()), set())


def _tally_dir(folder: str, seen: set[tuple[int, int]]) -> Iterator[int]:
    try:
        st = os.stat(folder)
    except OSError:
        return
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return
    seen.add(key)
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError:
        yield 1  # walk yields the folder itself, with its error
        return
    files = 0
    folders = []
    for entry in entries:
        if entry.is_dir():  # follows links, like walk
            folders.append(entry.path)
        elif entry.is_file():
            files += 1
        else:  # not a folder or a regular file: walk yields it only when stat fails
            try:
                entry.stat(follow_symlinks=True)
            except OSError:
                files += 1
    yield files
    for path in folders:
        yield from _tally_dir(path, seen)
