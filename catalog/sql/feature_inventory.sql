-- feature_inventory: what radiomics_features holds at the snapshot, for checking the
-- feature criteria of cohort specs (catalog.spec.check_against) against it.
--   feature_class    firstorder, shape, glcm, ...
--   feature_name     the feature's name within its class (Mean, MeshVolume, ...)
--   segment_number   SegmentNumber / ROINumber / label value of the segment
--   segment_label    the segment's label as text
--   param_hash       the parameter set the values were computed with
--   series           image series with this feature for this segment and parameter set
SELECT
    feature_class,
    feature_name,
    segment_number,
    segment_label,
    param_hash,
    count(DISTINCT SeriesInstanceUID) AS series
FROM radiomics_features
GROUP BY ALL
ORDER BY ALL
