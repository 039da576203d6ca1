"""Permission denied, for real: the `lake` command run as the unprivileged user nobody
(65534) over files and folders it may not read or write.

The tests run as root (CI does), so they create what they need as root and drop
privileges in the child process: with ``setpriv`` (util-linux) when it is there, which
resolves the command's path before it drops, so an interpreter under a folder only root
may enter (pyenv in /root) still starts; else ``subprocess.run(user=, group=)``. Either way
the command runs as uid/gid 65534 with no capabilities (checked below). Ingests use the
synchronous scheduler: Dask's process workers would have to start that interpreter again
as nobody.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from catalog import cohorts, open_lake
from lakehouse import Lake, audit

NOBODY = 65534

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="these tests drop privileges to nobody (65534) to hit permission-denied paths, "
           "which only root can do; CI runs them as root")

LAKE = str(Path(sys.executable).with_name("lake"))


@pytest.fixture(scope="module", autouse=True)
def _reachable_by_nobody():
    """The repository and its virtual environment may sit under a folder only root may
    enter (a clone in a ``mktemp -d`` folder, 0700): nobody could not even start ``lake``.
    For these tests, such folders above them get the search bit for others (enter, not
    list), and get their mode back afterwards."""
    import stat

    folders = {a for start in (Path(LAKE).parent, Path(__file__).resolve().parents[2])
               for a in [start, *start.parents]}
    changed = []
    try:
        for folder in sorted(folders):
            mode = folder.stat().st_mode
            if not mode & stat.S_IXOTH:
                os.chmod(folder, stat.S_IMODE(mode) | stat.S_IXOTH)
                changed.append((folder, stat.S_IMODE(mode)))
        yield
    finally:
        for folder, mode in changed:
            os.chmod(folder, mode)


@pytest.fixture()
def area():
    """A folder under /tmp that nobody can reach (pytest's tmp_path is root-only), with a
    home folder of nobody's."""
    root = Path(tempfile.mkdtemp(prefix="lake-permissions-", dir="/tmp"))
    os.chmod(root, 0o755)
    home = root / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    yield root
    shutil.rmtree(root)


def as_nobody(area: Path, *argv: str, command: tuple[str, ...] = (LAKE,)
              ) -> subprocess.CompletedProcess:
    """``lake ARGV...`` (or ``command ARGV...``) as nobody, in nobody's home folder."""
    home = area / "home"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "LANG": "C.UTF-8", "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_STATE_HOME": str(home / ".state"), "XDG_CACHE_HOME": str(home / ".cache")}
    setpriv = shutil.which("setpriv")
    if setpriv:
        return subprocess.run([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}",
                               "--clear-groups", *command, *argv], env=env, cwd=home,
                              capture_output=True, text=True, timeout=300)
    return subprocess.run([*command, *argv], user=NOBODY, group=NOBODY, extra_groups=[],
                          env=env, cwd=home, capture_output=True, text=True, timeout=300)


def test_the_command_really_runs_as_nobody(area):
    secret = area / "secret"
    secret.write_text("root only")
    os.chmod(secret, 0o600)
    probe = as_nobody(
        area, "-c", "import os; print(os.getuid(), os.getgid(), os.getgroups(), "
        "[l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')]); "
        f"open({str(secret)!r})", command=(sys.executable,))
    assert probe.stdout.strip() == "65534 65534 [] ['0000000000000000']", probe.stdout
    assert "PermissionError: [Errno 13] Permission denied" in probe.stderr, probe.stderr


def chown_tree(path: Path, uid: int = NOBODY) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, uid, uid, follow_symlinks=False)


def one_line_error(r: subprocess.CompletedProcess, command: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"lake {command}: error: "), lines[0]
    return lines[0]


def _identified_lake(path: Path) -> Lake:
    lake = Lake.create(path, profile="identified")
    chown_tree(path)
    return lake


