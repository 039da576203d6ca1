-- patient_timeline: every study of a patient in order, with the interval since the
-- previous one (for disease-monitoring cohorts). Works unchanged on research lakes:
-- dates there are shifted per patient, so intervals within a patient are exact.
--   PatientID                    patient identifier (a pseudonym in research lakes)
--   study_index                  1 for the patient's first study, 2 for the next, ...
--   StudyInstanceUID             the study
--   StudyDate                    study date
--   StudyTime                    study time
--   Modality                     main modality of the study
--   BodyPartExamined             main body part of the study
--   StudyDescription             study description
--   previous_StudyInstanceUID    the patient's study before this one (null for the first)
--   days_since_previous          days since the previous study (null for the first)
--   days_since_first             days since the patient's first study
--   same_modality_body_part_days days since the patient's previous study with the same
--                                Modality and BodyPartExamined (null when none)
CREATE VIEW patient_timeline AS
SELECT
    PatientID,
    row_number() OVER w AS study_index,
    StudyInstanceUID,
    StudyDate,
    StudyTime,
    Modality,
    BodyPartExamined,
    StudyDescription,
    lag(StudyInstanceUID) OVER w AS previous_StudyInstanceUID,
    date_diff('day', lag(StudyDate) OVER w, StudyDate) AS days_since_previous,
    date_diff('day', first_value(StudyDate) OVER w, StudyDate) AS days_since_first,
    date_diff('day', lag(StudyDate) OVER (
        PARTITION BY PatientID, Modality, BodyPartExamined
        ORDER BY StudyDate, StudyTime, StudyInstanceUID), StudyDate
    ) AS same_modality_body_part_days
FROM studies
WHERE PatientID IS NOT NULL
WINDOW w AS (PARTITION BY PatientID ORDER BY StudyDate, StudyTime, StudyInstanceUID)
