"""Filtered images (pyradiomics ``imageType``): Laplacian of Gaussian and wavelets.

Each filter is pyradiomics 3's (``imageoperations.getLoGImage`` and
``getWaveletImage``) call for call: SimpleITK's
``LaplacianRecursiveGaussianImageFilter`` normalized across scale for each
sigma (in mm), and PyWavelets' stationary wavelet transform (``pywt.swtn``,
one level at a time, odd axes padded by one wrapped voxel, axes in x, y, z
order) for each decomposition. The filter runs on the same image pyradiomics
gives it: the whole (normalized) image, or the resampled block around the
region when resampling, or the region's bounding box plus ``padDistance``
with ``preCrop`` or when the spacing asked for is the image's own. Images
are named as pyradiomics names them (``log-sigma-1-0-mm-3D``,
``wavelet-LLH``, ``wavelet2-HLL``...) and their features as
``<image>_<class>_<feature>``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Image types the extractor implements (pyradiomics' names).
IMAGE_TYPES = ("Original", "LoG", "Wavelet")


def log_images(image, sigmas: list[float]) -> Iterator[tuple[str, Any]]:
    """pyradiomics' getLoGImage: one filtered image per usable sigma."""
    import SimpleITK as sitk

    size = np.array(image.GetSize())
    spacing = np.array(image.GetSpacing())
    if np.min(size) < 4:  # pyradiomics: too small for the filter, no image
        log.warning("image of size %s too small for LoG: no LoG features", size.tolist())
        return
    for sigma in sigmas:
        if not np.all(size >= np.ceil(sigma / spacing) + 1):
            log.warning("LoG sigma %g mm: the image (size %s, spacing %s) is too small",
                        sigma, size.tolist(), spacing.tolist())
        elif sigma > 0.0:
            lrgif = sitk.LaplacianRecursiveGaussianImageFilter()
            lrgif.SetNormalizeAcrossScale(True)
            lrgif.SetSigma(sigma)
            name = "log-sigma-{}-mm-3D".format(str(sigma).replace(".", "-"))
            yield name, lrgif.Execute(image)


def wavelet_images(image, wavelet: str = "coif1", level: int = 1, start_level: int = 0
                   ) -> Iterator[tuple[str, Any]]:
    """pyradiomics' getWaveletImage (3-D): each level's detail images, then the approximation."""
    import pywt
    import SimpleITK as sitk

    axes = (2, 1, 0)
    matrix = sitk.GetArrayFromImage(image)
    original_shape = matrix.shape
    padding = tuple((0, 1 if dim % 2 != 0 else 0) for dim in original_shape)
    data = np.pad(matrix.copy(), padding, "wrap")
    w = pywt.Wavelet(wavelet)
    unpad = tuple(slice(None, -1 if dim % 2 != 0 else None) for dim in original_shape)
    for _ in range(start_level):
        data = pywt.swtn(data, w, level=1, start_level=0, axes=axes)[0]["aaa"].copy()
    levels = []
    for _ in range(start_level, start_level + level):
        dec = pywt.swtn(data, w, level=1, start_level=0, axes=axes)[0]
        data = dec["aaa"].copy()
        images = {}
        for name, band in dec.items():
            if name == "aaa":
                continue
            out = sitk.GetImageFromArray(band.copy()[unpad])
            out.CopyInformation(image)
            images[str(name).replace("a", "L").replace("d", "H")] = out
        levels.append(images)
    for idx, images in enumerate(levels, start=1):
        prefix = "wavelet" if idx == 1 else f"wavelet{idx}"
        for name, img in images.items():
            yield f"{prefix}-{name}", img
    approx = sitk.GetImageFromArray(data[unpad])
    approx.CopyInformation(image)
    yield ("wavelet" if len(levels) == 1 else f"wavelet{len(levels)}") + "-LLL", approx


def images(image, image_types: dict[str, dict]) -> Iterator[tuple[str, Any]]:
    """(image type name, SimpleITK image) for each enabled image type, in the order given."""
    for kind, custom in image_types.items():
        custom = custom or {}
        if kind == "Original":
            yield "original", image
        elif kind == "LoG":
            yield from log_images(image, [float(s) for s in custom.get("sigma", [])])
        elif kind == "Wavelet":
            yield from wavelet_images(image, custom.get("wavelet", "coif1"),
                                      int(custom.get("level", 1)),
                                      int(custom.get("start_level", 0)))
        else:  # the schema admits only IMAGE_TYPES
            raise ValueError(f"image type {kind!r} is not implemented")
