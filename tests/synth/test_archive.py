"""The generator's ground truth against an independent read-back with pydicom."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from synth import PRESETS, GroundTruth, generate_archive
from synth.archive import encode
from synth.datasets import build_series
from synth.encode import SeriesEncoder
from synth.plan import Planner, UidFactory


def walk(root: Path) -> list[str]:
    """Depth-first, entries of each folder sorted by name: the ingest's order."""
    out: list[str] = []

    def visit(folder: Path) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_dir():
                visit(Path(entry.path))
            else:
                out.append(Path(entry.path).relative_to(root).as_posix())

    visit(root)
    return out


def digests(root: Path) -> dict[str, str]:
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in walk(root)}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GroundTruth]:
    base = tmp_path_factory.mktemp("synth")
    truth = generate_archive(
        base / "archive", seed=7, preset="test", truth_path=base / "truth.json"
    )
    assert GroundTruth.from_json((base / "truth.json").read_text(encoding="utf-8")) == truth
    return base / "archive", truth


@pytest.fixture(scope="module")
def headers(archive: tuple[Path, GroundTruth]) -> dict[str, pydicom.Dataset]:
    root, truth = archive
    return {
        rel: pydicom.dcmread(root / rel)
        for rel, outcome in truth.files.items()
        if outcome == "ingested"
    }


def test_files_on_disk_are_the_truth_files(archive: tuple[Path, GroundTruth]) -> None:
    root, truth = archive
    assert sorted(walk(root)) == sorted(truth.files)
    assert truth.files_total == len(truth.files) == sum(truth.outcomes.values())
    assert 250 <= truth.files_total <= 400
    assert truth.outcomes == {
        "ingested": truth.tables["instances"],
        "duplicate": 3,
        "conflict": 1,
        "skipped": 1,
        "quarantined": 8,
    }
    assert truth.quarantine_reasons == {
        "empty_file": 1,
        "missing_uid:SeriesInstanceUID": 1,
        "missing_uid:SOPInstanceUID": 1,
        "missing_uid:StudyInstanceUID": 1,
        "not_dicom": 2,
        "truncated": 2,
    }
    assert truth.skipped_reasons == {"dicomdir": 1}
    assert truth.tables["conflicts"] == 1 and truth.tables["quarantine"] == 8
    assert (
        Counter(truth.files.values()) == Counter(truth.outcomes) - Counter()
    )  # zero counts dropped
    assert not (root / "truth.json").exists()


def test_same_seed_same_bytes_other_seed_differs(
    tmp_path: Path, archive: tuple[Path, GroundTruth]
) -> None:
    root, truth = archive
    again = generate_archive(tmp_path / "again", seed=7, preset="test")
    assert digests(tmp_path / "again") == digests(root)
    assert again == truth
    other = generate_archive(tmp_path / "other", seed=8, preset="test")
    assert other.series_instance_counts.keys().isdisjoint(truth.series_instance_counts)
    assert set(digests(tmp_path / "other").values()).isdisjoint(
        v for k, v in digests(root).items() if truth.files[k] == "ingested"
    )


def test_ingested_files_agree_with_truth(archive: tuple[Path, GroundTruth], headers: dict) -> None:
    root, truth = archive
    sops = [ds.SOPInstanceUID for ds in headers.values()]
    assert len(set(sops)) == len(sops) == truth.tables["instances"]
    # a CT study's dose report is a series of its own (Modality SR): the images decide
    studies = {ds.StudyInstanceUID: ds for ds in headers.values() if ds.Modality != "SR"}
    assert len(studies) == truth.tables["studies"]
    assert len({ds.PatientID for ds in headers.values()}) == truth.tables["patients"]
    assert dict(Counter(ds.Modality for ds in studies.values())) == truth.studies_by_modality
    assert sorted(truth.studies_by_modality) == ["CR", "CT", "DX", "MG", "MR", "NM", "PT", "US"]
    by_year = Counter((ds.Modality, int(ds.StudyDate[:4])) for ds in studies.values())
    assert [[m, y, n] for (m, y), n in sorted(by_year.items())] == truth.studies_by_modality_year
    assert all(2019 <= y <= 2024 for _, y, _ in truth.studies_by_modality_year)
    assert dict(Counter(ds.Modality for ds in headers.values())) == truth.instances_by_modality
    assert (
        dict(Counter(ds.SeriesInstanceUID for ds in headers.values()))
        == truth.series_instance_counts
    )
    assert len(truth.series_instance_counts) == truth.tables["series"]
    sizes: Counter[str] = Counter()
    for rel, ds in headers.items():
        sizes[ds.SeriesInstanceUID] += (root / rel).stat().st_size
    assert dict(sizes) == truth.series_size_bytes
    # one image modality per study, plus the dose report of CT studies
    mods = defaultdict(set)
    for ds in headers.values():
        mods[ds.StudyInstanceUID].add(ds.Modality)
    assert all(len(m - {"SR"}) == 1 for m in mods.values())
    assert all(m == {"CT", "SR"} for m in mods.values() if "SR" in m)


