"""Image pre-processing before feature extraction: normalization and resampling.

Both follow pyradiomics 3 (``imageoperations.normalizeImage`` and
``imageoperations.resampleImage``) step for step, with SimpleITK doing the
arithmetic and the interpolation, so that the same settings give the same
voxels:

* **normalization** (``normalize``): z-score of the whole image
  (``sitk.Normalize``), values beyond ``removeOutliers`` standard deviations
  clipped, then multiplied by ``normalizeScale``. It is done before resampling.
* **resampling** (``resampledPixelSpacing``, ``interpolator``, ``padDistance``):
  the output grid is aligned to the input origin (voxel corners coincide),
  covers the region's bounding box plus ``padDistance`` output voxels, keeps the
  input direction, and is clipped to the image. A spacing of 0 keeps that
  axis; an axis the region spans in one voxel is not resampled; when the new
  spacing equals the old one nothing is interpolated. The image is interpolated
  with ``interpolator`` (B-spline by default), the region with nearest neighbour
  (pyradiomics' only choice) or, with ``maskInterpolator: sitkLinear``, linearly
  with voxels at or above ``maskPartialVolumeThreshold`` (0.5) kept, as IBSI
  recommends (pyradiomics has no such option).

One difference in *how*, not *what*: for B-spline interpolation SimpleITK
first computes spline coefficients over its whole input image; pyradiomics
hands it the whole image for every region, the lake only a block around the
region with :data:`BSPLINE_MARGIN` voxels to spare. The coefficients' recursive
filter forgets the block's edge by a factor 0.268 per voxel, so the resampled
values differ from pyradiomics' by less than 1e-10 of the image's range (ITK's
own truncation); in float32 images they are in practice the same numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Interpolators allowed for the image (SimpleITK names, as in pyradiomics' parameter files).
IMAGE_INTERPOLATORS = ("sitkNearestNeighbor", "sitkLinear", "sitkBSpline")
#: Interpolators allowed for the region.
MASK_INTERPOLATORS = ("sitkNearestNeighbor", "sitkLinear")
#: Extra input voxels around the sampled block for B-spline interpolation (see module doc):
#: 2 for the cubic kernel's support, 18 for the coefficients' filter (0.268 ** 18 < 1e-10,
#: the tolerance ITK's own B-spline decomposition truncates its initial sums at).
BSPLINE_MARGIN = 20


def normalize(image, setting: dict[str, Any]):
    """pyradiomics' normalizeImage: z-score, optional outlier clipping, then the scale."""
    import SimpleITK as sitk

    if not setting.get("normalize"):
        return image
    out = sitk.Normalize(image)
    outliers = setting.get("removeOutliers")
    if outliers is not None:
        arr = sitk.GetArrayFromImage(out)
        arr[arr > outliers] = outliers
        arr[arr < -outliers] = -outliers
        clipped = sitk.GetImageFromArray(arr)
        clipped.CopyInformation(out)
        out = clipped
    out *= setting.get("normalizeScale", 1)
    return out


