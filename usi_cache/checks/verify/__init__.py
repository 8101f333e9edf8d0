"""`usi verify`: named, ordered check lists over each shard's data (shard_checks.py, shard_data.py)
and the cache as a whole (cache_checks.py), an optional teacher re-run (recompute.py), and
the report (report.py); run.py drives them.
"""
