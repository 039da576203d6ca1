-- studies: one row per StudyInstanceUID, rebuilt from `instances`.
WITH by_modality AS (
    SELECT StudyInstanceUID, Modality, count(*) AS n
    FROM instances GROUP BY ALL
),
main_modality AS (
    SELECT StudyInstanceUID, first(Modality ORDER BY n DESC, Modality) AS Modality
    FROM by_modality GROUP BY StudyInstanceUID
),
by_body_part AS (
    SELECT StudyInstanceUID, BodyPartExamined, count(*) AS n
    FROM instances WHERE BodyPartExamined IS NOT NULL GROUP BY ALL
),
main_body_part AS (
    SELECT StudyInstanceUID,
           first(BodyPartExamined ORDER BY n DESC, BodyPartExamined) AS BodyPartExamined
    FROM by_body_part GROUP BY StudyInstanceUID
),
agg AS (
    SELECT
        StudyInstanceUID,
        min(PatientID) AS PatientID,
        min(PatientName) AS PatientName,
        min(PatientSex) AS PatientSex,
        min(PatientAge) AS PatientAge,
        min(patient_age_years) AS patient_age_years,
        min(AccessionNumber) AS AccessionNumber,
        min(StudyID) AS StudyID,
        min(StudyDate) AS StudyDate,
        min(StudyTime) AS StudyTime,
        min(StudyDescription) AS StudyDescription,
        list_sort(list_distinct(list(Modality))) AS modalities,
        list_sort(list_distinct(list(BodyPartExamined))) AS body_parts,
        min(InstitutionName) AS InstitutionName,
        min(InstitutionalDepartmentName) AS InstitutionalDepartmentName,
        min(StationName) AS StationName,
        min(Manufacturer) AS Manufacturer,
        min(ManufacturerModelName) AS ManufacturerModelName,
        count(DISTINCT SeriesInstanceUID) AS series_count,
        count(*) AS instance_count,
        sum(file_size) / 1e6 AS study_size_MB,
        min(study_year) AS study_year
    FROM instances
    GROUP BY StudyInstanceUID
)
SELECT agg.*, main_modality.Modality, main_body_part.BodyPartExamined
FROM agg
JOIN main_modality USING (StudyInstanceUID)
LEFT JOIN main_body_part USING (StudyInstanceUID)
ORDER BY StudyInstanceUID
