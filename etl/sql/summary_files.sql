-- The files of an instances version (the view `instances_all`, with each row's
-- filename) holding a row of a changed series or study (the table `changed`),
-- for an update of the summaries (etl/summarize.py update()): the only files it
-- reads beyond two key columns.
--   filename   the file
--   n          its rows of a changed series or study
SELECT filename, count(*) AS n
FROM instances_all
WHERE SeriesInstanceUID IN (SELECT SeriesInstanceUID FROM changed)
   OR StudyInstanceUID IN (SELECT StudyInstanceUID FROM changed)
GROUP BY filename
ORDER BY filename;
