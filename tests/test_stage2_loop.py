"""The stage-2 loop's conventions: timm's eval transform and checkpoint keys, persistent loader
workers, per-step records in log.jsonl, TensorBoard, --compile (all real: shards, timm models)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import timm.models
import torch
from helpers import NUM_CLASSES, TEACHER, make_shards, yaml_config
from PIL import Image
from torch.utils.data import DataLoader

from usi_cache.config.stages import ViewSpec
from usi_cache.stage2.plan import PlanSpec
from usi_cache.shards.manifest import load_manifest
from usi_cache.stage2.state import TrainError
from usi_cache.stage2.loop import run_train
from usi_cache.stage2.data import TrainStream, TrainStreamSpec, valid_counts
from usi_cache.stage2.eval_data import eval_array


# ------------------------------------------------------------------ eval transform = timm's

@pytest.mark.parametrize("size,crop_pct,interpolation", [(32, 0.95, "bicubic"), (24, 0.875, "bilinear"),
                                                         (29, 1.0, "bicubic"), (32, 0.9, "lanczos")])
def test_eval_transform_equals_timm_bit_for_bit(size, crop_pct, interpolation):
    model = timm.create_model(TEACHER, num_classes=NUM_CLASSES)
    data_cfg = timm.data.resolve_data_config({"input_size": (3, size, size), "crop_pct": crop_pct,
                                              "interpolation": interpolation}, model=model)
    tf = timm.data.create_transform(**data_cfg, is_training=False)
    mean = torch.tensor(data_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(data_cfg["std"]).view(3, 1, 1)
    rng = np.random.default_rng(size)
    # odd sizes: the resize's long side and the crop offsets fall between pixels
    for w, h in [(37, 53), (53, 37), (41, 41), (101, 33), (33, 100), (size, 70)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = torch.from_numpy(eval_array(image, size, crop_pct, interpolation)).permute(2, 0, 1)
        ours = (ours.float().div(255) - mean) / std  # what stage 2 feeds the model
        theirs = tf(image)
        assert theirs.shape == ours.shape == (3, size, size)
        assert torch.equal(ours, theirs), (w, h, (ours - theirs).abs().max())


# ------------------------------------------------------ persistent workers and the epoch plan

def label_stream(shards: Path, workers: int) -> TrainStream:
    m = load_manifest(shards)
    plan = PlanSpec(counts=valid_counts(m), seed=42, world=1, workers=workers, batch=4)
    return TrainStream(TrainStreamSpec(manifest=m, cache=None, layout=None, spec=ViewSpec(randaugment=""), size=16,
                                       plan=plan, rank=0, shuffle_buffer=8))


def batches(loader) -> list[tuple[list[int], list[int], int]]:
    """(sample ids, views, checksum of the pixels) of every batch."""
    return [(b["sid"].tolist(), b["view"].tolist(), int(b["image"].long().sum())) for b in loader]


def test_persistent_workers_follow_set_epoch(tmp_path):
    shards = make_shards(tmp_path / "shards", n=26, per_shard=6)
    stream = label_stream(shards, workers=2)
    loader = DataLoader(stream, batch_size=4, num_workers=2, persistent_workers=True)
    seen = {}
    for epoch in range(3):
        stream.set_epoch(epoch)
        seen[epoch] = batches(loader)
    fresh = label_stream(shards, workers=2)
    fresh.set_epoch(2)
    expected = batches(DataLoader(fresh, batch_size=4, num_workers=2))  # workers started at epoch 2
    assert seen[2] == expected
    assert {v for _, views, _ in seen[2] for v in views} == {2}  # without a cache, epoch e draws view e
    assert seen[0] != seen[2] and len(seen[0]) == len(seen[2]) == 6


# --------------------------------------------------- whole runs configured through YAML

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    return {"train": make_shards(root / "train", n=30, per_shard=10),
            "val": make_shards(root / "val", n=10, per_shard=5, seed=7)}


def read_records(run: Path) -> tuple[list[dict], list[dict]]:
    """(epoch records, step records) of a run's log.jsonl."""
    records = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "step" not in r], [r for r in records if "step" in r]


