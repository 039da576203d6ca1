-- series: one row per SeriesInstanceUID, rebuilt from `instances` (storage types:
-- times are ISO strings). Column names follow IDC's idc_index where they exist.
WITH geo AS (
    SELECT
        SeriesInstanceUID,
        ImagePositionPatient AS ipp,
        -- slice normal = row direction x column direction
        ImageOrientationPatient[2] * ImageOrientationPatient[6]
            - ImageOrientationPatient[3] * ImageOrientationPatient[5] AS nx,
        ImageOrientationPatient[3] * ImageOrientationPatient[4]
            - ImageOrientationPatient[1] * ImageOrientationPatient[6] AS ny,
        ImageOrientationPatient[1] * ImageOrientationPatient[5]
            - ImageOrientationPatient[2] * ImageOrientationPatient[4] AS nz
    FROM instances
    WHERE len(ImageOrientationPatient) = 6 AND len(ImagePositionPatient) = 3
),
positions AS (
    SELECT DISTINCT SeriesInstanceUID, round(ipp[1] * nx + ipp[2] * ny + ipp[3] * nz, 3) AS d
    FROM geo
),
gaps AS (
    SELECT SeriesInstanceUID, d - lag(d) OVER (PARTITION BY SeriesInstanceUID ORDER BY d) AS gap
    FROM positions
),
spacing AS (
    SELECT
        SeriesInstanceUID,
        count(*) AS distinct_positions,
        min(gap) AS slice_spacing_min,
        max(gap) AS slice_spacing_max
    FROM gaps
    GROUP BY SeriesInstanceUID
),
agg AS (
    SELECT
        SeriesInstanceUID,
        min(StudyInstanceUID) AS StudyInstanceUID,
        min(PatientID) AS PatientID,
        min(PatientAge) AS PatientAge,
        min(PatientSex) AS PatientSex,
        min(StudyDate) AS StudyDate,
        min(StudyDescription) AS StudyDescription,
        min(BodyPartExamined) AS BodyPartExamined,
        min(Modality) AS Modality,
        min(Manufacturer) AS Manufacturer,
        min(ManufacturerModelName) AS ManufacturerModelName,
        min(StationName) AS StationName,
        min(SeriesDate) AS SeriesDate,
        min(SeriesTime) AS SeriesTime,
        min(SeriesDescription) AS SeriesDescription,
        min(SeriesNumber) AS SeriesNumber,
        min(ProtocolName) AS ProtocolName,
        min(SOPClassUID) AS SOPClassUID,
        count(*) AS instanceCount,
        sum(file_size) / 1e6 AS series_size_MB,
        sum(coalesce(NumberOfFrames, 1)) AS frame_count,
        min(InstanceNumber) AS instance_number_min,
        max(InstanceNumber) AS instance_number_max,
        min(SliceThickness) AS slice_thickness_min,
        max(SliceThickness) AS slice_thickness_max,
        min(list_min(PixelSpacing)) AS pixel_spacing_min,
        max(list_max(PixelSpacing)) AS pixel_spacing_max,
        min(KVP) AS kvp_min,
        max(KVP) AS kvp_max,
        min(CTDIvol) AS ctdivol_min,
        max(CTDIvol) AS ctdivol_max,
        min(AcquisitionDate) AS acquisition_date_min,
        max(AcquisitionDate) AS acquisition_date_max,
        count(DISTINCT list_transform(ImageOrientationPatient, lambda x: round(x, 4)))
            AS distinct_orientations,
        count(DISTINCT CAST(Rows AS VARCHAR) || 'x' || CAST(Columns AS VARCHAR))
            AS distinct_dimensions,
        min(study_year) AS study_year,
        min(ingest_run_id) AS first_ingest_run_id,
        max(ingest_run_id) AS last_ingest_run_id
    FROM instances
    GROUP BY SeriesInstanceUID
)
SELECT
    agg.*,
    coalesce(spacing.distinct_positions, 0) AS distinct_positions,
    spacing.slice_spacing_min,
    spacing.slice_spacing_max,
    coalesce(spacing.slice_spacing_max - spacing.slice_spacing_min
             > 0.01 * spacing.slice_spacing_min, false) AS uneven_spacing
FROM agg
LEFT JOIN spacing USING (SeriesInstanceUID)
ORDER BY SeriesInstanceUID
