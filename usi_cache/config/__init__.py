"""Configs: the frozen dataclass of each stage (stages.py) apart from the YAML/type/--set parser
(parser.py), and their error class (errors.py).
"""
