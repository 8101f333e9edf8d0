"""`usi inspect`: a cache's summary, statistics, label issues and one sample's views, built as dicts
(run.py, stats.py, label_issues.py), then rendered as text (text.py), figures (figures.py) or a
page to open in a browser (html.py).
"""
