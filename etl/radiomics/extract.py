"""The extractor: one image, one segment mask, one parameter set -> feature values."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from etl.radiomics import firstorder, shape, texture
from etl.radiomics.params import Params, ParamsError
from etl.radiomics.preprocess import bounding_box, normalize, resample

#: Version of the lake's extractor, written to every radiomics_features row.
EXTRACTOR_VERSION = "lake-radiomics 1.2 (pyradiomics 3 definitions)"

#: Implemented classes and their feature names, in output order.
FEATURE_CLASSES: dict[str, tuple[str, ...]] = {
    "firstorder": firstorder.NAMES,
    "shape": shape.NAMES,
    "glcm": texture.GLCM_NAMES,
    "glrlm": texture.GLRLM_NAMES,
    "glszm": texture.GLSZM_NAMES,
    "gldm": texture.GLDM_NAMES,
    "ngtdm": texture.NGTDM_NAMES,
}


def extract(image, mask: np.ndarray, params: Params | None = None, *,
            normalized: bool = False) -> dict[tuple[str, str], float]:
    """Features of the region ``mask`` (bool, numpy order) of ``image`` (a SimpleITK image).

    Returns {(feature class, feature name): value}. The mask must have the
    image's array shape; an empty mask raises ValueError. The image is first
    normalized (when the parameters say so; pass ``normalized=True`` for an
    image that already went through :func:`~etl.radiomics.preprocess.normalize`
    with these parameters), then resampled with the region (when they ask for
    a pixel spacing), as pyradiomics does.
    """
    params = params or Params.default()
    setting = params.setting
    if not normalized:
        image = normalize(image, setting)
    size = tuple(image.GetSize())[::-1]
    if tuple(size) != mask.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {size}")
    if not mask.any():
        raise ValueError("empty mask")
    resampled = resample(image, mask, setting)
    if resampled is None:
        import SimpleITK as sitk

        box = bounding_box(mask)
        m = np.ascontiguousarray(mask[box])
        region = sitk.GetArrayViewFromImage(image)[box]
        sx, sy, sz = (float(s) for s in image.GetSpacing())
        spacing = (sz, sy, sx)  # array order: slice, row, column
    else:
        grid, full, spacing = resampled
        if not full.any():
            raise ValueError("the region has no voxel on the resampled grid")
        box = bounding_box(full)
        m = np.ascontiguousarray(full[box])
        region = grid[box]
    out: dict[tuple[str, str], float] = {}
    values_in = np.asarray(region, dtype=np.float64)[m]
    bin_width = float(setting.get("binWidth", 25))
    bin_count = setting.get("binCount")
    q = np.zeros(m.shape, dtype=np.intp)
    q[m] = firstorder.discretize(values_in, bin_width, bin_count)
    levels = np.unique(q[m])
    computed: dict[str, Callable[[], dict[str, float]]] = {
        "firstorder": lambda: firstorder.features(
            values_in, float(np.prod(spacing)), bin_width=bin_width, bin_count=bin_count,
            shift=float(setting.get("voxelArrayShift", 0))),
        "shape": lambda: shape.features(m, spacing),
        "glcm": lambda: texture.glcm(q, m, levels),
        "glrlm": lambda: texture.glrlm(q, m, levels),
        "glszm": lambda: texture.glszm(q, m, levels),
        "gldm": lambda: texture.gldm(q, m, levels, int(setting.get("gldm_a", 0))),
        "ngtdm": lambda: texture.ngtdm(q, m, levels),
    }
    for cls, wanted in params.feature_classes.items():
        values = computed[cls]()
        names = wanted or list(FEATURE_CLASSES[cls])
        for name in names:
            if name not in values:
                raise ParamsError(params.source, f"{cls} has no feature {name!r}; it has "
                                  f"{', '.join(FEATURE_CLASSES[cls])}")
            out[(cls, name)] = values[name]
    return out