def test_headers_are_realistic_part10(archive: tuple[Path, GroundTruth], headers: dict) -> None:
    root, _ = archive
    sop_classes = {
        "CT": "1.2.840.10008.5.1.4.1.1.2",
        "MR": "1.2.840.10008.5.1.4.1.1.4",
        "CR": "1.2.840.10008.5.1.4.1.1.1",
        "DX": "1.2.840.10008.5.1.4.1.1.1.1",
        "MG": "1.2.840.10008.5.1.4.1.1.1.2",
        "US": "1.2.840.10008.5.1.4.1.1.6.1",
        "PT": "1.2.840.10008.5.1.4.1.1.128",
        "NM": "1.2.840.10008.5.1.4.1.1.20",
        "SR": "1.2.840.10008.5.1.4.1.1.88.67",
    }
    for rel, ds in headers.items():
        assert (root / rel).read_bytes()[128:132] == b"DICM"
        assert ds.SOPClassUID == sop_classes[ds.Modality] == ds.file_meta.MediaStorageSOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPInstanceUID.startswith("2.25.") and len(ds.SOPInstanceUID) <= 64
        birth = dt.datetime.strptime(ds.PatientBirthDate, "%Y%m%d").date()
        study = dt.datetime.strptime(ds.StudyDate, "%Y%m%d").date()
        years = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
        assert ds.PatientAge == f"{years:03d}Y"
        for keyword in (
            "AccessionNumber",
            "StudyID",
            "StudyDescription",
            "SeriesDescription",
            "ProtocolName",
            "BodyPartExamined",
            "Manufacturer",
            "ManufacturerModelName",
            "StationName",
            "InstitutionName",
            "InstitutionalDepartmentName",
            "ReferringPhysicianName",
            "SeriesDate",
            "SeriesTime",
            "AcquisitionDate",
            "ContentDate",
            "PatientSex",
        ):
            if keyword not in ("ProtocolName", "BodyPartExamined", "AcquisitionDate") \
                    or ds.Modality != "SR":
                assert ds.get(keyword), (rel, keyword)
        if ds.Modality == "SR":
            assert "PixelData" not in ds and ds.ContentTemplateSequence[0].TemplateIdentifier \
                == "10011"
            continue
        assert len(ds.ImageType) >= 2
        arr = ds.pixel_array
        assert arr.shape[:2] == (ds.Rows, ds.Columns)
        if ds.Modality == "CT":
            assert ds.RescaleIntercept == -1024 and ds.PixelRepresentation == 1
            assert ds.KVP and ds.CTDIvol and ds.XRayTubeCurrent and ds.ConvolutionKernel
            if "AXIAL" in ds.ImageType:
                assert ds.Rows == PRESETS["test"].ct_matrix
                hu = arr.astype(np.int32) - 1024
                assert hu.min() < -900 and hu.max() > 100  # air and bone or contrast
                assert np.mean((hu > -200) & (hu < 300)) > 0.1  # soft tissue
        if ds.Modality == "MG":
            assert ds.ImageLaterality in ("L", "R") and ds.ViewPosition in ("CC", "MLO")
        if ds.Modality in ("CR", "DX"):
            assert ds.ViewPosition in ("PA", "AP", "LAT")
        if ds.Modality == "US":
            assert ds.BitsAllocated == 8
    localizers = [ds for ds in headers.values() if "LOCALIZER" in ds.get("ImageType", [])]
    assert all(ds.Modality == "CT" for ds in localizers)
    assert any(int(ds.PatientAge[:3]) > 89 for ds in headers.values())


