"""The features job end to end: real CT + SEG, an RTSTRUCT, a NRRD label map, a real lake."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from catalog import open_lake
from etl import IngestConfig, ingest
from etl.errors import GeometryMismatchError
from etl.features import FeaturesConfig, compute_features
from etl.imagestats import series_stats
from etl.masks import read_mask_file
from etl.volumes import series_geometry
from lake_cli import main
from lakehouse import Lake
from tests.etl.features_data import (
    CT_SERIES,
    DCMQI,
    RT_COLS,
    RT_ROWS,
    SKIP_DCMQI,
    ct_headers,
    real_ct_volume,
    write_rtstruct,
)

needs_dcmqi = pytest.mark.skipif(not (DCMQI / "liver.dcm").is_file(), reason=SKIP_DCMQI)


@pytest.fixture(scope="module")
def feature_lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    src = root / "src"
    shutil.copytree(DCMQI / "ct-3slice", src / "ct")
    shutil.copy(DCMQI / "liver.dcm", src / "liver.dcm")
    shutil.copy(DCMQI / "partial_overlaps.dcm", src / "partial_overlaps.dcm")
    rt = write_rtstruct(src / "rtstruct.dcm", ct_headers())
    lake = Lake.create(root / "lake")  # a research lake: UIDs remapped, labels cleaned
    ingest(lake, src, IngestConfig(scheduler="synchronous"))
    ct = lake.read("instances", columns=["SeriesInstanceUID", "Modality"]).to_pylist()
    (ct_uid,) = {r["SeriesInstanceUID"] for r in ct if r["Modality"] == "CT"}
    assert ct_uid.startswith("2.25.") and ct_uid != CT_SERIES
    summary = compute_features(lake, FeaturesConfig(
        scheduler="processes", workers=2,
        mask_files=((ct_uid, str(DCMQI / "liver_seg.nrrd")),)))
    return root / "lake", summary, rt, ct_uid


@pytest.mark.slow  # about 35 s together: real 512 x 512 CT, eight segments
@needs_dcmqi
def test_summary(feature_lake):
    _, s, _, _ = feature_lake
    assert (s.series, s.volumes_ok, s.image_stats, s.masks) == (1, 1, 1, 4)
    # liver (1) + partial overlaps (5) + RTSTRUCT box (1) + NRRD liver (1)
    assert s.segments == 8
    assert s.feature_rows == 8 * 107
    assert s.failures == 0


@pytest.mark.slow  # about 35 s together: real 512 x 512 CT, eight segments
@needs_dcmqi
def test_tables(feature_lake):
    path, _, rt, ct_uid = feature_lake
    with open_lake(path) as cat:
        g = cat.df("SELECT * FROM series_geometry").iloc[0]
        assert g.SeriesInstanceUID == ct_uid
        assert (g.slice_count, g.Rows, g.Columns, g.orientation) == (3, 512, 512, "axial")
        assert g.row_spacing == 0.810547
        assert g.slice_spacing_median == 1.0
        assert bool(g.volume_ok) and list(g.issues) == []
        st = cat.df("SELECT * FROM image_stats").iloc[0]
        assert (st.units, st.status, st.instances_read, st.pixel_failures) == ("HU", "ok", 3, 0)
        assert st.voxel_count == 3 * 512 * 512
        assert (st.p01, st.p25, st.p50, st.p75, st.p99) == (-3024.0, -1024.0, -807.0, -13.0,
                                                              395.0)
        assert (st["min"], st["max"]) == (-3024.0, 1381.0)
        assert st.saturated_fraction == 0.0
        assert not st.burned_in_annotation
        seg = cat.df("""SELECT mask_source, segment_number, segment_label, voxel_count
                        FROM radiomics_wide ORDER BY mask_source, voxel_count""")
        assert seg.values.tolist() == [
            ["file:liver_seg.nrrd", 1, "1", 107098],
            ["rtstruct", 7, "Box", (RT_COLS[1] - RT_COLS[0]) * (RT_ROWS[1] - RT_ROWS[0]) * 3],
            ["seg", 5, seg.segment_label[2], 4713],
            ["seg", 4, seg.segment_label[3], 6693],
            ["seg", 1, seg.segment_label[4], 9602],
            ["seg", 3, seg.segment_label[5], 10743],
            ["seg", 2, seg.segment_label[6], 11888],
            ["seg", 1, "Liver", 107098],
        ]
        # the NRRD and the SEG of the liver are the same mask: the same features
        same = cat.df("""SELECT count(*) AS n FROM radiomics_features a JOIN radiomics_features b
                         USING (feature_class, feature_name)
                         WHERE a.mask_source = 'seg' AND a.segment_label = 'Liver'
                           AND b.mask_source = 'file:liver_seg.nrrd' AND a.value = b.value""")
        assert same.n[0] == 107
        box = cat.df("""SELECT "shape_VoxelVolume" AS v FROM radiomics_wide
                        WHERE mask_source = 'rtstruct'""")
        assert box.v[0] == pytest.approx(100 * 80 * 3 * 0.810547 ** 2 * 1.0, rel=1e-12)
        hashes = cat.df("SELECT DISTINCT param_hash, extractor_version FROM radiomics_features")
        assert len(hashes) == 1
        # privacy: the feature tables hold the lake's UIDs, never those inside the files
        originals = {CT_SERIES, rt.SOPInstanceUID, pydicom.dcmread(
            DCMQI / "liver.dcm", stop_before_pixels=True).SOPInstanceUID}
        for table in ("series_geometry", "image_stats", "radiomics_features",
                      "feature_failures"):
            text = cat.df(f"SELECT * FROM {table}").to_csv()
            assert not any(uid in text for uid in originals), table
        masks = cat.df("""SELECT DISTINCT mask_SOPInstanceUID AS u FROM radiomics_features
                          WHERE mask_SOPInstanceUID IS NOT NULL""").u.tolist()
        lake_masks = cat.df("""SELECT SOPInstanceUID AS u FROM instances
                               WHERE Modality IN ('SEG', 'RTSTRUCT')""").u.tolist()
        assert sorted(masks) == sorted(lake_masks) and len(masks) == 3


@pytest.mark.slow  # about 35 s together: real 512 x 512 CT, eight segments
@needs_dcmqi
def test_rerun_replaces_rows_of_the_series(feature_lake, tmp_path):
    dest = tmp_path / "lake"
    shutil.copytree(feature_lake[0], dest)
    s = compute_features(Lake.open(dest), FeaturesConfig(series=(feature_lake[3],),
                                                         scheduler="synchronous"))
    assert s.segments == 7  # without the mask file this time
    with open_lake(dest) as cat:
        assert cat.df("SELECT count(*) AS n FROM radiomics_features").n[0] == 7 * 107
        assert cat.df("SELECT count(*) AS n FROM series_geometry").n[0] == 1


@pytest.mark.slow  # about 35 s together: real 512 x 512 CT, eight segments
@needs_dcmqi
def test_geometry_mismatch_is_a_failure_row(feature_lake, tmp_path):
    img = sitk.ReadImage(str(DCMQI / "liver_seg.nrrd"))
    img.SetSpacing((0.8, 0.8, 1.0))
    bad = tmp_path / "bad.nrrd"
    sitk.WriteImage(img, str(bad))
    dest = tmp_path / "lake"
    shutil.copytree(feature_lake[0], dest)
    code = main(["features", "--lake", str(dest), "--scheduler", "synchronous",
                 "--mask-file", f"{feature_lake[3]}={bad}"])
    assert code == 0
    with open_lake(dest) as cat:
        f = cat.df("SELECT stage, reason, message FROM feature_failures")
    assert f.values.tolist()[0][:2] == ["mask", "geometry_mismatch"]
    assert "never resamples" in f.message[0]
    assert len(f) == 1


@needs_dcmqi
def test_mask_file_flipped_is_reindexed_not_resampled(tmp_path):
    rows = [{"SOPInstanceUID": h.SOPInstanceUID, "SeriesInstanceUID": h.SeriesInstanceUID,
             "ImagePositionPatient": [float(v) for v in h.ImagePositionPatient],
             "ImageOrientationPatient": [float(v) for v in h.ImageOrientationPatient],
             "PixelSpacing": [float(v) for v in h.PixelSpacing], "Rows": h.Rows,
             "Columns": h.Columns} for h in ct_headers()]
    geo = series_geometry(rows)
    original = read_mask_file(DCMQI / "liver_seg.nrrd", geo).segments[0].mask
    img = sitk.ReadImage(str(DCMQI / "liver_seg.nrrd"))
    flipped = sitk.Flip(img, [False, True, True])  # same grid, y and z reversed
    path = tmp_path / "flipped.nii.gz"
    sitk.WriteImage(flipped, str(path))
    again = read_mask_file(path, geo).segments[0].mask
    assert np.array_equal(original, again)
    shifted = sitk.ReadImage(str(DCMQI / "liver_seg.nrrd"))
    shifted.SetOrigin((-235.2, -226.8, -128.19))  # half a slice off
    sitk.WriteImage(shifted, str(tmp_path / "shifted.nrrd"))
    with pytest.raises(GeometryMismatchError, match="grid extent"):
        read_mask_file(tmp_path / "shifted.nrrd", geo)


@needs_dcmqi
def test_undecodable_pixels_are_recorded(tmp_path):
    from pydicom.data import get_testdata_file

    good = str(sorted((DCMQI / "ct-3slice").glob("*.dcm"))[0])
    bad = tmp_path / "bad.dcm"
    data = Path(good).read_bytes()
    bad.write_bytes(data[: len(data) - 1000])  # pixel data cut short
    row = series_stats("1.2.3", [("a", good), ("b", str(bad)), ("c", None)], "CT")
    assert (row["instances_read"], row["pixel_failures"], row["status"]) == (1, 2, "partial")
    assert row["failure_message"].startswith("b (transfer syntax 1.2.840.10008.1.2): ValueError")
    assert row["voxel_count"] == 512 * 512
    burned = tmp_path / "burned.dcm"
    ds = pydicom.dcmread(good)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(burned)
    row = series_stats("1.2.6", [("a", good), ("d", str(burned))], "CT")
    assert row["burned_in_annotation"] is True and row["status"] == "ok"
    assert series_stats("1.2.6", [("a", good)], "CT")["burned_in_annotation"] is False
    mono = get_testdata_file("US1_J2KR.dcm")  # colour JPEG 2000: not greyscale
    row = series_stats("1.2.4", [("u", mono)], "US")
    assert row["status"] == "failed" and row["voxel_count"] == 0


def test_compressed_transfer_syntaxes_give_the_same_statistics():
    from pydicom.data import get_testdata_file

    names = ["MR_small.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm",
             "MR_small_jpeg_ls_lossless.dcm"]
    rows = [series_stats("1.2.5", [("x", get_testdata_file(n))], "MR") for n in names]
    assert [r["status"] for r in rows] == ["ok"] * 4
    keys = ["voxel_count", "p01", "p50", "p99", "mean", "std", "noise_sigma",
            "saturated_fraction"]
    assert all({k: r[k] for k in keys} == {k: rows[0][k] for k in keys} for r in rows)
    assert (rows[0]["voxel_count"], rows[0]["p50"], rows[0]["units"]) == (64 * 64, 327.0,
                                                                          "stored")


@pytest.mark.slow  # about 35 s together: real 512 x 512 CT, eight segments
@needs_dcmqi
def test_cli_errors_are_one_line(feature_lake, tmp_path, capsys):
    bad = tmp_path / "p.yaml"
    bad.write_text("version: 1\nfeatureClass: {gldzm: []}\n")
    assert main(["features", "--lake", str(feature_lake[0]), "--params", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "implemented feature classes: firstorder, shape, glcm" in err[0]
    assert main(["features", "--lake", str(feature_lake[0]), "--series", "1.2.3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "series 1.2.3 is not an image series" in err[0]


@pytest.mark.slow  # pyradiomics on a 512 x 512 CT: about a minute
@needs_dcmqi
def test_every_feature_of_every_real_segment_agrees_with_pyradiomics(tmp_path):
    """The real CT with its two SEGs (6 segments) and an RTSTRUCT, all 107 features."""
    from etl.masks import read_rtstruct, read_seg
    from etl.radiomics import Params, extract
    from tests.etl.test_radiomics import assert_agree, pyradiomics_values

    headers, geo, image = real_ct_volume()
    write_rtstruct(tmp_path / "rt.dcm", headers)
    segments = (read_seg(DCMQI / "liver.dcm", geo).segments
                + read_seg(DCMQI / "partial_overlaps.dcm", geo).segments
                + read_rtstruct(tmp_path / "rt.dcm", geo).segments)
    assert len(segments) == 7
    params = Params.default()
    for seg in segments:
        assert_agree(extract(image, seg.mask, params),
                     pyradiomics_values(image, seg.mask, params))


def test_a_lake_made_before_the_feature_tables_gets_them(tmp_path):
    import json

    from lakehouse import layout

    lake = Lake.create(tmp_path / "lake")
    snap_path = layout.snapshot_path(lake.root, 0)
    snap = json.loads(snap_path.read_text())
    for name in ("series_geometry", "image_stats", "radiomics_features", "feature_failures"):
        del snap["versions"][name]
        shutil.rmtree(layout.table_path(lake.root, name))
    snap_path.write_text(json.dumps(snap))
    with open_lake(lake.root) as cat:  # an older lake reads as empty feature tables
        assert cat.df("SELECT count(*) AS n FROM radiomics_wide").n[0] == 0
    from lakehouse.verify import verify

    assert verify(lake).ok
    s = compute_features(lake, FeaturesConfig(scheduler="synchronous"))
    assert (s.series, s.feature_rows, s.snapshot) == (0, 0, 1)
    from lakehouse import audit

    assert [e["action"] for e in audit.read(lake.root)][-1] == "features"
    assert set(Lake.open(lake.root).snapshot().versions) >= {"radiomics_features",
                                                             "feature_failures"}


@needs_dcmqi
@pytest.mark.slow  # starts a distributed LocalCluster of two worker processes
def test_a_distributed_cluster_gives_the_same_rows(feature_lake, tmp_path):
    dest = tmp_path / "lake"
    shutil.copytree(feature_lake[0], dest)
    s = compute_features(Lake.open(dest), FeaturesConfig(
        scheduler="local-cluster", workers=2,
        mask_files=((feature_lake[3], str(DCMQI / "liver_seg.nrrd")),)))
    assert (s.segments, s.feature_rows, s.failures) == (8, 8 * 107, 0)
    query = """SELECT mask_source, segment_number, feature_class, feature_name, value
               FROM radiomics_features ORDER BY ALL"""
    with open_lake(feature_lake[0]) as a, open_lake(dest) as b:
        assert a.df(query).equals(b.df(query))


@needs_dcmqi
@pytest.mark.slow  # recomputes the real CT's seven segments
def test_features_of_a_saved_cohort(feature_lake, tmp_path, capsys):
    cohorts = pytest.importorskip("catalog.cohorts",
                                  reason="saved cohorts (catalog.cohorts) are not in this "
                                  "version of the lake")
    dest = tmp_path / "lake"
    shutil.copytree(feature_lake[0], dest)
    # a cohort with the CT and its SEG series: the SEGs have no image to compute
    cohorts.save(dest, "ct_and_seg", sql="SELECT SeriesInstanceUID FROM series "
                 "WHERE Modality IN ('CT', 'SEG')")
    assert main(["features", "--lake", str(dest), "--cohort", "ct_and_seg",
                 "--scheduler", "synchronous"]) == 0
    assert "1 series (1 regular volumes" in capsys.readouterr().out


def test_cohort_option_without_saved_cohorts(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("catalog.cohorts") is not None:
        pytest.skip("this version has saved cohorts: test_features_of_a_saved_cohort runs")
    Lake.create(tmp_path / "lake", profile="identified")
    assert main(["features", "--lake", str(tmp_path / "lake"), "--cohort", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cohort needs saved cohorts" in err[0]


@needs_dcmqi
def test_a_malformed_rtstruct_is_a_failure_row_not_a_crash(tmp_path):
    from etl.features import SeriesTask, process_series
    from etl.radiomics import Params

    headers = ct_headers()
    files = sorted((DCMQI / "ct-3slice").glob("*.dcm"))
    rows = [{"SOPInstanceUID": h.SOPInstanceUID, "SeriesInstanceUID": h.SeriesInstanceUID,
             "Modality": "CT", "ImagePositionPatient": [float(v) for v in h.ImagePositionPatient],
             "ImageOrientationPatient": [float(v) for v in h.ImageOrientationPatient],
             "PixelSpacing": [float(v) for v in h.PixelSpacing], "Rows": h.Rows,
             "Columns": h.Columns} for h in headers]
    rt = write_rtstruct(tmp_path / "rt.dcm", headers)
    rt.ROIContourSequence[0].ContourSequence[0].ContourData = ["1.0", "2.0", "3.0", "4.0"]
    rt.save_as(tmp_path / "rt.dcm", enforce_file_format=True)
    task = SeriesTask("2.25.1", rows, {h.SOPInstanceUID: str(p) for h, p in
                                       zip(headers, files, strict=True)},
                      [("rtstruct", "2.25.2", str(tmp_path / "rt.dcm")),
                       ("seg", "2.25.3", str(DCMQI / "liver.dcm"))])
    out = process_series(task, Params.from_dict({"version": 1,
                                                 "featureClass": {"firstorder": ["Mean"]}}))
    (failure,) = out["feature_failures"]
    assert (failure["stage"], failure["reason"], failure["mask_SOPInstanceUID"]) == (
        "mask", "unsupported_mask", "2.25.2")
    assert "ValueError" in failure["message"]
    # the other mask of the series is still computed
    assert [(r["mask_SOPInstanceUID"], r["feature_name"]) for r in out["radiomics_features"]] \
        == [("2.25.3", "Mean")]


def test_an_unexpected_error_in_one_series_is_recorded_and_the_batch_goes_on():
    from etl.features import SeriesTask, process_batch
    from etl.radiomics import Params

    broken = SeriesTask("2.25.9", [], {}, [])  # no instance rows at all
    empty = SeriesTask("2.25.10", [{"SOPInstanceUID": "2.25.11", "Modality": "OT"}], {}, [])
    out = process_batch([broken, empty], Params.default())
    (failure,) = out["feature_failures"]
    assert (failure["SeriesInstanceUID"], failure["reason"]) == ("2.25.9", "feature_error")
    assert failure["message"].startswith("IndexError")
    assert [r["SeriesInstanceUID"] for r in out["series_geometry"]] == ["2.25.10"]
    assert out["series_geometry"][0]["issues"] == ["no_geometry"]
    assert out["image_stats"][0]["status"] == "failed"


@needs_dcmqi
def test_a_source_file_replaced_since_ingest_is_a_failure_not_its_pixels(tmp_path, caplog):
    """The features read each source file again, long after the ingest: one replaced
    since by another instance (here the next slice) is never read as the first. Its
    image statistics count it as a failure, the volume cannot be built (the RTSTRUCT's
    segment is not computed); a replaced mask is left out."""
    src = tmp_path / "src"
    shutil.copytree(DCMQI / "ct-3slice", src / "ct")
    write_rtstruct(src / "rtstruct.dcm", ct_headers())
    lake = Lake.create(tmp_path / "lake")
    ingest(lake, src, IngestConfig(scheduler="synchronous"))
    from etl.radiomics import Params

    config = FeaturesConfig(scheduler="synchronous", params=Params.from_dict({
        "version": 1, "featureClass": {"firstorder": ["Mean"]}}))
    assert compute_features(lake, config).feature_rows == 1  # as ingested: all good
    slices = sorted((src / "ct").glob("*.dcm"))
    shutil.copy(slices[1], slices[0])
    s = compute_features(Lake.open(tmp_path / "lake"), config)
    assert (s.image_stats, s.feature_rows, s.failures) == (1, 0, 1)
    with open_lake(tmp_path / "lake") as cat:
        stats = cat.df("SELECT instances_read, pixel_failures, status, failure_message "
                       "FROM image_stats").iloc[0]
        (failure,) = cat.df("SELECT stage, reason, message FROM feature_failures"
                            ).values.tolist()
    assert (stats.instances_read, stats.pixel_failures, stats.status) == (2, 1, "partial")
    assert stats.failure_message.endswith(": the source file changed since it was ingested "
                                          "(its size or checksum differs): ingest its folder "
                                          "again")
    assert failure[:2] == ["volume", "source_changed"]
    assert "ingest its folder again" in failure[2]
    # the slice put back, the mask replaced (by a SEG of another series): which series
    # it belongs to is no longer known, so it is left out, with a warning and a failure
    # row of no series
    shutil.copy(DCMQI / "ct-3slice" / slices[0].name, slices[0])
    shutil.copy(DCMQI / "liver.dcm", src / "rtstruct.dcm")
    with caplog.at_level(logging.WARNING, logger="etl.features"):
        s = compute_features(Lake.open(tmp_path / "lake"), config)
    assert (s.masks, s.feature_rows, s.failure_reasons) == (0, 0, {"source_changed": 1})
    assert "the source file changed since it was ingested" in caplog.text
    with open_lake(tmp_path / "lake") as cat:
        assert cat.df("SELECT pixel_failures FROM image_stats").pixel_failures[0] == 0
        (failure,) = cat.con.execute("SELECT SeriesInstanceUID, stage, reason, message "
                                     "FROM feature_failures").fetchall()
    assert failure[:3] == (None, "mask", "source_changed")
    assert failure[3].startswith("cannot read the mask's header: the source file changed")


@needs_dcmqi
def test_a_mask_changed_after_the_plan_is_a_failure(tmp_path):
    """A mask file that changes between the plan (which read its header) and its
    placement: a ``source_changed`` failure of the mask, from either reader."""
    from etl.errors import FeatureError
    from etl.masks import read_rtstruct, read_seg
    from etl.sourcefiles import Source

    headers = ct_headers()
    geo = series_geometry([{
        "SOPInstanceUID": h.SOPInstanceUID, "SeriesInstanceUID": h.SeriesInstanceUID,
        "ImagePositionPatient": [float(v) for v in h.ImagePositionPatient],
        "ImageOrientationPatient": [float(v) for v in h.ImageOrientationPatient],
        "PixelSpacing": [float(v) for v in h.PixelSpacing], "Rows": h.Rows,
        "Columns": h.Columns} for h in headers])
    write_rtstruct(tmp_path / "rt.dcm", headers)
    for reader, path in ((read_seg, DCMQI / "liver.dcm"), (read_rtstruct, tmp_path / "rt.dcm")):
        assert reader(str(path), geo).segments  # as a plain path: read
        recorded = Source(str(path), "0" * 64, None, path.stat().st_size)  # another sum
        with pytest.raises(FeatureError) as err:
            reader(recorded, geo)
        assert err.value.reason == "source_changed"
