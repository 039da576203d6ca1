"""The second process that stats the end of a walk (etl.statahead): the walk finds exactly
what a walk without it finds, whatever the child does, and the child never outlives the
walk."""

import os
import stat
import subprocess

import pytest

import etl.listings as listings_mod
from etl import statahead
from etl.discover import WalkStats, walk_columns
from etl.listings import Listings
from tests.etl.test_listings import make_tree, rows


@pytest.fixture
def eager(monkeypatch):
    """The child starts for any walk with listings; listings count as settled."""
    monkeypatch.setattr(listings_mod, "SETTLE_NS", 0)
    monkeypatch.setattr(statahead, "MIN_ENTRIES", 0)
    monkeypatch.setattr(statahead, "usable_cpus", lambda: 2)


@pytest.fixture
def forced(eager, monkeypatch):
    """:func:`eager`, and the child has finished before the walk starts (so the walk
    takes every folder it can from it)."""
    started = []
    start = statahead.StatAhead.start.__func__

    def start_and_wait(cls, entries, tree):
        ahead = start(cls, entries, tree)
        if ahead is not None:
            ahead._thread.join()
            started.append(ahead)
        return ahead

    monkeypatch.setattr(statahead.StatAhead, "start", classmethod(start_and_wait))
    return started


def tree_with_more(root):
    """:func:`make_tree`, plus a wide folder, an empty one, a file in a folder of folders,
    and an unreadable folder."""
    make_tree(root)
    wide = root / "p1" / "wide"
    wide.mkdir()
    for i in range(50):
        (wide / f"f{i:02d}.dcm").write_bytes(b"w" * i)
    (root / "empty").mkdir()
    (root / "p1" / "z.dcm").write_bytes(b"zz")
    if os.geteuid() != 0:  # root reads any folder
        (root / "locked").mkdir()
        (root / "locked" / "x.dcm").write_bytes(b"x")
        os.chmod(root / "locked", 0)


def source(tmp_path, make=tree_with_more):
    """(a source folder made by ``make``; where its listings are kept)."""
    src = tmp_path / "src"
    src.mkdir()
    make(src)
    return src, tmp_path / "walk.arrow"


def walk(source, cache):
    listings = Listings(cache)
    stats = WalkStats()
    return rows(walk_columns(source, stats, 7, listings)), stats, listings


def test_the_walk_is_the_same_with_the_child(tmp_path, forced):
    src, cache = source(tmp_path)
    first, first_stats, _ = walk(src, cache)  # no listings yet: no child
    assert forced == []
    second, second_stats, listings = walk(src, cache)
    (ahead,) = forced
    assert second == first and second_stats == first_stats
    # every folder reused, each one's entries stat-ed by the child (the root, p1, s1, s2,
    # wide, p2, s3, empty)
    assert listings.reused == 8 and ahead.taken == 8
    assert ahead._proc.poll() is not None  # ended with the walk

    # changed since: a file in place (its folder is not), a file added (its folder is
    # listed again, and stat-ed by the walk itself), a file turned into a folder
    (src / "p1" / "wide" / "f03.dcm").write_bytes(b"longer now")
    (src / "p1" / "s1" / "new.dcm").write_bytes(b"n")
    os.unlink(src / "top.dcm")
    (src / "top.dcm").mkdir()
    (src / "top.dcm" / "inner.dcm").write_bytes(b"i")
    forced.clear()
    third, third_stats, listings = walk(src, cache)
    plain_stats = WalkStats()
    plain = rows(walk_columns(src, plain_stats, 7))
    assert third == plain and third_stats == plain_stats
    (ahead,) = forced
    assert listings.listed == 3  # the root, s1 and the new top.dcm folder
    assert ahead.taken == listings.reused == 6
    by_path = {os.path.relpath(p, src): size for p, size, _, _ in third}
    assert by_path["p1/wide/f03.dcm"] == 10 and by_path["top.dcm/inner.dcm"] == 1


def test_entries_the_child_cannot_stat_are_stat_ed_by_the_walk(tmp_path, forced):
    """A broken link fails in the child too; the walk stats it again for its error."""
    src, cache = source(tmp_path, make_tree)
    first, _, _ = walk(src, cache)
    again, _, _ = walk(src, cache)
    assert again == first
    errors = [(os.path.relpath(p, src), err) for p, _, _, err in again if err]
    assert errors == [("broken", "No such file or directory")]


@pytest.mark.parametrize("child", [
    "import sys; sys.exit(3)",                        # ends at once
    "import sys; sys.stdin.buffer.read(); sys.stdout.buffer.write(b'\\x01' * 40)",  # garbage
    "import sys, time; sys.stdin.buffer.read(); time.sleep(60)",                # never answers
])
def test_a_child_that_fails_changes_nothing(tmp_path, monkeypatch, eager, child):
    script = tmp_path / "child.py"
    script.write_text(child)
    monkeypatch.setattr(statahead, "CHILD", script)
    src, cache = source(tmp_path)
    first, first_stats, _ = walk(src, cache)
    again, again_stats, listings = walk(src, cache)
    assert again == first and again_stats == first_stats
    assert listings.reused == 8


