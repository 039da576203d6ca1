"""`--as nifti` over every file pydicom and pydicom-data ship: which series become volumes
(geometry and values equal to what pydicom reads), which are skipped, with which reason."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from catalog import cohorts, open_lake
from catalog.export import export
from catalog.nifti import REASONS, Skip, plan_volume
from etl import ingest
from lake_cli import main
from lakehouse import Lake
from tests.conftest import fast_config
from tests.etl.test_fastpath import local_test_files

sitk = pytest.importorskip("SimpleITK", reason="pip install 'imaging-lakehouse[nifti]'")
pytest.importorskip("data_store", reason="pydicom-data is a test dependency: "
                    "pip install -e '.[test]'")

#: the series of the corpus, named by the first (sorted) file name ingested for it, and
#: the reason code it is skipped with (None: exported). Several of pydicom's files are the
#: same image in other encodings (same SOPInstanceUID): the first one walked is ingested,
#: the others are conflicts.
EXPECTED = {
    # single-frame slices with geometry
    "CT_small.dcm": None,
    "MR_small.dcm": None,
    "2062": None,  # 5 CT slices, 2.5 mm apart
    "4919": None, "5641": None, "15820": None, "15970": None,
    # JPEG 2000 CT slices
    "J2K_pixelrep_mismatch.dcm": None,
    "pdd_explicit_VR-UN.dcm": None,
    # enhanced CT: 2 frames, geometry in the functional groups
    "pdd_eCT_Supplemental.dcm": None,
    # made below from pydicom's files under new UIDs: JPEG extended 12-bit with geometry
    # (pydicom cannot decode it, GDCM can), an RLE dose plane (GDCM cannot read it,
    # pydicom can), RT Dose's 15-frame grid
    "zz_jpeg12_with_geometry.dcm": None,
    "zz_rle_dose_plane.dcm": None,
    "zz_rtdose_grid.dcm": None,
    # slices that are not one volume
    "17106": "uneven_spacing",
    "4467": "mixed_orientations", "4950": "mixed_orientations",
    "6273": "mixed_orientations", "6293": "mixed_orientations",
    "SC_rgb_dcmtk_+eb+cr.dcm": "mixed_dimensions",
    "examples_jpeg2k.dcm": "mixed_dimensions",
    "examples_overlay.dcm": "mixed_dimensions",
    "693_J2KI.dcm": "overlapping_planes",  # the same slice lossy and lossless
    "pdd_MR2_J2KI.dcm": "overlapping_planes",
    # images without a place in the patient: projection, secondary capture, ultrasound
    "6154": "no_patient_geometry", "6247": "no_patient_geometry",
    "6278": "no_patient_geometry",
    "ExplVR_BigEnd.dcm": "no_patient_geometry",
    "GDCMJ2K_TextGBR.dcm": "no_patient_geometry",
    "JPEG-lossy.dcm": "no_patient_geometry",
    "SC_jpeg_no_color_transform.dcm": "no_patient_geometry",
    "SC_jpeg_no_color_transform_2.dcm": "no_patient_geometry",
    "SC_rgb_jpeg.dcm": "no_patient_geometry",
    "examples_palette.dcm": "no_patient_geometry",
    "examples_ybr_color.dcm": "no_patient_geometry",  # 30-frame cine
    "image_dfl.dcm": "no_patient_geometry",
    "pdd_JPGLosslessP14SV1_1s_1f_8b.dcm": "no_patient_geometry",
    "pdd_OT-PAL-8-face.dcm": "no_patient_geometry",
    "pdd_RG1_J2KI.dcm": "no_patient_geometry",
    "pdd_RG3_J2KI.dcm": "no_patient_geometry",
    "pdd_color-pl.dcm": "no_patient_geometry",
    "pdd_emri_small.dcm": "no_patient_geometry",  # enhanced MR without functional groups
    "pdd_gdcm-US-ALOKA-16.dcm": "no_patient_geometry",
    "pdd_mlut_18.dcm": "no_patient_geometry",
    "pdd_vlut_04.dcm": "no_patient_geometry",
    # not images
    "ExplVR_BigEndNoMeta.dcm": "no_pixel_data",  # RT Ion Plan
    "IM000000": "no_pixel_data",  # CT headers without pixel data
    "reportsi.dcm": "no_pixel_data",
    "rtplan.dcm": "no_pixel_data",
    "rtstruct.dcm": "no_pixel_data",
    "test-SR.dcm": "no_pixel_data",
    "waveform_ecg.dcm": "no_pixel_data",
    "liver_1frame.dcm": "segmentation",
    # NumberOfFrames '1A' over 15 frames of pixel data (GDCM would read one)
    "badVR.dcm": "invalid_header",
}


def _derived(root: Path) -> None:
    """Three files made from pydicom's own, under new UIDs."""
    ds = pydicom.dcmread(get_testdata_file("JPEG-lossy.dcm"))
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["jpeg12 sop"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["jpeg12 series"])
    ds.ImagePositionPatient = [-120.5, -98.25, 31.0]
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
    ds.PixelSpacing = [0.7, 0.6]
    ds.SliceThickness = 3
    ds.save_as(root / "zz_jpeg12_with_geometry.dcm")
    for name, out in (("rtdose.dcm", "zz_rtdose_grid.dcm"),
                      ("rtdose_rle_1frame.dcm", "zz_rle_dose_plane.dcm")):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[out, "sop"])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[out, "series"])
        ds.save_as(root / out)


