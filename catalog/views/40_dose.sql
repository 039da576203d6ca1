-- CT dose (DESIGN.md "Dose"): CTDIvol and DLP per CT irradiation event from
-- CT Radiation Dose SRs (the dose_events table), and from image headers where
-- a study has no report.

-- dose_by_study: one row per CT study (main modality CT, or any CT series).
--   (all utilization_studies columns)  the study, for grouping
--   dose_source        'report' (dose_events), 'header' (no report: the
--                      largest CTDIvol of the CT image headers) or NULL (neither)
--   events             irradiation events reported (distinct IrradiationEventUID)
--   CTDIvol_max        largest CTDIvol of the study in mGy
--   DLP_total          sum of the events' DLP in mGy.cm (NULL from headers,
--                      which carry no DLP)
--   accumulated_DLP    the report's CT Dose Length Product Total in mGy.cm
--   protocols          the acquisition protocols reported, sorted (empty in research
--                      lakes: report free text is not kept; DRL protocols then match
--                      StudyDescription only)
--   target_regions     the target regions reported, sorted
--   header_CTDIvol_max largest CTDIvol in the CT image headers (any source)
CREATE VIEW dose_by_study AS
WITH events AS (  -- one row per irradiation event, even if a report was sent twice
    SELECT StudyInstanceUID,
           coalesce(IrradiationEventUID, SOPInstanceUID || '/' || event_index) AS event_key,
           max(CTDIvol) AS CTDIvol, max(DLP) AS DLP, max(accumulated_DLP) AS accumulated_DLP,
           min(acquisition_protocol) AS acquisition_protocol,
           min(target_region) AS target_region
    FROM dose_events
    GROUP BY ALL
),
reported AS (
    SELECT StudyInstanceUID,
           count(*) AS events,
           max(CTDIvol) AS CTDIvol_max,
           sum(DLP) AS DLP_total,
           max(accumulated_DLP) AS accumulated_DLP,
           list_sort(list_distinct(list(acquisition_protocol))) AS protocols,
           list_sort(list_distinct(list(target_region))) AS target_regions
    FROM events
    GROUP BY StudyInstanceUID
),
header AS (
    SELECT StudyInstanceUID, max(CTDIvol) AS header_CTDIvol_max
    FROM instances
    WHERE Modality = 'CT'
    GROUP BY StudyInstanceUID
)
SELECT u.*,
       CASE WHEN r.StudyInstanceUID IS NOT NULL THEN 'report'
            WHEN h.header_CTDIvol_max IS NOT NULL THEN 'header' END AS dose_source,
       coalesce(r.events, 0) AS events,
       CASE WHEN r.StudyInstanceUID IS NOT NULL THEN r.CTDIvol_max
            ELSE h.header_CTDIvol_max END AS CTDIvol_max,
       r.DLP_total,
       r.accumulated_DLP,
       r.protocols,
       r.target_regions,
       h.header_CTDIvol_max
FROM utilization_studies u
LEFT JOIN reported r USING (StudyInstanceUID)
LEFT JOIN header h USING (StudyInstanceUID)
WHERE u.Modality = 'CT' OR h.StudyInstanceUID IS NOT NULL OR r.StudyInstanceUID IS NOT NULL;

-- drl_levels: the diagnostic reference levels compared with; empty until
-- catalog.reports.load_drl() fills it from a CSV (see catalog/drl_default.csv).
--   body_region    matched case-insensitively with the study's BodyPartExamined
--                  or one of its reported target regions
--   protocol       optional ILIKE pattern matched with a reported acquisition
--                  protocol or the StudyDescription; a matching row with a
--                  protocol wins over one without
--   CTDIvol_mGy    reference level for the study's largest CTDIvol, mGy
--   DLP_mGycm      reference level for the study's total DLP, mGy.cm
--   note           free text (source of the level)
CREATE TABLE drl_levels (
    body_region VARCHAR NOT NULL,
    protocol VARCHAR,
    CTDIvol_mGy DOUBLE,
    DLP_mGycm DOUBLE,
    note VARCHAR
);