@pytest.mark.slow
def test_step_records_timm_checkpoints_and_resume_of_an_old_last_pth(data, tmp_path):
    cfg = yaml_config(data, tmp_path, log_every=2)
    run = Path(cfg.out)
    summary = run_train(cfg, progress=False)
    epochs, steps = read_records(run)
    assert [e["epoch"] for e in epochs] == [0, 1]
    # 3 steps per epoch: global steps 2 (epoch 0), 4 and 6 (epoch 1), each with that epoch's lr
    assert [(s["step"], s["epoch"]) for s in steps] == [(2, 0), (4, 1), (6, 1)]
    assert all(np.isfinite(s["loss"]) and s["loss"] > 0 for s in steps)
    assert [s["lr"] for s in steps] == [epochs[0]["lr"], epochs[1]["lr"], epochs[1]["lr"]]

    last = torch.load(run / "last.pth", weights_only=True)
    assert last["arch"] == TEACHER and last["step"] == 6 and last["epoch"] == 1
    for use_ema, key in ((False, "state_dict"), (True, "state_dict_ema")):  # timm's own loader
        model = timm.create_model(TEACHER, num_classes=NUM_CLASSES)
        timm.models.load_checkpoint(model, str(run / "last.pth"), use_ema=use_ema)
        assert all(torch.equal(v, last[key][k]) for k, v in model.state_dict().items()), key
    best = torch.load(run / "best.pth", weights_only=True)
    assert best["arch"] == TEACHER and best["epoch"] == summary["best"]["epoch"]
    model = timm.create_model(best["arch"], num_classes=NUM_CLASSES)
    timm.models.load_checkpoint(model, str(run / "best.pth"))
    assert all(torch.equal(v, best["state_dict"][k]) for k, v in model.state_dict().items())
    weights = last["state_dict_ema"] if best["ema"] else last["state_dict"]
    if best["epoch"] == last["epoch"]:  # the last epoch was the best: best.pth holds its chosen weights
        assert all(torch.equal(v, weights[k]) for k, v in best["state_dict"].items())
    else:  # an earlier epoch stays best only when the last one did not beat it
        final = summary["last"]
        assert best["top1"] >= max(final["val_top1"], final["val_top1_ema"] or -1)

    # an earlier run's last.pth (keys model/ema, no step count) from the end of epoch 0: the resume
    # derives the step count and trims epoch 1's records, step records included
    old = {k: v for k, v in last.items() if k not in ("arch", "step", "state_dict", "state_dict_ema")}
    old.update(model=last["state_dict"], ema=last["state_dict_ema"], epoch=0)
    torch.save(old, run / "last.pth")
    run_train(cfg, resume=True, progress=False)
    epochs, steps = read_records(run)
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert [(s["step"], s["epoch"]) for s in steps] == [(2, 0), (4, 1), (6, 1)]
    assert torch.load(run / "last.pth", weights_only=True)["step"] == 6


@pytest.mark.slow
def test_tensorboard_event_files_or_a_one_line_error(data, tmp_path):
    cfg = yaml_config(data, tmp_path, log_every=1, tensorboard=True, epochs=1)
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(TrainError, match=r"train.tensorboard: the tensorboard package is not installed"):
            run_train(cfg, progress=False)
        return
    run_train(cfg, progress=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    files = list(Path(cfg.out).glob("events.out.tfevents.*"))
    assert files
    acc = EventAccumulator(str(cfg.out))
    acc.Reload()
    _, steps = read_records(Path(cfg.out))
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [s["step"] for s in steps] == [1, 2, 3]
    np.testing.assert_allclose([e.value for e in loss], [s["loss"] for s in steps], rtol=1e-6)
    (top1,) = acc.Scalars("epoch/val_top1")
    assert top1.step == 3


@pytest.mark.slow
def test_compiled_student_trains(data, tmp_path):
    """torch.compile on the CPU (inductor, C++): the same run as eager, to float tolerance."""
    eager = run_train(yaml_config(data, tmp_path / "eager", epochs=1, max_steps=2, ema_decay=0), progress=False)
    compiled = run_train(yaml_config(data, tmp_path / "compiled", epochs=1, max_steps=2, ema_decay=0,
                                     compile=True), progress=False)
    a = torch.load(tmp_path / "eager" / "run" / "last.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "compiled" / "run" / "last.pth", weights_only=True)["state_dict"]
    assert not any(k.startswith("_orig_mod") for k in b)  # plain keys: the module, not its wrapper
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)
    assert compiled["last"]["train_loss"] == pytest.approx(eager["last"]["train_loss"], rel=1e-4)
