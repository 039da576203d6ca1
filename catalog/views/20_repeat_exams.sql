-- Repeat exams (DESIGN.md "Repeat exam (default)"): a study is a repeat when
-- the same patient has an earlier study with the same matching keys (default
-- Modality and BodyPartExamined) at most `window_days` calendar days before it.
-- Studies of one patient and key are ordered by StudyDate, StudyTime (a study
-- without a time first), then StudyInstanceUID, so same-day studies are
-- ordered deterministically and the later one is the repeat. A study whose
-- PatientID, StudyDate or a matching key is NULL is never a repeat nor a prior.
-- Intervals are within one patient, so per-patient date shifts (research
-- lakes) give the same result as the original dates.

-- exam_studies(...): the studies that count as exams (utilization_studies
-- rows) once excluded images are set aside: a study is left out when every
-- one of its instances is excluded.
--   exclude_localizers   ImageType contains LOCALIZER (CT scout / topogram)
--   exclude_derived      ImageType contains DERIVED (reformats, MIPs, ...)
--   exclude_secondary    Secondary Capture SOP classes, or ImageType SECONDARY
--   exclude_non_image    Modality SR, KO, PR, REG, SEG, RTSTRUCT, DOC (reports, markup)
-- The test reads studies.instance_kinds (the kinds of instance each study has,
-- written by the summary): a study is an exam when it has a kind with none of
-- the excluded bits. Studies summarized before that column existed (NULL) are
-- tested on their instances instead (legacy_kind_instances), with the same result.

-- legacy_kind_instances: the instances of the studies whose instance_kinds is NULL
-- (summarized before the column existed) that some exclusion may set aside (a cheap,
-- constant test); exam_studies tests the exclusions asked for on these rows only.
-- A catalog whose studies all have instance_kinds (every lake summarized since)
-- replaces this view by one of no rows with the same columns when it opens
-- (catalog/connect.py), so the repeat-exam queries neither bind nor scan `instances`.
--   StudyInstanceUID   study UID
--   ImageType          the instance's ImageType values
--   SOPClassUID        the instance's SOP class
--   Modality           the instance's modality
CREATE VIEW legacy_kind_instances AS
SELECT StudyInstanceUID, ImageType, SOPClassUID, Modality
FROM instances
SEMI JOIN (SELECT StudyInstanceUID FROM studies WHERE instance_kinds IS NULL) USING (StudyInstanceUID)
WHERE list_contains(ImageType, 'LOCALIZER') OR list_contains(ImageType, 'DERIVED')
   OR list_contains(ImageType, 'SECONDARY') OR is_secondary_capture(SOPClassUID)
   OR Modality IN ('SR', 'KO', 'PR', 'REG', 'SEG', 'RTSTRUCT', 'DOC');

CREATE MACRO exam_studies(exclude_localizers := true, exclude_derived := true,
                          exclude_secondary := true, exclude_non_image := true) AS TABLE
WITH asked AS (  -- the kinds (0-15) that keep a study: those without an excluded bit
    SELECT bit_or(1 << k)::INTEGER AS exam_kinds
    FROM range(16) AS r(k)
    WHERE k & (exclude_localizers::INTEGER + 2 * exclude_derived::INTEGER
               + 4 * exclude_secondary::INTEGER + 8 * exclude_non_image::INTEGER) = 0
),
excluded AS (  -- the exclusions asked for, tested on the studies without instance_kinds
    SELECT StudyInstanceUID, count(*) AS n
    FROM legacy_kind_instances
    WHERE (exclude_localizers AND list_contains(ImageType, 'LOCALIZER'))
       OR (exclude_derived AND list_contains(ImageType, 'DERIVED'))
       OR (exclude_secondary AND (list_contains(ImageType, 'SECONDARY')
                                  OR is_secondary_capture(SOPClassUID)))
       OR (exclude_non_image AND Modality IN ('SR', 'KO', 'PR', 'REG', 'SEG', 'RTSTRUCT', 'DOC'))
    GROUP BY StudyInstanceUID
)
SELECT u.* EXCLUDE (instance_kinds)
FROM study_facts u
CROSS JOIN asked a
LEFT JOIN excluded e USING (StudyInstanceUID)
WHERE CASE WHEN u.instance_kinds IS NOT NULL THEN u.instance_kinds & a.exam_kinds <> 0
           ELSE u.instance_count > coalesce(e.n, 0) END;

