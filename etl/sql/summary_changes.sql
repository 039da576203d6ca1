-- The changed series, studies and patients between two instances versions, for
-- an update of the summaries (etl/summarize.py update()): the rows of the files
-- the later version added (`rows_new`) and of those it removed (`rows_gone`),
-- each row as (SOPInstanceUID, ingest_run_id, SeriesInstanceUID,
-- StudyInstanceUID, PatientID). With $moved (some commits between the versions
-- only moved rows between files, as `lake optimize` does) a row found on both
-- sides was moved, not changed, and is left out; otherwise every row counts.
--   SeriesInstanceUID   a changed series
--   StudyInstanceUID    its study
--   PatientID           its patient
--   rows                the rows added or removed of that series, study and patient
SELECT SeriesInstanceUID, StudyInstanceUID, PatientID, count(*) AS rows
FROM (
    (SELECT * FROM rows_new EXCEPT ALL SELECT * FROM rows_gone WHERE $moved)
    UNION ALL
    (SELECT * FROM rows_gone EXCEPT ALL SELECT * FROM rows_new WHERE $moved)
)
GROUP BY ALL;
