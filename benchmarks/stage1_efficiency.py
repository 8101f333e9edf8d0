r"""Stage-1 efficiency: cache_teacher views/s against the bare teacher forward.

Stage 1 end to end (decoding and augmentation in worker processes, the teacher, writing the
cache) on synthetic JPEG shards, against the same teacher run alone on pre-made uint8 batches of
the same size and dtype (decoding and augmentation already done). Also reported: where stage 1's
time goes: decoding + augmentation timed alone in one process, the teacher inside stage 1, the
main process waiting for data, writing the cache. On a GPU (`benchmarks/gpu_check.sh` runs this
at that size):

    .venv/bin/python benchmarks/stage1_efficiency.py --teacher tresnet_v2_l --size 224 \
        --images 4096 --batch 128 --workers 12

`--members 1,2,3` adds stage 1 with an ensemble of 1, 2 and 3 copies of the teacher (random
weights, seeded per member: the same compute as three different teachers of that architecture),
and `--mixes none,paired` each of them on a plain and a paired cache: views/s and bytes per view
of every combination, each a fresh cache of the same shards.

Interpretation:
Stage 1 overlaps decoding (worker processes) with the teacher, so with a real teacher on a GPU
the bound is the teacher, as long as the workers produce views faster than it consumes them (the
per-worker rate above). With a tiny teacher on a few CPU cores the balance is the other way:
decoding, cropping and RandAugment cost more than the forward, and the worker shares the cores
with the teacher (which is why the forward is slower inside stage 1 than alone). The wall time
also includes loading the teacher and creating the store. Members run one after another on each
batch, so the teacher's share of the time grows with their number while decoding and augmenting
a view is paid once (each view is rendered once per distinct input size). A paired cache decodes
each view's partner image too and writes the four mixing arrays. `benchmarks/gpu_check.sh` measures the
ratio where a GPU is available.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench_common import cache_config, publish, synthetic_shards, table
from usi_cache import cache_format as schema
from usi_cache.config.stages import MixConfig
from usi_cache.stage1.run import ViewJob, run_cache, shard_batches
from usi_cache.dist import init_world
from usi_cache.shards.manifest import load_manifest
from usi_cache.models.teacher import load_teacher
from usi_cache.views.sampling import op_slots


TARGET = 0.9  # stage 1 / bare forward, on a GPU (docs: performance targets)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="test_resnet")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--members", default="1", help="ensemble sizes to run stage 1 with, comma-separated")
    p.add_argument("--mixes", default="none", help="cache kinds: none (plain) and/or paired, comma-separated")
    p.add_argument("--work", default=None)
    return p


def report(r: dict) -> str:
    """The tables and findings of a stage1_efficiency results file."""
    a, s = r["args"], r["summary"]
    views, bare, aug = s["views_computed"], r["bare_views_per_s"], r["augment_ms_per_view"]
    rows = [["cache_teacher (end to end)", f"{r['stage1_views_per_s']:.0f}"], ["bare teacher forward", f"{bare:.0f}"],
            ["ratio", f"{r['ratio']:.3f}"]]
    split = [["decode + augment (1 process, measured alone)", f"{aug:.3f} ms/view"],
             ["teacher (in stage 1)", f"{s['time_teacher_s']:.1f} s"],
             ["waiting for data (main process)", f"{s['time_data_wait_s']:.1f} s"],
             ["writing the cache", f"{s['time_write_s']:.1f} s"],
             ["wall time", f"{s['wall_s']:.1f} s for {views} views"]]
    return "\n".join([
        f"`{a['teacher']}` at {a['size']} px, {a['images']} images × {a['views']} views, {a['classes']} classes, "
        f"batch {a['batch']}, {a['workers']} worker(s)", "",
        table(["", "views/s"], rows), "", table(["where the time goes", ""], split), "",
        f"* stage 1 reaches {r['ratio']:.2f}× the bare forward (target on a GPU: ≥ {TARGET})",
        f"* the teacher alone: {1e3 / bare:.2f} ms/view; inside stage 1: {1e3 * s['time_teacher_s'] / views:.2f} "
        f"ms/view",
        f"* decode + augment: {aug:.2f} ms/view in one process, so one worker makes about {1e3 / aug:.0f} views/s "
        f"at this size", *_sweep(r)])


def _sweep(r: dict) -> list[str]:
    """The members x cache-kind table, when the run has one."""
    runs = r.get("sweep") or []
    if len(runs) < 2:
        return []
    base = {x["mix"]: x for x in runs if x["members"] == 1}
    rows = [[str(x["members"]), "paired" if x["mix"] == "paired" else "plain", f"{x['views_per_s']:.0f}",
             f"{x['views_per_s'] / base[x['mix']]['views_per_s']:.2f}" if x["mix"] in base else "-",
             f"{x['bytes_per_view']:.1f}", f"{x['time_teacher_s']:.1f} s"] for x in runs]
    out = ["", table(["teachers", "cache", "views/s", "vs 1 teacher", "bytes/view", "teacher time"], rows)]
    plain, paired = base.get("none"), base.get("paired")
    if plain and paired:
        out += ["", f"* paired against plain (1 teacher): {paired['views_per_s'] / plain['views_per_s']:.2f}× the "
                    f"views/s, {paired['bytes_per_view']:.1f} against {plain['bytes_per_view']:.1f} bytes per view "
                    f"(+{paired['bytes_per_view'] - plain['bytes_per_view']:.1f})"]
    return out


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="usi-bench-"))
    shards = synthetic_shards(work / "shards", a.images, a.classes, max(a.size + 8, 40), per_shard=256)
    cfg = cache_config(shards, work / "cache.zarr", a.teacher, views=a.views, topk=min(10, a.classes),
                       input_size=a.size, batch_size=a.batch, workers=a.workers, overwrite=True,
                       random_teacher=True)  # throughput only: the weights do not matter
    s = run_cache(cfg, progress=False)
    views = s["views_computed"]
    sweep = []
    for mix in a.mixes.split(","):
        for m in (int(x) for x in a.members.split(",")):
            if (m, mix) == (1, "none"):
                run = s  # the run above
            else:
                c = replace(cfg, teacher=(a.teacher,) * m, mix=MixConfig(mode=mix), out=str(work / f"cache-{m}-{mix}.zarr"))
                run = run_cache(c, progress=False)
            sweep.append({"members": m, "mix": mix, "views_per_s": run["views_per_s"],
                          "bytes_per_view": run["bytes_per_view"], "time_teacher_s": run["time_teacher_s"],
                          "wall_s": run["wall_s"]})
            print(f"  {m} teacher(s), {mix}: {run['views_per_s']:.0f} views/s, {run['bytes_per_view']:.1f} bytes/view")

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
    job = ViewJob(m.root, tuple(x.name for x in m.shards), layout, cfg.view, (a.size,), cfg.seed, a.batch)
    t = time.perf_counter()
    n_aug = sum(len(b["pos"]) for b in shard_batches(job, 0) if b["kind"] == "batch")
    aug_per_view = (time.perf_counter() - t) / n_aug

    publish("stage1_efficiency", {"args": vars(a), "stage1_views_per_s": s["views_per_s"],
                                  "bare_views_per_s": bare, "ratio": s["views_per_s"] / bare,
                                  "augment_ms_per_view": aug_per_view * 1e3, "summary": s, "sweep": sweep}, report)


if __name__ == "__main__":
    main()
