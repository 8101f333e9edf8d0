"""Benchmark 1 — stage-2 overhead: label-only vs cached KD vs online KD, side by side.

Same student, shards, batch and steps. Two measurements, the three modes alternating for
several rounds each:
* steady state: `--steps` training steps in this process, the median images/s of each mode (the
  first step left out), with the ratios cache / label-only (target >= 0.95) and cache / online
  next to the FLOP ideal 1 + teacher_fwd / student_fwd_bwd (a training step counted as 3x the
  forward: torch's flop counter over-counts the backward of grouped convolutions);
* whole runs: `train_student.py` in a fresh process over every training image for
  `--whole-epochs` epochs (start-up, cache checks, data loading, evaluation and checkpoints
  included), the median wall time of each mode and the ratios cache / label-only (target
  <= 1.03) and online / cache.

    .venv/bin/python benchmarks/stage2_overhead.py            # CPU defaults (about 8 minutes)
    .venv/bin/python benchmarks/stage2_overhead.py --student resnet10t --teacher resnet18 --images 600 \
        --steps 0 --whole-rounds 3                             # whole runs only
    .venv/bin/python benchmarks/stage2_overhead.py --student resnet50 --teacher tresnet_v2_l \
        --size 224 --batch 128 --images 8192 --steps 30      # GPU
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from bench_common import cache_config, synthetic_shards, table, train_config, write_result
from usi_cache.cache import run_cache
from usi_cache.config import to_dict
from usi_cache.train import run_train

ROOT = Path(__file__).resolve().parent.parent


def forward_flops(name: str, size: int, classes: int) -> int:
    model = timm.create_model(name, num_classes=classes).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops()


def whole_run(cfg, recipe: Path) -> float:
    """Wall seconds of `train_student.py --config recipe` in a fresh process (imports included)."""
    d = to_dict(cfg)
    recipe.write_text(yaml.safe_dump({"view": d.pop("view"), "train": d}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "train_student.py"), "--config", str(recipe), "--quiet"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"train_student.py failed ({recipe}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="test_efficientnet")
    p.add_argument("--teacher", default="test_resnet")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--steps", type=int, default=12, help="steady-state steps per run (0 = skip)")
    p.add_argument("--rounds", type=int, default=3, help="steady-state rounds")
    p.add_argument("--whole-rounds", type=int, default=3, help="whole runs per mode (0 = skip)")
    p.add_argument("--whole-epochs", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    a = p.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="usi-bench-"))
    train = synthetic_shards(work / "train", a.images, a.classes, max(a.size, 40), per_shard=256)
    val = synthetic_shards(work / "val", a.batch, a.classes, max(a.size, 40), per_shard=a.batch, seed=1)
    cache = work / "cache.zarr"
    run_cache(cache_config(train, cache, a.teacher, views=2, topk=min(10, a.classes), input_size=a.size,
                           workers=a.workers), progress=False)
    modes = {"label-only": {}, "cache": {"cache": str(cache)}, "online KD": {"teacher": a.teacher}}

    def config(mode: str, **kw):
        return train_config(train, val, work / f"run-{mode}", a.student, warmup_epochs=0, batch_size=a.batch,
                            input_size=a.size, ema_decay=0.0, workers=a.workers, **modes[mode], **kw)

    speeds = {m: [] for m in modes}
    for r in range(a.rounds if a.steps else 0):
        for mode in modes:
            s = run_train(config(mode, epochs=1, max_steps=a.steps), progress=False)
            speeds[mode].append(s["last"]["img_per_s"])
            print(f"round {r}: {mode:10s} {speeds[mode][-1]:8.1f} img/s", flush=True)
    walls = {m: [] for m in modes}
    for r in range(a.whole_rounds):
        for mode in modes:
            walls[mode].append(whole_run(config(mode, epochs=a.whole_epochs), work / f"{mode}.yaml"))
            print(f"whole run {r}: {mode:10s} {walls[mode][-1]:8.2f} s", flush=True)
    med = {m: statistics.median(v) for m, v in speeds.items() if v}
    wall = {m: statistics.median(v) for m, v in walls.items() if v}
    t_f, s_f = forward_flops(a.teacher, a.size, a.classes), forward_flops(a.student, a.size, a.classes)
    ideal = 1 + t_f / (3 * s_f)
    rows = [[m, f"{med[m]:.1f}" if m in med else "-", ", ".join(f"{x:.1f}" for x in speeds[m]),
             f"{wall[m]:.2f}" if m in wall else "-", ", ".join(f"{x:.2f}" for x in walls[m])] for m in modes]
    print()
    print(table(["mode", "median img/s (steady)", "runs", "median wall s (whole run)", "runs"], rows))
    print()
    ratios = {}
    if med:
        ratios.update({"cache / label-only": med["cache"] / med["label-only"],
                       "cache / online KD": med["cache"] / med["online KD"]})
    if wall:  # wall time: lower is better, so the ratios read as "times slower"
        ratios.update({"whole run: cache / label-only wall": wall["cache"] / wall["label-only"],
                       "whole run: online KD / cache wall": wall["online KD"] / wall["cache"]})
    ratios["FLOP ideal (1 + teacher_fwd / student_fwd_bwd)"] = ideal
    print(table(["ratio", "value"], [[k, f"{v:.3f}"] for k, v in ratios.items()]))
    print(f"\nstudent {a.student} {s_f / 1e6:.1f} MFLOPs/img fwd, teacher {a.teacher} {t_f / 1e6:.1f} MFLOPs/img fwd, "
          f"{a.size}px, batch {a.batch}; steady: {a.steps} steps x {a.rounds} rounds; whole: {a.images} images x "
          f"{a.whole_epochs} epoch(s) x {a.whole_rounds} rounds")
    path = write_result("stage2_overhead", {"args": vars(a), "img_per_s": speeds, "median": med, "wall_s": walls,
                                            "median_wall_s": wall, "ratios": ratios, "student_fwd_flops": s_f,
                                            "teacher_fwd_flops": t_f})
    print(f"written {path}")


if __name__ == "__main__":
    main()
