-- The files of an instances version ($files) holding a row of a changed series
-- or study (the table `changed`), for an update of the summaries
-- (etl/summarize.py update()): the only files it reads beyond two key columns.
--   filename   the file
SELECT DISTINCT filename
FROM read_parquet($files, filename = true, union_by_name = true)
WHERE SeriesInstanceUID IN (SELECT SeriesInstanceUID FROM changed)
   OR StudyInstanceUID IN (SELECT StudyInstanceUID FROM changed)
ORDER BY filename;