-- dose_vs_drl_for(date_from, date_to): every CT study with a dose and a
-- matching reference level.
--   StudyInstanceUID, PatientID, StudyDate, Modality, BodyPartExamined,
--   StudyDescription, StationName   the study
--   dose_source, CTDIvol_max, DLP_total, protocols   as in dose_by_study
--   drl_body_region, drl_protocol   the reference level row used
--   drl_CTDIvol, drl_DLP            its levels
--   CTDIvol_ratio, DLP_ratio        the study's value / the level
--   exceeds_CTDIvol, exceeds_DLP    the value is above the level
--   exceeds                         either is above
CREATE MACRO dose_vs_drl_for(date_from := NULL, date_to := NULL) AS TABLE
WITH matches AS (
    SELECT d.*, l.body_region AS drl_body_region, l.protocol AS drl_protocol,
           l.CTDIvol_mGy AS drl_CTDIvol, l.DLP_mGycm AS drl_DLP,
           row_number() OVER (PARTITION BY d.StudyInstanceUID
                              ORDER BY l.protocol IS NULL, l.protocol, l.body_region) AS pick
    FROM dose_by_study d
    JOIN drl_levels l
      ON (upper(l.body_region) = upper(d.BodyPartExamined)
          OR list_contains(list_transform(d.target_regions, lambda t: upper(t)),
                           upper(l.body_region)))
     AND (l.protocol IS NULL
          OR d.StudyDescription ILIKE l.protocol
          OR len(list_filter(d.protocols, lambda p: p ILIKE l.protocol)) > 0)
    WHERE d.CTDIvol_max IS NOT NULL
      AND (date_from IS NULL OR d.StudyDate >= date_from)
      AND (date_to IS NULL OR d.StudyDate <= date_to)
)
SELECT StudyInstanceUID, PatientID, StudyDate, Modality, BodyPartExamined, StudyDescription,
       StationName, dose_source, CTDIvol_max, DLP_total, protocols,
       drl_body_region, drl_protocol, drl_CTDIvol, drl_DLP,
       CTDIvol_max / drl_CTDIvol AS CTDIvol_ratio,
       DLP_total / drl_DLP AS DLP_ratio,
       coalesce(CTDIvol_max > drl_CTDIvol, false) AS exceeds_CTDIvol,
       coalesce(DLP_total > drl_DLP, false) AS exceeds_DLP,
       coalesce(CTDIvol_max > drl_CTDIvol, false) OR coalesce(DLP_total > drl_DLP, false)
           AS exceeds
FROM matches
WHERE pick = 1
ORDER BY StudyDate, StudyInstanceUID;

-- dose_studies_for(date_from, date_to): dose_by_study rows dated
-- date_from..date_to with their reference level (NULL when none applies).
--   (all dose_by_study columns)
--   drl_body_region, drl_protocol, drl_CTDIvol, drl_DLP, CTDIvol_ratio, DLP_ratio,
--   exceeds_CTDIvol, exceeds_DLP, exceeds   as in dose_vs_drl_for (exceeds is
--                   false without a level)
CREATE MACRO dose_studies_for(date_from := NULL, date_to := NULL) AS TABLE
SELECT d.*, v.drl_body_region, v.drl_protocol, v.drl_CTDIvol, v.drl_DLP,
       v.CTDIvol_ratio, v.DLP_ratio,
       coalesce(v.exceeds_CTDIvol, false) AS exceeds_CTDIvol,
       coalesce(v.exceeds_DLP, false) AS exceeds_DLP,
       coalesce(v.exceeds, false) AS exceeds
FROM dose_by_study d
LEFT JOIN dose_vs_drl_for(date_from := date_from, date_to := date_to) v USING (StudyInstanceUID)
WHERE (date_from IS NULL OR d.StudyDate >= date_from)
  AND (date_to IS NULL OR d.StudyDate <= date_to)
ORDER BY d.StudyDate, d.StudyInstanceUID;

-- dose_summary_for(group_cols, date_from, date_to): CTDIvol and DLP
-- distributions grouped by the dose_by_study columns named in `group_cols`.
--   <group columns>     the grouping columns, in dose_by_study order
--   studies             CT studies
--   from_report         of those, with a dose report
--   from_header         of those, with header CTDIvol only
--   CTDIvol_median, CTDIvol_p75, CTDIvol_max   of the studies' CTDIvol_max, mGy
--   DLP_median, DLP_p75, DLP_max               of the studies' DLP_total, mGy.cm
--   above_drl           studies above their reference level (drl_levels)
CREATE MACRO dose_summary_for(group_cols, date_from := NULL, date_to := NULL) AS TABLE
SELECT
    COLUMNS(lambda c: list_contains(group_cols, c)),
    count(*) AS studies,
    count(*) FILTER (WHERE dose_source = 'report') AS from_report,
    count(*) FILTER (WHERE dose_source = 'header') AS from_header,
    median(CTDIvol_max) AS CTDIvol_median,
    quantile_cont(CTDIvol_max, 0.75) AS CTDIvol_p75,
    max(CTDIvol_max) AS CTDIvol_max,
    median(DLP_total) AS DLP_median,
    quantile_cont(DLP_total, 0.75) AS DLP_p75,
    max(DLP_total) AS DLP_max,
    count(*) FILTER (WHERE exceeds) AS above_drl
FROM dose_studies_for(date_from := date_from, date_to := date_to)
WHERE (date_from IS NULL OR StudyDate >= date_from)
  AND (date_to IS NULL OR StudyDate <= date_to)
GROUP BY ALL
ORDER BY ALL;
