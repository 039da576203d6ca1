"""Resampling, interpolation and normalization of the extractor, against pyradiomics.

Every feature (107) agrees with pyradiomics 3.0.1 given the same settings
within a relative 1e-4, on phantoms (fast) and on the real CT + SEG (slow).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from etl.radiomics import FEATURE_CLASSES, Params, ParamsError, extract
from etl.radiomics.preprocess import resample
from tests.etl.features_data import DCMQI, SKIP_DCMQI, sphere
from tests.etl.test_radiomics import (
    PYRADIOMICS_MISSING,
    assert_agree,
    image_of,
    noisy_phantom,
    pyradiomics_values,
)

ALL = dict.fromkeys(FEATURE_CLASSES)


def params_of(setting: dict) -> Params:
    return Params.from_dict({"version": 1, "setting": setting, "featureClass": ALL})


SETTINGS = [
    # resampling: B-spline (the default interpolator), linear, nearest; 0 keeps an axis
    {"resampledPixelSpacing": [1, 1, 1]},
    {"resampledPixelSpacing": [1, 1, 1], "interpolator": "sitkLinear", "binWidth": 10},
    {"resampledPixelSpacing": [0.5, 0, 2], "interpolator": "sitkNearestNeighbor"},
    {"resampledPixelSpacing": [2, 2, 2], "padDistance": 0, "binCount": 8},
    # spacing equal to the image's: nothing interpolated
    {"resampledPixelSpacing": [0.7, 0.8, 2.5]},
    # normalization with outlier clipping, with and without resampling; bin count
    {"normalize": True, "normalizeScale": 100, "removeOutliers": 2, "binCount": 32},
    {"normalize": True, "removeOutliers": 1.5, "binWidth": 0.1, "preCrop": True},
    {"resampledPixelSpacing": [1, 1, 1], "normalize": True, "normalizeScale": 100,
     "removeOutliers": 2, "binCount": 32, "padDistance": 2},
]


@pytest.mark.parametrize("setting", SETTINGS, ids=[str(i) for i in range(len(SETTINGS))])
def test_agrees_with_pyradiomics_on_a_ragged_phantom(setting):
    spacing = (2.5, 0.8, 0.7)
    arr, mask = noisy_phantom(1, (14, 40, 44), spacing)
    image = image_of(arr, spacing)
    params = params_of(setting)
    assert_agree(extract(image, mask, params), pyradiomics_values(image, mask, params))


def test_bspline_block_around_a_small_region_gives_pyradiomics_voxels():
    """The lake interpolates a block around the region, pyradiomics the whole image."""
    imageoperations = pytest.importorskip("radiomics.imageoperations", reason=PYRADIOMICS_MISSING)
    spacing = (2.5, 0.8, 0.7)
    shape = (40, 140, 150)
    rng = np.random.default_rng(3)
    image = image_of(np.round(rng.normal(40, 300, size=shape)), spacing)
    mask = sphere(shape, (20, 70, 75), 8.0, spacing)
    setting = {"resampledPixelSpacing": [1, 1, 1], "interpolator": "sitkBSpline"}
    grid_image, region, new_spacing = resample(image, mask, setting)
    grid = sitk.GetArrayFromImage(grid_image)
    m = sitk.GetImageFromArray(mask.astype(np.uint8))
    m.CopyInformation(image)
    ref_image, ref_mask = imageoperations.resampleImage(image, m, **setting)
    assert new_spacing == (1.0, 1.0, 1.0)
    assert grid.shape == sitk.GetArrayViewFromImage(ref_image).shape == (29, 29, 28)
    assert np.array_equal(grid, sitk.GetArrayFromImage(ref_image))
    assert np.array_equal(region, sitk.GetArrayFromImage(ref_mask) > 0)
    params = params_of(setting)
    assert_agree(extract(image, mask, params), pyradiomics_values(image, mask, params))


#: the cube's indicator along one axis at the 1 mm voxel centres, linearly interpolated:
#: the output centres sit 0.5 and 1.5 mm inside the 2 mm ramps at each end
PROFILE = np.array([0.25, 0.75] + [1.0] * 8 + [0.75, 0.25])


@pytest.mark.parametrize(("interpolator", "threshold", "voxels"), [
    ("sitkNearestNeighbor", None, 10 ** 3),  # the cube's 10 mm edges
    ("sitkLinear", 0.2, 1384),   # 10^3 + the face layers at 0.25 (3 x 2 x 8 x 8)
    ("sitkLinear", 0.5, 992),    # 8^3 + faces at 0.75 (3 x 2 x 64) + edges at 0.5625 (3 x 4 x 8)
    ("sitkLinear", 0.8, 8 ** 3),
])
def test_region_interpolation_on_a_cube(interpolator, threshold, voxels):
    """A cube of 5 voxels of 2 mm, resampled to 1 mm.

    pyradiomics' grid puts the output voxel centres 0.5 mm off the input ones.
    Nearest neighbour keeps the cube's 10 mm; linear interpolation gives each
    output voxel the product of the per-axis values of PROFILE, kept at or
    above the threshold.
    """
    shape = (12, 12, 12)
    mask = np.zeros(shape, dtype=bool)
    mask[2:7, 3:8, 4:9] = True
    image = image_of(np.full(shape, 7.0), (2.0, 2.0, 2.0))
    setting: dict = {"resampledPixelSpacing": [1, 1, 1], "maskInterpolator": interpolator}
    if threshold is not None:
        setting["maskPartialVolumeThreshold"] = threshold
        product = PROFILE[:, None, None] * PROFILE[None, :, None] * PROFILE[None, None, :]
        assert int(np.count_nonzero(product >= threshold)) == voxels
    v = extract(image, mask, params_of(setting))
    assert v[("shape", "VoxelVolume")] == voxels
    assert v[("firstorder", "Mean")] == pytest.approx(7.0, abs=1e-5)


def test_resampling_settings_are_validated():
    def bad(setting, match):
        with pytest.raises(ParamsError, match=match):
            params_of(setting)

    bad({"resampledPixelSpacing": [1, 1]}, r"resampledPixelSpacing.*too short")
    bad({"resampledPixelSpacing": [1, -1, 1]}, r"resampledPixelSpacing/1.*minimum")
    bad({"interpolator": "sitkCubic"}, r"interpolator.*is not one of")
    bad({"maskInterpolator": "sitkBSpline"}, r"maskInterpolator.*is not one of")
    bad({"maskPartialVolumeThreshold": 1.5}, r"maskPartialVolumeThreshold.*maximum")
    bad({"padDistance": -1}, r"padDistance.*minimum")
    bad({"removeOutliers": 0}, r"removeOutliers.*less than or equal to the minimum")
    ok = params_of({"resampledPixelSpacing": [1, 1, 0], "maskInterpolator": "sitkLinear"})
    assert ok.hash != params_of({"resampledPixelSpacing": [1, 1, 0]}).hash
    with pytest.raises(ParamsError, match="pyradiomics resamples the region by nearest"):
        ok.pyradiomics_settings()


def test_a_region_lost_by_resampling_is_an_error():
    shape = (8, 12, 12)
    mask = np.zeros(shape, dtype=bool)
    # 2 x 2 x 2 voxels of 1 mm: the 4 mm voxel centres nearest them see 0.5 along each
    # axis, 0.125 together, below the 0.8 threshold
    mask[2:4, 6:8, 6:8] = True
    image = image_of(np.ones(shape), (1.0, 1.0, 1.0))
    params = params_of({"resampledPixelSpacing": [4, 4, 4], "maskInterpolator": "sitkLinear",
                        "maskPartialVolumeThreshold": 0.8})
    with pytest.raises(ValueError, match="no voxel on the resampled grid"):
        extract(image, mask, params)


@pytest.mark.slow  # pyradiomics on a 512 x 512 CT, three settings, three segments
@pytest.mark.skipif(not (DCMQI / "liver.dcm").is_file(), reason=SKIP_DCMQI)
@pytest.mark.parametrize("setting", [
    {"resampledPixelSpacing": [1, 1, 1]},
    {"resampledPixelSpacing": [0.6, 0.6, 0], "interpolator": "sitkLinear", "binCount": 32},
    {"normalize": True, "normalizeScale": 100, "removeOutliers": 3, "binWidth": 5,
     "resampledPixelSpacing": [1.5, 1.5, 1], "padDistance": 1},
])
def test_every_feature_of_real_segments_agrees_with_pyradiomics_when_resampled(setting):
    from etl.masks import read_seg
    from tests.etl.features_data import real_ct_volume

    _, geo, image = real_ct_volume()
    segments = (read_seg(DCMQI / "liver.dcm", geo).segments
                + read_seg(DCMQI / "partial_overlaps.dcm", geo).segments[:2])
    params = params_of(setting)
    for seg in segments:
        assert_agree(extract(image, seg.mask, params),
                     pyradiomics_values(image, seg.mask, params))