def pre_crop(image, mask: np.ndarray, setting: dict[str, Any]) -> tuple[Any, np.ndarray]:
    """pyradiomics' preCrop (cropToTumorMask): the bounding box plus ``padDistance`` (default 0).

    Changes no feature of the original image; filters see only this block.
    """
    pad = int(setting.get("padDistance", 0))
    box = bounding_box(mask)
    lo = [max(s.start - pad, 0) for s in box]
    hi = [min(s.stop + pad, n) for s, n in zip(box, mask.shape, strict=True)]
    cropped = image[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
    return cropped, mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The region's bounding box in numpy order (slice, row, column)."""
    where = np.argwhere(mask)
    lo, hi = where.min(axis=0), where.max(axis=0) + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def resample(image, mask: np.ndarray, setting: dict[str, Any]
             ) -> tuple[Any, np.ndarray, tuple[float, float, float]] | None:
    """Image and region on the resampled grid, or None when nothing is to be interpolated.

    ``image`` is a SimpleITK image, ``mask`` a boolean array of its shape (numpy
    order). Returns (SimpleITK image, region as a boolean array, spacing in
    numpy order) on the resampled grid, cropped as pyradiomics crops it
    (bounding box plus ``padDistance``).
    """
    import SimpleITK as sitk

    wanted = setting.get("resampledPixelSpacing")
    if wanted is None:
        return None
    interpolator = setting.get("interpolator") or "sitkBSpline"
    pad = setting.get("padDistance", 5)
    mask_spacing = np.array(image.GetSpacing())  # the region lies on the image grid
    image_spacing = np.array(image.GetSpacing())
    mask_size = np.array(image.GetSize())
    spacing = np.array(wanted, dtype=np.float64)
    spacing = np.where(spacing == 0, mask_spacing, spacing)
    box = bounding_box(mask)
    lower = np.array([s.start for s in box][::-1])  # x, y, z as SimpleITK indexes
    size = np.array([s.stop - s.start for s in box][::-1])
    # pyradiomics' bounding box: (lower x, y, z, size x, y, z)
    bb = np.concatenate([lower, size])
    nd = 3
    spacing = np.where(bb[nd:] != 1, spacing, mask_spacing)
    if np.allclose(image_spacing, spacing):
        return None
    ratio = mask_spacing / spacing
    new_lower = np.floor((bb[:nd] - 0.5) * ratio - pad)
    new_upper = np.ceil((bb[:nd] + bb[nd:] - 0.5) * ratio + pad)
    max_upper = np.ceil(mask_size * ratio) - 1
    new_lower = np.where(new_lower < 0, 0, new_lower)
    new_upper = np.where(new_upper > max_upper, max_upper, new_upper)
    new_size = np.array(new_upper - new_lower + 1, dtype="int").tolist()
    original_lower = new_lower / ratio
    origin_index = np.array(0.5 * (spacing - mask_spacing) / mask_spacing)
    cropped_origin_index = origin_index + original_lower
    new_origin = image.TransformContinuousIndexToPhysicalPoint(cropped_origin_index)

    rif = sitk.ResampleImageFilter()
    rif.SetOutputSpacing(spacing)
    rif.SetOutputDirection(np.array(image.GetDirection()))
    rif.SetSize(new_size)
    rif.SetOutputOrigin(new_origin)

    source = image
    if interpolator == "sitkBSpline":
        # only the block the output grid samples, with a margin (see the module doc)
        first = cropped_origin_index
        last = cropped_origin_index + (np.array(new_size) - 1) / ratio
        lo = np.maximum(np.floor(first).astype(int) - BSPLINE_MARGIN, 0)
        hi = np.minimum(np.ceil(last).astype(int) + BSPLINE_MARGIN + 1, mask_size)
        source = image[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    rif.SetOutputPixelType(image.GetPixelID())
    rif.SetInterpolator(getattr(sitk, interpolator))
    resampled = rif.Execute(source)

    mask_image = sitk.GetImageFromArray(mask.astype(np.uint8))
    mask_image.CopyInformation(image)
    if (setting.get("maskInterpolator") or "sitkNearestNeighbor") == "sitkLinear":
        rif.SetOutputPixelType(sitk.sitkFloat32)
        rif.SetInterpolator(sitk.sitkLinear)
        fraction = sitk.GetArrayFromImage(rif.Execute(sitk.Cast(mask_image, sitk.sitkFloat32)))
        region = fraction >= float(setting.get("maskPartialVolumeThreshold", 0.5))
    else:
        rif.SetOutputPixelType(mask_image.GetPixelID())
        rif.SetInterpolator(sitk.sitkNearestNeighbor)
        region = sitk.GetArrayFromImage(rif.Execute(mask_image)) > 0
    sx, sy, sz = (float(s) for s in spacing)
    return resampled, region, (sz, sy, sx)
