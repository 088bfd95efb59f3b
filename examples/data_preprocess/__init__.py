"""Scripts that turn datasets into rlflow's parquet row schema (the verl schema).

Each script is importable (pure functions) and runnable as a command-line tool.
"""
