"""Stage 2 end to end on tiny real shards, a real cache and real torchrun processes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from helpers import ROOT, TEACHER, make_shards, make_train_data, run_py

from usi_cache import cache_format as schema
from usi_cache.cli.main import main
from usi_cache.config.parser import from_dict
from usi_cache.config.stages import TrainConfig
from usi_cache.dist import World
from usi_cache.stage2.targets import CacheTargets
from usi_cache.stage2.plan import PlanSpec
from usi_cache.shards.images import decode_image
from usi_cache.shards.manifest import load_manifest
from usi_cache.shards.tars import read_shard
from usi_cache.stage2.data import TrainStream, TrainStreamSpec, valid_counts
from usi_cache.views.sampling import decode_view, replay_array

# every test here trains or needs the module's cache (about 10 s to build): the slow tier
pytestmark = pytest.mark.slow

LOG_FIELDS = {"epoch", "lr", "train_loss", "img_per_s", "val_top1", "val_top5", "val_top1_ema",
              "val_top5_ema", "val_count", "time_s", "rank_weights_equal"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Uneven train shards (12,12,12,12,10), 3 val shards (10,10,5), a teacher and its cache."""
    return make_train_data(tmp_path_factory.mktemp("train"), n=58, per_shard=12, n_val=25, val_per_shard=10)


def train_args(data, out, *extra):
    return helpers.train_args(data, out, *extra, batch_size=8, workers=1)


