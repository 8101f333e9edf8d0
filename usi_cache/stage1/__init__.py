"""Stage 1: caching a teacher's top-k logits over augmented views (run.py); independent parts of
one cache, as job-array tasks with no process group (parts.py), and what they have left (status.py).
"""
