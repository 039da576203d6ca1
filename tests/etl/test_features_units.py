"""The features job's units of work: (series, segment), exactly once per parameter set.

A small lake of two CT series written here (40 x 48 and 32 x 32 voxels) with
an RTSTRUCT of three boxes on the first and one on the second: four units.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from catalog import open_lake
from etl import IngestConfig, ingest
from etl.features import (
    FeaturesConfig,
    SegmentUnit,
    compute_features,
    segment_batches,
)
from etl.masks import MaskSet, Segment
from etl.radiomics import FEATURE_CLASSES, Params
from lakehouse import Lake
from lakehouse.tables import add_actions

N_FEATURES = sum(len(v) for v in FEATURE_CLASSES.values())
RESAMPLED = Params.from_dict({"version": 1, "setting": {"resampledPixelSpacing": [1, 1, 1]},
                              "featureClass": dict.fromkeys(FEATURE_CLASSES)})
ROWS_QUERY = """SELECT SeriesInstanceUID, mask_source, segment_number, feature_class,
                       feature_name, value, param_hash
                FROM radiomics_features ORDER BY ALL"""


def write_ct(folder: Path, seed: int, slices: int, rows: int, columns: int,
             spacing: tuple[float, float, float]) -> list[Dataset]:
    """A CT series of ``slices`` files with noisy HU values (int16 stored, intercept -1024)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame
        ds.PatientID, ds.PatientName = f"P{seed}", f"Phantom^{seed}"
        ds.StudyDate, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "20240102", "CT", 1, k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-20.0, -15.0, 7.5 + k * spacing[0]]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ramp = np.linspace(0, 400, columns)[None, :]
        pixels = rng.normal(1064, 60, size=(rows, columns)) + ramp
        ds.PixelData = np.round(pixels).astype(np.int16).tobytes()
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
        out.append(ds)
    return out