-- repeat_exams_for(window_days, match, exclusions...): one row per exam study.
--   (all utilization_studies columns)  the study, for grouping
--   is_repeat            true when the study repeats an earlier one within the window
--   prior_study_uid      the study it repeats: the latest earlier study with the same keys
--   prior_study_date     StudyDate of that prior
--   prior_study_time     StudyTime of that prior
--   days_since_prior     calendar days between the prior's and this StudyDate (0 = same day)
--   matched_keys         the matching keys used (besides PatientID)
--   matched_values       this study's values of those keys, as a JSON object
--   window_days          the window used
-- How: most exams are the only one of their patient and keys, and cannot be a repeat
-- nor a prior. A 64-bit hash of (PatientID, keys) finds the keys seen more than once
-- (an aggregate on one integer); only those exams (a fifth of them) are joined with
-- each other, on the hash, within the window, and every pair is checked on the keys
-- themselves (two different keys with the same hash never pair up).
CREATE MACRO repeat_exams_for(window_days := 30, match := ['Modality', 'BodyPartExamined'],
                              exclude_localizers := true, exclude_derived := true,
                              exclude_secondary := true, exclude_non_image := true) AS TABLE
WITH exams AS (
    SELECT *, hash(PatientID, match_key) AS match_hash
    FROM (SELECT *, struct_pack(*COLUMNS(lambda c: list_contains(match, c))) AS match_key
          FROM exam_studies(exclude_localizers := exclude_localizers,
                            exclude_derived := exclude_derived,
                            exclude_secondary := exclude_secondary,
                            exclude_non_image := exclude_non_image))
),
comparable AS (  -- the exams that may be a repeat or a prior: nothing compared is NULL
    FROM exams
    WHERE PatientID IS NOT NULL AND StudyDate IS NOT NULL
      AND COLUMNS(lambda c: list_contains(match, c)) IS NOT NULL
),
keys_seen_twice AS (  -- the (PatientID, keys) hashes of more than one comparable exam
    SELECT match_hash FROM comparable GROUP BY match_hash HAVING count(*) > 1
),
candidates AS (  -- the comparable exams with such a hash: the only possible repeats and priors
    SELECT StudyInstanceUID, PatientID, StudyDate, StudyTime, match_hash,
           struct_pack(*COLUMNS(lambda c: list_contains(match, c))) AS match_key,
           coalesce(epoch_us(StudyTime), -1) AS time_key  -- no time: first of its day
    FROM comparable SEMI JOIN keys_seen_twice USING (match_hash)
),
priors AS (
    -- each candidate's latest earlier candidate with the same keys, when it lies within
    -- the window: a join on the hash limited to the window (a handful of pairs per
    -- exam); the FILTER keeps the pairs whose keys are equal, not just their hashes
    SELECT a.StudyInstanceUID,
           arg_max({'uid': b.StudyInstanceUID, 'date': b.StudyDate, 'time': b.StudyTime},
                   {'date': b.StudyDate, 'time': b.time_key, 'uid': b.StudyInstanceUID})
               FILTER (WHERE a.PatientID = b.PatientID AND a.match_key = b.match_key)
               AS prior
    FROM candidates a
    JOIN candidates b
      ON a.match_hash = b.match_hash
     AND b.StudyDate >= a.StudyDate - window_days
     AND (b.StudyDate < a.StudyDate
          OR (b.StudyDate = a.StudyDate
              AND (b.time_key < a.time_key
                   OR (b.time_key = a.time_key AND b.StudyInstanceUID < a.StudyInstanceUID))))
    GROUP BY a.StudyInstanceUID
)
SELECT e.* EXCLUDE (match_key, match_hash),
       p.prior IS NOT NULL AS is_repeat,
       p.prior.uid AS prior_study_uid,
       p.prior.date AS prior_study_date,
       p.prior.time AS prior_study_time,
       date_diff('day', p.prior.date, e.StudyDate) AS days_since_prior,
       match AS matched_keys,
       to_json(e.match_key) AS matched_values,
       window_days::INTEGER AS window_days
