"""Pixel statistics of one series in modality units (pure: paths in, one row out).

Every instance is decoded with pydicom (compressed transfer syntaxes through
whichever of its pixel-data plugins is installed: pylibjpeg, gdcm, ...); an
instance that cannot be decoded counts as a pixel failure with its message,
it never stops the series. Values are converted to modality units (HU for CT)
with the Modality LUT / Rescale Slope and Intercept.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from etl.sourcefiles import Source, SourceChangedError, open_source
from etl.volumes import to_modality_units
from lakehouse.errors import error_text

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


def _syntax(ds) -> str:
    """The file's transfer syntax UID for a message: "?" unless a valid UID (a damaged file
    meta's value can run on over the header)."""
    from pydicom.uid import UID

    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return str(ts) if isinstance(ts, UID) and ts.is_valid else "?"


def _units(ds, modality: str | None) -> str:
    if modality == "CT":
        return "HU"
    rescale_type = getattr(ds, "RescaleType", None)
    if rescale_type:
        return str(rescale_type)
    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds:
        return "rescaled"
    return "stored"


class ValueCounts:
    """A histogram of exact values (value -> count): percentiles, mean and standard
    deviation of every pixel of a series without holding the pixels.

    Stored pixel values are integers, so one instance adds at most 2**BitsStored
    distinct values however large it is; memory stays bounded for series of
    thousands of slices.
    """

    #: merge the pending per-instance histograms when they hold this many entries
    COMPACT_AT = 1 << 20

    def __init__(self) -> None:
        self.values = np.empty(0, dtype=np.float64)
        self.counts = np.empty(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    def add(self, values: np.ndarray, counts: np.ndarray) -> None:
        self._pending.append((values.astype(np.float64), counts.astype(np.int64)))
        self._pending_size += len(values)
        if self._pending_size >= self.COMPACT_AT:
            self._compact()

    def _compact(self) -> None:
        if not self._pending:
            return
        v = np.concatenate([self.values, *(p[0] for p in self._pending)])
        c = np.concatenate([self.counts, *(p[1] for p in self._pending)])
        self.values, inverse = np.unique(v, return_inverse=True)
        self.counts = np.bincount(inverse, weights=c).astype(np.int64)
        self._pending, self._pending_size = [], 0

    @property
    def n(self) -> int:
        self._compact()
        return int(self.counts.sum())

    def percentiles(self, qs: Sequence[float]) -> list[float]:
        """As ``numpy.percentile`` (linear interpolation) over the expanded values."""
        self._compact()
        ends = np.cumsum(self.counts)  # sorted position k is values[searchsorted(ends, k, right)]
        n = int(ends[-1])

        def at(k: int) -> float:
            return float(self.values[np.searchsorted(ends, k, side="right")])

        out = []
        for q in qs:
            h = (n - 1) * q / 100.0
            lo = math.floor(h)
            hi = min(lo + 1, n - 1)
            a, b, f = at(lo), at(hi), h - lo
            value = a + f * (b - a)  # numpy's, which overflows for a -1e308 and a 1e308
            out.append(value if math.isfinite(value) else (1 - f) * a + f * b)
        return out

    def mean_std(self) -> tuple[float, float]:
        self._compact()
        # in units of the largest magnitude, with weights that sum to 1: no sum overflows,
        # whatever the values (a Rescale Intercept of 1e308 is a valid DS)
        scale = float(np.abs(self.values).max()) or 1.0
        v = self.values / scale
        w = self.counts / self.counts.sum()
        mean = float((v * w).sum())
        var = float((w * (v - mean) ** 2).sum())
        return mean * scale, math.sqrt(var) * scale


def stored_value_counts(stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct stored values, their counts) of one instance's pixels."""
    flat = stored.ravel()
    if flat.dtype.kind in "iu" and flat.size:
        lo, hi = int(flat.min()), int(flat.max())
        if hi - lo < (1 << 24):
            counts = np.bincount((flat.astype(np.int64) - lo), minlength=hi - lo + 1)
            nz = np.flatnonzero(counts)
            return nz + lo, counts[nz]
    return np.unique(flat, return_counts=True)


def series_stats(series_uid: str, files: Sequence[tuple[str, Source | str | None]],
                 modality: str | None = None, study_uid: str | None = None,
                 burned_in: bool = False) -> dict:
    """Statistics over every pixel of the series' instances.

    ``files`` is a list of (SOPInstanceUID, source file or None); a file that changed
    since it was ingested is a failure, as an undecodable one is. Returns an
    ``image_stats`` row (without the run id). Memory is bounded by the number
    of distinct values, not by the size of the series (see :class:`ValueCounts`).
    """
    import pydicom

    hist = ValueCounts()
    read = 0
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
        try:  # everything of one instance: what fails is that instance's failure
            ds = pydicom.dcmread(open_source(path), force=True)  # may lack a preamble
            if "PixelData" not in ds and "FloatPixelData" not in ds:
                raise ValueError("no pixel data")
            if int(getattr(ds, "SamplesPerPixel", 1) or 1) != 1:
                raise ValueError(f"{ds.PhotometricInterpretation} colour image; statistics "
                                 "are defined for single-sample (greyscale) images")
            # the frames the header declares, as the lake's row and the NIfTI export
            # count them: bytes beyond them are not read as frames more
            ds.pixel_array_options(allow_excess_frames=False)
            stored = ds.pixel_array
            stored_values, counts = stored_value_counts(stored)
            values = to_modality_units(ds, stored_values)  # finite: so is every plane
        except SourceChangedError as exc:
            failures += 1
            first_failure = first_failure or f"{sop}: {exc}"
            continue
        except Exception as exc:  # any decoder error is a recorded failure
            failures += 1
            if first_failure is None:
                first_failure = f"{sop} (transfer syntax {_syntax(ds)}): {error_text(exc)}"
            continue
        read += 1
        rng = _stored_range(ds)
        if rng is not None:
            at_limit = (stored_values <= rng[0]) | (stored_values >= rng[1])
            saturated += int(counts[at_limit].sum())
        hist.add(values, counts)
        units = units or _units(ds, modality)
        for plane in stored.reshape((-1, *stored.shape[-2:])):
            sigma = immerkaer_sigma(to_modality_units(ds, plane, checked=False))
            if sigma is not None and math.isfinite(sigma):  # not if a sum overflows
                noise.append(sigma)
        burned_in = burned_in or str(getattr(ds, "BurnedInAnnotation", "")).upper() == "YES"
    row: dict = {
        "SeriesInstanceUID": series_uid,
        "StudyInstanceUID": study_uid,
        "Modality": modality,
        "units": units,
        "instances_read": read,
        "pixel_failures": failures,
        "failure_message": first_failure,
        "burned_in_annotation": burned_in,
    }
    n = hist.n
    if not n:
        row.update(voxel_count=0, status="failed")
        return row
    pct = hist.percentiles(PERCENTILES)
    mean, std = hist.mean_std()
    row.update({f"p{p:02d}": v for p, v in zip(PERCENTILES, pct, strict=True)})
    row.update(
        voxel_count=n, mean=mean, std=std,
        min=float(hist.values[0]), max=float(hist.values[-1]),
        noise_sigma=float(np.median(noise)) if noise else None,
        saturated_fraction=saturated / n,
        status="partial" if failures else "ok",
    )
    return row
