-- parquet_schemas: the schema of each Parquet file of $files (column names and types, in
-- any order), as one text: files with the same text can be read without union_by_name,
-- which merges the files' schemas again at every query.
--   file_name  the file, as given
--   cols       its sorted (name, physical type, logical type, repetition, children)
SELECT
    file_name,
    list_sort(list(concat_ws(':', name, type, logical_type::VARCHAR, repetition_type,
                             num_children::VARCHAR)))::VARCHAR AS cols
FROM parquet_schema($files)
GROUP BY file_name
