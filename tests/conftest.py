"""The tests' fixtures; the helpers they use are in helpers.py."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_shards, save_teacher


@pytest.fixture
def shards(tmp_path) -> Path:
    return make_shards(tmp_path / "shards")


@pytest.fixture
def teacher_ckpt(tmp_path) -> Path:
    return save_teacher(tmp_path / "teacher.pth")
