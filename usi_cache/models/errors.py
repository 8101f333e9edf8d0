"""The models area's one error class: raised by building, checkpoint loading, precision and the
teacher alike, so it lives apart from all four.
"""
from __future__ import annotations


class TeacherError(ValueError):
    """A teacher name, checkpoint or setting is unusable. One line; names the file/key/field."""
