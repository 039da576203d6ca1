"""Image series as 3-D volumes: geometry checks and assembly along the slice normal.

:func:`series_geometry` is pure: it takes the ``instances`` rows of one series
(positions, orientations, spacings, matrix sizes) and says whether they make
one regular volume, with the checks of IDC's volume geometry index.
:func:`load_volume` reads the pixels of such a series (paths from the vault
``files`` table), sorts the slices along the normal, converts to modality units
and returns a SimpleITK image whose origin, spacing and direction are the
patient geometry of the DICOM files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from etl.errors import FeatureError
from etl.sourcefiles import Source, SourceChangedError, open_source
from lakehouse.errors import error_text

log = logging.getLogger(__name__)

#: Relative tolerance on slice gaps before a series is "unevenly spaced".
SPACING_TOLERANCE = 0.01
#: Tilt (degrees) above which a stack is "tilted".
TILT_TOLERANCE_DEG = 0.01
#: Component tolerance for an axis-aligned slice normal.
OBLIQUE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Slice:
    """One image plane of a series, as the lake knows it from the header."""

    SOPInstanceUID: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    rows: int | None
    columns: int | None

    @classmethod
    def from_row(cls, row: dict) -> Slice:
        def tup(v, n):
            if v is None or len(v) != n or any(x is None for x in v):
                return None
            return tuple(float(x) for x in v)

        return cls(row["SOPInstanceUID"], tup(row.get("ImagePositionPatient"), 3),
                   tup(row.get("ImageOrientationPatient"), 6),
                   tup(row.get("PixelSpacing"), 2), row.get("Rows"), row.get("Columns"))


@dataclass
class Geometry:
    """The geometry of one series: the ``series_geometry`` row plus the slice order."""

    row: dict
    #: SOPInstanceUIDs sorted along the normal (only when a single stack)
    order: list[str] = field(default_factory=list)
    #: 4x4 voxel-index (x=column, y=row, z=slice) -> patient mm
    affine: np.ndarray | None = None

    @property
    def volume_ok(self) -> bool:
        return bool(self.row.get("volume_ok"))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns): the numpy shape of the volume."""
        return (len(self.order), int(self.row["Rows"]), int(self.row["Columns"]))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """SimpleITK spacing (column, row, slice) in mm."""
        return (self.row["column_spacing"], self.row["row_spacing"],
                self.row["slice_spacing_median"] or 1.0)


def _orientation_name(normal: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(normal)))
    if np.max(np.abs(normal)) < 1 - OBLIQUE_TOLERANCE:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def series_geometry(rows: Sequence[dict], series_uid: str = "") -> Geometry:
    """Check the slices of a series (``instances`` rows) and order them along the normal."""
    slices = [Slice.from_row(r) for r in rows]
    first = rows[0] if rows else {}
    out: dict = {
        "SeriesInstanceUID": series_uid or first.get("SeriesInstanceUID"),
        "StudyInstanceUID": first.get("StudyInstanceUID"),
        "Modality": first.get("Modality"),
        "instance_count": len(slices),
    }
    issues: list[str] = []
    usable = [s for s in slices if s.position and s.orientation and s.pixel_spacing
              and s.rows and s.columns]
    out["slice_count"] = len(usable)
    if not usable:
        out.update(volume_ok=False, issues=["no_geometry"])
        return Geometry(out)
    orientations = {tuple(round(v, 4) for v in s.orientation or ()) for s in usable}
    dims = {(s.rows, s.columns) for s in usable}
    out["distinct_orientations"] = len(orientations)
    out["distinct_dimensions"] = len(dims)
    out["mixed_dimensions"] = len(dims) > 1
    ref = usable[0]
    assert ref.orientation is not None and ref.pixel_spacing is not None
    row_dir = np.array(ref.orientation[:3])
    col_dir = np.array(ref.orientation[3:])
    normal = np.cross(row_dir, col_dir)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        out.update(volume_ok=False, issues=["no_geometry"])
        return Geometry(out)
    normal = normal / norm
    out["normal_x"], out["normal_y"], out["normal_z"] = (float(v) for v in normal)
    out["orientation"] = _orientation_name(normal)
    out["is_oblique"] = out["orientation"] == "oblique"
    if len(dims) == 1:
        out["Rows"], out["Columns"] = next(iter(dims))
    out["row_spacing"], out["column_spacing"] = ref.pixel_spacing
    positions = np.array([s.position for s in usable], dtype=float)
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    dist_sorted = dist[order]
    rounded = np.round(dist_sorted, 2)
    distinct = np.unique(rounded)
    out["distinct_positions"] = len(distinct)
    out["duplicate_positions"] = int(len(rounded) - len(distinct))
    out["multiple_stacks"] = len(orientations) > 1 or out["duplicate_positions"] > 0
    gaps = np.diff(distinct)
    tilt = 0.0
    if len(distinct) > 1:
        median = float(np.median(gaps))
        out["slice_spacing_median"] = median
        out["slice_spacing_min"] = float(gaps.min())
        out["slice_spacing_max"] = float(gaps.max())
        out["slice_spacing_std"] = float(gaps.std())
        extent = float(distinct[-1] - distinct[0])
        out["missing_slices"] = max(0, round(extent / median) + 1 - len(distinct)) if median else 0
        out["uneven_spacing"] = bool(np.any(np.abs(gaps - median) > SPACING_TOLERANCE * median))
        p_first, p_last = positions[order[0]], positions[order[-1]]
        line = p_last - p_first
        length = float(np.linalg.norm(line))
        if length > 0:
            cosang = min(1.0, abs(float(line @ normal)) / length)
            tilt = math.degrees(math.acos(cosang))
    else:
        out["missing_slices"] = 0
        out["uneven_spacing"] = False
    out["tilt_degrees"] = tilt
    out["is_tilted"] = tilt > TILT_TOLERANCE_DEG
    if out["mixed_dimensions"]:
        issues.append("mixed_dimensions")
    if out["multiple_stacks"]:
        issues.append("multiple_stacks")
    if out["missing_slices"]:
        issues.append("missing_slices")
    if out["uneven_spacing"]:
        issues.append("uneven_spacing")
    if out["is_tilted"]:
        issues.append("tilted")
    if out["is_oblique"]:
        issues.append("oblique")
    blocking = {"mixed_dimensions", "multiple_stacks", "missing_slices", "uneven_spacing",
                "tilted"}
    out["volume_ok"] = not blocking.intersection(issues)
    out["issues"] = issues
    p0 = positions[order[0]]
    out["origin"] = [float(v) for v in p0]
    geo = Geometry(out, [usable[i].SOPInstanceUID for i in order])
    rs, cs = ref.pixel_spacing
    dz = out.get("slice_spacing_median") or 1.0
    affine = np.eye(4)
    affine[:3, 0] = row_dir * cs  # x index runs along a row: column spacing
    affine[:3, 1] = col_dir * rs
    affine[:3, 2] = normal * dz
    affine[:3, 3] = p0
    geo.affine = affine
    return geo


