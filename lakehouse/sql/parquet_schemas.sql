-- parquet_schemas: how many different schemas the Parquet files $files have (column names
-- and types, in any order). One means the files can be read without union_by_name, which
-- merges the files' schemas again at every query.
--   schemas   distinct sets of (name, physical type, logical type, repetition) per file
SELECT count(DISTINCT cols) AS schemas
FROM (
    SELECT
        file_name,
        list_sort(list(concat_ws(':', name, type, logical_type::VARCHAR, repetition_type,
                                 num_children::VARCHAR))) AS cols
    FROM parquet_schema($files)
    GROUP BY file_name
)
