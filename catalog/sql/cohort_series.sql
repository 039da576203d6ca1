-- cohort_series: the series of a cohort, one row per series. The members are in the
-- registered relation _cohort_keys(key); $grain says whether they are series or study UIDs.
--   SeriesInstanceUID    series UID
--   StudyInstanceUID     study UID
--   PatientID            patient identifier (a pseudonym in research lakes)
--   Modality             modality
--   BodyPartExamined     body part examined
--   StudyDate            study date (shifted per patient in research lakes)
--   SeriesNumber         series number
--   SeriesDescription    series description
--   instanceCount        number of instances
--   series_size_MB       total size of the series' files in MB
--   distinct_orientations, distinct_dimensions, uneven_spacing   geometry checks (see series)
--   BurnedInAnnotation   YES when any instance says identifying text is burned into the pixels
SELECT
    s.SeriesInstanceUID,
    s.StudyInstanceUID,
    s.PatientID,
    s.Modality,
    s.BodyPartExamined,
    s.StudyDate,
    s.SeriesNumber,
    s.SeriesDescription,
    s.instanceCount,
    s.series_size_MB,
    s.distinct_orientations,
    s.distinct_dimensions,
    s.uneven_spacing,
    (SELECT max(i.BurnedInAnnotation) FROM instances i
     WHERE i.SeriesInstanceUID = s.SeriesInstanceUID AND i.BurnedInAnnotation = 'YES'
    ) AS BurnedInAnnotation
FROM series s
WHERE ($grain = 'series' AND s.SeriesInstanceUID IN (SELECT key FROM _cohort_keys))
   OR ($grain = 'study' AND s.StudyInstanceUID IN (SELECT key FROM _cohort_keys))
ORDER BY s.StudyInstanceUID, s.SeriesNumber, s.SeriesInstanceUID
