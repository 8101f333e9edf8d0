"""Benchmark 1 — stage-2 overhead: label-only vs cached KD vs online KD, side by side.

Same student, shards, batch and steps; the three modes alternate for several rounds in one
process, and the median images/s of each is reported with the ratios cache / label-only
(target >= 0.95) and cache / online next to the FLOP ideal 1 + teacher_fwd / student_fwd_bwd
(a training step counted as 3x the forward: torch's flop counter over-counts the backward of
grouped convolutions).

    .venv/bin/python benchmarks/stage2_overhead.py            # CPU defaults (about 5 minutes)
    .venv/bin/python benchmarks/stage2_overhead.py --student resnet50 --teacher tresnet_v2_l \
        --size 224 --batch 128 --images 8192 --steps 30      # GPU
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench_common import cache_config, synthetic_shards, table, train_config, write_result
from usi_cache.cache import run_cache
from usi_cache.train import run_train


def forward_flops(name: str, size: int, classes: int) -> int:
    model = timm.create_model(name, num_classes=classes).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="test_efficientnet")
    p.add_argument("--teacher", default="test_resnet")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
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
    speeds = {m: [] for m in modes}
    for r in range(a.rounds):
        for mode, extra in modes.items():
            cfg = train_config(train, val, work / f"run-{mode}", a.student, epochs=1, warmup_epochs=0,
                               batch_size=a.batch, input_size=a.size, max_steps=a.steps, ema_decay=0.0,
                               workers=a.workers, **extra)
            s = run_train(cfg, progress=False)
            speeds[mode].append(s["last"]["img_per_s"])
            print(f"round {r}: {mode:10s} {speeds[mode][-1]:8.1f} img/s", flush=True)
    med = {m: statistics.median(v) for m, v in speeds.items()}
    t_f, s_f = forward_flops(a.teacher, a.size, a.classes), forward_flops(a.student, a.size, a.classes)
    ideal = 1 + t_f / (3 * s_f)
    rows = [[m, f"{med[m]:.1f}", ", ".join(f"{x:.1f}" for x in speeds[m])] for m in modes]
    print()
    print(table(["mode", "median img/s", "runs"], rows))
    print()
    ratios = {"cache / label-only": med["cache"] / med["label-only"],
              "cache / online KD": med["cache"] / med["online KD"],
              "FLOP ideal (1 + teacher_fwd / student_fwd_bwd)": ideal}
    print(table(["ratio", "value"], [[k, f"{v:.3f}"] for k, v in ratios.items()]))
    print(f"\nstudent {a.student} {s_f / 1e6:.1f} MFLOPs/img fwd, teacher {a.teacher} {t_f / 1e6:.1f} MFLOPs/img fwd, "
          f"{a.size}px, batch {a.batch}, {a.steps} steps x {a.rounds} rounds")
    path = write_result("stage2_overhead", {"args": vars(a), "img_per_s": speeds, "median": med,
                                            "ratios": ratios, "student_fwd_flops": s_f, "teacher_fwd_flops": t_f})
    print(f"written {path}")


if __name__ == "__main__":
    main()
