"""Related pairs: co-occurrence mining (the shared SQL and its DuckDB and Spark engines), imported pair files, and the readers of a pairs folder."""