@pytest.fixture(scope="module")
def corpus_export(tmp_path_factory):
    """An identified lake of every file of the corpus, its cohort of every series exported
    as NIfTI; {file name of the series: (SeriesInstanceUID, ingested source paths)}."""
    root = tmp_path_factory.mktemp("nifti-corpus")
    src = root / "src"
    src.mkdir()
    for p in sorted(local_test_files()):
        name = ("pdd_" + p.name) if "data_store" in p.parts else p.name
        shutil.copy(p, src / name)
    _derived(src)
    lake = Lake.create(root / "lake", profile="identified")
    ingest(lake, src, fast_config())
    cohorts.save(lake, "all", sql="SELECT SeriesInstanceUID FROM series")
    summary = export(lake, "all", root / "out", "nifti")
    with open_lake(lake.root, vault=True) as cat:
        rows = cat.con.execute(
            "SELECT i.SeriesInstanceUID, list(f.path ORDER BY f.path) FROM instances i "
            "JOIN files f ON f.SOPInstanceUID = i.SOPInstanceUID "
            "AND f.file_sha256 = i.file_sha256 AND f.outcome = 'ingested' GROUP BY 1"
        ).fetchall()
    series = {Path(paths[0]).name: (uid, paths) for uid, paths in rows}
    return lake, root / "out", summary, series


def test_every_series_is_exported_or_skipped_with_its_reason(corpus_export):
    _lake, out, summary, series = corpus_export
    assert summary.series == len(series) == len(EXPECTED)
    got = {name: summary.reasons.get(uid) for name, (uid, _) in series.items()}
    assert got == EXPECTED
    assert set(summary.reasons.values()) <= set(REASONS)
    assert summary.not_exported.keys() == summary.reasons.keys()
    assert summary.written == sum(v is None for v in EXPECTED.values())
    for uid, message in summary.not_exported.items():  # messages name no source path
        assert "/" not in message.replace("ImagePositionPatient/", ""), (uid, message)

    # the summary and the manifest say the same, series by series
    saved = json.loads((out / "export.json").read_text())
    assert saved["reasons"] == summary.reasons
    with open(out / "manifest" / "nifti.csv", encoding="utf-8") as fh:
        manifest = {r["SeriesInstanceUID"]: r for r in csv.DictReader(fh)}
    assert len(manifest) == len(series)
    for uid, _ in series.values():
        row = manifest[uid]
        if uid in summary.reasons:
            assert (row["status"], row["reason"], row["message"], row["file"]) == (
                "skipped", summary.reasons[uid], summary.not_exported[uid], "")
            assert not (out / "nifti" / f"{uid}.nii.gz").exists()
        else:
            assert (row["status"], row["reason"], row["file"]) == (
                "written", "", f"nifti/{uid}.nii.gz")
    assert sorted(p.name for p in (out / "nifti").iterdir()) == sorted(
        f"{uid}.{ext}" for uid, _ in series.values() if uid not in summary.reasons
        for ext in ("nii.gz", "json"))


