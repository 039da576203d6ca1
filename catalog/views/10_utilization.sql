-- study_facts: one row per study with the calendar and equipment columns that
-- utilization, repeat-exam and dose figures are grouped by, and what the
-- repeat-exam exclusions read (utilization_studies is this view without it).
--   StudyInstanceUID             study UID
--   PatientID                    patient identifier (a pseudonym in research lakes)
--   StudyDate                    study date (shifted per patient in research lakes)
--   StudyTime                    study time
--   day                          = StudyDate
--   week                         Monday of the ISO week of StudyDate
--   month                        first day of the month of StudyDate
--   year                         year of StudyDate
--   weekday                      ISO day of the week, 1 = Monday ... 7 = Sunday
--   weekday_name                 Monday ... Sunday
--   hour                         hour of StudyTime (0-23; NULL without a time)
--   Modality                     main modality of the study
--   BodyPartExamined             main body part of the study
--   ProtocolName                 main acquisition protocol of the study
--   StudyDescription             study description
--   StationName                  station of the first series
--   Manufacturer                 manufacturer of the first series
--   ManufacturerModelName        device model of the first series
--   InstitutionName              institution
--   InstitutionalDepartmentName  department
--   series_count                 series in the study
--   instance_count               instances in the study
--   instance_kinds               bit set of the kinds of instance in the study (see
--                                studies.instance_kinds; NULL in lakes summarized before it)
CREATE VIEW study_facts AS
SELECT
    StudyInstanceUID,
    PatientID,
    StudyDate,
    StudyTime,
    StudyDate AS day,
    date_trunc('week', StudyDate)::DATE AS week,
    date_trunc('month', StudyDate)::DATE AS month,
    year(StudyDate) AS year,
    isodow(StudyDate) AS weekday,
    dayname(StudyDate) AS weekday_name,
    hour(StudyTime) AS hour,
    Modality,
    BodyPartExamined,
    ProtocolName,
    StudyDescription,
    StationName,
    Manufacturer,
    ManufacturerModelName,
    InstitutionName,
    InstitutionalDepartmentName,
    series_count,
    instance_count,
    instance_kinds
FROM studies;

-- utilization_studies: study_facts without instance_kinds (all the other columns,
-- as described there): the rows behind every utilization figure.
CREATE VIEW utilization_studies AS SELECT * EXCLUDE (instance_kinds) FROM study_facts;

-- utilization_by(period): studies, series and instances per period and equipment.
-- period is 'day', 'week', 'month' or 'year'; the dimensions are
-- Modality x BodyPartExamined x StationName x Manufacturer x
-- ManufacturerModelName x InstitutionalDepartmentName.
--   period_start                 first day of the period
--   Modality, BodyPartExamined, StationName, Manufacturer, ManufacturerModelName,
--   InstitutionalDepartmentName  the dimensions (as in utilization_studies)
--   studies                      studies in the period
--   series                       series of those studies
--   instances                    instances of those studies
CREATE MACRO utilization_by(period) AS TABLE
SELECT
    date_trunc(period, StudyDate)::DATE AS period_start,
    Modality,
    BodyPartExamined,
    StationName,
    Manufacturer,
    ManufacturerModelName,
    InstitutionalDepartmentName,
    count(*) AS studies,
    sum(series_count)::BIGINT AS series,
    sum(instance_count)::BIGINT AS instances
FROM utilization_studies
WHERE StudyDate IS NOT NULL
GROUP BY ALL
ORDER BY ALL;

-- utilization_daily / utilization_weekly / utilization_by_month: utilization_by
-- per day, ISO week (period_start is the Monday) and month.
CREATE VIEW utilization_daily AS FROM utilization_by('day');
CREATE VIEW utilization_weekly AS FROM utilization_by('week');
CREATE VIEW utilization_by_month AS FROM utilization_by('month');

-- utilization_grouped(group_cols, date_from, date_to): studies, series and instances
-- grouped by the utilization_studies columns named in the list `group_cols` (e.g.
-- ['month', 'Modality']), for studies dated date_from..date_to (inclusive; NULL
-- leaves that end open).
--   <by columns>   the grouping columns, in utilization_studies order
--   studies        studies in the group
--   series         series of those studies
--   instances      instances of those studies
CREATE MACRO utilization_grouped(group_cols, date_from := NULL, date_to := NULL) AS TABLE
SELECT
    COLUMNS(lambda c: list_contains(group_cols, c)),
    count(*) AS studies,
    sum(series_count)::BIGINT AS series,
    sum(instance_count)::BIGINT AS instances
FROM utilization_studies
WHERE StudyDate IS NOT NULL
  AND (date_from IS NULL OR StudyDate >= date_from)
  AND (date_to IS NULL OR StudyDate <= date_to)
GROUP BY ALL
ORDER BY ALL;

-- workload_for(date_from, date_to) and the view workload_matrix (all dates):
-- studies per ISO weekday and hour of the study start, a weekday x hour
-- workload matrix (studies without a StudyTime are left out).
--   weekday        ISO day of the week, 1 = Monday ... 7 = Sunday
--   weekday_name   Monday ... Sunday
--   hour           hour of StudyTime, 0-23
--   studies        studies started in that hour of that weekday
CREATE MACRO workload_for(date_from := NULL, date_to := NULL) AS TABLE
SELECT weekday, weekday_name, hour, count(*) AS studies
FROM utilization_studies
WHERE StudyDate IS NOT NULL AND StudyTime IS NOT NULL
  AND (date_from IS NULL OR StudyDate >= date_from)
  AND (date_to IS NULL OR StudyDate <= date_to)
GROUP BY ALL
ORDER BY weekday, hour;

CREATE VIEW workload_matrix AS FROM workload_for();
