"""The command line `usi`: the click group and its commands (main.py) and the options generated
from the config dataclasses (options.py)."""
from usi_cache.cli.main import main

__all__ = ["main"]
