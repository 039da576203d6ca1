"""Segmentation masks on an image series' own grid: DICOM SEG, RTSTRUCT, NIfTI/NRRD.

A mask is placed on the voxel grid of the image volume built by
:mod:`etl.volumes` (slices sorted along the normal). Placement is exact or it
fails: a SEG frame must sit on an image slice with the same orientation,
pixel spacing and matrix; an RTSTRUCT contour must lie in an image plane; a
mask file must have the image's grid up to a permutation or flip of its axes.
Anything else is a :class:`~etl.errors.GeometryMismatchError` naming the
property that differs. Nothing is ever resampled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from etl.errors import FeatureError, GeometryMismatchError
from etl.sourcefiles import Source, SourceChangedError, open_source
from etl.volumes import Geometry
from lakehouse.errors import error_text

log = logging.getLogger(__name__)

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
MASK_SOP_CLASSES = (SEG_SOP_CLASS, RTSTRUCT_SOP_CLASS)

#: In-plane and through-plane placement tolerance, in voxels.
INDEX_TOLERANCE = 0.01
#: Relative tolerance on spacings, absolute on direction cosines.
SPACING_TOLERANCE = 1e-4
DIRECTION_TOLERANCE = 1e-4


@dataclass
class Segment:
    number: int
    label: str
    #: boolean array of the image volume's shape (slices, rows, columns)
    mask: np.ndarray

    @property
    def voxel_count(self) -> int:
        return int(np.count_nonzero(self.mask))


@dataclass
class MaskSet:
    source: str  # seg, rtstruct, file:<name>
    sop_uid: str | None
    segments: list[Segment] = field(default_factory=list)


def referenced_series(ds) -> str | None:
    """The image series a SEG or RTSTRUCT data set refers to (header only)."""
    for item in getattr(ds, "ReferencedSeriesSequence", []) or []:
        uid = getattr(item, "SeriesInstanceUID", None)
        if uid:
            return str(uid)
    for frame_ref in getattr(ds, "ReferencedFrameOfReferenceSequence", []) or []:
        for study in getattr(frame_ref, "RTReferencedStudySequence", []) or []:
            for series in getattr(study, "RTReferencedSeriesSequence", []) or []:
                uid = getattr(series, "SeriesInstanceUID", None)
                if uid:
                    return str(uid)
    return None


def labels_from_json(dicom_json: str | None) -> dict[int, str]:
    """Segment number -> label from the lake's own DICOM JSON of a SEG or RTSTRUCT.

    In research lakes that header went through the privacy policy (labels
    cleaned of identifiers), so the lake's labels are used, not the file's.
    """
    import json

    if not dicom_json:
        return {}
    try:
        ds = json.loads(dicom_json)
    except ValueError:
        return {}

    def first(item: dict, tag: str):
        values = (item.get(tag) or {}).get("Value") or []
        return values[0] if values else None

    out: dict[int, str] = {}
    # SegmentSequence / SegmentNumber, SegmentLabel; StructureSetROISequence / ROINumber, ROIName
    for seq, num, name in (("00620002", "00620004", "00620005"),
                           ("30060020", "30060022", "30060026")):
        for item in (ds.get(seq) or {}).get("Value") or []:
            n, label = first(item, num), first(item, name)
            if n is not None:
                out[int(n)] = "" if label is None else str(label)
    return out


def _index_of(geometry: Geometry, points: np.ndarray) -> np.ndarray:
    """Patient mm (N, 3) -> continuous voxel index (N, 3) as (column, row, slice)."""
    assert geometry.affine is not None
    inv = np.linalg.inv(geometry.affine)
    homo = np.c_[points, np.ones(len(points))]
    return (homo @ inv.T)[:, :3]


def _series(geometry: Geometry) -> str | None:
    return geometry.row.get("SeriesInstanceUID")


def _check_plane(geometry: Geometry, orientation, spacing, rows, columns,
                 mask_uid: str | None) -> None:
    series = _series(geometry)
    assert geometry.affine is not None
    a = geometry.affine[:3, :3] / np.array(geometry.spacing)[None, :]
    image_orientation = [float(v) for v in (*a[:, 0], *a[:, 1])]
    if orientation is not None:
        o = [float(v) for v in orientation]
        if len(o) != 6 or np.max(np.abs(np.array(o) - image_orientation)) > DIRECTION_TOLERANCE:
            raise GeometryMismatchError(series, "ImageOrientationPatient",
                                        [round(v, 6) for v in image_orientation], o, mask_uid)
    if spacing is not None:
        expected = (geometry.row["row_spacing"], geometry.row["column_spacing"])
        s = tuple(float(v) for v in spacing)
        if any(abs(x - e) > SPACING_TOLERANCE * e for x, e in zip(s, expected, strict=True)):
            raise GeometryMismatchError(series, "PixelSpacing", list(expected), list(s),
                                        mask_uid)
    expected_dims = (geometry.row["Rows"], geometry.row["Columns"])
    if rows is not None and (int(rows), int(columns)) != expected_dims:
        raise GeometryMismatchError(series, "Rows x Columns", list(expected_dims),
                                    [int(rows), int(columns)], mask_uid)


def _slice_index(geometry: Geometry, position, mask_uid: str | None) -> int:
    idx = _index_of(geometry, np.array([[float(v) for v in position]]))[0]
    k = round(float(idx[2]))
    series = _series(geometry)
    nz = geometry.shape[0]
    if abs(idx[0]) > INDEX_TOLERANCE or abs(idx[1]) > INDEX_TOLERANCE:
        raise GeometryMismatchError(series, "in-plane origin (voxels)", [0.0, 0.0],
                                    [round(float(idx[0]), 3), round(float(idx[1]), 3)],
                                    mask_uid)
    if abs(idx[2] - k) > INDEX_TOLERANCE or not 0 <= k < nz:
        raise GeometryMismatchError(series, "slice position (index)",
                                    f"an integer in [0, {nz - 1}]", round(float(idx[2]), 3),
                                    mask_uid)
    return k


def _check_frame_count(ds) -> None:
    """Raise ValueError unless NumberOfFrames is the number of per-frame functional groups
    (PS3.3 C.7.6.16: one item per frame). highdicom sizes its frame index by it: a damaged
    count (2,147,483,647) made it take all the machine's memory, and the kernel killed
    the worker."""
    groups = ds.get("PerFrameFunctionalGroupsSequence")
    try:
        frames = int(ds.get("NumberOfFrames"))
    except (TypeError, ValueError):
        frames = None
    if groups is None or frames != len(groups):
        raise ValueError(f"Number of Frames ({'not a number' if frames is None else frames}) "
                         f"is not the number of per-frame functional groups "
                         f"({'none' if groups is None else len(groups)})")


def read_seg(path: Source | str | Path, geometry: Geometry) -> MaskSet:
    """A DICOM SEG (binary or fractional) placed frame by frame on the image grid."""
    import highdicom as hd
    import pydicom

    series = _series(geometry)
    try:
        # force: checked by the ingest; a Part 10 file may lack its preamble
        ds = pydicom.dcmread(open_source(path), force=True)
        _check_frame_count(ds)
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
        frames = seg.pixel_array
    except SourceChangedError as exc:
        raise FeatureError("source_changed", series, f"the SEG: {exc}") from None
    except Exception as exc:
        raise FeatureError("unsupported_mask", series,
                           f"cannot read the SEG: {error_text(exc)}"
                           ) from None
    uid = str(seg.SOPInstanceUID)
    if frames.ndim == 2:
        frames = frames[None]
    fractional = str(seg.SegmentationType) == "FRACTIONAL"
    threshold = (float(getattr(seg, "MaximumFractionalValue", 255)) / 2) if fractional else 0
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg \
        else None

    def group(frame_item, name):
        if name in frame_item:
            return frame_item[name].value[0]
        if shared is not None and name in shared:
            return shared[name].value[0]
        return None

    labels = {int(d.SegmentNumber): str(d.SegmentLabel) for d in seg.SegmentSequence}
    masks = {n: np.zeros(geometry.shape, dtype=bool) for n in labels}
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        orient = group(item, "PlaneOrientationSequence")
        measures = group(item, "PixelMeasuresSequence")
        _check_plane(geometry, orient.ImageOrientationPatient if orient else None,
                     measures.PixelSpacing if measures else None, seg.Rows, seg.Columns, uid)
        pos = group(item, "PlanePositionSequence")
        if pos is None:
            raise FeatureError("unsupported_mask", series,
                               f"SEG frame {i + 1} has no PlanePositionSequence", uid)
        k = _slice_index(geometry, pos.ImagePositionPatient, uid)
        seg_id = group(item, "SegmentIdentificationSequence")
        number = int(seg_id.ReferencedSegmentNumber) if seg_id is not None else None
        if number not in masks:
            raise FeatureError("unsupported_mask", series, f"SEG frame {i + 1} references "
                               f"segment {number}, which its SegmentSequence does not define",
                               uid)
        masks[number][k] |= frames[i] > threshold
    return MaskSet("seg", uid, [Segment(n, labels[n], masks[n]) for n in sorted(labels)])


def read_rtstruct(path: Source | str | Path, geometry: Geometry) -> MaskSet:
    """An RTSTRUCT's closed planar contours rasterized on the image slices (even-odd rule)."""
    import pydicom
    from skimage.draw import polygon

    series = _series(geometry)
    try:
        ds = pydicom.dcmread(open_source(path), force=True)  # may lack a preamble
        rois = {int(r.ROINumber): str(getattr(r, "ROIName", r.ROINumber))
                for r in ds.StructureSetROISequence}
        contours = list(ds.ROIContourSequence)
    except SourceChangedError as exc:
        raise FeatureError("source_changed", series, f"the RTSTRUCT: {exc}") from None
    except Exception as exc:
        raise FeatureError("unsupported_mask", series,
                           f"cannot read the RTSTRUCT: {error_text(exc)}"
                           ) from None
    uid = str(ds.SOPInstanceUID)
    nz, ny, nx = geometry.shape
    segments = []
    for roi in contours:
        number = int(roi.ReferencedROINumber)
        mask = np.zeros(geometry.shape, dtype=bool)
        for contour in getattr(roi, "ContourSequence", []) or []:
            kind = str(getattr(contour, "ContourGeometricType", "CLOSED_PLANAR"))
            if kind != "CLOSED_PLANAR":
                continue  # points and open polylines enclose no voxel
            pts = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
            idx = _index_of(geometry, pts)
            k = np.round(idx[:, 2])
            if np.max(np.abs(idx[:, 2] - k)) > INDEX_TOLERANCE or len(set(k.tolist())) != 1:
                raise GeometryMismatchError(series, "contour plane (slice index)",
                                            "one integer slice index",
                                            sorted({round(float(v), 3) for v in idx[:, 2]})[:4],
                                            uid)
            kk = int(k[0])
            if not 0 <= kk < nz:
                raise GeometryMismatchError(series, "contour slice index", f"0..{nz - 1}", kk,
                                            uid)
            rr, cc = polygon(idx[:, 1], idx[:, 0], shape=(ny, nx))
            plane = np.zeros((ny, nx), dtype=bool)
            plane[rr, cc] = True
            mask[kk] ^= plane  # even-odd: an inner contour is a hole
        segments.append(Segment(number, rois.get(number, str(number)), mask))
    return MaskSet("rtstruct", uid, segments)


