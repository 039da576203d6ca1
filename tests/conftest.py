"""Session fixtures: one generated archive and one lake built from it, reused by all tests.

Tests that change a lake copy it first (``lake_copy``) so the shared one stays
as built.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from catalog import open_lake
from etl import IngestConfig, ingest
from lakehouse import Lake
from synth import generate_archive


@pytest.fixture(scope="session", autouse=True)
def _keys_in_a_temporary_config_home(tmp_path_factory):
    """Research lakes created without --key-file put their key under XDG_CONFIG_HOME:
    never the real home folder in tests."""
    old = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("config-home"))
    yield
    if old is None:
        os.environ.pop("XDG_CONFIG_HOME", None)
    else:
        os.environ["XDG_CONFIG_HOME"] = old


@pytest.fixture(scope="session")
def archive(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("archive") / "pacs"
    truth = generate_archive(root, seed=0, preset="test")
    return root, truth


#: the nightly folders of :func:`nightly`
NIGHTS = 4


@pytest.fixture(scope="session")
def nightly(archive, tmp_path_factory) -> list[Path]:
    """The sample archive as NIGHTS nightly folders (every NIGHTS-th file each)."""
    root = tmp_path_factory.mktemp("nightly")
    files = sorted(p for p in archive[0].rglob("*") if p.is_file() and not p.is_symlink())
    parts = []
    for i in range(NIGHTS):
        part = root / f"night{i}"
        for f in files[i::NIGHTS]:
            dest = part / f.relative_to(archive[0])
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
        parts.append(part)
    return parts


@pytest.fixture(scope="session")
def truth(archive):
    return archive[1]


@pytest.fixture(scope="session")
def built_lake(archive, tmp_path_factory):
    """(lake path, run summary) of the sample archive ingested with Dask processes into an
    identified lake (names and identifiers kept, so tests can check them against the
    ground truth; tests/privacy covers research lakes)."""
    path = tmp_path_factory.mktemp("lakes") / "lake"
    lake = Lake.create(path, profile="identified")
    summary = ingest(lake, archive[0], IngestConfig(scheduler="processes", workers=2,
                                                    batch_files=64))
    return path, summary


@pytest.fixture()
def lake_copy(built_lake, tmp_path) -> Path:
    dest = tmp_path / "lake"
    shutil.copytree(built_lake[0], dest, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def cat(built_lake):
    with open_lake(built_lake[0]) as c:
        yield c


def fast_config(**kw) -> IngestConfig:
    """In-process Dask scheduler for tests that run many small ingests."""
    kw.setdefault("scheduler", "synchronous")
    return IngestConfig(**kw)


def unnamed_threads(pid: int) -> int | None:
    """The threads of process ``pid`` named as its main thread: a library's threads that
    do not name themselves, as OpenBLAS's (Arrow's jemalloc names its own). None without
    /proc. Imports nothing but ``os`` (its source runs in fresh interpreters too)."""
    tasks = f"/proc/{pid}/task"
    if not os.path.isdir(tasks):
        return None
    names = []
    for t in os.listdir(tasks):
        try:
            with open(f"{tasks}/{t}/comm", encoding="utf-8") as fh:
                names.append((int(t) == pid, fh.read().strip()))
        except OSError:  # the thread ended meanwhile
            pass
    main = next(name for is_main, name in names if is_main)
    return sum(name == main for _, name in names)


def fixed_key_file(path: Path) -> Path:
    """A key file at ``path`` (owner-only) holding the same key in every session, for a
    research lake whose outputs are scanned for planted identifiers: dates move by a
    number of weeks drawn from the key, and with a random key one patient's shifted
    StudyDate sometimes equalled another patient's original birth date, which the scans
    then reported (seen twice: a 67-year-old's study on a child's birth date, and
    ``20140929``). ``lake init`` and ``Lake.create`` keep a key file that exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(bytes(range(7, 39)).hex() + "\n")
    return path