def _reference(paths: list[str]):
    """What pydicom reads: (origin, spacing, direction, array (slices, rows, columns))."""
    planes = []  # (position, orientation, pixel spacing, thickness, values)
    for path in paths:
        ds = pydicom.dcmread(path)
        try:
            arr = ds.pixel_array
        except RuntimeError:  # JPEG extended 12-bit: what GDCM reads
            arr = sitk.GetArrayFromImage(sitk.ReadImage(path))[0]
        frames = int(ds.get("NumberOfFrames") or 1)
        arr = arr[np.newaxis] if frames == 1 else arr
        if "PerFrameFunctionalGroupsSequence" in ds:  # eCT_Supplemental: shared groups
            shared = ds.SharedFunctionalGroupsSequence[0]
            measures = shared.PixelMeasuresSequence[0]
            pvt = shared.PixelValueTransformationSequence[0]
            for k, pf in enumerate(ds.PerFrameFunctionalGroupsSequence):
                planes.append((pf.PlanePositionSequence[0].ImagePositionPatient,
                               shared.PlaneOrientationSequence[0].ImageOrientationPatient,
                               measures.PixelSpacing, measures.SliceThickness,
                               arr[k] * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept)))
            continue
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        offsets = ds.get("GridFrameOffsetVector") or [0.0]
        slope = float(ds.get("RescaleSlope", ds.get("DoseGridScaling", 1)))
        intercept = float(ds.get("RescaleIntercept", 0))
        for k in range(frames):
            planes.append((np.array(ds.ImagePositionPatient, dtype=float)
                           + float(offsets[k]) * normal, iop, ds.PixelSpacing,
                           ds.get("SliceThickness"), arr[k] * slope + intercept))
    iop = np.array(planes[0][1], dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    planes.sort(key=lambda p: float(np.dot(normal, np.array(p[0], dtype=float))))
    depth = [float(np.dot(normal, np.array(p[0], dtype=float))) for p in planes]
    ps = planes[0][2]
    gap = depth[1] - depth[0] if len(planes) > 1 else float(planes[0][3] or 1)
    return (np.array(planes[0][0], dtype=float), (float(ps[1]), float(ps[0]), gap),
            np.column_stack([iop[:3], iop[3:], normal]).ravel(),
            np.stack([p[4] for p in planes]))


def test_volumes_equal_what_pydicom_reads(corpus_export):
    _lake, out, _summary, series = corpus_export
    exported = [name for name, why in EXPECTED.items() if why is None]
    shapes = {}
    for name in exported:
        uid, paths = series[name]
        image = sitk.ReadImage(str(out / "nifti" / f"{uid}.nii.gz"))
        origin, spacing, direction, array = _reference(paths)
        got = sitk.GetArrayFromImage(image)
        shapes[name] = (got.shape, got.dtype.name)
        assert got.shape == array.shape, name
        np.testing.assert_allclose(image.GetOrigin(), origin, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(image.GetSpacing(), spacing, rtol=1e-6, err_msg=name)
        # DICOM's cosines have 4-6 decimals; NIfTI stores them orthonormal
        np.testing.assert_allclose(image.GetDirection(), direction, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(got, array, rtol=1e-6, atol=1e-9, err_msg=name)
        sidecar = json.loads((out / "nifti" / f"{uid}.json").read_text())
        assert sidecar["size"] == list(image.GetSize())
        assert len(sidecar["slices"]) == got.shape[0]
    # modality units: int16 where stored integers rescale by integers into its range,
    # float32 for RT Dose (DoseGridScaling 1e-6 Gy), stored type where nothing rescales
    assert shapes == {
        "CT_small.dcm": ((1, 128, 128), "int16"), "MR_small.dcm": ((1, 64, 64), "int16"),
        "2062": ((5, 16, 16), "int16"), "4919": ((1, 16, 16), "int16"),
        "5641": ((1, 16, 16), "int16"), "15820": ((1, 16, 16), "int16"),
        "15970": ((1, 16, 16), "int16"),
        "J2K_pixelrep_mismatch.dcm": ((1, 512, 512), "int16"),
        "pdd_explicit_VR-UN.dcm": ((1, 512, 512), "int16"),
        "pdd_eCT_Supplemental.dcm": ((2, 512, 512), "int16"),
        "zz_jpeg12_with_geometry.dcm": ((1, 1024, 256), "uint16"),
        "zz_rtdose_grid.dcm": ((15, 10, 10), "float32"),
        "zz_rle_dose_plane.dcm": ((1, 10, 10), "float32")}


def test_each_decoder_covers_what_the_other_cannot_read(corpus_export):
    _lake, out, _summary, series = corpus_export
    # RLE, 32 bits: GDCM fails, pydicom decodes
    uid, paths = series["zz_rle_dose_plane.dcm"]
    with pytest.raises(RuntimeError):
        sitk.ReadImage(paths[0])
    ds = pydicom.dcmread(paths[0])
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"  # RLE lossless
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "nifti" / f"{uid}.nii.gz")))
    np.testing.assert_allclose(got[0], ds.pixel_array * float(ds.DoseGridScaling), rtol=1e-6)
    sidecar = json.loads((out / "nifti" / f"{uid}.json").read_text())
    assert sidecar["pixel_values"]["decoder"] == "pydicom"
    # JPEG extended 12-bit: pydicom's plugins fail, GDCM decodes
    uid, paths = series["zz_jpeg12_with_geometry.dcm"]
    ds = pydicom.dcmread(paths[0])
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.51"  # JPEG extended
    with pytest.raises(RuntimeError):
        ds.pixel_array  # noqa: B018
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "nifti" / f"{uid}.nii.gz")))
    np.testing.assert_array_equal(got, sitk.GetArrayFromImage(sitk.ReadImage(paths[0])))
    sidecar = json.loads((out / "nifti" / f"{uid}.json").read_text())
    assert sidecar["pixel_values"]["decoder"] == "GDCM (pydicom could not decode)"


