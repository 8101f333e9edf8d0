"""`usi inspect`: a cache's summary, statistics and one sample's views, built as dicts (run.py,
stats.py), then rendered as text (text.py) or figures (figures.py).
"""