FROM exams e
LEFT JOIN priors p USING (StudyInstanceUID);

-- repeat_exams: repeat_exams_for() with the default definition.
CREATE VIEW repeat_exams AS FROM repeat_exams_for();

-- repeat_rates_for(group_cols, date_from, date_to, <repeat_exams_for parameters>):
-- repeat rates grouped by the repeat_exams columns named in `group_cols` (e.g.
-- ['Modality', 'month']), over the studies dated date_from..date_to
-- (inclusive; a prior may lie before date_from).
--   <by columns>   the grouping columns, in repeat_exams order
--   studies        exam studies in the group (the denominator)
--   repeats        of those, repeats (the numerator)
--   repeat_rate    repeats / studies
--   ci_low         lower bound of the Wilson 95% interval of the rate
--   ci_high        upper bound of the Wilson 95% interval of the rate
CREATE MACRO repeat_rates_for(group_cols, date_from := NULL, date_to := NULL, window_days := 30,
                              match := ['Modality', 'BodyPartExamined'],
                              exclude_localizers := true, exclude_derived := true,
                              exclude_secondary := true, exclude_non_image := true) AS TABLE
SELECT
    COLUMNS(lambda c: list_contains(group_cols, c)),
    count(*) AS studies,
    count(*) FILTER (WHERE is_repeat) AS repeats,
    count(*) FILTER (WHERE is_repeat) / count(*) AS repeat_rate,
    wilson_low(count(*) FILTER (WHERE is_repeat), count(*)) AS ci_low,
    wilson_high(count(*) FILTER (WHERE is_repeat), count(*)) AS ci_high
FROM repeat_exams_for(window_days := window_days, match := match,
                      exclude_localizers := exclude_localizers,
                      exclude_derived := exclude_derived,
                      exclude_secondary := exclude_secondary,
                      exclude_non_image := exclude_non_image)
WHERE (date_from IS NULL OR StudyDate >= date_from)
  AND (date_to IS NULL OR StudyDate <= date_to)
GROUP BY ALL
ORDER BY ALL;

-- repeat_pairs_for(date_from, date_to, <repeat_exams_for parameters>): the
-- drill-down behind every repeat rate, one row per (repeat, prior) pair, the
-- repeat dated date_from..date_to.
--   StudyInstanceUID    the repeat study
--   prior_study_uid     the study it repeats
--   PatientID           the patient
--   StudyDate           date of the repeat
--   StudyTime           time of the repeat
--   prior_study_date    date of the prior
--   prior_study_time    time of the prior
--   days_since_prior    days between them
--   matched_keys        the matching keys
--   matched_values      their values, as a JSON object
--   (then the other utilization_studies columns of the repeat, for grouping)
CREATE MACRO repeat_pairs_for(date_from := NULL, date_to := NULL, window_days := 30,
                              match := ['Modality', 'BodyPartExamined'],
                              exclude_localizers := true, exclude_derived := true,
                              exclude_secondary := true, exclude_non_image := true) AS TABLE
SELECT StudyInstanceUID, prior_study_uid, PatientID, StudyDate, StudyTime,
       prior_study_date, prior_study_time, days_since_prior, matched_keys, matched_values,
       * EXCLUDE (StudyInstanceUID, prior_study_uid, PatientID, StudyDate, StudyTime,
                  prior_study_date, prior_study_time, days_since_prior, matched_keys,
                  matched_values, is_repeat)
FROM repeat_exams_for(window_days := window_days, match := match,
                      exclude_localizers := exclude_localizers,
                      exclude_derived := exclude_derived,
                      exclude_secondary := exclude_secondary,
                      exclude_non_image := exclude_non_image)
WHERE is_repeat
  AND (date_from IS NULL OR StudyDate >= date_from)
  AND (date_to IS NULL OR StudyDate <= date_to)
ORDER BY StudyDate, StudyTime, StudyInstanceUID;

-- repeat_pairs: repeat_pairs_for() with the default definition, all dates.
CREATE VIEW repeat_pairs AS FROM repeat_pairs_for();
