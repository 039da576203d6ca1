-- patients: one row per PatientID, rebuilt from `instances` and the new `studies`.
WITH by_sex AS (
    SELECT PatientID, PatientSex, count(*) AS n
    FROM studies WHERE PatientSex IS NOT NULL GROUP BY ALL
),
main_sex AS (
    SELECT PatientID, first(PatientSex ORDER BY n DESC, PatientSex) AS PatientSex
    FROM by_sex GROUP BY PatientID
),
agg AS (
    SELECT
        PatientID,
        min(PatientName) AS PatientName,
        min(patient_age_years) AS age_min_years,
        max(patient_age_years) AS age_max_years,
        min(StudyDate) AS first_study_date,
        max(StudyDate) AS last_study_date,
        count(*) AS study_count,
        sum(series_count) AS series_count,
        sum(instance_count) AS instance_count,
        list_sort(list_distinct(flatten(list(modalities)))) AS modalities
    FROM studies
    WHERE PatientID IS NOT NULL
    GROUP BY PatientID
)
SELECT agg.*, main_sex.PatientSex
FROM agg LEFT JOIN main_sex USING (PatientID)
ORDER BY PatientID
