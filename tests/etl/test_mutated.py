"""Files damaged at random: every one gets exactly one result, the same on both read paths.

The bad-input corpus (:mod:`tests.etl.corpus`) holds one crafted file per failure the
reader knows. This module damages real files instead, where nobody chose the place:
the session's sample archive and pydicom's bundled files, each mutated by a seeded
generator (truncated, bytes overwritten, a value length or a VR rewritten, bytes
inserted or repeated, a run of zeros) inside the first 4 KB, where the header is. For
every damaged file:

- the batch path (:mod:`etl.batchread`) gives the very row the per-file path (pydicom,
  the reference) gives: the same status, reason, message, values and DICOM JSON;
- it is exactly one row, ``ok``, ``skipped`` or ``quarantined`` with a known reason
  code and a message; nothing is raised out of a batch;
- a whole ingest accounts for every file (files seen = the sum of the outcomes, one
  vault ``files`` row each, one ``quarantine`` row per quarantined file) and leaves a
  lake that verifies.

What a run prints says what happened and nothing of the files' contents: pydicom warns
with the raw value of an invalid UID, which in a damaged file meta runs on through the
header (names, identifiers); the reader's checks keep those warnings to themselves.

Exact expectations: a file whose 128-byte preamble is overwritten (DICOM readers
ignore it) gives the row of the original file, value for value; and what this module
found read wrongly are now regression tests (a binary value of the wrong length, an
element of unknown VR, and in research lakes a value that ran on over the elements
after it, names and identifiers included).
"""

from __future__ import annotations

import gc
import random
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest

from catalog import open_lake
from etl import IngestConfig, ingest
from etl.errors import REASONS, SKIP_REASONS
from lakehouse import Lake
from lakehouse.verify import verify
from tests.etl.corpus import PIXEL_TAG, _Uids, base, part10
from tests.etl.test_batchread import assert_same_rows, found, make_policy, run

#: damaged files made from the seed files (the default suite's share; the slow test
#: makes more from other seeds of the generator)
FILES = 600
#: the header: mutations land in the first HEAD bytes of a file
HEAD = 4096
#: the generator's mutations, chosen in turn at random
KINDS = ("truncate", "overwrite", "length", "vr", "insert", "repeat", "zeros")
#: value representations a rewritten VR becomes (XX: none)
VRS = (b"SQ", b"UN", b"OB", b"UT", b"DS", b"IS", b"DA", b"PN", b"UI", b"US", b"FD", b"AT",
       b"XX")


def mutate(data: bytes, rng: random.Random, head: int = HEAD) -> tuple[bytes, str]:
    """``data`` damaged once inside its first ``head`` bytes (after the preamble and
    ``DICM`` when it has them), and the kind of damage."""
    buf = bytearray(data)
    kind = rng.choice(KINDS)
    head = min(len(buf), head)
    lo = 132 if len(buf) > 132 and buf[128:132] == b"DICM" else 0
    at = rng.randrange(lo, head - 4)
    if kind == "truncate":
        return bytes(buf[:at]), kind
    if kind == "overwrite":
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(lo, head)] = rng.randrange(256)
    elif kind == "length":  # a 32-bit length: undefined, huge, random or small
        value = rng.choice([0xFFFFFFFF, 0x7FFFFFFF, rng.randrange(1 << 32), rng.randrange(64)])
        buf[at:at + 4] = value.to_bytes(4, "little")
    elif kind == "vr":
        buf[at:at + 2] = rng.choice(VRS)
    elif kind == "insert":
        buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == "repeat":
        end = min(head, at + rng.randint(4, 200))
        buf[end:end] = buf[at:end]
    else:
        n = rng.randint(1, 64)
        buf[at:at + n] = bytes(n)
    return bytes(buf), kind


def seed_files(archive_root: Path) -> list[Path]:
    """The files damaged: the sample archive's and pydicom's bundled ones (headers of
    every transfer syntax it ships), each larger than a header's first bytes."""
    import pydicom.data

    bundled = Path(pydicom.data.__file__).parent / "test_files"
    paths = sorted(p for p in archive_root.rglob("*") if p.is_file() and not p.is_symlink())
    paths += sorted(p for p in bundled.rglob("*.dcm") if p.stat().st_size < 3_000_000)
    return [p for p in paths if p.stat().st_size > 256]