def test_ingest_quarantines_an_unreadable_file_and_folder_and_reads_them_later(area):
    src = area / "archive"
    (src / "locked").mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "ct.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), src / "mr.dcm")
    shutil.copy(get_testdata_file("rtplan.dcm"), src / "secret.dcm")
    shutil.copy(get_testdata_file("rtdose.dcm"), src / "locked" / "dose.dcm")
    shutil.copy(get_testdata_file("rtstruct.dcm"), src / "locked" / "struct.dcm")
    os.chmod(src, 0o755)
    for p in (src / "ct.dcm", src / "mr.dcm"):
        os.chmod(p, 0o644)
    os.chmod(src / "secret.dcm", 0o600)  # root's: nobody cannot open it
    os.chmod(src / "locked", 0o700)  # root's: nobody cannot list it
    lake = _identified_lake(area / "lake")

    r = as_nobody(area, "ingest", str(src), "--lake", str(lake.root), "--no-progress",
                  "--scheduler", "synchronous")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    with open_lake(lake.root, vault=True) as cat:
        files = cat.arrow("SELECT path, outcome, reason FROM files ORDER BY path").to_pylist()
        quarantine = cat.arrow("SELECT reason, message FROM quarantine ORDER BY message"
                               ).to_pylist()
        run = cat.arrow("SELECT * FROM ingest_runs").to_pylist()[0]
    assert [(Path(f["path"]).relative_to(src).as_posix(), f["outcome"], f["reason"])
            for f in files] == [
        ("ct.dcm", "ingested", None),
        ("locked", "quarantined", "io_error"),
        ("mr.dcm", "ingested", None),
        ("secret.dcm", "quarantined", "io_error")]
    assert [q["reason"] for q in quarantine] == ["io_error", "io_error"]
    assert all("Permission denied" in q["message"] for q in quarantine), quarantine
    assert (run["files_seen"], run["files_ingested"], run["files_quarantined"]) == (4, 2, 2)

    # nothing lost: once readable, the next run reads the file and the folder's files
    os.chmod(src / "secret.dcm", 0o644)
    os.chmod(src / "locked", 0o755)
    for p in (src / "locked").iterdir():
        os.chmod(p, 0o644)
    r = as_nobody(area, "ingest", str(src), "--lake", str(lake.root), "--no-progress",
                  "--scheduler", "synchronous")
    assert r.returncode == 0, r.stderr
    with open_lake(lake.root, vault=True) as cat:
        ingested = cat.con.execute(
            "SELECT path FROM files WHERE outcome = 'ingested' ORDER BY path").fetchall()
        second = cat.arrow("SELECT * FROM ingest_runs ORDER BY started_at").to_pylist()[-1]
        assert cat.con.execute("SELECT count(*) FROM quarantine WHERE ingest_run_id = ?",
                               [second["ingest_run_id"]]).fetchone() == (0,)
    # the unreadable file and the folder's two files are read; ct and mr are unchanged
    assert (second["files_ingested"], second["files_quarantined"]) == (3, 0)
    assert [Path(p).relative_to(src).as_posix() for (p,) in ingested] == [
        "ct.dcm", "locked/dose.dcm", "locked/struct.dcm", "mr.dcm", "secret.dcm"]


def test_cohort_export_to_a_folder_it_cannot_write_is_one_line(area):
    lake = Lake.create(area / "lake", profile="identified")
    src = area / "archive"
    src.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "ct.dcm")
    from etl import ingest
    from tests.conftest import fast_config

    ingest(lake, src, fast_config())
    cohorts.save(lake, "all", sql="SELECT SeriesInstanceUID FROM series")
    chown_tree(lake.root)
    chown_tree(src)
    closed = area / "closed"  # root's, 0755: nobody may not create anything in it
    closed.mkdir()
    for to in (closed / "out", closed):
        for as_ in ("manifest", "nifti"):
            r = as_nobody(area, "cohort", "export", "all", "--to", str(to), "--as", as_,
                          "--lake", str(lake.root))
            line = one_line_error(r, "cohort")
            assert line == (f"lake cohort: error: export: cannot write into {to}: Permission "
                            "denied; choose a folder you can write, or ask its owner for "
                            "write access"), line
    assert list(closed.iterdir()) == []
    # nothing was exported, so no export is in the audit log
    assert [a for a in audit.read(lake.root) if a["action"] == "export"] == []
    # and where it can write, the same command works
    r = as_nobody(area, "cohort", "export", "all", "--to", str(area / "home" / "out"),
                  "--as", "nifti", "--lake", str(lake.root))
    assert r.returncode == 0, r.stderr
    assert (area / "home" / "out" / "SHA256SUMS").is_file()


