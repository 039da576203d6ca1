-- Retakes (reject analysis) for CR, DX and MG (DESIGN.md "Retake"): within one
-- study, the images of one view (ViewPosition, ImageLaterality,
-- BodyPartExamined) beyond the first are retakes. Images without a
-- ViewPosition are counted as images but never as retakes (their view is
-- unknown); an empty or absent ImageLaterality or BodyPartExamined is one value.
-- Derived and secondary-capture images are left out.

-- retake_views: one row per study and view of the CR, DX and MG images.
--   StudyInstanceUID   the study
--   Modality           modality of the images
--   BodyPartExamined   body part of the view (NULL when absent)
--   ViewPosition       view (PA, AP, LAT, CC, MLO, ...)
--   ImageLaterality    laterality (NULL when absent or empty)
--   images             images of this view in the study
--   retakes            images - 1 (0 when ViewPosition is unknown)
--   sop_instance_uids  the images ordered by SeriesNumber, InstanceNumber,
--                      SOPInstanceUID: the first is kept, the others are the retakes
CREATE VIEW retake_views AS
SELECT
    StudyInstanceUID,
    Modality,
    nullif(coalesce(BodyPartExamined, ''), '') AS BodyPartExamined,
    ViewPosition,
    nullif(coalesce(ImageLaterality, ''), '') AS ImageLaterality,
    count(*) AS images,
    CASE WHEN ViewPosition IS NULL THEN 0 ELSE count(*) - 1 END AS retakes,
    list(SOPInstanceUID ORDER BY SeriesNumber, InstanceNumber, SOPInstanceUID)
        AS sop_instance_uids
FROM instances
WHERE Modality IN ('CR', 'DX', 'MG')
  AND NOT coalesce(list_contains(ImageType, 'DERIVED'), false)
  AND NOT coalesce(list_contains(ImageType, 'SECONDARY'), false)
  AND NOT is_secondary_capture(SOPClassUID)
GROUP BY StudyInstanceUID, Modality, nullif(coalesce(BodyPartExamined, ''), ''),
         ViewPosition, nullif(coalesce(ImageLaterality, ''), '')
ORDER BY StudyInstanceUID, Modality, BodyPartExamined, ViewPosition, ImageLaterality;

-- retake_studies: one row per study with CR, DX or MG images.
--   (all utilization_studies columns)  the study, for grouping (StationName,
--                      BodyPartExamined, month, ...)
--   images             CR/DX/MG images of the study
--   retakes            retaken images (sum over the study's views)
--   views              distinct views
--   has_retake         at least one retake
CREATE VIEW retake_studies AS
SELECT u.*, r.images, r.retakes, r.views, r.retakes > 0 AS has_retake
FROM (
    SELECT StudyInstanceUID, sum(images)::BIGINT AS images, sum(retakes)::BIGINT AS retakes,
           count(*) AS views
    FROM retake_views GROUP BY StudyInstanceUID
) r
JOIN utilization_studies u USING (StudyInstanceUID);

-- retake_rates_for(group_cols, date_from, date_to): retake rates grouped by
-- the retake_studies columns named in `group_cols` (e.g. ['StationName'],
-- ['BodyPartExamined'], ['month']), studies dated date_from..date_to inclusive.
--   <group columns>      the grouping columns, in retake_studies order
--   studies              studies with CR/DX/MG images
--   images               their images (the denominator of retake_rate)
--   retakes              retaken images (the numerator)
--   retake_rate          retakes / images
--   ci_low, ci_high      Wilson 95% interval of retake_rate
--   studies_with_retake  studies with at least one retake
--   study_retake_rate    studies_with_retake / studies
CREATE MACRO retake_rates_for(group_cols, date_from := NULL, date_to := NULL) AS TABLE
SELECT
    COLUMNS(lambda c: list_contains(group_cols, c)),
    count(*) AS studies,
    sum(images)::BIGINT AS images,
    sum(retakes)::BIGINT AS retakes,
    sum(retakes) / sum(images) AS retake_rate,
    wilson_low(sum(retakes), sum(images)) AS ci_low,
    wilson_high(sum(retakes), sum(images)) AS ci_high,
    count(*) FILTER (WHERE has_retake) AS studies_with_retake,
    count(*) FILTER (WHERE has_retake) / count(*) AS study_retake_rate
FROM retake_studies
WHERE (date_from IS NULL OR StudyDate >= date_from)
  AND (date_to IS NULL OR StudyDate <= date_to)
GROUP BY ALL
ORDER BY ALL;

-- retakes_for(date_from, date_to): the drill-down, one row per retaken view.
--   StudyInstanceUID, PatientID, StudyDate, StationName    the study
--   Modality, BodyPartExamined, ViewPosition, ImageLaterality  the view
--   images, retakes, sop_instance_uids                     as in retake_views
CREATE MACRO retakes_for(date_from := NULL, date_to := NULL) AS TABLE
SELECT v.StudyInstanceUID, u.PatientID, u.StudyDate, u.StationName,
       v.Modality, v.BodyPartExamined, v.ViewPosition, v.ImageLaterality,
       v.images, v.retakes, v.sop_instance_uids
FROM retake_views v
JOIN utilization_studies u USING (StudyInstanceUID)
WHERE v.retakes > 0
  AND (date_from IS NULL OR u.StudyDate >= date_from)
  AND (date_to IS NULL OR u.StudyDate <= date_to)
ORDER BY u.StudyDate, v.StudyInstanceUID, v.ViewPosition, v.ImageLaterality;
