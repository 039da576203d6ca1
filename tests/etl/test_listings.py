"""Folder listings kept from the last walk (etl.listings): a folder unchanged since is not
listed again, and the walk finds exactly what a walk without them finds."""

import logging
import os
import stat

import pyarrow as pa
import pytest

import etl.listings as listings_mod
from etl.discover import WalkStats, walk_columns
from etl.listings import Listings, listings_path


@pytest.fixture
def settled(monkeypatch):
    """Folders made by the test count as settled (by default a listing is reused only when
    taken 2 s after the folder's last change)."""
    monkeypatch.setattr(listings_mod, "SETTLE_NS", 0)


def make_tree(root):
    for rel in ("p1/s1/a.dcm", "p1/s1/b.dcm", "p1/s2/c.dcm", "p2/s3/d.dcm", "top.dcm"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * 10)
    os.symlink(root, root / "p2" / "loop")  # a link back to the root: skipped
    os.symlink(root / "nowhere", root / "broken")


def made_tree(tmp_path):
    """(the source folder, made by :func:`make_tree`; where its listings are kept)."""
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    return src, tmp_path / "walk.arrow"


def rows(found):
    return [(p, s, m, f.errors.get(i)) for f in found
            for i, (p, s, m) in enumerate(zip(f.paths, f.sizes, f.mtimes, strict=True))]


def walk_twice(source, cache, chunk=2):
    """A walk with the kept listings (then saved), and a plain walk at the same moment."""
    listings = Listings(cache)
    with_stats = WalkStats()
    got = rows(walk_columns(source, with_stats, chunk, listings))
    plain_stats = WalkStats()
    want = rows(walk_columns(source, plain_stats, chunk))
    assert got == want
    assert with_stats == plain_stats
    return listings, got


def test_an_unchanged_tree_is_not_listed_again(tmp_path, settled):
    src, cache = tmp_path / "src", tmp_path / "work" / "walk" / "x.arrow"
    src.mkdir()
    make_tree(src)
    first, found = walk_twice(src, cache)
    assert (first.listed, first.reused) == (6, 0)  # root, p1, s1, s2, p2, s3
    assert len(found) == 6  # 5 files and the broken link (with its error)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
    before = cache.stat().st_mtime_ns
    second, again = walk_twice(src, cache)
    assert (second.listed, second.reused) == (0, 6)
    assert again == found
    assert cache.stat().st_mtime_ns == before  # nothing listed anew: nothing written


def test_only_changed_folders_are_listed_again(tmp_path, settled):
    src, cache = made_tree(tmp_path)
    walk_twice(src, cache)
    (src / "p1" / "s1" / "new.dcm").write_bytes(b"y")     # added: s1 changes
    (src / "p2" / "s3" / "d.dcm").unlink()                  # removed: s3 changes
    (src / "p1" / "s2" / "c.dcm").write_bytes(b"longer")    # changed in place: s2 does not
    listings, found = walk_twice(src, cache)
    assert (listings.listed, listings.reused) == (2, 4)
    by_name = {os.path.relpath(p, src): (size, err) for p, size, _, err in found}
    assert by_name["p1/s1/new.dcm"] == (1, None)
    assert "p2/s3/d.dcm" not in by_name
    assert by_name["p1/s2/c.dcm"] == (6, None)  # the file's own stat, as always
    # the saved listings now hold the changed folders' new names: the next walk lists none
    third, _ = walk_twice(src, cache)
    assert (third.listed, third.reused) == (0, 6)


def test_a_folder_replaced_or_removed(tmp_path, settled):
    src, cache = made_tree(tmp_path)
    walk_twice(src, cache)
    # same path, same names, another folder (new inode and ctime): listed again
    os.rename(src / "p1" / "s2", tmp_path / "old-s2")
    (src / "p1" / "s2").mkdir()
    (src / "p1" / "s2" / "c.dcm").write_bytes(b"x" * 10)
    (src / "p2" / "s3" / "d.dcm").unlink()  # and a folder removed
    (src / "p2" / "s3").rmdir()
    listings, _ = walk_twice(src, cache)
    assert (listings.listed, listings.reused) == (3, 2)  # p1, its new s2, p2
    kept = pa.ipc.open_file(str(cache)).read_all()
    folders = sorted(os.path.relpath(f, src) for f in kept.column("folder").to_pylist())
    assert folders == [".", "p1", "p1/s1", "p1/s2", "p2"]  # s3 dropped


def test_a_listing_taken_soon_after_a_change_is_not_reused(tmp_path):
    """The default settle time: folders changed just now are listed again (a change in the
    same clock tick as the recorded one would not show in their times)."""
    src, cache = made_tree(tmp_path)
    walk_twice(src, cache)
    listings, _ = walk_twice(src, cache)
    assert (listings.listed, listings.reused) == (6, 0)


