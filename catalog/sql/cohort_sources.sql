-- cohort_sources: where the source file of each instance of the cohort's series
-- (_cohort_series) is, from the vault table `files` (identifying: paths).
--   StudyInstanceUID         study UID
--   SeriesInstanceUID        series UID
--   SOPInstanceUID           instance UID
--   file_sha256              checksum of the ingested file as the tables hold it (keyed in
--                            research lakes)
--   source_sha256            plain SHA-256 of the source file's first checksum_bytes bytes
--                            (a copy must match it)
--   checksum_bytes           bytes of the file the checksums cover (header or whole file)
--   file_size                size in bytes
--   path                     source path of the ingested file
--   InstanceNumber           instance number
--   ImagePositionPatient     position of the first pixel (to order slices)
--   ImageOrientationPatient  row and column direction cosines
SELECT
    i.StudyInstanceUID,
    i.SeriesInstanceUID,
    i.SOPInstanceUID,
    i.file_sha256,
    f.source_sha256,
    f.checksum_bytes,
    i.file_size,
    f.path,
    i.InstanceNumber,
    i.ImagePositionPatient,
    i.ImageOrientationPatient
FROM instances i
LEFT JOIN (
    SELECT SOPInstanceUID, file_sha256, source_sha256, checksum_bytes, path
    FROM files
    WHERE outcome = 'ingested'
    QUALIFY row_number() OVER (PARTITION BY SOPInstanceUID, file_sha256
                               ORDER BY ingest_run_id, path) = 1
) f ON f.SOPInstanceUID = i.SOPInstanceUID AND f.file_sha256 = i.file_sha256
WHERE i.SeriesInstanceUID IN (SELECT SeriesInstanceUID FROM _cohort_series)
ORDER BY i.SeriesInstanceUID, i.InstanceNumber, i.SOPInstanceUID
