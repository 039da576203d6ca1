"""A research lake of an archive full of planted PHI holds none of it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from catalog import open_lake
from etl import IngestConfig, ingest
from lake_cli import main
from lakehouse import Lake
from lakehouse.privacy import KeyError_, Pseudonymizer, read_key_file
from synth import generate_archive
from synth.phi import MARKER_PREFIX, plant_phi
from tests.conftest import fixed_key_file


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi")
    truth = generate_archive(root / "archive", seed=7, preset="test")
    phi = plant_phi(root / "archive", truth)
    return root, truth, phi


@pytest.fixture(scope="module")
def research(planted, tmp_path_factory):
    """The planted archive ingested through the CLI into a research lake, output captured.
    The lake's key is fixed (:func:`tests.conftest.fixed_key_file`): the string scans
    below look for planted birth dates."""
    root, _truth, _phi = planted
    lake = tmp_path_factory.mktemp("rl") / "lake"
    key = fixed_key_file(lake.parent / "lake.key")
    logger = logging.getLogger()
    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Grab(level=logging.DEBUG)
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert main(["init", str(lake), "--key-file", str(key)]) == 0
            assert main(["ingest", str(root / "archive"), "--lake", str(lake), "--key-file",
                         str(key), "--scheduler", "threads", "--workers", "2"]) == 0
            assert main(["sql", "SELECT * FROM instances", "--lake", str(lake),
                         "--format", "json"]) == 0
            assert main(["status", "--lake", str(lake)]) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return lake, key, out.getvalue() + err.getvalue() + "\n".join(records)


def _leaks(text: str, phi) -> list[str]:
    found = [m for m in phi.markers if m in text]
    if MARKER_PREFIX in text:
        found.append(MARKER_PREFIX)
    found += [i for i in phi.identifiers if len(i) >= 4 and i in text]
    found += [n for n in phi.name_parts if re.search(rf"(?<!\w){re.escape(n)}(?!\w)", text)]
    return found


def _research_texts(lake: Path):
    for path in sorted((lake / "research").rglob("*")):
        rel = str(path.relative_to(lake))
        yield f"name:{rel}", rel
        if path.is_file():
            if path.suffix == ".parquet":
                table = pq.read_table(path)
                yield f"values:{rel}", json.dumps(table.to_pylist(), default=str,
                                                  ensure_ascii=False)
                meta = pq.read_metadata(path).metadata or {}
                yield f"meta:{rel}", repr(meta)
            else:
                yield f"bytes:{rel}", path.read_bytes().decode("utf-8", "replace")


def test_no_planted_phi_anywhere_under_research(planted, research):
    _, truth, phi = planted
    lake, _, _ = research
    assert len(phi.markers) > 100 and len(phi.name_parts) > 10
    leaks = {where: found for where, text in _research_texts(lake)
             if (found := _leaks(text, phi))}
    assert leaks == {}
    # the non-ASCII names of the ground truth, and the original PatientIDs
    blob = "\n".join(t for _, t in _research_texts(lake))
    assert [n for n in truth.names.values() if n in blob] == []
    assert [p for p in truth.names if p in blob] == []


def test_no_phi_in_cli_output_or_logs(planted, research):
    _, _, phi = planted
    _, _, output = research
    assert "ingested" in output  # the run did report
    assert _leaks(output, phi) == []


def test_research_and_identified_lakes_agree_on_counts(planted, research, tmp_path):
    root, truth, _ = planted
    lake, _, _ = research
    ident = Lake.create(tmp_path / "ident", profile="identified")
    ingest(ident, root / "archive", IngestConfig(scheduler="threads", workers=2))
    q = ("SELECT (SELECT count(*) FROM patients), (SELECT count(*) FROM studies), "
         "(SELECT count(*) FROM series), (SELECT count(*) FROM instances), "
         "(SELECT count(*) FROM quarantine), (SELECT count(*) FROM conflicts)")
    with open_lake(lake) as r, open_lake(tmp_path / "ident") as i:
        assert r.con.execute(q).fetchall() == i.con.execute(q).fetchall()
        # per-modality study counts and instance counts per series (by position) agree
        m = "SELECT Modality, count(*) FROM studies GROUP BY 1 ORDER BY 1"
        assert r.con.execute(m).fetchall() == i.con.execute(m).fetchall()
    counts = (truth.tables["patients"], truth.tables["studies"], truth.tables["series"],
              truth.tables["instances"], truth.tables["quarantine"], truth.tables["conflicts"])
    with open_lake(lake) as r:
        assert r.con.execute(q).fetchall() == [counts]


def test_pseudonyms_are_keyed_and_deterministic(planted, research):
    _root, truth, _ = planted
    lake, key_path, _ = research
    key = read_key_file(key_path)
    p = Pseudonymizer(key)
    with open_lake(lake, vault=True) as c:
        pairs = c.con.execute("SELECT kind, original, pseudonym FROM identifiers "
                              "WHERE kind = 'PatientID'").fetchall()
        in_research = {r[0] for r in c.con.execute("SELECT PatientID FROM patients").fetchall()}
    assert len(pairs) == truth.tables["patients"]
    assert {ps for _, _, ps in pairs} == in_research
    for _, original, pseudo in pairs:
        assert p.patient_id(original) == pseudo  # deterministic with the key
        assert Pseudonymizer(b"\x00" * 32).patient_id(original) != pseudo  # another key
        for plain in (hashlib.sha256(original.encode()).hexdigest(),
                      hashlib.md5(original.encode()).hexdigest()):
            assert plain[:16].upper() != pseudo and plain.upper()[:16] != pseudo


def test_uid_references_still_resolve(research):
    lake, _, _ = research
    with open_lake(lake) as c:
        orphans = c.con.execute("""
            SELECT count(*) FROM instances i
            LEFT JOIN series s USING (SeriesInstanceUID)
            LEFT JOIN studies st ON st.StudyInstanceUID = i.StudyInstanceUID
            WHERE s.SeriesInstanceUID IS NULL OR st.StudyInstanceUID IS NULL
        """).fetchall()[0][0]
        uids = c.con.execute("SELECT StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID "
                             "FROM instances").fetchall()
        in_json = c.con.execute("SELECT count(*) FROM instances WHERE "
                                "json_extract_string(dicom_json, '$.00080018.Value[0]') "
                                "<> SOPInstanceUID").fetchall()[0][0]
    assert orphans == 0 and in_json == 0
    assert all(u.startswith("2.25.") and len(u) <= 64 for row in uids for u in row)


def test_dates_shift_per_patient_and_keep_intervals(planted, research, tmp_path):
    root, _truth, _ = planted
    lake, _, _ = research
    ident = Lake.create(tmp_path / "ident", profile="identified")
    ingest(ident, root / "archive", IngestConfig(scheduler="threads", workers=2))
    q = ("SELECT PatientID, list(StudyDate ORDER BY StudyDate, StudyTime, StudyInstanceUID) "
         "FROM studies GROUP BY 1")
    with open_lake(lake, vault=True) as r, open_lake(tmp_path / "ident") as i:
        back = dict(r.con.execute("SELECT pseudonym, original FROM identifiers "
                                  "WHERE kind = 'PatientID'").fetchall())
        shifted = {back[p]: d for p, d in r.con.execute(q).fetchall()}
        original = dict(i.con.execute(q).fetchall())
        repeats = r.con.execute("SELECT count(*) FROM studies").fetchall()
    assert set(shifted) == set(original) and repeats
    offsets = {}
    for pid, dates in original.items():
        deltas = {(s - o).days for s, o in zip(shifted[pid], dates, strict=True)}
        assert len(deltas) == 1, pid  # one offset per patient: intervals exact
        (offsets[pid],) = deltas
        assert offsets[pid] < 0 and offsets[pid] % 7 == 0  # whole weeks back: weekdays kept
    assert len(set(offsets.values())) > len(offsets) // 2  # patients differ


def test_ages_over_89_become_90(planted, research):
    _, truth, _ = planted
    lake, _, _ = research
    assert truth.patients_over_89
    with open_lake(lake) as c:
        ages = c.con.execute("SELECT max(patient_age_years), "
                             "count(*) FILTER (WHERE PatientAge > '089Y') FROM instances "
                             "WHERE PatientAge LIKE '%Y'").fetchall()[0]
        assert ages[0] == 90.0
        assert c.con.execute("SELECT DISTINCT PatientAge FROM instances WHERE "
                             "patient_age_years = 90").fetchall() == [("090Y",)]


def test_descriptions_keep_their_words_but_not_identifiers(research):
    lake, _, _ = research
    with open_lake(lake) as c:
        descs = [r[0] for r in c.con.execute(
            "SELECT DISTINCT StudyDescription FROM studies WHERE Modality = 'CT'").fetchall()]
    assert descs and all(d.startswith("CT ") for d in descs)


def test_a_wrong_key_is_refused(research, tmp_path):
    lake, _, _ = research
    other = tmp_path / "other.key"
    Lake.create(tmp_path / "x", key_file=other)  # creates a different key
    with pytest.raises(KeyError_, match="not the key of the lake"):
        Lake.open(lake).policy(other)
    with pytest.raises(KeyError_, match="not found"):
        Lake.open(lake).policy(tmp_path / "missing.key")


def test_key_file_is_owner_only_and_outside_the_lake(research):
    lake, key, _ = research
    assert key.stat().st_mode & 0o777 == 0o600
    assert not key.resolve().is_relative_to(lake.resolve())
    manifest = json.loads((lake / "_lake" / "lake.json").read_text())
    assert key.read_text().strip() not in json.dumps(manifest)
    assert (lake / "vault").stat().st_mode & 0o777 == 0o700


def test_unprivileged_user_cannot_read_vault_or_key(research):
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    lake, key, _ = research
    setpriv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    files = [p for p in (lake / "vault").rglob("*.parquet")][:1]
    for target in (key, lake / "vault" / "audit.jsonl", *files):
        r = subprocess.run([*setpriv, "cat", str(target)], capture_output=True)
        assert r.returncode != 0 and b"Permission denied" in r.stderr, target
    r = subprocess.run([*setpriv, "ls", str(lake / "vault")], capture_output=True)
    assert r.returncode != 0


def test_every_query_is_audited(research, capsys):
    lake, _, _ = research
    from lakehouse import audit

    before = len(audit.read(lake))
    assert main(["sql", "SELECT count(*) FROM studies", "--lake", str(lake)]) == 0
    entries = audit.read(lake)
    assert len(entries) == before + 1
    last = entries[-1]
    assert last["action"] == "sql" and last["rows"] == 1
    assert last["text_sha256"] == hashlib.sha256(b"SELECT count(*) FROM studies").hexdigest()


def test_reidentify_maps_back_and_is_logged(planted, research, capsys):
    lake, _, _ = research
    from lakehouse import audit

    with open_lake(lake) as c:
        pseudo = c.con.execute("SELECT PatientID FROM patients ORDER BY 1 LIMIT 1"
                               ).fetchall()[0][0]
    capsys.readouterr()
    assert main(["reidentify", pseudo, "--lake", str(lake), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["kind"] == "PatientID" and rows[0]["pseudonym"] == pseudo
    assert rows[0]["original"] in planted[2].identifiers
    assert audit.read(lake)[-1]["action"] == "reidentify"


def test_a_failed_run_keeps_its_message_out_of_research_tables(tmp_path, capsys):
    """A run that fails is recorded in ``ingest_runs``. Its error's text can quote the
    source path (here a folder named after a patient), which research tables never
    hold: a research lake records the kind of error only; the command's output has the
    whole message, and an identified lake keeps it."""
    source = tmp_path / "DOE^JOHN 1234567" / "CT"
    messages = {}
    for profile in ("research", "identified"):
        lake = tmp_path / profile
        key = ["--key-file", str(tmp_path / "lake.key")] if profile == "research" else []
        assert main(["init", str(lake), "--profile", profile, *key]) == 0
        capsys.readouterr()
        assert main(["ingest", str(source), "--lake", str(lake), *key]) == 1
        err = capsys.readouterr().err
        assert err == f"lake ingest: error: cannot read source {source}: No such file or " \
                      "directory\n"
        runs = Lake.open(lake).read("ingest_runs", columns=["status", "message"]).to_pylist()
        assert [r["status"] for r in runs] == ["failed"]
        messages[profile] = runs[0]["message"]
        assert main(["status", "--lake", str(lake)]) == 0  # it says why the run failed
        assert f"\n    {messages[profile]}\n" in capsys.readouterr().out
    assert messages == {
        "research": "SourceError (its message may quote source paths or identifiers: it is "
                    "in the run's output and log, not in the research tables)",
        "identified": f"SourceError: cannot read source {source}: No such file or directory"}
    texts = "\n".join(text for _, text in _research_texts(tmp_path / "research"))
    assert "ingest_runs" in texts and "DOE" not in texts and "1234567" not in texts
