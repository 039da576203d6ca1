-- What the patients summary reads in an update of the summaries
-- (etl/summarize.py update()), from `changed` (the series, studies and patients
-- of the instance rows added or removed), `studies_ds` (the studies summary
-- before) and `new_studies` (the changed studies' new rows).
-- changed_patients: the patients whose row may change.
--   PatientID   a patient of a changed instance row, or of a changed study
--               before or after the change
CREATE TEMP TABLE changed_patients AS
SELECT PatientID FROM changed WHERE PatientID IS NOT NULL
UNION
SELECT PatientID FROM studies_ds
WHERE PatientID IS NOT NULL AND StudyInstanceUID IN (SELECT StudyInstanceUID FROM changed)
UNION
SELECT PatientID FROM new_studies WHERE PatientID IS NOT NULL;

-- studies: every study of those patients (the columns of the studies table),
-- its new row when it changed, its old row otherwise.
CREATE TEMP VIEW studies AS
SELECT * FROM studies_ds
WHERE PatientID IN (SELECT PatientID FROM changed_patients)
  AND StudyInstanceUID NOT IN (SELECT StudyInstanceUID FROM changed)
UNION ALL BY NAME
SELECT * FROM new_studies
WHERE PatientID IN (SELECT PatientID FROM changed_patients);
