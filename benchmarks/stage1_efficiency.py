"""Benchmark 2 — stage-1 efficiency: cache_teacher views/s vs the bare teacher forward.

The bare forward runs the same teacher on pre-made uint8 batches of the same size and dtype
(the decode and augmentation already done). Also reported: where stage 1's time goes —
decode + augmentation (timed alone), teacher, writing. Target on a GPU: >= 0.9.

    .venv/bin/python benchmarks/stage1_efficiency.py                 # CPU defaults
    .venv/bin/python benchmarks/stage1_efficiency.py --teacher tresnet_v2_l --size 224 \
        --images 4096 --batch 128 --workers 12                      # GPU
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench_common import cache_config, synthetic_shards, table, write_result
from usi_cache import schema
from usi_cache.cache import ViewJob, run_cache, shard_batches
from usi_cache.dist import init_world
from usi_cache.shards import load_manifest
from usi_cache.teacher import load_teacher
from usi_cache.views import op_slots


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="test_resnet")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--work", default=None)
    a = p.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="usi-bench-"))
    shards = synthetic_shards(work / "shards", a.images, a.classes, max(a.size + 8, 40), per_shard=256)
    cfg = cache_config(shards, work / "cache.zarr", a.teacher, views=a.views, topk=min(10, a.classes),
                       input_size=a.size, batch_size=a.batch, workers=a.workers, overwrite=True)
    s = run_cache(cfg, progress=False)
    views = s["views_computed"]

    device = init_world().device
    teacher, _ = load_teacher(a.teacher, None, num_classes=a.classes, input_size=a.size, device=device)
    batch = torch.randint(0, 255, (a.batch, a.size, a.size, 3), dtype=torch.uint8)
    teacher(batch)  # warm-up
    t = time.perf_counter()
    done = 0
    while done < views:
        n = min(a.batch, views - done)
        teacher(batch[:n])
        done += n
    bare = views / (time.perf_counter() - t)

    # decode + augmentation alone, inline, for one shard's worth of views
    m = load_manifest(shards)
    layout = schema.Layout(len(m.shards), m.per_shard, a.views, cfg.topk, a.classes, op_slots(cfg.view))
    job = ViewJob(m.root, tuple(x.name for x in m.shards), layout, cfg.view, a.size, cfg.seed, a.batch)
    t = time.perf_counter()
    n_aug = sum(len(b["pos"]) for b in shard_batches(job, 0) if b["kind"] == "batch")
    aug_per_view = (time.perf_counter() - t) / n_aug

    ratio = s["views_per_s"] / bare
    rows = [["cache_teacher (end to end)", f"{s['views_per_s']:.0f}"], ["bare teacher forward", f"{bare:.0f}"],
            ["ratio", f"{ratio:.3f}"]]
    print(table(["", "views/s"], rows))
    split = [["decode + augment (1 process, measured alone)", f"{aug_per_view * 1e3:.3f} ms/view"],
             ["teacher (in stage 1)", f"{s['time_teacher_s']:.1f} s"],
             ["waiting for data (main process)", f"{s['time_data_wait_s']:.1f} s"],
             ["writing the cache", f"{s['time_write_s']:.1f} s"],
             ["wall time", f"{s['wall_s']:.1f} s for {views} views"]]
    print()
    print(table(["where the time goes", ""], split))
    path = write_result("stage1_efficiency", {"args": vars(a), "stage1_views_per_s": s["views_per_s"],
                                              "bare_views_per_s": bare, "ratio": ratio,
                                              "augment_ms_per_view": aug_per_view * 1e3, "summary": s})
    print(f"written {path}")


if __name__ == "__main__":
    main()