def read_mask_file(path: str | Path, geometry: Geometry) -> MaskSet:
    """A label map (NIfTI, NRRD, any format SimpleITK reads); each non-zero value a segment.

    The file's grid must be the image grid up to a permutation or flip of
    axes (a pure re-indexing, no interpolation); otherwise GeometryMismatchError.
    """
    import SimpleITK as sitk

    series = _series(geometry)
    name = Path(path).name
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise FeatureError("unsupported_mask", series,
                           f"cannot read mask file {name}: {str(exc).strip().splitlines()[-1]}"
                           ) from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise FeatureError("unsupported_mask", series,
                           f"mask file {name} must be a 3-D scalar label map")
    spacing = np.array(img.GetSpacing())
    direction = np.array(img.GetDirection()).reshape(3, 3)
    mask_affine = np.eye(4)
    mask_affine[:3, :3] = direction * spacing[None, :]
    mask_affine[:3, 3] = img.GetOrigin()
    assert geometry.affine is not None
    m = np.linalg.inv(geometry.affine) @ mask_affine  # mask index -> image index
    lin = m[:3, :3]
    perm = np.round(lin)
    ok = (np.max(np.abs(lin - perm)) < SPACING_TOLERANCE * 10
          and np.all(np.abs(perm).sum(axis=0) == 1) and np.all(np.abs(perm).sum(axis=1) == 1))
    if not ok:
        raise GeometryMismatchError(series, "voxel grid (spacing/direction)",
                                    [round(v, 6) for v in geometry.spacing],
                                    [round(float(v), 6) for v in spacing], None)
    arr = sitk.GetArrayFromImage(img)  # (k, j, i)
    size = np.array(img.GetSize())  # (i, j, k)
    corners = np.array([[0, 0, 0], size - 1])
    mapped = (np.c_[corners, np.ones(2)] @ m.T)[:, :3]
    image_size = np.array(geometry.shape[::-1])
    lo, hi = np.minimum(*mapped), np.maximum(*mapped)
    if (np.max(np.abs(lo)) > INDEX_TOLERANCE
            or np.max(np.abs(hi - (image_size - 1))) > INDEX_TOLERANCE):
        raise GeometryMismatchError(series, "grid extent (voxels, x y z)",
                                    image_size.tolist(), size.tolist(), None)
    # re-index: image axis a takes mask axis b (flipped when the sign is negative)
    out = arr
    axes_np = []
    flips = []
    for a in range(3):  # image axes in (i, j, k)
        b = int(np.argmax(np.abs(perm[a])))
        axes_np.append(2 - b)
        flips.append(perm[a, b] < 0)
    out = np.transpose(arr, axes=[axes_np[2], axes_np[1], axes_np[0]])
    for a, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=2 - a)
    labels = sorted(int(v) for v in np.unique(out) if v != 0)
    return MaskSet(f"file:{name}", None,
                   [Segment(v, str(v), out == v) for v in labels])
