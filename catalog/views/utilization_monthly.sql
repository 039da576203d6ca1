-- utilization_monthly: studies, series and instances per month and modality.
--   month            first day of the month of StudyDate
--   Modality         main modality of the study
--   studies          number of studies
--   series           number of series in those studies
--   instances        number of instances in those studies
CREATE VIEW utilization_monthly AS
SELECT
    date_trunc('month', StudyDate)::DATE AS month,
    Modality,
    count(*) AS studies,
    sum(series_count) AS series,
    sum(instance_count) AS instances
FROM studies
WHERE StudyDate IS NOT NULL
GROUP BY ALL
ORDER BY month, Modality