def test_init_where_it_cannot_write_is_one_line(area):
    closed = area / "closed"
    closed.mkdir()
    line = one_line_error(as_nobody(area, "init", str(closed / "lake"), "--profile",
                                    "identified"), "init")
    assert "Permission denied" in line and str(closed) in line, line
    assert list(closed.iterdir()) == []


def test_a_lake_it_cannot_read_is_one_line(area):
    lake = Lake.create(area / "lake", profile="identified")
    os.chmod(lake.root, 0o700)  # root's
    for argv in (("status",), ("sql", "SELECT count(*) FROM instances"),
                 ("ingest", str(area / "home"), "--scheduler", "synchronous"),
                 ("cohort", "list")):
        line = one_line_error(as_nobody(area, *argv, "--lake", str(lake.root)), argv[0])
        assert line.startswith(f"lake {argv[0]}: error: cannot read the lake at {lake.root}: "
                               "Permission denied; this needs read access to the lake "
                               "folder"), line


def test_a_lake_it_may_read_but_not_write(area):
    """A researcher with read access to the tables: every query is audited, so without
    write access to the audit log a query is refused in one line saying so; with it
    (the vault itself still closed) queries work, and writing is refused in one line."""
    lake = Lake.create(area / "lake", profile="identified")
    src = area / "archive"
    src.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "ct.dcm")
    from etl import ingest
    from tests.conftest import fast_config

    ingest(lake, src, fast_config())
    for p in [lake.root, *lake.root.rglob("*")]:  # readable by all but the vault
        if "vault" not in p.relative_to(lake.root).parts:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    query = ("sql", "SELECT Modality, count(*) AS n FROM instances GROUP BY 1",
             "--lake", str(lake.root), "--format", "csv")
    line = one_line_error(as_nobody(area, *query), "sql")
    assert "cannot write the audit log" in line and "Permission denied" in line, line

    audit_log = lake.root / "vault" / "audit.jsonl"
    os.chmod(lake.root / "vault", 0o711)  # may reach the audit log, may not list the vault
    audit_log.touch()
    os.chmod(audit_log, 0o622)  # may append, may not read
    before = audit_log.read_text().count("\n")
    r = as_nobody(area, *query)
    assert (r.returncode, r.stdout, r.stderr) == (
        0, "Modality,n\nCT,1\n", "# identified lake: this result may contain patient identifiers\n")
    assert audit_log.read_text().count("\n") == before + 1
    r = as_nobody(area, "status", "--lake", str(lake.root))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr

    shutil.copy(get_testdata_file("MR_small.dcm"), src / "mr.dcm")
    chown_tree(src)
    line = one_line_error(as_nobody(area, "ingest", str(src), "--lake", str(lake.root),
                                    "--no-progress", "--scheduler", "synchronous"),
                          "ingest")
    assert line == (f"lake ingest: error: cannot write the lake at {lake.root}: the write lock "
                    "write.lock cannot be opened: Permission denied; this needs write access "
                    "to the lake folder (ingest, cohorts, vacuum write to it): ask the lake's "
                    "owner, or use another lake"), line
    line = one_line_error(as_nobody(area, "cohort", "save", "c", "--sql",
                                    "SELECT SeriesInstanceUID FROM series",
                                    "--lake", str(lake.root)), "cohort")
    assert "Permission denied" in line, line
