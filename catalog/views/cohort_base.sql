-- cohort_base: one row per series with the study attributes cohorts filter on;
-- what declarative cohort specs (catalog/spec.py) select from.
--   (every column of series)   the series summary, IDC names where they exist
--   patient_age_years          age at the study in years (from studies)
--   AccessionNumber            accession number of the study (a pseudonym in research lakes)
CREATE VIEW cohort_base AS
SELECT
    s.*,
    st.patient_age_years,
    st.AccessionNumber
FROM series s
LEFT JOIN studies st USING (StudyInstanceUID)
