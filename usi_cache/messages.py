"""The package's one message channel: the `usi_cache` logger, printing INFO and above to stdout
on rank 0 for the length of a stage; the other ranks are silent."""
from __future__ import annotations

import contextlib
import logging
import sys

PACKAGE_LOGGER = "usi_cache"


class Messages:
    """Route the package logger to stdout (rank 0) until `close()`; then put it back as it was."""

    def __init__(self, main: bool):
        self.logger = logging.getLogger(PACKAGE_LOGGER)
        self.saved = (self.logger.level, self.logger.propagate)
        self.handler = logging.StreamHandler(sys.stdout) if main else None
        if self.handler is not None:
            self.handler.setFormatter(logging.Formatter("%(message)s"))
            self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO if main else logging.CRITICAL + 1)
        self.logger.propagate = False  # one channel: not also through the root logger's handlers

    def close(self) -> None:
        if self.handler is not None:
            self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]


@contextlib.contextmanager
def messages(main: bool):
    m = Messages(main)
    try:
        yield
    finally:
        m.close()
