"""Checks of a cache: `usi verify` (verify/), `usi inspect` (inspect/) and `usi audit` (audit.py).
The three share common.py and replay.py and never import each other.
"""
