-- dose_reports: the instances that can hold a CT Radiation Dose SR (TID 10011),
-- with their DICOM JSON header for etl.dose to parse. $classes: SR SOP class UIDs.
--   StudyInstanceUID   study of the report
--   SeriesInstanceUID  series of the report
--   SOPInstanceUID     the report instance
--   PatientID          patient identifier (pseudonym in research lakes)
--   StudyDate          study date
--   dicom_json         the header as DICOM JSON, content tree included
SELECT StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, PatientID, StudyDate, dicom_json
FROM instances_ds
WHERE list_contains($classes, SOPClassUID)
ORDER BY StudyInstanceUID, SOPInstanceUID
