import os
import stat

import pytest

from etl.discover import WalkStats, walk
from etl.errors import SourceError


def test_walk_is_sorted_depth_first_and_loop_safe(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").mkdir(parents=True)
    for rel in ("a/x/2", "a/x/1.dcm", "a/z", "b/y", "c"):
        (tmp_path / rel).write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "b" / "loop")  # a link back to the root
    os.symlink(tmp_path / "nowhere", tmp_path / "broken")
    stats = WalkStats()
    found = list(walk(tmp_path, stats))
    rel = [os.path.relpath(f.path, tmp_path) for f in found]
    assert rel == ["a/x/1.dcm", "a/x/2", "a/z", "b/y", "broken", "c"]
    assert stats.loops_skipped == 1
    broken = found[4]
    assert broken.error is not None


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="No such file"):
        list(walk(tmp_path / "nope"))


def test_a_single_file_source(tmp_path):
    f = tmp_path / "one.dcm"
    f.write_bytes(b"abc")
    (found,) = walk(f)
    assert found.size == 3


def test_tally_counts_what_walk_yields(tmp_path):
    """The progress bar's count (no stat per file) agrees with the walk: links to files
    and folders followed, a loop counted once, broken links and unreadable entries
    counted (the walk yields them with their error), fifos left out."""
    from etl.discover import tally

    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").mkdir(parents=True)
    for rel in ("a/x/2", "a/x/1.dcm", "a/z", "b/y", "c"):
        (tmp_path / rel).write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "b" / "loop")
    os.symlink(tmp_path / "a", tmp_path / "b" / "second")  # a folder reached twice
    os.symlink(tmp_path / "nowhere", tmp_path / "broken")
    os.symlink(tmp_path / "c", tmp_path / "b" / "to-file")
    os.mkfifo(tmp_path / "a" / "fifo")
    os.symlink(tmp_path / "a" / "fifo", tmp_path / "to-fifo")
    found = list(walk(tmp_path))
    assert len(found) == 7  # 5 files, the broken link, the link to a file
    assert sum(tally(tmp_path)) == 7
    assert sum(tally(tmp_path / "c")) == 1
    assert sum(tally(tmp_path / "a" / "fifo")) == 0
    assert sum(tally(tmp_path / "nope")) == 0


def _reference_walk(folder: str, seen: set) -> list[tuple[str, int, int, bool]]:
    """The walk as the old recursive generator did it: (path, size, mtime, error?)."""
    st = os.stat(folder)
    if (st.st_dev, st.st_ino) in seen:
        return []
    seen.add((st.st_dev, st.st_ino))
    out = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        try:
            est = entry.stat(follow_symlinks=True)
        except OSError:
            out.append((entry.path, 0, 0, True))
            continue
        if stat.S_ISDIR(est.st_mode):
            out += _reference_walk(entry.path, seen)
        elif stat.S_ISREG(est.st_mode):
            out.append((entry.path, est.st_size, est.st_mtime_ns, False))
    return out


@pytest.mark.parametrize(("chunk", "first"),
                         [(1, None), (2, None), (3, None), (7, None), (1000, None), (7, 2),
                          (3, 5), (1000, 1)])
def test_walk_columns_in_chunks_is_the_walk(tmp_path, chunk, first):
    """Files before, between and after subfolders, deep nesting, links to folders (a loop,
    a second link), broken links and a fifo: the same entries in the same order as the
    recursive walk, in chunks of ``chunk`` files after a first one of ``first`` (default
    ``chunk``), and ``walk`` yields the same."""
    import random

    from etl.discover import walk_columns

    rng = random.Random(7)
    folders = [tmp_path]
    for i in range(40):
        parent = rng.choice(folders)
        if rng.random() < 0.3:
            sub = parent / f"d{i:02d}"
            sub.mkdir()
            folders.append(sub)
        else:
            (parent / f"f{i:02d}.dcm").write_bytes(b"x" * i)
    deep = tmp_path / "m"
    for level in range(30):  # deeper than any Python generator chain should go
        deep = deep / f"l{level}"
    deep.mkdir(parents=True)
    (deep / "bottom.dcm").write_bytes(b"deep")
    (tmp_path / "m" / "after.dcm").write_bytes(b"after")
    os.symlink(tmp_path, folders[-1] / "loop")
    os.symlink(tmp_path / "m", tmp_path / "second")
    os.symlink(tmp_path / "nowhere", tmp_path / "broken")
    os.mkfifo(tmp_path / "fifo")

    expected = _reference_walk(str(tmp_path), set())
    stats = WalkStats()
    chunks = list(walk_columns(tmp_path, stats, chunk, first=first))
    sizes = [first or chunk] + [chunk] * (len(chunks) - 1)
    assert [len(c) for c in chunks[:-1]] == sizes[:-1]
    assert 0 < len(chunks[-1]) <= sizes[-1]
    got = [(c.paths[i], c.sizes[i], c.mtimes[i], i in c.errors)
           for c in chunks for i in range(len(c))]
    assert got == expected
    assert len(got) == 31  # 28 random files, the deep one, the one after it, the broken link
    assert [g[0] for g in got if g[3]] == [str(tmp_path / "broken")]
    assert (stats.loops_skipped, stats.folders) == (2, len(folders) + 31)
    assert [(f.path, f.size, f.mtime_ns, f.error is not None)
            for f in walk(tmp_path)] == expected
