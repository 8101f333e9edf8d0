"""The config area's one error class, apart from the dataclasses and the parser so that both,
and the CLI, import it from one place.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range."""
