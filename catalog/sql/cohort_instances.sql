-- cohort_instances: the instances of a cohort's series (registered as _cohort_series),
-- one row per instance: the export manifest.
--   PatientID            patient identifier (a pseudonym in research lakes)
--   StudyInstanceUID     study UID
--   SeriesInstanceUID    series UID
--   SOPInstanceUID       instance UID
--   SOPClassUID          storage class
--   Modality             modality
--   StudyDate            study date
--   SeriesNumber         series number
--   InstanceNumber       instance number
--   file_size            size of the source file in bytes
--   file_sha256          SHA-256 of the source file as ingested
SELECT
    i.PatientID,
    i.StudyInstanceUID,
    i.SeriesInstanceUID,
    i.SOPInstanceUID,
    i.SOPClassUID,
    i.Modality,
    i.StudyDate,
    i.SeriesNumber,
    i.InstanceNumber,
    i.file_size,
    i.file_sha256
FROM instances i
WHERE i.SeriesInstanceUID IN (SELECT SeriesInstanceUID FROM _cohort_series)
ORDER BY i.StudyInstanceUID, i.SeriesNumber, i.SeriesInstanceUID, i.InstanceNumber,
    i.SOPInstanceUID
