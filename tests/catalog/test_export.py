"""Cohort export: manifest, DICOM copies re-ingested into a fresh lake, NIfTI geometry."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

from catalog import cohorts, open_lake
from catalog.export import export, sha256_file
from etl import ingest
from lakehouse import Lake
from lakehouse.privacy import KeyError_
from synth import generate_archive
from synth.phi import MARKER_PREFIX, plant_phi
from tests.conftest import fast_config, fixed_key_file

CT_MR = "SELECT SeriesInstanceUID FROM series WHERE Modality IN ('CT', 'MR')"


@pytest.fixture(scope="module")
def cohort_lake(built_lake, tmp_path_factory):
    """A copy of the sample lake with saved cohorts: CT+MR series, and CT studies."""
    dest = tmp_path_factory.mktemp("export") / "lake"
    shutil.copytree(built_lake[0], dest, symlinks=True)
    cohorts.save(dest, "ctmr", sql=CT_MR)
    cohorts.save(dest, "ct_studies", spec={"modality": "CT"})
    cohorts.save(dest, "ct_study_grain",
                 sql="SELECT DISTINCT StudyInstanceUID FROM series WHERE Modality = 'CT'")
    return dest


def _check_sums(root):
    lines = (root / "SHA256SUMS").read_text().splitlines()
    listed = {}
    for line in lines:
        digest, rel = line.split("  ", 1)
        listed[rel] = digest
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert set(listed) == files - {"SHA256SUMS", "export.json"}
    for rel, digest in listed.items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest
    return listed


def test_manifest(cohort_lake, truth, tmp_path):
    from lakehouse import audit

    out = tmp_path / "out"
    before = len(audit.read(cohort_lake))
    summary = export(cohort_lake, "ctmr", out, "manifest")
    entries = audit.read(cohort_lake)
    assert len(entries) == before + 1  # every export is audited
    assert entries[-1]["action"] == "export" and entries[-1]["text"].startswith("cohort ctmr")
    with open_lake(cohort_lake) as cat:
        expected = dict(cat.con.execute(
            "SELECT SeriesInstanceUID, instanceCount FROM series "
            "WHERE Modality IN ('CT', 'MR')").fetchall())
    assert summary.series == len(expected)
    assert summary.instances == sum(expected.values())
    inst = pq.read_table(out / "manifest" / "instances.parquet")
    meta = inst.schema.metadata
    assert meta[b"lake.cohort"] == b"ctmr"
    assert meta[b"lake.snapshot"] == str(summary.snapshot).encode()
    assert meta[b"lake.cohort_rows_sha256"] == cohorts.load(
        cohort_lake, "ctmr").rows_sha256.encode()
    per_series: dict[str, int] = {}
    for uid in inst.column("SeriesInstanceUID").to_pylist():
        per_series[uid] = per_series.get(uid, 0) + 1
    assert per_series == {u: truth.series_instance_counts[u] for u in expected}
    assert all(len(h) == 64 for h in inst.column("file_sha256").to_pylist())
    with open(out / "manifest" / "instances.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["SOPInstanceUID"] for r in rows] == inst.column("SOPInstanceUID").to_pylist()
    assert json.loads((out / "cohort.json").read_text())["name"] == "ctmr"
    assert set(_check_sums(out)) == {"cohort.json", "manifest/series.parquet",
                                     "manifest/series.csv", "manifest/instances.parquet",
                                     "manifest/instances.csv"}
    # a study-grain cohort exports every series of its studies
    s = export(cohort_lake, "ct_study_grain", tmp_path / "studies", "manifest")
    with open_lake(cohort_lake) as cat:
        n = cat.con.execute("SELECT count(*) FROM series WHERE StudyInstanceUID IN "
                            "(SELECT StudyInstanceUID FROM series WHERE Modality = 'CT')"
                            ).fetchall()[0][0]
    assert s.series == n


def test_dicom_export_reingested_gives_the_same_counts(cohort_lake, tmp_path):
    out = tmp_path / "out"
    summary = export(cohort_lake, "ctmr", out, "dicom")
    assert summary.not_exported == {} and summary.written == summary.instances
    dicoms = sorted((out / "dicom").rglob("*.dcm"))
    assert len(dicoms) == summary.instances
    _check_sums(out)

    fresh = Lake.create(tmp_path / "fresh", profile="identified")
    run = ingest(fresh, out / "dicom", fast_config())
    assert run.outcomes["ingested"] == summary.instances
    assert run.outcomes["quarantined"] == 0
    with open_lake(cohort_lake) as old, open_lake(fresh.root) as new:
        q = ("SELECT SeriesInstanceUID, instanceCount, StudyInstanceUID FROM series "
             "{} ORDER BY 1")
        assert new.arrow(q.format("")).to_pylist() == \
            old.arrow(q.format("WHERE Modality IN ('CT', 'MR')")).to_pylist()
        shas = "SELECT SOPInstanceUID, file_sha256 FROM instances {} ORDER BY 1"
        assert new.arrow(shas.format("")).to_pylist() == old.arrow(shas.format(
            "WHERE Modality IN ('CT', 'MR')")).to_pylist()

    # resumable: a missing and a damaged copy are redone, the rest skipped
    dicoms[0].unlink()
    dicoms[1].write_bytes(b"damaged")
    again = export(cohort_lake, "ctmr", out, "dicom")
    assert (again.written, again.skipped_existing) == (2, summary.instances - 2)
    assert dicoms[0].exists() and sha256_file(dicoms[1]) != hashlib.sha256(
        b"damaged").hexdigest()
    _check_sums(out)


def test_nifti_geometry_matches_the_series(cohort_lake, tmp_path):
    sitk = pytest.importorskip("SimpleITK", reason="pip install 'imaging-lakehouse[nifti]'")
    out = tmp_path / "out"
    summary = export(cohort_lake, "ct_studies", out, "nifti")
    with open_lake(cohort_lake) as cat:
        series = cat.arrow("SELECT * FROM series WHERE Modality = 'CT'").to_pylist()
        mixed = {s["SeriesInstanceUID"] for s in series if s["distinct_orientations"] > 1}
        assert set(summary.not_exported) == mixed
        assert summary.written == len(series) - len(mixed) > 0
        for s in series:
            uid = s["SeriesInstanceUID"]
            if uid in mixed:
                continue
            image = sitk.ReadImage(str(out / "nifti" / f"{uid}.nii.gz"))
            inst = cat.arrow("SELECT ImagePositionPatient AS ipp, ImageOrientationPatient AS "
                             "iop, PixelSpacing AS ps, Rows, Columns FROM instances "
                             "WHERE SeriesInstanceUID = ?", [uid]).to_pylist()
            iop = np.array(inst[0]["iop"])
            normal = np.cross(iop[:3], iop[3:])
            first = min(inst, key=lambda r: float(np.dot(normal, r["ipp"])))
            ps = inst[0]["ps"]
            assert image.GetSize() == (inst[0]["Columns"], inst[0]["Rows"], len(inst))
            np.testing.assert_allclose(image.GetOrigin(), first["ipp"], atol=1e-4)
            expected_spacing = [ps[1], ps[0]]
            if len(inst) > 1:
                expected_spacing.append(s["slice_spacing_min"])
                np.testing.assert_allclose(image.GetSpacing(), expected_spacing, atol=1e-3)
                np.testing.assert_allclose(
                    np.array(image.GetDirection()).reshape(3, 3),
                    np.column_stack([iop[:3], iop[3:], normal]), atol=1e-4)
            sidecar = json.loads((out / "nifti" / f"{uid}.json").read_text())
            assert sidecar["instanceCount"] == s["instanceCount"] == len(inst)
            assert sidecar["Modality"] == "CT" and sidecar["lake_snapshot"] == \
                cohorts.load(cohort_lake, "ct_studies").snapshot
    again = export(cohort_lake, "ct_studies", out, "nifti")
    assert (again.written, again.skipped_existing) == (0, summary.written)


@pytest.fixture(scope="module")
def research_lake(tmp_path_factory):
    """A research lake of a generated archive full of planted PHI, with a saved cohort of
    every series. Its key is fixed (:func:`tests.conftest.fixed_key_file`): the byte
    scans below look for planted birth dates."""
    root = tmp_path_factory.mktemp("research-export")
    truth = generate_archive(root / "archive", seed=7, preset="test")
    phi = plant_phi(root / "archive", truth)
    key = fixed_key_file(root / "lake.key")
    lake = Lake.create(root / "lake", profile="research", key_file=key)
    ingest(lake, root / "archive", fast_config(), key_file=key)
    cohorts.save(lake, "everything", sql="SELECT SeriesInstanceUID FROM series")
    # the check below can fail: the originals do carry the markers
    first = next(p for p in sorted((root / "archive").rglob("*.dcm")))
    assert MARKER_PREFIX in first.read_bytes().decode("latin-1")
    return lake, key, phi, truth


def test_research_dicom_export_is_deidentified_like_the_tables(research_lake, tmp_path):
    lake, key, phi, truth = research_lake
    with pytest.raises(KeyError_):  # another key: refused before anything is written
        export(lake, "everything", tmp_path / "wrong", "dicom",
               key_file=_other_key(tmp_path / "other.key"))
    assert not (tmp_path / "wrong" / "dicom").exists()

    out = tmp_path / "out"
    summary = export(lake, "everything", out, "dicom", key_file=key)
    assert summary.not_exported == {} and summary.written == summary.instances > 100
    _check_sums(out)

    # no planted marker, original identifier or name anywhere in the exported files
    names = [n for n in phi.name_parts if len(n) >= 3]
    for path in sorted(out.rglob("*")):
        if not path.is_file():
            continue
        raw = path.read_bytes().decode("latin-1")
        assert MARKER_PREFIX not in raw, path
        assert [i for i in phi.identifiers if len(i) >= 4 and i in raw] == [], path
        text = raw
        if path.suffix == ".dcm":  # names are checked in the header, not in random pixels
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert ds.PatientIdentityRemoved == "YES"
            text = json.dumps(ds.to_json_dict(bulk_data_threshold=1 << 30,
                                              suppress_invalid_tags=True), ensure_ascii=False)
        assert [n for n in names if re.search(rf"(?<!\w){re.escape(n)}(?!\w)", text)] == [], \
            path
        assert [n for n in truth.names.values() if n in text] == [], path

    # re-ingested into a fresh lake: the same counts, and the research tables' pseudonyms,
    # UIDs and shifted dates
    fresh = Lake.create(tmp_path / "fresh", profile="identified")
    run = ingest(fresh, out / "dicom", fast_config())
    assert run.outcomes["ingested"] == summary.instances
    q = ("SELECT PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, StudyDate, "
         "Modality FROM instances ORDER BY SOPInstanceUID")
    with open_lake(lake.root) as old, open_lake(fresh.root) as new:
        assert new.arrow(q).to_pylist() == old.arrow(q).to_pylist()
        assert new.counts()["series"] == old.counts()["series"] == summary.series
        assert new.counts()["studies"] == old.counts()["studies"]

    again = export(lake, "everything", out, "dicom", key_file=key)
    assert (again.written, again.skipped_existing) == (0, summary.instances)


def _other_key(path):
    path.write_bytes(os.urandom(32).hex().encode())
    os.chmod(path, 0o600)
    return path


def test_research_nifti_and_manifest(research_lake, tmp_path):
    lake, _key, phi, _truth = research_lake
    summary = export(lake, "everything", tmp_path / "n", "nifti")
    assert summary.written > 0
    for path in (tmp_path / "n").rglob("*.json"):
        text = path.read_text(encoding="utf-8")
        assert MARKER_PREFIX not in text
        assert [i for i in phi.identifiers if len(i) >= 4 and i in text] == []
