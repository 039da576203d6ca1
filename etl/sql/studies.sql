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
by_protocol AS (
    SELECT StudyInstanceUID, ProtocolName, count(*) AS n
    FROM instances WHERE ProtocolName IS NOT NULL GROUP BY ALL
),
main_protocol AS (  -- the most frequent ProtocolName, ties by name
    SELECT StudyInstanceUID, first(ProtocolName ORDER BY n DESC, ProtocolName) AS ProtocolName
    FROM by_protocol GROUP BY StudyInstanceUID
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
        -- the kinds of instance present, a bit set over kind = 1 x localizer + 2 x derived
        -- + 4 x secondary + 8 x non-image (the repeat-exam exclusions, catalog/views/
        -- 20_repeat_exams.sql; the Secondary Capture classes are 1.2.840.10008.5.1.4.1.1.7
        -- and its .7.x variants)
        bit_or(1 << (coalesce(list_contains(ImageType, 'LOCALIZER'), false)::INTEGER
                     + 2 * coalesce(list_contains(ImageType, 'DERIVED'), false)::INTEGER
                     + 4 * (coalesce(list_contains(ImageType, 'SECONDARY'), false)
                            OR coalesce(SOPClassUID = '1.2.840.10008.5.1.4.1.1.7'
                                        OR SOPClassUID LIKE '1.2.840.10008.5.1.4.1.1.7.%',
                                        false))::INTEGER
                     + 8 * coalesce(Modality IN ('SR', 'KO', 'PR', 'REG', 'SEG', 'RTSTRUCT',
                                                 'DOC'), false)::INTEGER))::INTEGER
            AS instance_kinds,
        sum(file_size) / 1e6 AS study_size_MB,
        min(study_year) AS study_year
    FROM instances
    GROUP BY StudyInstanceUID
)
SELECT agg.*, main_modality.Modality, main_body_part.BodyPartExamined,
       main_protocol.ProtocolName
FROM agg
JOIN main_modality USING (StudyInstanceUID)
LEFT JOIN main_body_part USING (StudyInstanceUID)
LEFT JOIN main_protocol USING (StudyInstanceUID)
ORDER BY StudyInstanceUID
