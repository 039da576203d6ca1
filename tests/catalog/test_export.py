"""Cohort export: manifest, DICOM copies re-ingested into a fresh lake, NIfTI geometry."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from catalog import cohorts, open_lake
from catalog.errors import ExportError
from catalog.export import export, sha256_file
from etl import ingest
from lakehouse import Lake
from tests.conftest import fast_config

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
    out = tmp_path / "out"
    summary = export(cohort_lake, "ctmr", out, "manifest")
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


def test_dicom_export_of_a_research_lake_refuses(tmp_path):
    lake = Lake.create(tmp_path / "research", profile="research")
    cohorts.save(lake, "empty", sql="SELECT SeriesInstanceUID FROM series")
    with pytest.raises(ExportError, match=r"de-identification .*--as manifest"):
        export(lake, "empty", tmp_path / "out", "dicom")
    assert not (tmp_path / "out").exists()
    assert export(lake, "empty", tmp_path / "m", "manifest").series == 0
