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
