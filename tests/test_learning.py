"""Training learns: a student trained on an easy task ends far above chance, from labels and
from a cache of a teacher that knows the task."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from helpers import NUM_CLASSES, TEACHER, make_shards
from usi_cache.cli.main import main

CHANCE = 100 / NUM_CLASSES  # top-1 of a guess, in percent

# An easy task: the class sets an image's mean colour (helpers.make_samples). No RandAugment
# (its colour ops would hide the class), no mixing, no EMA: a short run that must learn.
EASY = ["--set", "view.randaugment=", "--set", "view.scale=0.5,1", "--mix", "none", "--ema-decay", "0",
        "--epochs", "6", "--warmup-epochs", "1", "--cooldown-epochs", "0", "--lr", "5e-3",
        "--batch-size", "32", "--input-size", "32", "--workers", "0", "--quiet"]


def _top1(run) -> float:
    log = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    epochs = [e for e in log if "val_top1" in e]
    return epochs[-1]["val_top1"]


@pytest.mark.slow
def test_students_learn_far_above_chance(tmp_path):
    train = make_shards(tmp_path / "train", n=300, per_shard=100)
    val = make_shards(tmp_path / "val", n=100, per_shard=50, seed=7)
    data = ["--train-shards", str(train), "--val-shards", str(val), "--model", TEACHER]

    teacher_run = tmp_path / "teacher"
    r = CliRunner().invoke(main, ["train", *data, "--out", str(teacher_run), *EASY])
    assert r.exit_code == 0, r.output
    assert _top1(teacher_run) >= 3 * CHANCE, "a label-only run did not learn the colour classes"

    cache = tmp_path / "cache.zarr"
    r = CliRunner().invoke(main, ["cache", "--shards", str(train), "--teacher", TEACHER,
                                  "--teacher-checkpoint", str(teacher_run / "best.pth"), "--views", "6",
                                  "--topk", "3", "--input-size", "32", "--batch-size", "64", "--workers", "0",
                                  "--set", "view.randaugment=", "--set", "view.scale=0.5,1", "--out", str(cache)])
    assert r.exit_code == 0, r.output

    student_run = tmp_path / "student"
    r = CliRunner().invoke(main, ["train", *data, "--cache", str(cache), "--out", str(student_run), *EASY])
    assert r.exit_code == 0, r.output
    assert _top1(student_run) >= 3 * CHANCE, "a student distilled from a good teacher's cache did not learn"