def test_geometry_steps_along_the_normal(headers: dict) -> None:
    series = defaultdict(list)
    for ds in headers.values():
        if ds.Modality in ("CT", "MR", "PT", "NM") and "LOCALIZER" not in ds.ImageType:
            series[ds.SeriesInstanceUID].append(ds)
    assert len(series) >= 4
    for items in series.values():
        items.sort(key=lambda d: d.InstanceNumber)
        first = items[0]
        iop = np.array(first.ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        spacing = float(first.SpacingBetweenSlices)
        assert len({d.FrameOfReferenceUID for d in items}) == 1
        assert {(d.Rows, d.Columns, tuple(d.PixelSpacing), d.SliceThickness) for d in items} == {
            (first.Rows, first.Columns, tuple(first.PixelSpacing), first.SliceThickness)
        }
        positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in items])
        steps = np.diff(positions @ normal)
        np.testing.assert_allclose(steps, spacing, atol=1e-3)
        # no drift within the slice plane
        np.testing.assert_allclose(np.diff(positions, axis=0), np.outer(steps, normal), atol=1e-3)
        np.testing.assert_allclose(
            [float(d.SliceLocation) for d in items], positions @ normal, atol=1e-3
        )


def test_names_read_back_as_unicode(archive: tuple[Path, GroundTruth], headers: dict) -> None:
    _, truth = archive
    assert len(truth.names) >= 10
    charsets = set(truth.charsets.values())
    for expected in (
        "ISO_IR 100",
        "ISO_IR 192",
        "GB18030",
        "\\ISO 2022 IR 87",
        "ISO 2022 IR 13\\ISO 2022 IR 87",
        "\\ISO 2022 IR 149",
        "ISO_IR 144",
        "ISO_IR 126",
        "ISO_IR 127",
        "ISO_IR 138",
    ):
        assert expected in charsets
    seen = {}
    for ds in headers.values():
        if ds.PatientID in truth.names:
            seen[ds.PatientID] = str(ds.PatientName)
            cs = ds.SpecificCharacterSet
            assert (cs if isinstance(cs, str) else "\\".join(cs)) == truth.charsets[ds.PatientID]
        else:
            assert str(ds.PatientName).isascii() and "SpecificCharacterSet" not in ds
    assert seen == truth.names
    assert "Yamada^Tarou=山田^太郎=やまだ^たろう" in truth.names.values()


def test_duplicates_and_conflict(archive: tuple[Path, GroundTruth], headers: dict) -> None:
    root, truth = archive
    order = {rel: i for i, rel in enumerate(walk(root))}
    by_sop = {ds.SOPInstanceUID: rel for rel, ds in headers.items()}
    assert len(truth.duplicates) == 3
    for rel in truth.duplicates:
        assert truth.files[rel] == "duplicate" and rel.startswith("zz_resent/")
        original = by_sop[pydicom.dcmread(root / rel).SOPInstanceUID]
        assert (root / rel).read_bytes() == (root / original).read_bytes()
        assert order[original] < order[rel]
    c = truth.conflict
    assert (
        truth.files[c["rejected_path"]] == "conflict" and truth.files[c["kept_path"]] == "ingested"
    )
    kept, rejected = (
        pydicom.dcmread(root / c["kept_path"]),
        pydicom.dcmread(root / c["rejected_path"]),
    )
    assert kept.SOPInstanceUID == rejected.SOPInstanceUID == c["sop_instance_uid"]
    assert kept.SeriesDescription != rejected.SeriesDescription
    assert (root / c["kept_path"]).read_bytes() != (root / c["rejected_path"]).read_bytes()
    assert order[c["kept_path"]] < order[c["rejected_path"]]


