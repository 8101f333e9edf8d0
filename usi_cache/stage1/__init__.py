"""Stage 1: caching a teacher's top-k logits over augmented views (run.py).
"""