def to_modality_units(ds, arr: np.ndarray, checked: bool = True) -> np.ndarray:
    """Stored values -> modality units (Rescale Slope/Intercept or the Modality LUT).

    Raises ValueError when the rescale cannot give numbers: an empty Rescale Slope or
    Intercept, or (``checked``) one that makes a value infinite or NaN (a damaged
    header), so that such an instance is a pixel failure and never a statistic of
    infinities. ``checked=False`` spares that pass over pixels whose distinct values
    were converted with the check already.
    """
    from pydicom.pixels import apply_modality_lut

    if not ds.get("ModalityLUTSequence") and "RescaleSlope" in ds and "RescaleIntercept" in ds \
            and (ds.RescaleSlope is None or ds.RescaleIntercept is None):
        raise ValueError("Rescale Slope or Rescale Intercept is empty")
    out = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    if checked and not np.isfinite(out).all():
        raise ValueError(f"Rescale Slope {ds.get('RescaleSlope')!s} and Intercept "
                         f"{ds.get('RescaleIntercept')!s} give values that are not finite")
    return out


def check_volume(geometry: Geometry, paths: Mapping[str, Source | str]) -> None:
    """Raise :class:`FeatureError` unless the series makes one volume with every file known."""
    series = geometry.row.get("SeriesInstanceUID")
    if not geometry.volume_ok:
        raise FeatureError("not_a_volume", series,
                           f"series {series} is not one regular volume "
                           f"({', '.join(geometry.row.get('issues') or [])})")
    for sop in geometry.order:
        if paths.get(sop) is None:
            raise FeatureError("missing_file", series,
                               f"no ingested source file for instance {sop} of series {series}")


def load_volume(geometry: Geometry, paths: Mapping[str, Source | str]):
    """Read the series' pixels into a SimpleITK image (float32, modality units).

    ``paths`` maps SOPInstanceUID -> source file (or a plain path). Raises
    :class:`FeatureError` when the series is not one regular volume or a file is
    missing, changed since it was ingested or undecodable.
    """
    import pydicom
    import SimpleITK as sitk

    series = geometry.row.get("SeriesInstanceUID")
    check_volume(geometry, paths)
    planes = []
    for sop in geometry.order:
        path = paths[sop]
        try:
            ds = pydicom.dcmread(open_source(path), force=True)  # may lack a preamble
            ds.pixel_array_options(allow_excess_frames=False)  # the frames declared
            stored = ds.pixel_array
            if stored.ndim != 2:
                raise FeatureError("not_a_volume", series, f"instance {sop} is not one "
                                   f"greyscale plane (pixels of shape {stored.shape})")
            plane = to_modality_units(ds, stored)
            with np.errstate(over="ignore"):
                planes.append(plane.astype(np.float32))
            if not np.isfinite(planes[-1]).all():
                raise ValueError(f"modality values up to {np.abs(plane).max():.3g} are beyond "
                                 "float32's range (Rescale Slope and Intercept)")
        except SourceChangedError as exc:
            raise FeatureError("source_changed", series, f"{sop}: {exc}") from None
        except FeatureError:
            raise
        except Exception as exc:  # pydicom raises many types for undecodable pixel data
            raise FeatureError("pixel_decode", series,
                               f"cannot decode pixels of {sop}: {error_text(exc)}"
                               ) from None
    image = sitk.GetImageFromArray(np.stack(planes))
    apply_geometry(image, geometry)
    return image


def apply_geometry(image, geometry: Geometry) -> None:
    """Set origin, spacing and direction of a SimpleITK image from the series geometry."""
    assert geometry.affine is not None
    a = geometry.affine[:3, :3]
    spacing = geometry.spacing
    direction = a / np.array(spacing)[None, :]
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in geometry.affine[:3, 3]])
    image.SetDirection([float(v) for v in direction.flatten()])