def test_bad_files_are_what_they_claim(archive: tuple[Path, GroundTruth]) -> None:
    root, truth = archive
    reasons = {
        reason: rel
        for rel, reason in truth.bad_files.items()
        if reason not in ("not_dicom", "truncated")
    }
    assert (root / reasons["empty_file"]).stat().st_size == 0
    for rel, reason in truth.bad_files.items():
        data = (root / rel).read_bytes()
        assert truth.files[rel] == ("skipped" if reason == "dicomdir" else "quarantined")
        if reason == "not_dicom":
            assert data[128:132] != b"DICM"
            with pytest.raises(pydicom.errors.InvalidDicomError):
                pydicom.dcmread(root / rel)
        if reason == "truncated":
            assert data[128:132] == b"DICM"
            assert (
                b"\xe0\x7f\x10\x00" in data or "header" in rel
            )  # pixel data tag, or cut before it
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        reason = f"missing_uid:{keyword}"
        ds = pydicom.dcmread(root / reasons[reason])
        assert keyword not in ds and "PixelData" in ds
    assert (
        "MediaStorageSOPInstanceUID"
        not in pydicom.dcmread(root / reasons["missing_uid:SOPInstanceUID"]).file_meta
    )
    dicomdir = pydicom.dcmread(root / reasons["dicomdir"])
    assert dicomdir.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.1.3.10"
    assert len(dicomdir.DirectoryRecordSequence) >= 4
    # the File-set's instances are ordinary ingested files
    media = [
        rel
        for rel, outcome in truth.files.items()
        if rel.startswith("media/") and outcome == "ingested"
    ]
    assert len(media) == 2


def test_repeats(archive: tuple[Path, GroundTruth], headers: dict) -> None:
    _, truth = archive
    studies = {ds.StudyInstanceUID: ds for ds in headers.values() if ds.Modality != "SR"}
    assert sorted(r["days"] for r in truth.repeats) == [0, 30, 31]
    for r in truth.repeats:
        later, prior = studies[r["study_uid"]], studies[r["prior_study_uid"]]
        assert later.PatientID == prior.PatientID == r["patient_id"]
        assert (later.Modality, later.BodyPartExamined) == (prior.Modality, prior.BodyPartExamined)
        t1 = dt.datetime.strptime(later.StudyDate + later.StudyTime, "%Y%m%d%H%M%S")
        t0 = dt.datetime.strptime(prior.StudyDate + prior.StudyTime, "%Y%m%d%H%M%S")
        assert t1 > t0 and (t1.date() - t0.date()).days == r["days"]
        assert (later.ProtocolName, prior.ProtocolName) == (r["protocol"], r["prior_protocol"])
    # only the 30-day pair changes protocol (matching on it drops that pair)
    assert {r["days"]: r["protocol"] == r["prior_protocol"] for r in truth.repeats} == {
        0: True, 30: False, 31: True}
    # every image series of a study has the study's protocol
    protocols = defaultdict(set)
    for ds in headers.values():
        if ds.Modality != "SR":
            protocols[ds.StudyInstanceUID].add(ds.ProtocolName)
    assert all(len(p) == 1 for p in protocols.values())
    # no other pair of same patient/modality/body part lies within 31 days
    starts = defaultdict(list)
    for ds in studies.values():
        starts[(ds.PatientID, ds.Modality, ds.BodyPartExamined)].append(
            dt.datetime.strptime(ds.StudyDate, "%Y%m%d")
        )
    close = sum(
        1
        for days in starts.values()
        for a, b in zip(sorted(days), sorted(days)[1:], strict=False)
        if (b - a).days <= 31
    )
    assert close == 3
    assert len({ds.PatientID for ds in studies.values()}) < len(
        studies
    )  # patients have several studies


def test_fast_encoder_matches_dcmwrite() -> None:
    config = PRESETS["test"]
    planner = Planner(config, 3, UidFactory("encoder-test"))
    planner.plan(150)
    for study in planner.studies:
        series = study.series[-1]
        ds, hook = build_series(study, series, asdict(config), 3)
        encoder = SeriesEncoder(ds)
        for i in range(series.n_instances):
            hook(ds, i)
            assert encoder.encode(ds) == encode(ds)