def damaged(root: Path, seeds: list[Path], n: int, seed: int,
            head: int = HEAD) -> Counter[str]:
    """``n`` damaged files in ``root`` (named by number and kind); the kinds made."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    kinds: Counter[str] = Counter()
    for i in range(n):
        data, kind = mutate(rng.choice(seeds).read_bytes(), rng, head)
        (root / f"m{i:05d}_{kind}.dcm").write_bytes(data)
        kinds[kind] += 1
    return kinds


@pytest.fixture(scope="module")
def mutated(archive, tmp_path_factory) -> tuple[Path, Counter[str]]:
    root = tmp_path_factory.mktemp("mutated") / "files"
    return root, damaged(root, seed_files(archive[0]), FILES, seed=20261130)


def same_rows_quietly(files, policy):
    """:func:`assert_same_rows`, and no warning (pydicom's hold raw values) escapes.
    Garbage that earlier tests left is collected first: an object finalized inside the
    window (a TLS test's client socket, say) would warn here of a leak that is not this
    test's."""
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = assert_same_rows(files, policy)
    assert not caught, [str(w.message)[:200] for w in caught[:5]]
    return table


def check_results(table, n: int) -> Counter[str]:
    """Every file one row with a known outcome; the quarantine reasons counted."""
    assert table.num_rows == n
    assert len(set(table.column("path").to_pylist())) == n
    reasons: Counter[str] = Counter()
    for row in table.select(["status", "reason", "message"]).to_pylist():
        if row["status"] == "ok":
            assert row["reason"] is None
        elif row["status"] == "skipped":
            assert row["reason"] in SKIP_REASONS
        else:
            assert row["status"] == "quarantined", row
            assert row["reason"] in REASONS, row
            assert row["message"], row
            reasons[row["reason"]] += 1
    return reasons


@pytest.mark.parametrize("policy_name", ["identified", "research"])
def test_each_damaged_file_gets_one_row_the_same_on_both_paths(mutated, policy_name):
    root, kinds = mutated
    assert set(kinds) == set(KINDS)  # every kind of damage was made
    files = found(sorted(root.iterdir()))
    table = same_rows_quietly(files, make_policy(policy_name))
    reasons = check_results(table, FILES)
    status = Counter(table.column("status").to_pylist())
    # damage in a header mostly shows (most files are cut short), and some is harmless
    # (a changed byte inside a text value)
    assert status["ok"] >= FILES // 10 and status["quarantined"] >= FILES // 2
    assert {"truncated", "element_too_large", "not_dicom"} <= set(reasons)


def test_a_whole_ingest_of_damaged_files_accounts_for_every_one(mutated, tmp_path):
    root, _ = mutated
    lake = Lake.create(tmp_path / "lake")
    s = ingest(lake, root, IngestConfig(scheduler="processes", workers=2))
    assert s.files_seen == FILES == sum(s.outcomes.values())
    assert s.quarantine_reasons and set(s.quarantine_reasons) <= set(REASONS)
    assert sum(s.quarantine_reasons.values()) == s.outcomes["quarantined"]
    with open_lake(tmp_path / "lake", vault=True) as c:
        assert c.con.execute("SELECT count(*), count(DISTINCT path) FROM files").fetchone() \
            == (FILES, FILES)
        rows = dict(c.con.execute(
            "SELECT reason, count(*) FROM quarantine GROUP BY reason").fetchall())
        assert rows == s.quarantine_reasons
        assert c.counts()["instances"] == s.outcomes["ingested"]
    assert verify(Lake.open(tmp_path / "lake")).ok
    # and a second run reads none of them again
    again = ingest(Lake.open(tmp_path / "lake"), root, IngestConfig(scheduler="processes"))
    assert again.files_unchanged == FILES


def identifiers(paths: list[Path]) -> set[str]:
    """The patient IDs and name parts (4 characters or more) in the headers of ``paths``."""
    import pydicom

    out: set[str] = set()
    for p in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:  # the bad files of the sample archive
            continue
        out.add(str(ds.get("PatientID", "") or ""))
        out |= set(str(ds.get("PatientName", "") or "").replace("^", " ").split())
    return {v for v in out if len(v) >= 4}


def test_an_ingest_of_damaged_files_prints_no_header_value(archive, mutated, tmp_path):
    """The installed command, as a user runs it: stdout is the run's summary, stderr holds
    no warning of pydicom's and no identifier of the archive's patients."""
    root, _ = mutated
    exe = shutil.which("lake") or str(Path(sys.executable).parent / "lake")
    lake = tmp_path / "lake"
    subprocess.run([exe, "init", str(lake)], check=True, capture_output=True)
    r = subprocess.run([exe, "ingest", str(root), "--lake", str(lake), "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{FILES} files seen" in r.stdout
    assert "UserWarning" not in r.stderr and "pydicom" not in r.stderr, r.stderr[:2000]
    names = identifiers(seed_files(archive[0]))
    assert len(names) > 20
    shown = {v for v in names if v in r.stderr or v in r.stdout}
    assert not shown, shown


def test_a_damaged_preamble_gives_the_row_of_the_original(archive, tmp_path):
    """The 128 bytes before ``DICM`` are the application's own: overwriting them changes
    the file's checksums and nothing else."""
    originals = [p for p in seed_files(archive[0])[:40]
                 if p.read_bytes()[128:132] == b"DICM"]
    assert len(originals) >= 30
    rng = random.Random(7)
    copies = tmp_path / "copies"
    copies.mkdir()
    for i, p in enumerate(originals):
        data = bytearray(p.read_bytes())
        data[:128] = bytes(rng.randrange(256) for _ in range(128))
        (copies / f"{i:03d}.dcm").write_bytes(data)
        shutil.copystat(p, copies / f"{i:03d}.dcm")
    policy = make_policy("research")
    ref = run(found(originals), policy, columnar=False)
    got = assert_same_rows(found(sorted(copies.iterdir())), policy)
    assert Counter(ref.column("status").to_pylist()) == {"ok": len(originals)}
    differ = {name for name in ref.column_names
              if got.column(name).to_pylist() != ref.column(name).to_pylist()}
    assert differ == {"path", "file_sha256", "source_sha256"}  # the research and plain sums


@pytest.mark.parametrize("policy_name", ["identified", "research"])
def test_a_binary_value_of_the_wrong_length_is_left_out_and_flagged(tmp_path, policy_name):
    """Rows (US, 2 bytes) written as FD, which needs 8 bytes a value: pydicom cannot
    convert it. Found by the damaged files: the file was quarantined as a parse_error,
    because keeping the raw text of unwritable values converted every element again.
    Now the file is ingested, Rows is left out of its DICOM JSON and flagged invalid,
    and its other values are kept."""
    data = part10(base(_Uids()))
    rows = b"\x28\x00\x10\x00US\x02\x00"
    assert data.count(rows) == 1
    path = tmp_path / "rows_as_fd.dcm"
    path.write_bytes(data.replace(rows, b"\x28\x00\x10\x00FD\x02\x00"))
    table = assert_same_rows(found([path]), make_policy(policy_name))
    row = table.to_pylist()[0]
    assert (row["status"], row["reason"], row["Rows"], row["Columns"]) == ("ok", None, None, 8)
    assert row["invalid_attributes"] == ["Rows"]
    assert '"00280010"' not in row["dicom_json"] and '"00280011"' in row["dicom_json"]


@pytest.mark.parametrize("policy_name", ["identified", "research"])
def test_an_element_of_unknown_vr_is_left_out(tmp_path, policy_name):
    """An element whose VR is no VR (``R\\0``, in a damaged dose report): pydicom cannot
    convert it, and the file was quarantined as a parse_error for it. Now it is left out
    of the DICOM JSON and the file is ingested."""
    data = part10(base(_Uids()))
    at = data.index(PIXEL_TAG)
    path = tmp_path / "unknown_vr.dcm"
    # read as implicit VR, as both readers tolerate: 4 bytes of length (82), 82 of value
    path.write_bytes(data[:at] + b"\x53\x51\x00\x00R\x00\x00\x00" + b"x" * 82 + data[at:])
    table = assert_same_rows(found([path]), make_policy(policy_name))
    row = table.to_pylist()[0]
    assert (row["status"], row["reason"], row["invalid_attributes"]) == ("ok", None, None)
    assert '"51530000"' not in row["dicom_json"] and row["Rows"] == 8


def test_a_value_run_on_over_other_elements_keeps_them_out_of_a_research_lake(tmp_path):
    """ContentTime's length made longer, so that its value runs on over the accession
    number and the referring physician's name as raw bytes. The file still parses, and
    ContentTime is kept by the research policy as it is. Found by the damaged files: the
    research row held the name and the number in ContentTime's value. Now a value that is
    not text (NUL and other control bytes inside) is dropped; an identified lake keeps
    it, as it keeps everything."""
    ds = base(_Uids())
    ds.ContentTime = "150111"
    ds.AccessionNumber = "ACC98765"
    ds.ReferringPhysicianName = "Kildare^James"
    data = part10(ds)
    at = data.index(b"\x08\x00\x33\x00TM")  # ContentTime: 8 bytes of header, 6 of value
    end = data.index(b"\x08\x00\x3e\x10LO")  # SeriesDescription, after the name
    damaged = data[:at + 6] + (end - at - 8).to_bytes(2, "little") + data[at + 8:]
    path = tmp_path / "run_on.dcm"
    path.write_bytes(damaged)
    research = assert_same_rows(found([path]), make_policy("research")).to_pylist()[0]
    assert (research["status"], research["Modality"]) == ("ok", None)  # run over too
    text = repr(research)
    assert "ACC98765" not in text and "Kildare" not in text and "James" not in text
    assert '"00080033":{"vr":"TM"}' in research["dicom_json"]
    identified = assert_same_rows(found([path]), make_policy("identified")).to_pylist()[0]
    assert "Kildare^James" in identified["dicom_json"]  # within ContentTime's raw value


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_more_damaged_files(archive, tmp_path, seed):
    """3 x 3,000 more damaged files, on both paths, in research lakes."""
    root = tmp_path / "files"
    damaged(root, seed_files(archive[0]), 3000, seed)
    table = same_rows_quietly(found(sorted(root.iterdir())), make_policy("research"))
    check_results(table, 3000)



@pytest.mark.slow
def test_damaged_dose_reports(archive, tmp_path):
    """The sample archive's CT dose reports (headers only: no pixel data) damaged anywhere,
    2,000 of them, ingested: every file accounted for, and the dose events the run parses
    come from the reports it ingested, which the dose report reads."""
    reports = [p for p in seed_files(archive[0])
               if b"1.2.840.10008.5.1.4.1.1.88.67" in p.read_bytes()[:HEAD]]
    assert len(reports) >= 4
    root = tmp_path / "files"
    damaged(root, reports, 2000, seed=5, head=1 << 20)
    lake = Lake.create(tmp_path / "lake")
    s = ingest(lake, root, IngestConfig(scheduler="processes", workers=2))
    assert s.files_seen == 2000 == sum(s.outcomes.values())
    assert s.outcomes["ingested"] >= 4 and s.outcomes["quarantined"] >= 1000
    with open_lake(tmp_path / "lake") as c:
        orphans = c.con.execute(
            "SELECT count(*) FROM dose_events e WHERE NOT EXISTS (SELECT 1 FROM instances i "
            "WHERE i.SOPInstanceUID = e.SOPInstanceUID)").fetchone()[0]
        assert orphans == 0
        assert c.con.execute("SELECT count(*) FROM dose_events").fetchone()[0] > 0
    assert verify(Lake.open(tmp_path / "lake")).ok