def test_an_abandoned_walk_keeps_nothing(tmp_path, settled):
    src, cache = made_tree(tmp_path)
    found = walk_columns(src, WalkStats(), 1, Listings(cache))
    next(found)
    found.close()
    assert not cache.exists()
    assert os.listdir(tmp_path) == ["src"]  # no temporary file left either
    # a walk killed while writing leaves its temporary file: the next one removes it
    (tmp_path / ".walk.arrow.99999.tmp").write_bytes(b"partial")
    walk_twice(src, cache)
    assert sorted(os.listdir(tmp_path)) == ["src", "walk.arrow"]


def test_names_arrow_cannot_hold_are_walked_and_not_kept(tmp_path, settled, caplog):
    src, cache = made_tree(tmp_path)
    odd = os.path.join(os.fsencode(src), b"p1", b"caf\xe9.dcm")  # Latin-1, not UTF-8
    with open(odd, "wb") as fh:
        fh.write(b"z")
    with caplog.at_level(logging.INFO, logger="etl.listings"):
        listings, found = walk_twice(src, cache)
    assert os.fsdecode(odd) in [p for p, *_ in found]
    assert not cache.exists() and os.listdir(tmp_path) == ["src"]
    assert "not kept" in caplog.text
    assert listings.listed == 6


def test_a_damaged_or_foreign_file_is_ignored_and_replaced(tmp_path, settled, caplog):
    src, cache = made_tree(tmp_path)
    cache.write_bytes(b"not an arrow file")
    with caplog.at_level(logging.WARNING, logger="etl.listings"):
        listings, _ = walk_twice(src, cache)
    assert listings.listed == 6 and "ignoring" in caplog.text
    again, _ = walk_twice(src, cache)
    assert again.reused == 6
    # damaged inside, its footer intact: ignored too
    data = bytearray(cache.read_bytes())
    middle = len(data) // 2  # the batches (the start repeats the footer's schema)
    data[middle - 100:middle + 100] = b"\xff" * 200
    cache.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="etl.listings"):
        damaged, _ = walk_twice(src, cache)
    assert damaged.listed == 6 and "ignoring" in caplog.text
    # a file of another format (an older version of the code) is ignored too
    table = pa.ipc.open_file(str(cache)).read_all()
    with pa.ipc.new_file(str(cache), table.schema.with_metadata({"format": "0"})) as w:
        w.write_table(table.replace_schema_metadata({"format": "0"}))
    st = os.stat(src)
    assert Listings(cache).get(str(src), st.st_dev, st.st_ino, st.st_mtime_ns,
                               st.st_ctime_ns) is None


def test_folders_without_times_are_always_listed(tmp_path, settled, monkeypatch):
    """A file system that reports no folder times (zero) never has its listings reused:
    its folders would look unchanged for ever."""
    src, cache = made_tree(tmp_path)
    real_stat = os.stat

    def timeless(path, *args, **kwargs):
        st = real_stat(path, *args, **kwargs)
        if not stat.S_ISDIR(st.st_mode):
            return st
        fields = list(st)
        fields[7:10] = [0, 0, 0]  # atime, mtime, ctime (seconds)
        return os.stat_result(fields, {"st_atime_ns": 0, "st_mtime_ns": 0, "st_ctime_ns": 0})

    monkeypatch.setattr(os, "stat", timeless)
    walk_twice(src, cache)
    again, _ = walk_twice(src, cache)
    assert (again.listed, again.reused) == (6, 0)


def test_listings_path_is_per_source(tmp_path):
    a = listings_path(tmp_path, "/archive/a")
    assert a == listings_path(tmp_path, "/archive/a")
    assert a != listings_path(tmp_path, "/archive/b")
    assert a.parent == tmp_path / "walk"


def test_ingest_keeps_the_listings_in_the_lake_and_reads_only_what_changed(
        tmp_path, settled, caplog):
    import shutil

    from pydicom.data import get_testdata_file

    from etl import ingest
    from lakehouse import Lake
    from tests.conftest import fast_config

    src = tmp_path / "src"
    for i, name in enumerate(("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm")):
        (src / f"p{i}").mkdir(parents=True)
        shutil.copy(get_testdata_file(name), src / f"p{i}" / "a.dcm")
    lake = Lake.create(tmp_path / "lk")
    first = ingest(lake, src, fast_config())
    assert first.outcomes["ingested"] == 3
    (kept,) = (tmp_path / "lk" / "vault" / "walk").iterdir()
    assert kept == listings_path(lake.work_dir(), str(src.absolute()))
    with caplog.at_level(logging.INFO, logger="etl.jobs"):
        again = ingest(lake, src, fast_config())
    assert (again.files_seen, again.files_unchanged) == (3, 3)
    assert "0 folders listed, 4 unchanged since the last run" in caplog.text
    shutil.copy(get_testdata_file("rtplan.dcm"), src / "p1" / "b.dcm")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="etl.jobs"):
        third = ingest(lake, src, fast_config())
    assert (third.files_seen, third.outcomes["ingested"]) == (4, 1)
    assert "1 folders listed, 3 unchanged since the last run" in caplog.text

    # not reused: every folder listed again (and kept for the next run)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="etl.jobs"):
        ingest(lake, src, fast_config(reuse_listings=False))
    assert "4 folders listed, 0 unchanged since the last run" in caplog.text
