"""Masks in Part 10 files without the 128-byte preamble and DICM prefix (pydicom ships
such files; the ingest accepts them): features find and place them like any other, where
they had been skipped with a warning ("cannot read its header")."""

import shutil

import pytest

from etl import IngestConfig, ingest
from etl.features import FeaturesConfig, compute_features, plan
from lakehouse import Lake
from tests.etl.features_data import DCMQI, SKIP_DCMQI, ct_headers, write_rtstruct

needs_dcmqi = pytest.mark.skipif(not (DCMQI / "liver.dcm").is_file(), reason=SKIP_DCMQI)


def _without_preamble(path):
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    path.write_bytes(data[132:])


@needs_dcmqi
def test_masks_without_a_preamble_are_placed(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(DCMQI / "ct-3slice", src / "ct")
    write_rtstruct(src / "rtstruct.dcm", ct_headers())
    _without_preamble(src / "rtstruct.dcm")
    shutil.copy(DCMQI / "liver.dcm", src / "liver.dcm")
    _without_preamble(src / "liver.dcm")
    _without_preamble(sorted((src / "ct").glob("*.dcm"))[1])  # an image too
    lake = Lake.create(tmp_path / "lake", profile="identified")
    summary = ingest(lake, src, IngestConfig(scheduler="synchronous"))
    assert summary.outcomes["ingested"] == 5
    (task,) = plan(lake, FeaturesConfig())
    assert sorted(kind for kind, _uid, _path in task.masks) == ["rtstruct", "seg"]
    done = compute_features(lake, FeaturesConfig(scheduler="synchronous"))
    assert (done.masks, done.failures) == (2, 0)
    assert done.segments > 1 and done.feature_rows > 0
    assert (done.volumes_ok, done.image_stats) == (1, 1)
