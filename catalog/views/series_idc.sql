-- series_idc: the lake's series with exactly the column names and types of IDC's
-- series index (idc_index.parquet of the idc-index-data package), so that
--   SELECT * FROM series_idc UNION ALL BY NAME SELECT * FROM read_parquet('idc_index.parquet')
-- works. Columns IDC has and a local archive cannot have are NULL.
--   collection_id              'local' for every series of this lake (IDC: collection short name)
--   analysis_result_id         NULL (IDC: analysis results collection)
--   PatientID                  patient identifier (a pseudonym in research lakes)
--   SeriesInstanceUID          series UID
--   StudyInstanceUID           study UID
--   source_DOI                 NULL (IDC: DOI of the dataset)
--   PatientAge                 age string at the study, e.g. 045Y
--   PatientSex                 patient sex
--   StudyDate                  study date as text YYYY-MM-DD (IDC stores dates as text)
--   StudyDescription           study description
--   BodyPartExamined           body part examined
--   Modality                   modality
--   SOPClassUID                SOP class UID of the series' instances
--   sop_class_name             name of the SOP class, for the storage classes listed below
--   TransferSyntaxUID          most frequent transfer syntax of the series' instances
--   transfer_syntax_name       name of the transfer syntax, for the syntaxes listed below
--   PhotometricInterpretation  most frequent photometric interpretation of the instances
--   PixelRepresentation        NULL (not extracted by the lake)
--   Manufacturer               device manufacturer
--   ManufacturerModelName      device model
--   SeriesDate                 series date as text YYYY-MM-DD
--   SeriesDescription          series description
--   SeriesNumber               series number as text (IDC's type)
--   instanceCount              number of instances
--   license_short_name         NULL (IDC: data license)
--   series_init_idc_version    NULL (IDC: release that added the series)
--   series_revised_idc_version NULL (IDC: release that last revised the series)
--   aws_bucket                 NULL (IDC: bucket holding the files)
--   crdc_series_uuid           NULL (IDC: CRDC series UUID)
--   series_aws_url             NULL (IDC: download URL)
--   series_size_MB             total size of the series' files in MB (10^6 bytes)
CREATE VIEW series_idc AS
WITH per_series AS (
    SELECT
        SeriesInstanceUID,
        mode(TransferSyntaxUID) AS TransferSyntaxUID,
        mode(PhotometricInterpretation) AS PhotometricInterpretation
    FROM instances
    GROUP BY SeriesInstanceUID
)
SELECT
    'local'::VARCHAR AS collection_id,
    NULL::VARCHAR AS analysis_result_id,
    s.PatientID::VARCHAR AS PatientID,
    s.SeriesInstanceUID::VARCHAR AS SeriesInstanceUID,
    s.StudyInstanceUID::VARCHAR AS StudyInstanceUID,
    NULL::VARCHAR AS source_DOI,
    s.PatientAge::VARCHAR AS PatientAge,
    s.PatientSex::VARCHAR AS PatientSex,
    strftime(s.StudyDate, '%Y-%m-%d')::VARCHAR AS StudyDate,
    s.StudyDescription::VARCHAR AS StudyDescription,
    s.BodyPartExamined::VARCHAR AS BodyPartExamined,
    s.Modality::VARCHAR AS Modality,
    s.SOPClassUID::VARCHAR AS SOPClassUID,
    CASE s.SOPClassUID
        WHEN '1.2.840.10008.5.1.4.1.1.1' THEN 'Computed Radiography Image Storage'
        WHEN '1.2.840.10008.5.1.4.1.1.1.1' THEN 'Digital X-Ray Image Storage - For Presentation'
        WHEN '1.2.840.10008.5.1.4.1.1.1.2' THEN 'Digital Mammography X-Ray Image Storage - For Presentation'
        WHEN '1.2.840.10008.5.1.4.1.1.2' THEN 'CT Image Storage'
        WHEN '1.2.840.10008.5.1.4.1.1.2.1' THEN 'Enhanced CT Image Storage'
        WHEN '1.2.840.10008.5.1.4.1.1.4' THEN 'MR Image Storage'
        WHEN '1.2.840.10008.5.1.4.1.1.4.1' THEN 'Enhanced MR Image Storage'
        WHEN '1.2.840.10008.5.1.4.1.1.6.1' THEN 'Ultrasound Image Storage'
        WHEN '1.2.840.10008.5.1.4.1.1.3.1' THEN 'Ultrasound Multi-frame Image Storage'
        WHEN '1.2.840.10008.5.1.4.1.1.7' THEN 'Secondary Capture Image Storage'
        WHEN '1.2.840.10008.5.1.4.1.1.20' THEN 'Nuclear Medicine Image Storage'
        WHEN '1.2.840.10008.5.1.4.1.1.128' THEN 'Positron Emission Tomography Image Storage'
        WHEN '1.2.840.10008.5.1.4.1.1.66.4' THEN 'Segmentation Storage'
        WHEN '1.2.840.10008.5.1.4.1.1.481.3' THEN 'RT Structure Set Storage'
        WHEN '1.2.840.10008.5.1.4.1.1.88.67' THEN 'X-Ray Radiation Dose SR Storage'
        WHEN '1.2.840.10008.5.1.4.1.1.88.22' THEN 'Enhanced SR Storage'
        WHEN '1.2.840.10008.5.1.4.1.1.88.33' THEN 'Comprehensive SR Storage'
    END::VARCHAR AS sop_class_name,
    p.TransferSyntaxUID::VARCHAR AS TransferSyntaxUID,
    CASE p.TransferSyntaxUID
        WHEN '1.2.840.10008.1.2' THEN 'Implicit VR Little Endian'
        WHEN '1.2.840.10008.1.2.1' THEN 'Explicit VR Little Endian'
        WHEN '1.2.840.10008.1.2.2' THEN 'Explicit VR Big Endian'
        WHEN '1.2.840.10008.1.2.1.99' THEN 'Deflated Explicit VR Little Endian'
        WHEN '1.2.840.10008.1.2.4.50' THEN 'JPEG Baseline (Process 1)'
        WHEN '1.2.840.10008.1.2.4.57' THEN 'JPEG Lossless, Non-Hierarchical (Process 14)'
        WHEN '1.2.840.10008.1.2.4.70' THEN 'JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])'
        WHEN '1.2.840.10008.1.2.4.80' THEN 'JPEG-LS Lossless Image Compression'
        WHEN '1.2.840.10008.1.2.4.90' THEN 'JPEG 2000 Image Compression (Lossless Only)'
        WHEN '1.2.840.10008.1.2.4.91' THEN 'JPEG 2000 Image Compression'
        WHEN '1.2.840.10008.1.2.5' THEN 'RLE Lossless'
    END::VARCHAR AS transfer_syntax_name,
    p.PhotometricInterpretation::VARCHAR AS PhotometricInterpretation,
    NULL::VARCHAR AS PixelRepresentation,
    s.Manufacturer::VARCHAR AS Manufacturer,
    s.ManufacturerModelName::VARCHAR AS ManufacturerModelName,
    strftime(s.SeriesDate, '%Y-%m-%d')::VARCHAR AS SeriesDate,
    s.SeriesDescription::VARCHAR AS SeriesDescription,
    s.SeriesNumber::VARCHAR AS SeriesNumber,
    s.instanceCount::BIGINT AS instanceCount,
    NULL::VARCHAR AS license_short_name,
    NULL::BIGINT AS series_init_idc_version,
    NULL::BIGINT AS series_revised_idc_version,
    NULL::VARCHAR AS aws_bucket,
    NULL::VARCHAR AS crdc_series_uuid,
    NULL::VARCHAR AS series_aws_url,
    s.series_size_MB::DOUBLE AS series_size_MB
FROM series s
LEFT JOIN per_series p USING (SeriesInstanceUID)