def test_refuses_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        generate_archive(tmp_path / "full")
    with pytest.raises(ValueError, match="inside the archive root"):
        generate_archive(tmp_path / "a", truth_path=tmp_path / "a" / "truth.json")
    with pytest.raises(ValueError, match="unknown preset"):
        generate_archive(tmp_path / "b", preset="huge")
    with pytest.raises(TypeError, match="unknown archive option"):
        generate_archive(tmp_path / "c", ct_size=3)


def test_bench_preset_small_target(tmp_path: Path) -> None:
    truth = generate_archive(tmp_path / "bench", seed=1, preset="bench", target_files=500)
    assert 450 <= truth.files_total <= 600
    ct_512 = 0
    for rel, outcome in truth.files.items():
        if outcome != "ingested":
            continue
        ds = pydicom.dcmread(tmp_path / "bench" / rel, stop_before_pixels=True)
        if ds.Modality == "CT" and "AXIAL" in ds.ImageType:
            assert (ds.Rows, ds.Columns) == (512, 512)
            assert 524_288 < (tmp_path / "bench" / rel).stat().st_size < 530_000
            ct_512 += 1
    assert ct_512 >= truth.files_total * 0.4


def test_a_relative_root_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    truth = generate_archive("rel/archive", seed=3, preset="test")
    assert sum(1 for p in (tmp_path / "rel" / "archive").rglob("*") if p.is_file()) == \
        truth.files_total


def test_retakes_and_dose_reports(archive: tuple[Path, GroundTruth], headers: dict) -> None:
    """Retake and dose truth, read back with pydicom from the files."""
    _, truth = archive
    views: Counter[tuple] = Counter()
    for ds in headers.values():
        if ds.Modality in ("CR", "DX", "MG"):
            views[(ds.StudyInstanceUID, ds.ViewPosition, ds.ImageLaterality,
                   ds.BodyPartExamined)] += 1
    retakes: Counter[str] = Counter()
    for (study, *_), n in views.items():
        if n > 1:
            retakes[study] += n - 1
    assert dict(retakes) == truth.retakes and len(truth.retakes) >= 2

    def concept(item) -> str:
        return item.ConceptNameCodeSequence[0].CodeValue

    reports = {ds.StudyInstanceUID: ds for ds in headers.values() if ds.Modality == "SR"}
    assert set(reports) == set(truth.dose_reports)
    ct_studies = {ds.StudyInstanceUID for ds in headers.values() if ds.Modality == "CT"}
    assert set(truth.dose_reports) | set(truth.ct_header_ctdivol) == ct_studies
    assert not set(truth.dose_reports) & set(truth.ct_header_ctdivol)
    for study, ds in reports.items():
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.67"
        assert concept(ds) == "113701"
        (total,) = [i for i in ds.ContentSequence if concept(i) == "113811"]
        dlp_total = [float(c.MeasuredValueSequence[0].NumericValue)
                     for c in total.ContentSequence if concept(c) == "113813"]
        assert dlp_total == [truth.dose_reports[study]["accumulated_dlp"]]
        got = []
        for acq in (i for i in ds.ContentSequence if concept(i) == "113819"):
            (ct_dose,) = [c for c in acq.ContentSequence if concept(c) == "113829"]
            nums = {concept(c): float(c.MeasuredValueSequence[0].NumericValue)
                    for c in ct_dose.ContentSequence if c.ValueType == "NUM"}
            got.append((nums["113830"], nums["113838"]))
        events = truth.dose_reports[study]["events"]
        assert got == [(e["ctdivol"], e["dlp"]) for e in events]
        assert truth.dose_reports[study]["accumulated_dlp"] == \
            round(sum(e["dlp"] for e in events), 2)
        # the images' header CTDIvol is the spiral acquisition's
        header_ctdivol = {float(h.CTDIvol) for h in headers.values()
                          if h.StudyInstanceUID == study and "AXIAL" in h.get("ImageType", [])}
        assert header_ctdivol == {events[-1]["ctdivol"]}
    for study, ctdivol in truth.ct_header_ctdivol.items():
        assert max(float(h.CTDIvol) for h in headers.values()
                   if h.StudyInstanceUID == study and h.Modality == "CT") == ctdivol
