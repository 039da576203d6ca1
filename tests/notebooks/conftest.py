"""A lake with image features for the radiomics notebook: the session lake, copied, with
threshold label maps on its CT volumes run through the features job."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from etl.features import FeaturesConfig, compute_features, plan
from etl.radiomics import Params
from etl.volumes import load_volume, series_geometry
from lakehouse import Lake

#: label values of the threshold masks: soft tissue and dense (bone, contrast)
SOFT, DENSE = 1, 2


def threshold_masks(lake: Lake, folder: Path) -> list[tuple[str, str]]:
    """One NRRD label map per regular CT volume: soft tissue (-100..100 HU) and > 300 HU."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for task in plan(lake, FeaturesConfig()):
        if task.rows[0].get("Modality") != "CT" or len(task.rows) < 3:
            continue
        geo = series_geometry(task.rows, task.series_uid)
        if not geo.volume_ok:
            continue
        image = load_volume(geo, task.paths)
        hu = sitk.GetArrayFromImage(image)
        label = np.zeros(hu.shape, dtype=np.uint8)
        label[(hu > -100) & (hu < 100)] = SOFT
        label[hu > 300] = DENSE
        mask = sitk.GetImageFromArray(label)
        mask.CopyInformation(image)
        path = folder / f"{task.series_uid}.nrrd"
        sitk.WriteImage(mask, str(path), True)
        out.append((task.series_uid, str(path)))
    return out


@pytest.fixture(scope="session")
def features_lake(built_lake, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("features-lake")
    dest = root / "lake"
    shutil.copytree(built_lake[0], dest, symlinks=True)
    lake = Lake.open(dest)
    masks = threshold_masks(lake, root / "masks")
    series = tuple(uid for uid, _ in masks)
    compute_features(lake, FeaturesConfig(series=series, mask_files=tuple(masks),
                                          scheduler="processes", workers=2))
    # a second parameter set beside the default one: first order on a 2 mm grid
    resampled = Params.from_dict({"version": 1, "setting": {"resampledPixelSpacing": [2, 2, 2]},
                                  "featureClass": {"firstorder": []}}, "resampled-2mm")
    again = compute_features(lake, FeaturesConfig(series=series, mask_files=tuple(masks),
                                                  params=resampled, scheduler="processes",
                                                  workers=2))
    assert again.feature_rows == again.segments * 18 > 0
    return dest
