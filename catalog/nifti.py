"""One series as one NIfTI volume: geometry from the DICOM headers, pixels decoded by pydicom.

:func:`build_volume` takes the pydicom datasets of a series' instances and
returns either a :class:`Volume` (a numpy array ``(slices, rows, columns[, 3])``
with its patient geometry) or a :class:`Skip` with a reason code (``REASONS``)
saying why the series cannot be written as one faithful volume.

Every image plane is collected first, whatever the object: one plane per
single-frame instance (``ImagePositionPatient``, ``ImageOrientationPatient``,
``PixelSpacing``), one per frame of an enhanced multi-frame object (the
per-frame and shared functional groups: ``PlanePositionSequence``,
``PlaneOrientationSequence``, ``PixelMeasuresSequence``), one per frame of a
classic multi-frame grid (``GridFrameOffsetVector``, as RT Dose has). The planes
make a volume only when they share one orientation, one matrix size and one
pixel spacing, lie one behind the other along the slice normal (no two at the
same place, no shear), evenly spaced. Nothing is invented: planes without a
position in the patient (projection radiographs, secondary captures, cine
ultrasound) are skipped (``no_patient_geometry``) rather than stacked on made-up
coordinates.

Pixels are decoded by pydicom with its installed handlers (pylibjpeg, pyjpegls:
JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE, deflate), so
transfer syntaxes GDCM cannot read are exported too. Values are modality units:
``RescaleSlope``/``RescaleIntercept`` (per frame for enhanced objects) and RT
Dose's ``DoseGridScaling`` applied; palette colour becomes RGB, YBR becomes RGB
(pydicom's conversion); ``MONOCHROME1`` values are kept as stored (the sidecar
says so).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lakehouse.errors import error_text

log = logging.getLogger(__name__)

#: reason code -> what it means (the export summary and manifest use the codes)
REASONS: dict[str, str] = {
    "burned_in_annotation": "identifying text burned into the pixels (research lake)",
    "source_missing": "a source file of the series is not in the vault",
    "source_unreadable": "a source file cannot be read",
    "source_changed": "a source file changed since ingest (checksum differs)",
    "no_pixel_data": "not an image (no pixel data: report, plan, structure set, waveform...)",
    "segmentation": "a segmentation object: its frames are segment masks, not one image",
    "no_patient_geometry": "no position/orientation/pixel spacing in the patient",
    "mixed_orientations": "planes of more than one orientation",
    "mixed_dimensions": "planes of more than one matrix size, pixel format or spacing",
    "overlapping_planes": "two planes at the same position (repeats, several stacks or "
                          "time points)",
    "sheared_stack": "planes not stacked along their normal (gantry tilt)",
    "uneven_spacing": "uneven gaps between planes (missing slices?)",
    "invalid_header": "a header value the volume depends on is invalid (NumberOfFrames, a "
                      "Rescale Slope or Intercept that is empty or gives values that are "
                      "not finite...)",
    "pixel_decode_failed": "neither pydicom nor GDCM can decode the pixel data",
    "too_large": "a dimension beyond NIfTI-1's limit of 32,767",
}

#: NIfTI-1 stores each dimension as a signed 16-bit integer
MAX_DIMENSION = 32767

#: position tolerance (mm) for overlap and shear
POSITION_TOLERANCE = 1e-3
#: direction-cosine tolerance for "the same orientation"
ORIENTATION_TOLERANCE = 1e-4
#: relative tolerance on the gaps between planes
SPACING_TOLERANCE = 0.01

SEG = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass
class Skip:
    """Why a series is not exported: a code of ``REASONS`` and a message naming values
    (never paths)."""

    reason: str
    message: str


@dataclass
class _Plane:
    instance: int  # index into the datasets
    frame: int  # frame index in that instance
    position: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]  # (row spacing, column spacing): PixelSpacing
    rows: int
    columns: int


@dataclass
class Volume:
    """A volume in DICOM patient coordinates (LPS), as SimpleITK wants it."""

    array: np.ndarray  # (slices, rows, columns) or (slices, rows, columns, 3)
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]  # (column, row, slice) mm
    direction: tuple[float, ...]  # 3x3 row-major, columns = row dir, column dir, normal
    #: (instance index, frame index) of each slice, in volume order
    planes: list[tuple[int, int]] = field(default_factory=list)
    #: how the values were obtained (the sidecar's "pixel_values")
    values: dict[str, Any] = field(default_factory=dict)


def _floats(v, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(x) for x in v], dtype=float)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def _item(ds, seq: str):
    s = ds.get(seq)
    return s[0] if s else None


def _group_attr(groups: Sequence, seq: str, keyword: str):
    """``keyword`` of the first item of ``seq`` in the first of ``groups`` that has it."""
    for g in groups:
        item = _item(g, seq) if g is not None else None
        if item is not None and keyword in item:
            return item.get(keyword)
    return None


def _frames(ds) -> int:
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


def _planes(index: int, ds) -> list[_Plane] | Skip:
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not rows or not columns:
        return Skip("no_pixel_data", "an instance has no Rows/Columns")
    raw = ds.get("NumberOfFrames")
    try:
        valid = raw is None or raw == "" or int(raw) >= 1
    except (TypeError, ValueError):
        valid = False
    if not valid:  # the frames in the pixel data cannot be counted: decoders guess
        return Skip("invalid_header", f"NumberOfFrames {str(raw)[:20]!r} is not a frame count")
    n = _frames(ds)
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    out = []
    if per_frame is not None:  # enhanced multi-frame: functional groups
        if len(per_frame) != n:
            return Skip("no_patient_geometry",
                        f"{len(per_frame)} per-frame functional groups for {n} frames")
        for k, pf in enumerate(per_frame):
            groups = [pf, shared]
            pos = _floats(_group_attr(groups, "PlanePositionSequence",
                                      "ImagePositionPatient"), 3)
            iop = _floats(_group_attr(groups, "PlaneOrientationSequence",
                                      "ImageOrientationPatient"), 6)
            ps = _floats(_group_attr(groups, "PixelMeasuresSequence", "PixelSpacing"), 2)
            if pos is None or iop is None or ps is None:
                return Skip("no_patient_geometry",
                            f"frame {k + 1} has no plane position, orientation or pixel "
                            "spacing in its functional groups")
            out.append(_Plane(index, k, pos, iop, (ps[0], ps[1]), rows, columns))
        return out
    pos = _floats(ds.get("ImagePositionPatient"), 3)
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    ps = _floats(ds.get("PixelSpacing"), 2)
    if pos is None or iop is None or ps is None:
        missing = [k for k, v in (("ImagePositionPatient", pos),
                                  ("ImageOrientationPatient", iop),
                                  ("PixelSpacing", ps)) if v is None]
        return Skip("no_patient_geometry", f"no {', '.join(missing)}")
    if n == 1:
        return [_Plane(index, 0, pos, iop, (ps[0], ps[1]), rows, columns)]
    offsets = _floats(ds.get("GridFrameOffsetVector") or [], n)
    if offsets is None:  # a cine loop or time series at one position: not a volume
        return Skip("no_patient_geometry",
                    f"{n} frames with one ImagePositionPatient and no per-frame positions")
    # relative offsets start at 0; the older absolute form starts at the first plane's
    # coordinate along the normal (PS3.3 C.8.8.3.2): relative to the first either way
    offsets = offsets - offsets[0]
    normal = np.cross(iop[:3], iop[3:])
    return [_Plane(index, k, pos + offsets[k] * normal, iop, (ps[0], ps[1]), rows, columns)
            for k in range(n)]


def plan_volume(datasets: Sequence) -> tuple[list[_Plane], tuple[float, float, float]] | Skip:
    """The planes of a series in volume order and its spacing, or why they make no volume.

    Headers only: the datasets may be read with ``stop_before_pixels``."""
    planes: list[_Plane] = []
    for i, ds in enumerate(datasets):
        if ds.get("SOPClassUID") == SEG:
            return Skip("segmentation", "a SEG object; read its segments with highdicom")
        if "PixelData" not in ds and "FloatPixelData" not in ds \
                and "DoubleFloatPixelData" not in ds and not ds.get("Rows"):
            return Skip("no_pixel_data",
                        f"{ds.get('Modality') or 'an object'} without pixel data")
        got = _planes(i, ds)
        if isinstance(got, Skip):
            return got
        planes.extend(got)
    if not planes:
        return Skip("no_pixel_data", "no image planes")
    first = planes[0]
    if any(np.max(np.abs(p.orientation - first.orientation)) > ORIENTATION_TOLERANCE
           for p in planes):
        return Skip("mixed_orientations", "planes of more than one orientation")
    formats = {(p.rows, p.columns) for p in planes}
    if len(formats) > 1:
        return Skip("mixed_dimensions", f"matrix sizes {sorted(formats)}")
    pixel = {(ds.get("SamplesPerPixel"), ds.get("BitsAllocated"),
              ds.get("PhotometricInterpretation")) for ds in datasets}
    if len(pixel) > 1:
        return Skip("mixed_dimensions", "more than one pixel format (samples, bits, "
                    "photometric interpretation)")
    if any(abs(p.spacing[0] - first.spacing[0]) > 1e-4
           or abs(p.spacing[1] - first.spacing[1]) > 1e-4 for p in planes):
        return Skip("mixed_dimensions", "more than one pixel spacing")
    row, col = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, col)
    planes.sort(key=lambda p: (float(np.dot(normal, p.position)), p.instance, p.frame))
    depth = np.array([float(np.dot(normal, p.position)) for p in planes])
    gaps = np.diff(depth)
    if len(gaps) and float(gaps.min()) < POSITION_TOLERANCE:
        return Skip("overlapping_planes",
                    f"{int(np.sum(gaps < POSITION_TOLERANCE)) + 1} planes share a position")
    base = planes[0].position
    for p, d in zip(planes, depth, strict=True):
        lateral = (p.position - base) - (d - depth[0]) * normal
        if float(np.linalg.norm(lateral)) > max(POSITION_TOLERANCE, 1e-4 * abs(d - depth[0])):
            return Skip("sheared_stack", "planes are offset across the slice normal "
                        f"by up to {float(np.linalg.norm(lateral)):.3g} mm")
    if len(gaps) and float(gaps.max() - gaps.min()) > SPACING_TOLERANCE * float(
            np.median(gaps)):
        return Skip("uneven_spacing", f"gaps from {gaps.min():.4g} to {gaps.max():.4g} mm")
    if len(gaps):
        slice_spacing = float(np.mean(gaps))
    else:  # one plane: its SliceThickness as depth (else 1 mm)
        try:
            slice_spacing = float(datasets[0].get("SliceThickness") or 1.0) or 1.0
        except (TypeError, ValueError):
            slice_spacing = 1.0
        if not (slice_spacing > 0 and np.isfinite(slice_spacing)):
            slice_spacing = 1.0
    return planes, (first.spacing[1], first.spacing[0], slice_spacing)


def _rescale(ds, frame: int) -> tuple[float, float]:
    """(slope, intercept) of one frame: per-frame or shared PixelValueTransformation of an
    enhanced object, else the top-level attributes; RT Dose's DoseGridScaling as slope."""
    groups = []
    pf = ds.get("PerFrameFunctionalGroupsSequence")
    if pf is not None and frame < len(pf):
        groups.append(pf[frame])
    groups.append(_item(ds, "SharedFunctionalGroupsSequence"))
    slope = _group_attr(groups, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _group_attr(groups, "PixelValueTransformationSequence", "RescaleIntercept")
    if slope is None:
        slope = ds.get("RescaleSlope")
    if intercept is None:
        intercept = ds.get("RescaleIntercept")
    if slope is None and "DoseGridScaling" in ds:
        slope = ds.DoseGridScaling
    if (slope is None and "RescaleSlope" in ds) or (intercept is None and "RescaleIntercept" in ds):
        raise ValueError("Rescale Slope or Rescale Intercept is empty")
    try:
        return (float(slope) if slope is not None else 1.0,
                float(intercept) if intercept is not None else 0.0)
    except (TypeError, ValueError):
        raise ValueError("Rescale Slope or Rescale Intercept is not a number") from None


def _pixels(ds) -> np.ndarray:
    """All frames of an instance as (frames, rows, columns[, 3]), colour as RGB."""
    from pydicom.pixels import apply_color_lut

    arr = ds.pixel_array
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    return arr[np.newaxis] if _frames(ds) == 1 else arr


def build_volume(datasets: Sequence,
                 fallback: Callable[[int], np.ndarray] | None = None) -> Volume | Skip:
    """The volume of a series' instances (pydicom datasets with their pixel data).

    ``fallback(i)``: another decoder for instance ``i`` when pydicom cannot decode it
    (the export passes GDCM's, through SimpleITK): all its frames as
    ``(frames, rows, columns[, 3])``, already in modality units."""
    plan = plan_volume(datasets)
    if isinstance(plan, Skip):
        return plan
    planes, spacing = plan
    decoded: dict[int, np.ndarray] = {}
    rescaled: set[int] = set()  # instances the fallback decoded (values already rescaled)
    for p in planes:
        if p.instance in decoded:
            continue
        ds = datasets[p.instance]
        try:
            decoded[p.instance] = _pixels(ds)
            continue
        except Exception as exc:  # pydicom raises many kinds for undecodable pixel data
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            name = getattr(ts, "name", None) or "unknown transfer syntax"
            failure = Skip("pixel_decode_failed", f"{name}: pydicom: {_one_line(exc)}")
        if fallback is None:
            return failure
        try:
            arr = fallback(p.instance)
        except Exception as exc:
            failure.message += f"; GDCM: {_one_line(exc)}"
            return failure
        if arr.shape[0] != _frames(ds) or arr.shape[1:3] != (p.rows, p.columns):
            failure.message += f"; GDCM: decoded shape {arr.shape} does not match the header"
            return failure
        log.info("instance %d decoded by the fallback (%s)", p.instance, failure.message)
        decoded[p.instance] = arr
        rescaled.add(p.instance)
    colour = any(a.ndim == 4 for a in decoded.values())
    try:
        rescales = {(p.instance, p.frame): (1.0, 0.0) if p.instance in rescaled
                    else _rescale(datasets[p.instance], p.frame) for p in planes}
    except ValueError as exc:
        return Skip("invalid_header", str(exc))
    identity = all(s == 1.0 and b == 0.0 for s, b in rescales.values()) and (
        not rescaled or len({a.dtype for a in decoded.values()}) == 1)
    rescale = not identity and not colour
    dtype = _output_dtype(planes, decoded, rescales) if rescale else np.result_type(
        *[a.dtype for a in decoded.values()])
    # filled plane by plane: only one plane at a time is ever in float64
    array = np.empty((len(planes), *decoded[planes[0].instance].shape[1:]), dtype=dtype)
    for k, p in enumerate(planes):
        a = decoded[p.instance][p.frame]
        if rescale:
            s, b = rescales[(p.instance, p.frame)]
            with np.errstate(all="ignore"):  # checked below
                array[k] = a.astype(np.float64) * s + b
            if not np.isfinite(array[k]).all():
                return Skip("invalid_header", f"Rescale Slope {s:g} and Intercept {b:g} give "
                            f"values that are not finite (as {array.dtype})")
        else:
            array[k] = a
    first = planes[0]
    # DICOM writes cosines to a few decimals: made orthonormal here, as NIfTI's quaternion
    # will store them, so that the sidecar says what the file holds
    row = first.orientation[:3] / np.linalg.norm(first.orientation[:3])
    col = first.orientation[3:] - np.dot(first.orientation[3:], row) * row
    col = col / np.linalg.norm(col)
    direction = np.column_stack([row, col, np.cross(row, col)])
    ds0 = datasets[first.instance]
    values = {
        "PhotometricInterpretation": ds0.get("PhotometricInterpretation"),
        "stored_as": "RGB" if colour else "MONOCHROME",
        "rescale_applied": not identity and not colour,
        "rescale": sorted({f"{s:g}*x+{b:g}" for s, b in rescales.values()}),
        "dose_grid_scaling": "DoseGridScaling" in ds0,
        "decoder": "GDCM (pydicom could not decode)" if rescaled else "pydicom",
    }
    if ds0.get("PhotometricInterpretation") == "MONOCHROME1":
        values["note"] = "MONOCHROME1: higher values are displayed darker"
    x, y, z = (float(v) for v in first.position)
    return Volume(array, (x, y, z), spacing, tuple(float(x) for x in direction.ravel()),
                  [(p.instance, p.frame) for p in planes], values)


def _one_line(exc: BaseException) -> str:
    """The error on one line, with the values it quotes from the file left out (the
    manifest goes to researchers with the volumes)."""
    return " ".join(error_text(exc).split())[:300]


def _output_dtype(planes: list[_Plane], decoded: dict[int, np.ndarray],
                  rescales: dict[tuple[int, int], tuple[float, float]]) -> np.dtype:
    """int16 or int32 when stored integers rescale by integers into its range (CT's
    slope 1, intercept -1024), else float32."""
    if not all(float(s).is_integer() and float(b).is_integer() for s, b in rescales.values()):
        return np.dtype(np.float32)
    if not all(np.issubdtype(a.dtype, np.integer) for a in decoded.values()):
        return np.dtype(np.float32)
    lo, hi = np.inf, -np.inf
    for p in planes:
        a = decoded[p.instance][p.frame]
        s, b = rescales[(p.instance, p.frame)]
        ends = (float(a.min()) * s + b, float(a.max()) * s + b) if a.size else (b, b)
        lo, hi = min(lo, *ends), max(hi, *ends)
    for t in (np.int16, np.int32):
        if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype(np.float64)


__all__ = ["REASONS", "Skip", "Volume", "build_volume", "plan_volume"]
