"""The bad-input corpus (tests/etl/corpus.py) ingested: every kind has its expected outcome."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from catalog import open_lake
from etl import ingest
from etl.errors import REASONS
from lakehouse import Lake
from tests.conftest import fast_config
from tests.etl import corpus


@pytest.fixture(scope="module", params=["header", "full"])
def corpus_lake(request, tmp_path_factory):
    """The corpus in a lake of each checksum mode: header-only reads must give every
    file the same outcome as whole-file reads."""
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    kinds = corpus.build(src)
    # identified: values checked as found
    lake = Lake.create(root / "lake", profile="identified", checksum=request.param)
    summary = ingest(lake, src, fast_config())
    return src, root / "lake", kinds, summary


def _plain(v):
    return v.isoformat() if isinstance(v, dt.date | dt.time) else v


def test_every_kind_has_its_expected_outcome(corpus_lake):
    src, lake, kinds, summary = corpus_lake
    assert len(kinds) >= 40
    with open_lake(lake, vault=True) as c:
        files = {os.path.relpath(p, src): (o, r) for p, o, r in c.con.execute(
            "SELECT path, outcome, reason FROM files").fetchall()}
        digests = {os.path.relpath(p, src): (sha, n) for p, sha, n in c.con.execute(
            "SELECT path, source_sha256, checksum_bytes FROM files").fetchall()}
    inst = Lake.open(lake).read("instances").to_pylist()
    by_sha = {}
    for row in inst:
        by_sha[row["file_sha256"]] = row

    def digest(rel: str) -> str:
        """The file's checksum as the lake's mode defines it, computed here from the file."""
        sha, n = digests[rel]
        data = (src / rel).read_bytes()
        assert n == len(data) or Lake.open(lake).config.checksum == "header"
        assert hashlib.sha256(data[:n]).hexdigest() == sha
        return sha
    got, mismatches = 0, []
    for k in kinds:
        if k.outcome == "none":  # a link loop adds no file of its own
            ok = not any(p.startswith(k.path + "/") for p in files)
        else:
            ok = files.get(k.path) == (k.outcome, k.reason)
            if ok and k.outcome == "ingested":
                row = by_sha[digest(k.path)]
                ok = row["invalid_attributes"] == k.invalid and all(
                    _plain(row[col]) == v for col, v in k.values.items())
        got += ok
        if not ok:
            detail = files.get(k.path)
            if detail == ("ingested", None):
                row = by_sha[digest(k.path)]
                detail = (row["invalid_attributes"], {c: row[c] for c in k.values})
            mismatches.append((k.name, k.outcome, k.reason, detail))
    print(f"\ncorpus: {got}/{len(kinds)} kinds handled as expected")
    for m in mismatches:
        print("MISMATCH", m)
    assert mismatches == []
    # every file seen has exactly one outcome, and nothing else entered the lake
    assert summary.files_seen == len(files) == sum(summary.outcomes.values())
    assert summary.outcomes["ingested"] == len(inst)
    assert set(summary.quarantine_reasons) <= set(REASONS)


def test_quarantine_rows_carry_the_reason_and_no_path(corpus_lake):
    _, lake, kinds, _ = corpus_lake
    expected: dict[str, int] = {}
    for k in kinds:
        if k.outcome == "quarantined":
            expected[k.reason] = expected.get(k.reason, 0) + 1
    with open_lake(lake) as c:
        got = dict(c.con.execute("SELECT reason, count(*) FROM quarantine GROUP BY 1").fetchall())
        assert "path" not in c.table("quarantine").columns
    assert got == expected
    assert {"missing_uid:SOPClassUID", "invalid_uid:StudyInstanceUID", "element_too_large",
            "too_deep", "unsupported_transfer_syntax", "io_error"} <= set(got)


def _ingest_user() -> str | None:
    """A user without rights on other users' files: 'lake-ingest-test', created if needed."""
    name = "lake-ingest-test"
    try:
        pwd.getpwnam(name)
        return name
    except KeyError:
        pass
    if shutil.which("useradd") is None:
        return None
    r = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        name], capture_output=True)
    return name if r.returncode == 0 else None


@pytest.fixture()
def outside_pytest_tmp():
    """A folder outside pytest's own temp root: a concurrent pytest session resets that
    root to 0700, which would lock the unprivileged user out half-way."""
    path = Path(tempfile.mkdtemp(prefix="lake-unprivileged-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_file_the_ingest_user_cannot_read_is_io_error(outside_pytest_tmp):
    """Run as an unprivileged user (root reads everything, so as root a user is created)."""
    tmp_path = outside_pytest_tmp
    src = tmp_path / "src"
    src.mkdir()
    ds = corpus.base(corpus._Uids())
    (src / "readable.dcm").write_bytes(corpus.part10(ds))
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1234.999"
    secret = src / "secret.dcm"
    secret.write_bytes(corpus.part10(ds))
    secret.chmod(0o000)
    lake_dir = tmp_path / "lake"
    Lake.create(lake_dir, profile="identified")  # the unprivileged user has no key
    cmd = [sys.executable, "-m", "lake_cli", "ingest", str(src), "--lake", str(lake_dir),
           "--scheduler", "synchronous", "--json"]
    if os.geteuid() == 0:
        user = _ingest_user()
        if user is None or shutil.which("setpriv") is None:
            pytest.skip("running as root and cannot create an unprivileged user (useradd) or "
                        "switch to it (setpriv): the unreadable-file case cannot be tested")
        pw = pwd.getpwnam(user)
        for p in [tmp_path, *tmp_path.parents]:
            if p != Path("/"):
                p.chmod(p.stat().st_mode | 0o011)  # let the user traverse to the lake
        subprocess.run(["chown", "-R", f"{pw.pw_uid}:{pw.pw_gid}", str(lake_dir)], check=True)
        src.chmod(0o755)
        (src / "readable.dcm").chmod(0o644)
        setpriv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
        probe = subprocess.run([*setpriv, sys.executable, "-c", "import lake_cli"],
                               capture_output=True, cwd=Path(__file__).parents[2], timeout=60)
        if probe.returncode != 0:  # e.g. the clone lives in a 0700 folder (mktemp -d)
            pytest.skip(f"user {user} cannot read the project's code (a parent folder of "
                        f"{Path(__file__).parents[2]} is closed to it): the unreadable-file "
                        "case cannot be run as that user here")
        cmd = [*setpriv, *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2],
                       env={**os.environ, "HOME": str(tmp_path)}, timeout=120)
    assert r.returncode == 0, r.stderr
    with open_lake(lake_dir, vault=True) as c:
        rows = sorted(c.con.execute("SELECT path, outcome, reason FROM files").fetchall())
    assert rows == [(str(src / "readable.dcm"), "ingested", None),
                    (str(src / "secret.dcm"), "quarantined", "io_error")], (r.stdout, r.stderr)