def read_log(run: Path) -> list[dict]:
    """The epoch records of a run's log.jsonl (step records have a "step" key)."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "step" not in r]


def test_two_rank_ddp_on_uneven_shards(data, tmp_path):
    run = tmp_path / "run"
    r = run_py(["train_student.py", *train_args(data, run, "--cache", str(data["cache"]))], torchrun=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "views repeat" not in r.stdout and "each view repeats" not in r.stdout  # V = 3 >= 2 epochs
    assert r.stdout.count("epoch 1: loss") == 1 and r.stdout.count("epoch plan:") == 1  # rank 0 only
    log = read_log(run)
    assert [e["epoch"] for e in log] == [0, 1]
    for e in log:
        assert LOG_FIELDS <= set(e), LOG_FIELDS - set(e)
        assert e["ranks"] == 2 and e["rank_weights_equal"] is True
        assert e["val_count"] == 25  # every val image exactly once across the two ranks
        assert e["view"] == e["epoch"] % 3
        # 58 valid samples, 2 ranks x 8: 3 steps, 48 samples each used once (10 rotate out)
        assert (e["samples_used"], e["sample_uses"], e["max_uses_per_sample"]) == (48, 48, 1)
    assert json.loads((run / "config.json").read_text())["cache"] == str(data["cache"])
    last = torch.load(run / "last.pth", weights_only=True)
    assert last["epoch"] == 1 and last["arch"] == TEACHER
    assert {"state_dict", "state_dict_ema", "optimizer", "scheduler", "best", "step"} <= set(last)
    assert last["step"] == 2 * 3  # 3 steps per epoch


@pytest.mark.parametrize("ranks", [2, 3])
def test_repeated_augmentation_trains_both_copies_in_one_step_on_real_keys(data, tmp_path, ranks):
    """R = 2 with 2 ranks x 8 (3 steps of 16 units, 8 copy groups each) and 3 ranks x 8 (2 steps of
    24 units, 12 groups; 2 does not divide 3, so a group's copies land on ranks (0, 1), (2, 0) or
    (1, 2)): both copies of every sample in the same step, on two ranks."""
    run = tmp_path / "run"
    r = run_py(["train_student.py", *train_args(data, run, "--cache", str(data["cache"]), "--epochs", "1",
                                                "--repeated-aug", "2")], torchrun=ranks)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "24 distinct samples x 2 views = 48 uses per epoch" in r.stdout, r.stdout
    (e,) = read_log(run)
    assert (e["samples_used"], e["sample_uses"], e["max_uses_per_sample"]) == (24, 48, 2)
    assert e["repeat_same_step"] == 1.0 and e["repeat_distinct_ranks"] == 1.0 and e["in_batch_duplicates"] == 0


def test_views_repeat_is_logged(data, tmp_path):
    r = CliRunner().invoke(main, ["train", *train_args(data, tmp_path / "run", "--cache", str(data["cache"]),
                                                       "--epochs", "4", "--max-steps", "1")])
    assert r.exit_code == 0, r.output
    assert "V = 3 views for 4 epochs" in r.output
    assert [e["view"] for e in read_log(tmp_path / "run")] == [0, 1, 2, 0]


def test_label_only_and_online_modes_run(data, tmp_path):
    r = CliRunner().invoke(main, ["train", *train_args(data, tmp_path / "labels", "--epochs", "1")])
    assert r.exit_code == 0, r.output
    log = read_log(tmp_path / "labels")
    assert "train_kd" not in log[0] and log[0]["val_count"] == 25
    r = CliRunner().invoke(main, ["train", *train_args(data, tmp_path / "online", "--epochs", "1", "--teacher",
                                                       TEACHER, "--teacher-checkpoint", str(data["ckpt"]))])
    assert r.exit_code == 0, r.output
    assert read_log(tmp_path / "online")[0]["train_kd"] > 0


def test_online_teacher_sees_the_student_pixels(data, tmp_path):
    calls = []

    def hook(module, args):
        if type(module).__name__ == "ResNet":
            calls.append((id(module), module.training, args[0].detach().clone()))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        r = CliRunner().invoke(main, ["train", *train_args(data, tmp_path / "online", "--epochs", "1", "--max-steps",
                                                           "2", "--teacher", TEACHER, "--teacher-checkpoint",
                                                           str(data["ckpt"]), "--ema-decay", "0")])
    finally:
        handle.remove()
    assert r.exit_code == 0, r.output
    teacher_id = calls[0][0]
    pairs = []
    for i, (mid, training, x) in enumerate(calls):
        if mid == teacher_id:
            student = next(c for c in calls[i + 1:] if c[1])
            pairs.append((x, student[2]))
    assert len(pairs) == 2
    cfg = timm.data.resolve_model_data_config(timm.create_model(TEACHER))
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    for t_in, s_in in pairs:  # both normalise with test_resnet's mean/std: undo and compare
        torch.testing.assert_close(t_in * std + mean, s_in * std + mean, rtol=0, atol=1e-6)


def cache_stream(data, *, shuffle_buffer: int, repeats: int = 1, world: int = 1, rank: int = 0):
    """The train stream of the module's cache (32 px, 7 steps of 8 in one process), its manifest,
    group and spec."""
    m = load_manifest(data["train"])
    group, attrs = schema.open_cache(data["cache"])
    spec, layout = schema.view_spec(attrs), schema.Layout.from_attrs(attrs)
    plan = PlanSpec(counts=valid_counts(m, group, layout), seed=42, world=world, workers=0, batch=8, repeats=repeats)
    stream = TrainStream(TrainStreamSpec(manifest=m, cache=str(data["cache"]), layout=layout, spec=spec, size=32,
                                         plan=plan, rank=rank, shuffle_buffer=shuffle_buffer))
    return stream, m, group, spec


def test_student_batch_equals_replayed_cache_views(data):
    stream, m, group, spec = cache_stream(data, shuffle_buffer=10)
    stream.set_epoch(4)  # view 4 mod 3 = 1
    x = {n: group[n][:] for n in schema.ARRAYS}
    images = {}
    for shard in range(len(m.shards)):
        for pos, sample in enumerate(read_shard(str(m.path(shard)))):
            images[sample.key] = (shard * m.per_shard + pos, decode_image(sample.data))
    samples = list(stream)
    assert len(samples) == 56 and len({s["key"] for s in samples}) == 56  # 58 // 8 * 8, each once
    for s in samples:
        slot, image = images[s["key"]]
        params = decode_view(tuple(x["boxes"][slot, 1]), bool(x["flips"][slot, 1]), x["aug_ops"][slot, 1],
                             x["aug_levels"][slot, 1], x["aug_resample"][slot, 1])
        expected = replay_array(image, params, 32, spec)
        np.testing.assert_array_equal(s["image"].permute(1, 2, 0).numpy(), expected)
        np.testing.assert_array_equal(s["t_log_probs"].numpy(), x["logits"][slot, 1].astype(np.float32))
        assert s["label"] == x["labels"][slot]


def test_cache_from_other_shards_is_refused(data, tmp_path):
    other = make_shards(tmp_path / "other", n=58, per_shard=12, seed=3)
    args = train_args(data, tmp_path / "run", "--cache", str(data["cache"]))
    args[args.index("--train-shards") + 1] = str(other)
    r = CliRunner().invoke(main, ["train", *args])
    assert r.exit_code == 1 and "dataset.fingerprint" in r.output and "other shards" in r.output, r.output


@pytest.mark.parametrize("repeats", [1, 2])
def test_resume_after_kill_mid_epoch_is_bit_identical(data, tmp_path, repeats):
    """Kill in epoch 1, resume: the final weights equal an uninterrupted run's bit for bit, with
    drop-path on (each rank's generator is saved in last.pth and put back), with and without
    repeated augmentation."""
    run = tmp_path / "run"
    extra = ("--cache", str(data["cache"]), "--epochs", "3", "--batch-size", "4",
             "--model-kwargs", '{"drop_path_rate": 0.2}', "--repeated-aug", str(repeats))
    args = [sys.executable, "train_student.py", *train_args(data, run, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as run_py: the thread count changes CPU summation order
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 180
    while time.time() < deadline and not (run / "last.pth").is_file():  # renamed into place: whole
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # epoch 0 saved; epoch 1 not yet (it takes far longer than a poll)
    proc.wait()
    assert [e["epoch"] for e in read_log(run)] == [0], "the kill should land in epoch 1"
    r = run_py(["train_student.py", *train_args(data, run, *extra), "--resume"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from" in r.stdout and "at epoch 1" in r.stdout
    log = read_log(run)
    assert [e["epoch"] for e in log] == [0, 1, 2]
    resumed = torch.load(run / "last.pth", weights_only=True)
    assert resumed["epoch"] == 2
    r = run_py(["train_student.py", *train_args(data, tmp_path / "straight", *extra)])
    assert r.returncode == 0, r.stdout + r.stderr
    straight = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    # the resumed schedule is the uninterrupted one, epoch by epoch
    assert [e["lr"] for e in log] == [e["lr"] for e in read_log(tmp_path / "straight")]
    assert [e["train_loss"] for e in log] == [e["train_loss"] for e in read_log(tmp_path / "straight")]
    for part in ("state_dict", "state_dict_ema"):
        for k, v in straight[part].items():
            assert torch.equal(v, resumed[part][k]), (part, k)


def test_resume_with_another_world_size_is_refused(data, tmp_path):
    run = tmp_path / "run"
    args = train_args(data, run, "--epochs", "2", "--max-steps", "1")
    r = CliRunner().invoke(main, ["train", *args])
    assert r.exit_code == 0, r.output
    state = torch.load(run / "last.pth", weights_only=True)
    assert state["world"] == 1 and len(state["rng"]) == 1
    state["world"], state["epoch"] = 2, 0  # as if two ranks had made it
    torch.save(state, run / "last.pth")
    r = CliRunner().invoke(main, ["train", *args, "--resume"])
    assert r.exit_code == 1 and "made by 2 process(es), this run has 1" in r.output, r.output


def test_repeated_augmentation_uses_distinct_cached_views(data):
    """R = 2 keeps the 7 steps of 8: 28 distinct samples, each twice, with two distinct cached views;
    the next epoch selects the other samples first, and their first use starts at view 0."""
    stream, _, group, _ = cache_stream(data, shuffle_buffer=4, repeats=2)
    x = {n: group[n][:] for n in schema.ARRAYS}
    slots = {str(k): i for i, k in enumerate(x["keys"]) if k}
    chosen = []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        seen: dict[str, list] = {}
        batches = [list(range(i, i + 8)) for i in range(0, 56, 8)]
        samples = list(stream)
        assert len(samples) == 56
        for b in batches:  # one process, 2 copies: both copies of a sample in the same batch
            keys = [samples[i]["key"] for i in b]
            assert len(set(keys)) == 4 and all(keys.count(k) == 2 for k in keys)
        for s in samples:
            seen.setdefault(s["key"], []).append((s["view"], s["t_log_probs"].numpy()))
        assert len(seen) == 28 and all(len(v) == 2 for v in seen.values())
        for k, uses in seen.items():
            assert len({v for v, _ in uses}) == 2
            for v, logits in uses:
                np.testing.assert_array_equal(logits, x["logits"][slots[k], v].astype(np.float32))
        chosen.append(seen)
    assert set(chosen[0]).isdisjoint(chosen[1])  # 28 + 28 of the 58: no sample twice before all once
    assert all(sorted(v for v, _ in uses) == [0, 1] for uses in chosen[1].values())


def test_ranks_of_a_copy_group_train_one_sample_in_the_same_step(data):
    """The data path itself, not only the plan: with 2 ranks and R = 2, each step's batches on rank 0
    and rank 1 hold the same samples, each with another cached view on the other rank."""
    per_rank = []
    for rank in (0, 1):
        stream, *_ = cache_stream(data, shuffle_buffer=5, repeats=2, world=2, rank=rank)
        stream.set_epoch(1)
        per_rank.append(list(stream))
    assert len(per_rank[0]) == len(per_rank[1]) == 3 * 8  # 58 // 16 = 3 steps
    for step in range(3):
        a, b = (per_rank[r][step * 8:(step + 1) * 8] for r in (0, 1))
        assert sorted(s["key"] for s in a) == sorted(s["key"] for s in b)
        views = {s["key"]: s["view"] for s in a}
        assert all(views[s["key"]] != s["view"] for s in b)
    assert len({s["key"] for s in per_rank[0]}) == 24


def test_a_grow_between_ranks_reads_cannot_split_the_ranks(data, tmp_path):
    """Rank 1 reads the cache only after a real `--add-views 1` grow has committed (V 3 -> 4) while
    rank 0 read it before: both ranks still train with rank 0's V = 3."""
    cache = tmp_path / "cache.zarr"
    shutil.copytree(data["cache"], cache)
    grow = helpers.cache_args(data["train"], data["ckpt"], cache, "--views", "3", "--add-views", "1")
    run = tmp_path / "run"
    r = run_py(["tests/grow_between_reads.py", json.dumps(grow), "--",
                *train_args(data, run, "--cache", str(cache), "--epochs", "1")], torchrun=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert schema.Layout.from_attrs(schema.open_cache(cache)[1]).views == 4  # the grow did commit
    assert [(run / f"views.rank{i}").read_text() for i in (0, 1)] == ["3", "3"]


def test_repeated_aug_larger_than_views_is_refused(data, tmp_path):
    r = CliRunner().invoke(main, ["train", *train_args(data, tmp_path / "run", "--cache", str(data["cache"]),
                                                       "--repeated-aug", "4")])
    assert r.exit_code == 1 and "repeated_aug = 4" in r.output and "V = 3" in r.output, r.output


def test_kd_tail_drop_trains_on_the_renormalised_top_k(data, tmp_path):
    """A k = 3 of C = 5 cache: `--kd-tail drop` turns each cached view into its top-3
    renormalised (no rest bucket), the default keeps the stored tail mass; both train."""
    stream, m, group, spec = cache_stream(data, shuffle_buffer=10)
    stream.set_epoch(0)
    batch = {k: torch.stack([torch.as_tensor(s[k]) for s in list(stream)[:8]]) for k in ("t_log_probs", "t_classes")}
    layout = schema.Layout.from_attrs(schema.open_cache(data["cache"])[1])
    world = World(0, 1, 0, torch.device("cpu"))
    runs = {}
    for tail in ("bucket", "drop"):
        out = tmp_path / tail
        r = CliRunner().invoke(main, ["train", *train_args(data, out, "--epochs", "1", "--cache", str(data["cache"]),
                                                           "--kd-tail", tail)])
        assert r.exit_code == 0, r.output
        runs[tail] = read_log(out)[0]
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["kd_tail"] == tail
        targets = CacheTargets(from_dict(TrainConfig, cfg, "config.json"), 5, world, spec, layout)
        runs[tail]["P"], runs[tail]["rest"] = targets.teacher(batch)
    kept, dropped = runs["bucket"], runs["drop"]
    assert (kept["rest"] > 0).all() and (dropped["rest"] == 0).all()
    torch.testing.assert_close(dropped["P"].sum(1), torch.ones(8))
    torch.testing.assert_close(dropped["P"], kept["P"] / kept["P"].sum(1, keepdim=True))
    assert np.isfinite(dropped["train_kd"]) and dropped["train_kd"] != kept["train_kd"]
