import os

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
