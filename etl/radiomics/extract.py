"""The extractor: one image, one segment mask, one parameter set -> feature values."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from etl.radiomics import filters, firstorder, shape, texture
from etl.radiomics.params import Params, ParamsError
from etl.radiomics.preprocess import bounding_box, normalize, pre_crop, resample

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
    import SimpleITK as sitk

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
    if resampled is not None:
        grid, region_mask, spacing = resampled
        if not region_mask.any():
            raise ValueError("the region has no voxel on the resampled grid")
    else:
        grid, region_mask = image, mask
        # filters see the block pyradiomics gives them: with preCrop, or when the spacing
        # asked for is the image's (resampleImage then only crops), the bounding box plus
        # padDistance; otherwise the whole image
        crop = setting.get("preCrop") or setting.get("resampledPixelSpacing") is not None
        if crop and set(params.image_types) - {"Original"}:
            grid, region_mask = pre_crop(image, mask, setting)
        sx, sy, sz = (float(s) for s in image.GetSpacing())
        spacing = (sz, sy, sx)  # array order: slice, row, column
    box = bounding_box(region_mask)
    m = np.ascontiguousarray(region_mask[box])
    out: dict[tuple[str, str], float] = {}
    classes = params.feature_classes
    if "shape" in classes:  # of the region only: once, whatever the image types
        _add(out, params, "shape", "shape", shape.features(m, spacing))
    textures = [c for c in classes if c != "shape"]
    if not textures:
        return out
    for image_type, filtered in filters.images(grid, params.image_types):
        view = sitk.GetArrayViewFromImage(filtered)
        values_in = np.asarray(view[box], dtype=np.float64)[m]
        del view
        for cls, values in _grey_level_classes(values_in, m, spacing, setting, textures):
            label = cls if image_type == "original" else f"{image_type}_{cls}"
            _add(out, params, cls, label, values)
    return out


def _grey_level_classes(values_in: np.ndarray, m: np.ndarray, spacing, setting: dict,
                        classes: list[str]) -> Iterator[tuple[str, dict[str, float]]]:
    """First-order and texture classes of the region's values (one image type)."""
    bin_width = float(setting.get("binWidth", 25))
    bin_count = setting.get("binCount")
    q = np.zeros(m.shape, dtype=np.intp)
    q[m] = firstorder.discretize(values_in, bin_width, bin_count)
    levels = np.unique(q[m])
    computed: dict[str, Callable[[], dict[str, float]]] = {
        "firstorder": lambda: firstorder.features(
            values_in, float(np.prod(spacing)), bin_width=bin_width, bin_count=bin_count,
            shift=float(setting.get("voxelArrayShift", 0))),
        "glcm": lambda: texture.glcm(q, m, levels),
        "glrlm": lambda: texture.glrlm(q, m, levels),
        "glszm": lambda: texture.glszm(q, m, levels),
        "gldm": lambda: texture.gldm(q, m, levels, int(setting.get("gldm_a", 0))),
        "ngtdm": lambda: texture.ngtdm(q, m, levels),
    }
    for cls in classes:
        yield cls, computed[cls]()


def _add(out: dict[tuple[str, str], float], params: Params, cls: str, label: str,
         values: dict[str, float]) -> None:
    """The wanted features of one class into ``out`` under (label, name)."""
    names = params.feature_classes[cls] or list(FEATURE_CLASSES[cls])
    for name in names:
        if name not in values:
            raise ParamsError(params.source, f"{cls} has no feature {name!r}; it has "
                              f"{', '.join(FEATURE_CLASSES[cls])}")
        out[(label, name)] = values[name]