def test_an_abandoned_walk_ends_the_child(tmp_path, forced):
    src, cache = source(tmp_path)
    walk(src, cache)
    found = walk_columns(src, WalkStats(), 1, Listings(cache))
    next(found)
    (ahead,) = forced
    found.close()
    assert ahead._proc.poll() is not None
    assert not ahead._thread.is_alive()


def test_the_walk_says_when_the_child_has_the_second_core(tmp_path, eager):
    """``stat_ahead``'s first function is called as the child starts, its second when the
    walk ends or is abandoned, each once; a walk without a child calls neither."""
    src, cache = source(tmp_path)
    calls: list[str] = []
    hooks = (lambda: calls.append("start"), lambda: calls.append("end"))
    rows(walk_columns(src, WalkStats(), 7, None, stat_ahead=hooks))  # no listings
    assert calls == []
    walk(src, cache)  # listings kept: the next walk has a child
    found = walk_columns(src, WalkStats(), 7, Listings(cache), stat_ahead=hooks)
    assert calls == []  # nothing before the walk starts
    first = next(found)
    assert calls == ["start"] and len(first)
    rest = rows(found)
    assert calls == ["start", "end"] and rest
    found = walk_columns(src, WalkStats(), 1, Listings(cache), stat_ahead=hooks)
    next(found)
    found.close()  # abandoned
    assert calls == ["start", "end", "start", "end"]


def test_small_walks_and_one_cpu_start_no_child(tmp_path, monkeypatch):
    monkeypatch.setattr(listings_mod, "SETTLE_NS", 0)
    spawned = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        spawned.append(args)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(statahead.subprocess, "Popen", popen)
    src, cache = source(tmp_path, make_tree)
    walk(src, cache)
    walk(src, cache)  # 8 names: under MIN_ENTRIES
    monkeypatch.setattr(statahead, "MIN_ENTRIES", 0)
    monkeypatch.setattr(statahead, "usable_cpus", lambda: 1)
    walk(src, cache)
    assert spawned == []
    monkeypatch.setattr(statahead, "usable_cpus", lambda: 2)
    walk(src, cache)
    assert len(spawned) == 1


def test_the_child_reports_each_folder_in_the_reverse_of_the_walk(tmp_path):
    """The child's own output, read directly: folders from the walk's end (in the order
    given), each entry's stat in order, and which folders hold regular files only."""
    import numpy as np
    import pyarrow as pa

    root = tmp_path / "t"
    for rel in ("a/x.dcm", "a/y.dcm", "a.b/z.dcm", "b/c/w.dcm"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"1" * len(rel))
    tree = {str(root): ["a", "a.b", "b", "gone"], str(root / "a"): ["x.dcm", "y.dcm"],
            str(root / "a.b"): ["z.dcm"], str(root / "b"): ["c"],
            str(root / "b" / "c"): ["w.dcm"]}
    folders, names = statahead.from_the_end(
        pa.array(list(tree), pa.large_string()),
        pa.array(list(tree.values()), pa.large_list(pa.large_string())))
    given = folders.to_pylist()
    assert names.to_pylist() == [tree[f] for f in given]
    out = subprocess.run([os.sys.executable, "-I", "-S", str(statahead.CHILD)],
                         input=b"".join(bytes(p) for p in statahead._request(folders, names)),
                         capture_output=True, check=True).stdout
    seen, at = [], 0
    while at < len(out):
        n_folders, n_entries = np.frombuffer(out, np.int64, 2, at).tolist()
        at += 16
        done = np.frombuffer(out, np.int64, n_folders, at).tolist()
        plain = np.frombuffer(out, np.int64, n_folders, at + 8 * n_folders).tolist()
        at += 16 * n_folders
        rows = np.frombuffer(out, np.int64, 6 * n_entries, at).reshape(-1, 6)
        at += 48 * n_entries
        start = 0
        for i, flat in zip(done, plain, strict=True):
            folder = given[i]
            for k, name in enumerate(tree[folder]):
                mode, size, mtime, dev, ino, ctime = rows[start + k].tolist()
                if name == "gone":
                    assert mode == 0
                    continue
                st = os.stat(os.path.join(folder, name))
                assert (mode, size, mtime, dev, ino, ctime) == (
                    st.st_mode, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino,
                    st.st_ctime_ns)
            start += len(tree[folder])
            seen.append((os.path.relpath(folder, tmp_path), bool(flat)))
    # the walk's order is t, t/a, t/a.b, t/b, t/b/c ("a" before "a.b": names, not paths)
    assert seen == [("t/b/c", True), ("t/b", False), ("t/a.b", True), ("t/a", True),
                    ("t", False)]
    assert stat.S_ISDIR(os.stat(root).st_mode)
