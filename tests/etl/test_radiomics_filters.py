"""Filtered image types (pyradiomics imageType): LoG and wavelets, against pyradiomics."""

from __future__ import annotations

import pytest

from etl.radiomics import FEATURE_CLASSES, Params, ParamsError, extract
from tests.etl.features_data import DCMQI, SKIP_DCMQI
from tests.etl.test_radiomics import assert_agree, image_of, noisy_phantom, pyradiomics_values

TEXTURE_FEATURES = sum(len(v) for k, v in FEATURE_CLASSES.items() if k != "shape")  # 93
SHAPE_FEATURES = len(FEATURE_CLASSES["shape"])  # 14


def params_of(image_type: dict, setting: dict) -> Params:
    return Params.from_dict({"version": 1, "setting": setting, "imageType": image_type,
                             "featureClass": dict.fromkeys(FEATURE_CLASSES)})


CASES = [
    # whole image filtered (no resampling, no pre-crop), as pyradiomics does
    ({"Original": {}, "LoG": {"sigma": [1.0, 2.5]}}, {"binWidth": 25}, 3),
    ({"Wavelet": {}}, {"binWidth": 20}, 8),
    # filters on the resampled block; two wavelet levels
    ({"LoG": {"sigma": [1.0]}, "Wavelet": {"wavelet": "haar", "level": 2}},
     {"resampledPixelSpacing": [1, 1, 1], "binCount": 16}, 1 + 2 * 7 + 1),
    # the image's own spacing asked for: pyradiomics only crops, the filters see the block
    ({"LoG": {"sigma": [1.5]}, "Wavelet": {}},
     {"resampledPixelSpacing": [0.7, 0.8, 2.5], "padDistance": 2, "binCount": 16}, 1 + 8),
    # filters on the pre-cropped block (bounding box + padDistance)
    ({"LoG": {"sigma": [2.0]}, "Wavelet": {"start_level": 1}},
     {"preCrop": True, "padDistance": 3, "binCount": 16, "normalize": True,
      "normalizeScale": 100}, 1 + 8),
]


@pytest.mark.parametrize(("image_type", "setting", "images"), CASES,
                         ids=[str(i) for i in range(len(CASES))])
def test_filtered_features_agree_with_pyradiomics(image_type, setting, images):
    spacing = (2.5, 0.8, 0.7)
    arr, mask = noisy_phantom(2, (10, 30, 32), spacing)
    image = image_of(arr, spacing)
    params = params_of(image_type, setting)
    ours = extract(image, mask, params)
    assert len(ours) == SHAPE_FEATURES + images * TEXTURE_FEATURES
    assert_agree(ours, pyradiomics_values(image, mask, params))


def test_feature_names_follow_pyradiomics():
    spacing = (1.0, 1.0, 1.0)
    arr, mask = noisy_phantom(3, (8, 16, 16), spacing)
    params = Params.from_dict({"version": 1, "imageType": {
        "Original": None, "LoG": {"sigma": [1.0, 0.5]}, "Wavelet": {"level": 2}},
        "featureClass": {"firstorder": ["Mean"], "shape": ["VoxelVolume"]}})
    v = extract(image_of(arr, spacing), mask, params)
    bands = ["LLH", "LHL", "LHH", "HLL", "HLH", "HHL", "HHH"]
    assert sorted(v) == sorted(
        [("shape", "VoxelVolume"), ("firstorder", "Mean"),
         ("log-sigma-1-0-mm-3D_firstorder", "Mean"), ("log-sigma-0-5-mm-3D_firstorder", "Mean")]
        + [(f"wavelet-{b}_firstorder", "Mean") for b in bands]
        + [(f"wavelet2-{b}_firstorder", "Mean") for b in [*bands, "LLL"]])


def test_image_type_settings_are_validated():
    def bad(image_type, match):
        with pytest.raises(ParamsError, match=match):
            params_of(image_type, {})

    bad({"LoG": {}}, r"imageType/LoG: 'sigma' is a required property")
    bad({"LoG": {"sigma": [0]}}, r"imageType/LoG/sigma/0.*minimum")
    bad({"Wavelet": {"wavelet": "morlet"}}, r"'morlet' is not a PyWavelets discrete wavelet")
    bad({"Gradient": {}}, r"imageType: Additional properties")
    bad({}, r"imageType.*should be non-empty|imageType.*does not have enough properties")
    assert Params.default().image_types == {"Original": {}}


@pytest.mark.slow  # pyradiomics' filters on a 512 x 512 CT, two settings, two segments
@pytest.mark.skipif(not (DCMQI / "liver.dcm").is_file(), reason=SKIP_DCMQI)
@pytest.mark.parametrize(("setting", "images"), [
    # 3 slices: too thin for LoG (pyradiomics needs 4), so the 8 wavelet images only
    ({"binWidth": 25}, 8),
    # resampled to 0.5 mm between slices: 6 slices, LoG at both sigmas too
    ({"resampledPixelSpacing": [1, 1, 0.5], "binCount": 32}, 10),
])
def test_filtered_features_of_real_segments_agree_with_pyradiomics(setting, images):
    from etl.masks import read_seg
    from tests.etl.features_data import real_ct_volume

    _, geo, image = real_ct_volume()
    # the liver and PURPLE, both on the 3 slices (a one-slice region keeps its 3 slices)
    segments = read_seg(DCMQI / "liver.dcm", geo).segments + [
        s for s in read_seg(DCMQI / "partial_overlaps.dcm", geo).segments
        if s.label == "PURPLE"]
    assert len(segments) == 2
    params = params_of({"LoG": {"sigma": [1.0, 2.0]}, "Wavelet": {}}, setting)
    for seg in segments:
        ours = extract(image, seg.mask, params)
        assert len(ours) == SHAPE_FEATURES + images * TEXTURE_FEATURES
        assert_agree(ours, pyradiomics_values(image, seg.mask, params))
