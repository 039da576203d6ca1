"""Inputs for the features tests: the real CT + SEG (read in place) and DICOM written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DCMQI = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "dcmqi-ct-seg"
CT_SERIES = "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"
SKIP_DCMQI = f"the real CT + SEG test data is not at {DCMQI} (shared/data/dcmqi-ct-seg)"

#: the RTSTRUCT square: columns 100..199, rows 150..229 on every CT slice
RT_COLS = (100, 200)
RT_ROWS = (150, 230)


def ct_headers() -> list[Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True)
            for p in sorted((DCMQI / "ct-3slice").glob("*.dcm"))]


def real_ct_volume():
    """The real 3-slice CT as ``(headers, series geometry, image volume)``, read the way
    the features job reads a series."""
    from etl.volumes import load_volume, series_geometry

    headers = ct_headers()
    files = sorted((DCMQI / "ct-3slice").glob("*.dcm"))
    rows = [{"SOPInstanceUID": h.SOPInstanceUID, "SeriesInstanceUID": h.SeriesInstanceUID,
             "ImagePositionPatient": [float(v) for v in h.ImagePositionPatient],
             "ImageOrientationPatient": [float(v) for v in h.ImageOrientationPatient],
             "PixelSpacing": [float(v) for v in h.PixelSpacing], "Rows": h.Rows,
             "Columns": h.Columns} for h in headers]
    geo = series_geometry(rows)
    image = load_volume(geo, {h.SOPInstanceUID: str(p) for h, p in zip(headers, files,
                                                                       strict=True)})
    return headers, geo, image


def write_rtstruct(path: Path, cts: list[Dataset], cols: tuple[int, int] = RT_COLS,
                   rows: tuple[int, int] = RT_ROWS) -> Dataset:
    """An RTSTRUCT with one ROI: a rectangle (pixel edges) on each slice of the CT, over
    columns ``cols`` and rows ``rows`` (first, one past the last)."""
    ref = cts[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = ref.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = ref.FrameOfReferenceUID
    ds.PatientID = ref.PatientID
    ds.PatientName = ref.PatientName
    ds.StudyDate = ref.StudyDate
    ds.Modality = "RTSTRUCT"
    ds.StructureSetLabel = "test"
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = ref.SeriesInstanceUID
    study_ref = Dataset()
    study_ref.ReferencedSOPInstanceUID = ref.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = [series_ref]
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = ref.FrameOfReferenceUID
    frame_ref.RTReferencedStudySequence = [study_ref]
    ds.ReferencedFrameOfReferenceSequence = [frame_ref]
    roi = Dataset()
    roi.ROINumber = 7
    roi.ROIName = "Box"
    roi.ReferencedFrameOfReferenceUID = ref.FrameOfReferenceUID
    ds.StructureSetROISequence = [roi]
    contours = []
    for ct in cts:
        x0, y0, z = (float(v) for v in ct.ImagePositionPatient)
        rs, cs = (float(v) for v in ct.PixelSpacing)
        c0, c1 = cols[0] - 0.5, cols[1] - 0.5
        r0, r1 = rows[0] - 0.5, rows[1] - 0.5
        pts = [(c0, r0), (c1, r0), (c1, r1), (c0, r1)]
        c = Dataset()
        c.ContourGeometricType = "CLOSED_PLANAR"
        c.NumberOfContourPoints = 4
        c.ContourData = [f"{v:.6f}" for col, row in pts for v in (x0 + col * cs, y0 + row * rs, z)]
        contours.append(c)
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = 7
    roi_contour.ContourSequence = contours
    ds.ROIContourSequence = [roi_contour]
    ds.save_as(path, enforce_file_format=True)
    return ds


def sphere(shape: tuple[int, int, int], centre, radius_mm: float,
           spacing: tuple[float, float, float]) -> np.ndarray:
    """Boolean ball in array order; ``spacing`` (slice, row, column) in mm."""
    idx = np.indices(shape, dtype=np.float64)
    d2 = sum(((idx[a] - centre[a]) * spacing[a]) ** 2 for a in range(3))
    return d2 <= radius_mm ** 2
