"""The lake's radiomics extractor: parameters, analytic shapes, agreement with pyradiomics."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import SimpleITK as sitk

from etl.radiomics import FEATURE_CLASSES, Params, ParamsError, extract
from tests.etl.features_data import sphere

PYRADIOMICS_MISSING = ("pyradiomics is not installed (test-only reference): pip install numpy "
                       "versioneer wheel setuptools && pip install --no-build-isolation "
                       "pyradiomics")
REL = 1e-4


def image_of(arr: np.ndarray, spacing_zyx) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    img.SetOrigin([-12.0, 30.0, 4.5])
    return img


def pyradiomics_values(image, mask: np.ndarray, params: Params) -> dict:
    """pyradiomics' features with the same settings, keyed as the lake's extractor keys them."""
    featureextractor = pytest.importorskip("radiomics.featureextractor",
                                           reason=PYRADIOMICS_MISSING)
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    ex = featureextractor.RadiomicsFeatureExtractor(**params.pyradiomics_settings())
    ex.disableAllFeatures()
    for cls in params.feature_classes:
        ex.enableFeatureClassByName(cls)
    ex.disableAllImageTypes()
    for kind, custom in params.image_types.items():
        ex.enableImageTypeByName(kind, customArgs=custom)
    m = sitk.GetImageFromArray(mask.astype(np.uint8))
    m.CopyInformation(image)
    out = {}
    for key, value in ex.execute(image, m).items():
        if key.startswith("diagnostics_"):
            continue
        kind, cls, name = key.split("_", 2)
        out[(cls if kind == "original" else f"{kind}_{cls}", name)] = float(value)
    return out


def assert_agree(ours: dict, ref: dict) -> None:
    assert set(ours) == set(ref)
    bad = {k: (ours[k], ref[k]) for k in ours
           if abs(ours[k] - ref[k]) > REL * max(abs(ref[k]), 1e-12)}
    assert bad == {}


def noisy_phantom(seed: int, shape, spacing):
    rng = np.random.default_rng(seed)
    arr = rng.normal(40, 30, size=shape) + np.linspace(-200, 300, shape[2])[None, None, :]
    mask = sphere(shape, [s / 2 for s in shape], 0.35 * shape[1] * spacing[1], spacing)
    mask &= rng.random(shape) > 0.03  # ragged: holes make ambiguous marching cubes
    mask[:, : shape[1] // 3, :] &= np.indices(shape)[2][:, : shape[1] // 3, :] % 5 != 0
    return np.round(arr), mask


@pytest.mark.parametrize("setting", [
    {"binWidth": 25},
    {"binCount": 16},
    {"binWidth": 10, "normalize": True, "normalizeScale": 100, "voxelArrayShift": 300},
    {"binWidth": 40, "gldm_a": 1},
])
def test_agrees_with_pyradiomics_on_a_ragged_phantom(setting):
    spacing = (2.5, 0.8, 0.7)
    arr, mask = noisy_phantom(1, (14, 40, 44), spacing)
    params = Params.from_dict({"version": 1, "setting": setting,
                               "featureClass": dict.fromkeys(FEATURE_CLASSES)})
    image = image_of(arr, spacing)
    assert_agree(extract(image, mask, params), pyradiomics_values(image, mask, params))


def test_sphere_matches_analytic_volume_and_surface():
    r = 12.0
    spacing = (1.0, 0.5, 0.5)
    shape = (30, 60, 60)
    mask = sphere(shape, (14.5, 29.5, 29.5), r, spacing)
    v = extract(image_of(np.zeros(shape), spacing), mask, Params.default())
    assert v[("shape", "MeshVolume")] == pytest.approx(4 / 3 * math.pi * r ** 3, rel=0.01)
    assert v[("shape", "VoxelVolume")] == pytest.approx(4 / 3 * math.pi * r ** 3, rel=0.01)
    # the mesh of a voxelized sphere is a staircase: its area is 10-15 % above 4 pi r^2
    area = v[("shape", "SurfaceArea")]
    assert 1.10 * 4 * math.pi * r ** 2 < area < 1.15 * 4 * math.pi * r ** 2
    assert 0.87 < v[("shape", "Sphericity")] < 0.91
    assert v[("shape", "Elongation")] == pytest.approx(1.0, abs=0.01)
    # mesh vertices lie half a voxel outside the voxel centres
    assert 2 * r < v[("shape", "Maximum3DDiameter")] <= 2 * r + max(spacing)


def test_box_axis_lengths_and_volume_are_exact():
    spacing = (2.0, 1.0, 0.5)
    n = (5, 8, 12)  # voxels along slice, row, column
    shape = (9, 12, 16)
    mask = np.zeros(shape, dtype=bool)
    mask[2:7, 2:10, 2:14] = True
    v = extract(image_of(np.ones(shape), spacing), mask, Params.default())
    lengths = sorted(4 * math.sqrt((k * k - 1) / 12) * s for k, s in zip(n, spacing, strict=True))
    assert v[("shape", "VoxelVolume")] == pytest.approx(5 * 8 * 12 * 1.0, rel=1e-12)
    assert v[("shape", "LeastAxisLength")] == pytest.approx(lengths[0], rel=1e-9)
    assert v[("shape", "MinorAxisLength")] == pytest.approx(lengths[1], rel=1e-9)
    assert v[("shape", "MajorAxisLength")] == pytest.approx(lengths[2], rel=1e-9)
    # the mesh of a box: the faces sit half a voxel out, with edges and corners cut;
    # its area is the box's (10 x 8 x 6 mm) less the chamfers
    assert v[("shape", "SurfaceArea")] < 2 * (10 * 8 + 10 * 6 + 8 * 6)
    assert v[("firstorder", "Entropy")] == pytest.approx(0.0, abs=1e-12)
    assert v[("firstorder", "Variance")] == 0.0


def test_params_validation_and_hash():
    p = Params.default()
    assert p.version == 1
    assert p.setting["binWidth"] == 25
    assert p.hash == Params.default().hash
    assert len(p.hash) == 64
    other = Params.from_dict({"version": 1, "setting": {"binWidth": 10},
                              "featureClass": {"firstorder": ["Mean"]}})
    assert other.hash != p.hash
    with pytest.raises(ParamsError, match=r"featureClass.*shape2D.*implemented feature classes"):
        Params.from_dict({"version": 1, "featureClass": {"shape2D": []}})
    with pytest.raises(ParamsError, match=r"setting: Additional properties.*binwidth"):
        Params.from_dict({"version": 1, "setting": {"binwidth": 3},
                          "featureClass": {"shape": []}})
    with pytest.raises(ParamsError, match=r"resampledPixelSpacing.*not of type 'array', 'null'"):
        Params.from_dict({"version": 1, "setting": {"resampledPixelSpacing": "1mm"},
                          "featureClass": {"shape": []}})
    with pytest.raises(ParamsError, match=r"version: 2 was expected|version: 1 was expected"):
        Params.from_dict({"version": 2, "featureClass": {"shape": []}})
    with pytest.raises(ParamsError, match="not valid YAML"):
        Params.from_yaml("version: [1", "x.yaml")


def test_selected_features_only_and_unknown_name():
    shape = (6, 10, 10)
    mask = np.zeros(shape, dtype=bool)
    mask[1:5, 2:8, 2:8] = True
    img = image_of(np.arange(600).reshape(shape), (1.0, 1.0, 1.0))
    p = Params.from_dict({"version": 1, "featureClass": {"firstorder": ["Mean", "Maximum"]}})
    v = extract(img, mask, p)
    vals = np.arange(600).reshape(shape)[mask]
    assert v == {("firstorder", "Mean"): float(vals.mean()),
                 ("firstorder", "Maximum"): float(vals.max())}
    bad = Params.from_dict({"version": 1, "featureClass": {"shape": ["Volume"]}})
    with pytest.raises(ParamsError, match="shape has no feature 'Volume'"):
        extract(img, mask, bad)
