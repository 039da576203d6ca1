"""A second process that ``stat``s the end of a walk while the walk does its start.

A no-op rerun of a large archive is its walk, and the walk is a ``stat`` per entry: about
2.5 µs each in one Python process, half of it in the kernel, at 120,000 entries for
100,000 files. The second core has nothing else to do at that point (no worker is
started until a changed file is found). So when the last walk's folder listings are
kept (:mod:`etl.listings`), a child process (:mod:`etl.statahead_child`, the standard
library only) is given the folders and names they hold and ``stat``s them starting from
the folder the walk will reach last; the walk starts from the first. Each folder's
results come back as the child finishes it, and the walk takes them for a folder it
enters whose listing it reuses (the same names, in the same order) and whose results
have arrived; any other folder, and any entry the child could not ``stat``, it
``stat``s itself. They meet about in the middle; the rest of the child's work is
dropped when the walk ends.

Nothing the walk finds depends on the child: a result is the ``stat`` of the same path
taken a little earlier in the same run (a walk is not an atomic snapshot either way),
and a child that fails or is slow only leaves the walk to ``stat`` more itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

#: The child is started only for a walk of at least this many entries (below, its start
#: and the hand-over cost more than they save).
MIN_ENTRIES = 20_000
CHILD = Path(__file__).with_name("statahead_child.py")

#: One folder's results: the ``modes, sizes, mtimes`` (lists) and ``devs, inos, ctimes``
#: (arrays) of the frame holding it, where its entries start in them, and whether they
#: are all regular files.
Results = tuple[list[int], list[int], list[int], np.ndarray, np.ndarray, np.ndarray, int,
                bool]


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class StatAhead:
    """The child of one walk (see the module's text). :meth:`get` is called by the walk;
    :meth:`close` ends the child and must be called when the walk ends or is dropped."""

    def __init__(self, tree: Callable[[], tuple[pa.Array, pa.Array]]):
        """``tree``: the folders (large strings) and each one's sorted names (a large list
        of large strings) to ``stat``; called by the thread that talks to the child."""
        self._ready: dict[str, Results] = {}
        self.taken = 0  # folders whose results the walk used
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(CHILD)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
        # the request is made and written and the results read by a thread (Arrow's work
        # and the waits on the pipe release the GIL): the walk starts at once
        self._thread = threading.Thread(target=self._talk, args=(tree,), daemon=True,
                                        name="lake-statahead")
        self._thread.start()

    @classmethod
    def start(cls, entries: int,
              tree: Callable[[], tuple[pa.Array, pa.Array]]) -> StatAhead | None:
        """A child for a walk of about ``entries`` entries, or None when it would not pay
        (a small walk, one CPU) or cannot start."""
        if not entries or entries < MIN_ENTRIES or usable_cpus() < 2 or not sys.executable:
            return None
        try:
            return cls(tree)
        except OSError as exc:
            log.info("not stat-ing ahead of the walk: %s", exc)
            return None

    def _talk(self, tree: Callable[[], tuple[pa.Array, pa.Array]]) -> None:
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        try:
            folders, names = from_the_end(*tree())
            paths: list[str] = folders.to_pylist()
            counts: list[int] = np.diff(names.offsets.to_numpy()).tolist()
            for part in _request(folders, names):
                proc.stdin.write(part)
            proc.stdin.close()
            out = proc.stdout
            total = int(np.sum(counts))
            while len(head := out.read(16)) == 16:
                n_folders, n_entries = np.frombuffer(head, np.int64).tolist()
                if not (0 < n_folders <= len(paths) and 0 <= n_entries <= total):
                    return  # not the child's frames: nothing more is taken from it
                done = np.frombuffer(out.read(8 * n_folders), np.int64).tolist()
                plain = np.frombuffer(out.read(8 * n_folders), np.int64).tolist()
                data = out.read(48 * n_entries)
                if len(plain) != n_folders or len(data) != 48 * n_entries:
                    return  # cut short (the child ended): what arrived stays usable
                rows = np.frombuffer(data, np.int64).reshape(n_entries, 6)
                # a folder's device, inode and ctime are read one at a time, files' never
                cols = (*(rows[:, c].tolist() for c in range(3)),
                        *(rows[:, c] for c in range(3, 6)))
                start = 0
                for i, flat in zip(done, plain, strict=True):
                    self._ready[paths[i]] = (*cols, start, bool(flat))
                    start += counts[i]
        except (OSError, ValueError):  # the walk closed the child first
            return

    def get(self, folder: str, count: int) -> Results | None:
        """The results for ``folder``, when they have arrived and are for ``count`` names
        (the walk's, from the same listing)."""
        got = self._ready.pop(folder, None)
        if got is None:
            return None
        if got[6] + count > len(got[0]):
            return None
        self.taken += 1
        return got

    def close(self) -> None:
        proc = self._proc
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._thread.join()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def from_the_end(folders: pa.Array, names: pa.Array) -> tuple[pa.Array, pa.Array]:
    """``folders`` and their ``names`` in the reverse of the order the walk meets them: it
    goes depth first, names sorted, so in the order of the paths with "/" sorting first
    (Arrow sorts strings bytewise, as the walk's ``sort`` of names does)."""
    order = pc.array_sort_indices(pc.replace_substring(folders, "/", "\0"),
                                  order="descending")
    return folders.take(order), names.take(order)


def _request(folders: pa.Array, names: pa.Array) -> list[bytes | memoryview]:
    """The child's input (see :mod:`etl.statahead_child`), from Arrow's buffers."""
    folder_at, folder_bytes = _strings(folders)
    names_at, name_bytes = _strings(pc.binary_join(names, pa.scalar("\0", pa.large_string())))
    head = np.array([len(folders), len(folder_bytes), len(name_bytes)], np.int64)
    return [head.tobytes(), folder_at.tobytes(), names_at.tobytes(), folder_bytes,
            name_bytes]


def _strings(arr: pa.Array) -> tuple[np.ndarray, memoryview]:
    """A large string array's offsets (from 0) and the bytes they point into."""
    _, offsets_buf, data = arr.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64)[arr.offset:arr.offset + len(arr) + 1]
    lo, hi = int(offsets[0]), int(offsets[-1])
    body = memoryview(data)[lo:hi] if data is not None else memoryview(b"")
    return offsets - lo, body
