"""The second process of :mod:`etl.statahead`: ``stat`` every entry of the folders it is
given, in the order given (the reverse of the walk's), and write the results back as
they come.

Run as a script (``python -I -S statahead_child.py``), not imported: the standard
library only, so that it starts in about 15 ms.

In (standard input; native-endian int64 numbers):
``n_folders, folder_bytes, name_bytes``; the folders' offsets (``n_folders + 1``) into
their bytes; the offsets of each folder's names (``n_folders + 1``) into theirs, where
the names of one folder are joined by NUL bytes; the folders' bytes; the names' bytes.

Out (standard output), frames of a few thousand entries: ``n_folders, n_entries``; the
folders' numbers (their places in the input); for each of them 1 when all its entries
are regular files, else 0; then for every entry of those folders, in order,
``mode, size, mtime_ns, dev, ino, ctime_ns`` (``mode`` 0: the ``stat`` failed).
"""

import os
import sys
from array import array

#: Entries per frame written back.
FRAME_ENTRIES = 2048


def _read(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError
    return data


def _int64s(stream, n: int) -> array:
    out = array("q")
    out.frombytes(_read(stream, 8 * n))
    return out


def main() -> None:
    src, dst = sys.stdin.buffer, sys.stdout.buffer
    n_folders, folder_bytes, name_bytes = _int64s(src, 3)
    folder_at = _int64s(src, n_folders + 1)
    names_at = _int64s(src, n_folders + 1)
    folders = _read(src, folder_bytes)
    names = _read(src, name_bytes)
    stat = os.stat
    done, plain, rows = array("q"), array("q"), array("q")
    put = rows.extend
    for i in range(n_folders):
        start = len(rows)
        prefix = folders[folder_at[i]:folder_at[i + 1]] + b"/"
        joined = names[names_at[i]:names_at[i + 1]]
        for name in joined.split(b"\0") if joined else ():
            try:
                st = stat(prefix + name)
            except (OSError, ValueError):
                put((0, 0, 0, 0, 0, 0))
                continue
            try:
                put((st.st_mode, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino,
                     st.st_ctime_ns))
            except OverflowError:  # a device or inode number past 2**63: the walk stats it
                del rows[len(rows) - len(rows) % 6:]
                put((0, 0, 0, 0, 0, 0))
        done.append(i)
        plain.append(all(m & 0o170000 == 0o100000 for m in rows[start::6]))
        if len(rows) >= 6 * FRAME_ENTRIES:
            _frame(dst, done, plain, rows)
            done, plain, rows = array("q"), array("q"), array("q")
            put = rows.extend
    if done:
        _frame(dst, done, plain, rows)


def _frame(dst, done: array, plain: array, rows: array) -> None:
    dst.write(array("q", (len(done), len(rows) // 6)).tobytes())
    dst.write(done.tobytes())
    dst.write(plain.tobytes())
    dst.write(rows.tobytes())
    dst.flush()


if __name__ == "__main__":
    try:
        main()
    except (BrokenPipeError, EOFError, KeyboardInterrupt):
        # the walk ended first (or gave up on this process): nothing left to do
        os._exit(0)
