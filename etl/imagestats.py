"""Pixel statistics of one series in modality units (pure: paths in, one row out).

Every instance is decoded with pydicom (compressed transfer syntaxes through
whichever of its pixel-data plugins is installed: pylibjpeg, gdcm, ...); an
instance that cannot be decoded counts as a pixel failure with its message,
it never stops the series. Values are converted to modality units (HU for CT)
with the Modality LUT / Rescale Slope and Intercept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from etl.volumes import to_modality_units

log = logging.getLogger(__name__)

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)

#: Immerkaer's noise mask: the difference of two Laplacians; zero on planes and ramps.
_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)


def immerkaer_sigma(plane: np.ndarray) -> float | None:
    """Immerkaer (1996) fast noise standard deviation of a 2-D image.

    sigma = sqrt(pi/2) / (6 (W-2)(H-2)) * sum |I * N| over the interior pixels.
    """
    from scipy.signal import convolve2d

    h, w = plane.shape
    if h < 3 or w < 3:
        return None
    conv = convolve2d(plane.astype(np.float64), _IMMERKAER, mode="valid")
    return float(np.sqrt(np.pi / 2) * np.abs(conv).sum() / (6.0 * (w - 2) * (h - 2)))


def _stored_range(ds) -> tuple[int, int] | None:
    bits = int(getattr(ds, "BitsStored", 0) or 0)
    if bits <= 0:
        return None
    if int(getattr(ds, "PixelRepresentation", 0) or 0) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _units(ds, modality: str | None) -> str:
    if modality == "CT":
        return "HU"
    rescale_type = getattr(ds, "RescaleType", None)
    if rescale_type:
        return str(rescale_type)
    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds:
        return "rescaled"
    return "stored"


def series_stats(series_uid: str, files: Sequence[tuple[str, str | None]],
                 modality: str | None = None, study_uid: str | None = None,
                 burned_in: bool = False) -> dict:
    """Statistics over every pixel of the series' instances.

    ``files`` is a list of (SOPInstanceUID, path or None). Returns an
    ``image_stats`` row (without the run id).
    """
    import pydicom

    values: list[np.ndarray] = []
    noise: list[float] = []
    saturated = 0
    failures = 0
    first_failure: str | None = None
    units: str | None = None
    for sop, path in files:
        if path is None:
            failures += 1
            first_failure = first_failure or f"{sop}: no ingested source file"
            continue
        ds = None
        try:
            ds = pydicom.dcmread(path)
            if "PixelData" not in ds and "FloatPixelData" not in ds:
                raise ValueError("no pixel data")
            if int(getattr(ds, "SamplesPerPixel", 1) or 1) != 1:
                raise ValueError(f"{ds.PhotometricInterpretation} colour image; statistics "
                                 "are defined for single-sample (greyscale) images")
            stored = ds.pixel_array
        except Exception as exc:  # any decoder error is a recorded failure
            failures += 1
            if first_failure is None:
                ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
                first_failure = f"{sop} (transfer syntax {ts}): {type(exc).__name__}: {exc}"
            continue
        rng = _stored_range(ds)
        if rng is not None:
            saturated += int(np.count_nonzero((stored <= rng[0]) | (stored >= rng[1])))
        vals = to_modality_units(ds, stored)
        units = units or _units(ds, modality)
        planes = vals.reshape((-1, *vals.shape[-2:]))
        for p in planes:
            sigma = immerkaer_sigma(p)
            if sigma is not None:
                noise.append(sigma)
        values.append(vals.ravel())
        burned_in = burned_in or str(getattr(ds, "BurnedInAnnotation", "")).upper() == "YES"
    row: dict = {
        "SeriesInstanceUID": series_uid,
        "StudyInstanceUID": study_uid,
        "Modality": modality,
        "units": units,
        "instances_read": len(values),
        "pixel_failures": failures,
        "failure_message": first_failure,
        "burned_in_annotation": burned_in,
    }
    if not values:
        row.update(voxel_count=0, status="failed")
        return row
    allv = np.concatenate(values)
    pct = np.percentile(allv, PERCENTILES)
    row.update({f"p{p:02d}": float(v) for p, v in zip(PERCENTILES, pct, strict=True)})
    row.update(
        voxel_count=int(allv.size), mean=float(allv.mean()), std=float(allv.std()),
        min=float(allv.min()), max=float(allv.max()),
        noise_sigma=float(np.median(noise)) if noise else None,
        saturated_fraction=saturated / allv.size,
        status="partial" if failures else "ok",
    )
    return row