def write_boxes(path: Path, cts: list[Dataset], boxes: dict[int, tuple]) -> None:
    """An RTSTRUCT with one ROI per box: {ROI number: (first slice, last slice, c0, c1, r0, r1)}."""
    ref = cts[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ref.StudyInstanceUID, generate_uid()
    ds.FrameOfReferenceUID = ref.FrameOfReferenceUID
    ds.PatientID, ds.PatientName, ds.StudyDate = ref.PatientID, ref.PatientName, ref.StudyDate
    ds.Modality, ds.StructureSetLabel = "RTSTRUCT", "boxes"
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = ref.SeriesInstanceUID
    study_ref = Dataset()
    study_ref.ReferencedSOPInstanceUID = ref.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = [series_ref]
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = ref.FrameOfReferenceUID
    frame_ref.RTReferencedStudySequence = [study_ref]
    ds.ReferencedFrameOfReferenceSequence = [frame_ref]
    rois, roi_contours = [], []
    for number, (k0, k1, c0, c1, r0, r1) in boxes.items():
        roi = Dataset()
        roi.ROINumber, roi.ROIName = number, f"box{number}"
        roi.ReferencedFrameOfReferenceUID = ref.FrameOfReferenceUID
        rois.append(roi)
        contours = []
        for ct in cts[k0:k1 + 1]:
            x0, y0, z = (float(v) for v in ct.ImagePositionPatient)
            rs, cs = (float(v) for v in ct.PixelSpacing)
            pts = [(c0 - 0.5, r0 - 0.5), (c1 - 0.5, r0 - 0.5), (c1 - 0.5, r1 - 0.5),
                   (c0 - 0.5, r1 - 0.5)]
            c = Dataset()
            c.ContourGeometricType, c.NumberOfContourPoints = "CLOSED_PLANAR", 4
            c.ContourData = [f"{v:.6f}" for col, row in pts
                             for v in (x0 + col * cs, y0 + row * rs, z)]
            contours.append(c)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ContourSequence = contours
        roi_contours.append(rc)
    ds.StructureSetROISequence = rois
    ds.ROIContourSequence = roi_contours
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def small_lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("units")
    src = root / "src"
    a = write_ct(src / "a", 1, 10, 40, 48, (2.5, 0.8, 0.7))
    b = write_ct(src / "b", 2, 6, 32, 32, (2.0, 0.9, 0.9))
    write_boxes(src / "rt_a.dcm", a, {1: (2, 7, 5, 20, 6, 18), 2: (1, 4, 25, 40, 20, 34),
                                      3: (5, 8, 30, 44, 3, 12)})
    write_boxes(src / "rt_b.dcm", b, {4: (1, 4, 8, 24, 8, 24)})
    lake = Lake.create(root / "lake")
    ingest(lake, src, IngestConfig(scheduler="synchronous"))
    return root / "lake"


def copy(lake: Path, tmp_path: Path) -> Lake:
    dest = tmp_path / "lake"
    shutil.copytree(lake, dest)
    return Lake.open(dest)


def test_one_task_per_segment_and_one_volume_read_per_series(small_lake, tmp_path):
    lake = copy(small_lake, tmp_path)
    s = compute_features(lake, FeaturesConfig(scheduler="synchronous", batch_segments=1))
    assert (s.series, s.masks, s.segments, s.failures) == (2, 2, 4, 0)
    assert s.segment_tasks == 4  # one per (series, segment), not one per series
    assert s.volume_loads == 2  # the units of a series share the volume read for the first
    assert s.feature_rows == 4 * N_FEATURES
    with open_lake(lake.root) as cat:
        boxes = cat.df("""SELECT segment_label, voxel_count FROM radiomics_wide
                          ORDER BY segment_label""").values.tolist()
    assert boxes == [["box1", 6 * 15 * 12], ["box2", 4 * 15 * 14], ["box3", 4 * 14 * 9],
                     ["box4", 4 * 16 * 16]]


def test_rerun_and_a_second_parameter_set_are_each_kept_once(small_lake, tmp_path):
    lake = copy(small_lake, tmp_path)
    default = Params.default()
    for params in (default, RESAMPLED, default):
        compute_features(lake, FeaturesConfig(scheduler="synchronous", params=params))
    with open_lake(lake.root) as cat:
        counts = cat.df("""SELECT param_hash, count(*) AS n,
                                  count(DISTINCT features_run_id) AS runs
                           FROM radiomics_features GROUP BY ALL ORDER BY ALL""")
        assert sorted(counts.param_hash) == sorted([default.hash, RESAMPLED.hash])
        assert counts.n.tolist() == [4 * N_FEATURES, 4 * N_FEATURES]
        assert counts.runs.tolist() == [1, 1]
        assert cat.df("SELECT count(*) AS n FROM radiomics_wide").n[0] == 8
        dup = cat.df("""SELECT count(*) AS n FROM (
                            SELECT SeriesInstanceUID, mask_SOPInstanceUID, segment_number,
                                   feature_class, feature_name, param_hash
                            FROM radiomics_features GROUP BY ALL HAVING count(*) > 1)""")
        assert dup.n[0] == 0
        assert cat.df("SELECT count(*) AS n FROM series_geometry").n[0] == 2
        # the resampled grid (1 mm) and the image grid see different volumes of box 1
        vol = cat.df("""SELECT param_hash, shape_VoxelVolume AS v FROM radiomics_wide
                        WHERE segment_label = 'box1'""")
    by_hash = dict(zip(vol.param_hash, vol.v, strict=True))
    assert by_hash[default.hash] == pytest.approx(6 * 15 * 12 * 2.5 * 0.8 * 0.7, rel=1e-9)
    assert by_hash[RESAMPLED.hash] != by_hash[default.hash]
    # each run rewrites the feature tables whole: no small files left for compaction
    for name in ("series_geometry", "image_stats", "radiomics_features", "feature_failures"):
        assert add_actions(lake.delta(name)).num_rows <= 1, name
    assert add_actions(lake.delta("radiomics_features")).num_rows == 1


def test_the_process_scheduler_gives_the_same_rows(small_lake, tmp_path):
    one = copy(small_lake, tmp_path / "one")
    two = copy(small_lake, tmp_path / "two")
    compute_features(one, FeaturesConfig(scheduler="synchronous", params=RESAMPLED))
    s = compute_features(two, FeaturesConfig(scheduler="processes", workers=2,
                                             params=RESAMPLED, batch_segments=1))
    assert (s.segment_tasks, s.segments, s.failures) == (4, 4, 0)
    # each worker process reads a series at most once for its units
    assert 2 <= s.volume_loads <= 4
    with open_lake(one.root) as a, open_lake(two.root) as b:
        assert a.df(ROWS_QUERY).equals(b.df(ROWS_QUERY))


@pytest.mark.slow  # starts a distributed LocalCluster of two worker processes
def test_a_local_cluster_gives_the_same_rows(small_lake, tmp_path):
    one = copy(small_lake, tmp_path / "one")
    two = copy(small_lake, tmp_path / "two")
    compute_features(one, FeaturesConfig(scheduler="synchronous"))
    s = compute_features(two, FeaturesConfig(scheduler="local-cluster", workers=2,
                                             batch_segments=2))
    assert (s.segment_tasks, s.segments, s.failures) == (2, 4, 0)
    with open_lake(one.root) as a, open_lake(two.root) as b:
        assert a.df(ROWS_QUERY).equals(b.df(ROWS_QUERY))


def test_units_are_small_and_rebuild_the_mask():
    mask = np.zeros((9, 40, 50), dtype=bool)
    mask[2:5, 10:30, 7:9] = True
    mask[3, 12, 40] = True
    unit = SegmentUnit.of("2.25.1", MaskSet("seg", "2.25.2"), Segment(3, "x", mask))
    assert (unit.offset, unit.box_shape, unit.voxel_count) == ((2, 10, 7), (3, 20, 34), 121)
    assert len(unit.bits) == (3 * 20 * 34 + 7) // 8
    assert np.array_equal(unit.mask(mask.shape), mask)


def test_batches_follow_series_order_and_split_big_series():
    def unit(series, n):
        return SegmentUnit(series, "m", "seg", n, str(n), 1, (0, 0, 0), (1, 1, 1), b"\x80")

    units = [unit("b", 2), unit("a", 1), unit("b", 1), unit("c", 1), unit("b", 3)]
    batches = segment_batches(units, 2)
    assert [[(u.series_uid, u.number) for u in b] for b in batches] == [
        [("a", 1), ("b", 1)], [("b", 2), ("b", 3)], [("c", 1)]]
    assert len(segment_batches(units, 0)) == 5


def test_filtered_image_features_are_rows_named_as_in_pyradiomics(small_lake, tmp_path):
    lake = copy(small_lake, tmp_path)
    params = Params.from_dict({"version": 1, "imageType": {"Original": {}, "LoG": {"sigma": [1.5]},
                                                            "Wavelet": {}},
                               "featureClass": {"firstorder": ["Mean"]}})
    s = compute_features(lake, FeaturesConfig(scheduler="synchronous", params=params))
    assert (s.segments, s.feature_rows, s.failures) == (4, 4 * (1 + 1 + 8), 0)
    with open_lake(lake.root) as cat:
        classes = cat.df("""SELECT feature_class, feature_name, count(*) AS n
                            FROM radiomics_features GROUP BY ALL ORDER BY ALL""")
        wide = cat.df("SELECT firstorder_Mean FROM radiomics_wide")
    bands = ["HHH", "HHL", "HLH", "HLL", "LHH", "LHL", "LLH", "LLL"]
    assert classes.values.tolist() == (
        [["firstorder", "Mean", 4], ["log-sigma-1-5-mm-3D_firstorder", "Mean", 4]]
        + [[f"wavelet-{b}_firstorder", "Mean", 4] for b in bands])
    assert wide.firstorder_Mean.notna().sum() == 4  # the wide view holds the original image's


def test_a_volume_that_cannot_be_read_is_a_failure_row_per_unit(tmp_path):
    from etl.features import VolumeSource, compute_segments
    from etl.volumes import series_geometry

    cts = write_ct(tmp_path / "ct", 5, 4, 8, 8, (1.0, 1.0, 1.0))
    files = sorted((tmp_path / "ct").glob("*.dcm"))
    rows = [{"SOPInstanceUID": c.SOPInstanceUID, "ImagePositionPatient":
             [float(v) for v in c.ImagePositionPatient], "ImageOrientationPatient":
             [float(v) for v in c.ImageOrientationPatient], "PixelSpacing":
             [float(v) for v in c.PixelSpacing], "Rows": 8, "Columns": 8} for c in cts]
    geo = series_geometry(rows, "2.25.1")
    paths = {c.SOPInstanceUID: str(f) for c, f in zip(cts, files, strict=True)}
    files[2].write_bytes(files[2].read_bytes()[:-100])  # pixel data cut short
    mask = np.zeros(geo.shape, dtype=bool)
    mask[1:3, 2:6, 2:6] = True
    units = [SegmentUnit.of("2.25.1", MaskSet("seg", "2.25.2"), Segment(n, str(n), mask))
             for n in (1, 2)]
    out = compute_segments(units, {"2.25.1": VolumeSource("2.25.1", geo, paths)},
                           Params.default(), "run")
    assert out.rows["radiomics_features"] == [] and out.volume_loads == 0
    assert [(f["stage"], f["reason"], f["mask_SOPInstanceUID"])
            for f in out.rows["feature_failures"]] == [("volume", "pixel_decode", "2.25.2")] * 2
    assert f"cannot decode pixels of {cts[2].SOPInstanceUID}" in \
        out.rows["feature_failures"][0]["message"]


def test_cli_with_a_resampling_parameter_file(small_lake, tmp_path, capsys):
    from lake_cli import main

    lake = copy(small_lake, tmp_path)
    params = tmp_path / "resampled.yaml"
    params.write_text("version: 1\n"
                      "setting: {resampledPixelSpacing: [1, 1, 0], interpolator: sitkLinear}\n"
                      "imageType: {Original: {}, LoG: {sigma: [1.0]}}\n"
                      "featureClass: {firstorder: [Mean, Variance]}\n")
    assert main(["features", "--lake", str(lake.root), "--params", str(params),
                 "--scheduler", "synchronous"]) == 0
    out = capsys.readouterr().out
    assert "4 segments (4 tasks, 2 volume reads), 16 feature values, 0 failures" in out
    with open_lake(lake.root) as cat:
        hashes = cat.df("SELECT DISTINCT param_hash FROM radiomics_features").param_hash
    assert hashes.tolist() == [Params.load(params).hash]
    params.write_text("version: 1\nsetting: {resampledPixelSpacing: [1, 1]}\n"
                      "featureClass: {firstorder: []}\n")
    assert main(["features", "--lake", str(lake.root), "--params", str(params)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resampledPixelSpacing" in err[0] and "too short" in err[0]


def test_the_cached_normalized_volume_gives_what_extract_gives(small_lake, tmp_path):
    from etl.features import plan
    from etl.masks import read_rtstruct
    from etl.radiomics import extract
    from etl.volumes import load_volume, series_geometry

    lake = copy(small_lake, tmp_path)
    params = Params.from_dict({"version": 1, "setting": {
        "normalize": True, "normalizeScale": 100, "removeOutliers": 2, "binWidth": 5},
        "featureClass": {"firstorder": ["Mean", "Entropy"], "glcm": ["Contrast"]}})
    compute_features(lake, FeaturesConfig(scheduler="synchronous", params=params))
    with open_lake(lake.root) as cat:
        got = {(r.segment_label, r.feature_class, r.feature_name): r.value for r in cat.df(
            "SELECT segment_label, feature_class, feature_name, value FROM radiomics_features"
        ).itertuples()}
    expected = {}
    for task in plan(lake, FeaturesConfig()):
        geo = series_geometry(task.rows, task.series_uid)
        image = load_volume(geo, task.paths)
        for _kind, _uid, path in task.masks:
            for seg in read_rtstruct(path, geo).segments:
                for (cls, name), value in extract(image, seg.mask, params).items():
                    expected[(seg.label, cls, name)] = value
    assert len(expected) == 4 * 3 and got == expected