def test_rerun_keeps_what_is_there_and_the_cli_lists_skips_on_stderr(corpus_export, capsys):
    lake, out, summary, _series = corpus_export
    code = main(["cohort", "export", "all", "--to", str(out), "--as", "nifti",
                 "--lake", str(lake.root)])
    stdout, stderr = capsys.readouterr()
    assert code == 0
    assert f"0 nifti files written, {summary.written} already there, " \
           f"{len(summary.reasons)} not exported" in stdout
    assert len(stdout.splitlines()) == 1  # the skips are on stderr
    lines = stderr.splitlines()
    assert lines == [f"lake cohort export: not exported {uid}: {summary.reasons[uid]}: "
                     f"{summary.not_exported[uid]}" for uid in sorted(summary.reasons)]
    with open(out / "manifest" / "nifti.csv", encoding="utf-8") as fh:
        statuses = sorted(r["status"] for r in csv.DictReader(fh))
    assert statuses == sorted(["existing"] * summary.written
                              + ["skipped"] * len(summary.reasons))


def _series_datasets(series, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [pydicom.dcmread(p, stop_before_pixels=True) for p in series[name][1]]


def test_plan_refuses_stacks_that_are_not_one_volume(corpus_export):
    series = corpus_export[3]
    good = _series_datasets(series, "2062")
    planes, spacing = plan_volume(good)
    assert len(planes) == 5 and spacing[2] == pytest.approx(2.5)

    def skip(datasets):
        got = plan_volume(datasets)
        assert isinstance(got, Skip)
        return got.reason

    sheared = _series_datasets(series, "2062")
    p = [float(x) for x in sheared[2].ImagePositionPatient]
    sheared[2].ImagePositionPatient = [p[0] + 5, p[1], p[2]]
    assert skip(sheared) == "sheared_stack"
    normal = np.cross(np.array(good[0].ImageOrientationPatient, dtype=float)[:3],
                      np.array(good[0].ImageOrientationPatient, dtype=float)[3:])
    ordered = sorted(good, key=lambda d: float(np.dot(normal, np.array(
        d.ImagePositionPatient, dtype=float))))
    assert skip(ordered[:2] + ordered[3:]) == "uneven_spacing"  # a missing slice
    assert skip([*good, good[1]]) == "overlapping_planes"
    no_spacing = _series_datasets(series, "2062")
    del no_spacing[3].PixelSpacing
    assert skip(no_spacing) == "no_patient_geometry"
    enhanced = _series_datasets(series, "pdd_eCT_Supplemental.dcm")
    del enhanced[0].PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    assert skip(enhanced) == "no_patient_geometry"


def test_the_readme_explains_every_reason_code():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert [code for code, meaning in REASONS.items()
            if f"| `{code}` | {meaning} |" not in readme] == []
