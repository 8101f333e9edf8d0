"""Verify scale: how `usi verify` scales with worker processes, and what that means for ImageNet.

A Fashion-MNIST cache (`test_resnet` teacher, random weights, 32 px) is verified with one and
more worker processes, without and with `--recompute`; each run's wall time includes starting
the workers and the cache-wide checks, and a 2-shard cache verified the same way gives those
fixed costs, so that the per-view rate is also reported without them. The reports of all runs
on the cache must be identical (checked here). The ImageNet projection (ImageNet-1k's images
times a typical view count) divides those views by the one-worker rate times the core count:
it *assumes* linear scaling up to the cores of one machine, which the multi-worker runs on the
measuring machine only sample.

Interpretation:
Starting a worker process costs seconds (each imports torch), which only a small cache notices:
on the 2-shard cache the multi-worker runs are slower than one worker. On a machine with few
cores shared with other jobs the multi-worker rows say little about scaling; the rate without
fixed costs is the number to project from. `--recompute` adds the teacher's time per re-run view.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_common import cache_config, fmnist_shards, publish, table
from usi_cache import cache_format as schema
from usi_cache.stage1.run import run_cache
from usi_cache.checks.verify.report import format_report
from usi_cache.checks.verify.run import verify_cache

IMAGENET_IMAGES, IMAGENET_VIEWS = 1_281_167, 16


def timed_verify(cache: Path, shards: Path, workers: int, recompute: int, repeats: int) -> tuple[float, int, str]:
    """Best wall time of `repeats` runs, the views checked and the report's text."""
    best, text = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        rep = verify_cache(cache, shards, workers=workers, recompute=recompute, device="cpu", progress=False)
        best = min(best, time.perf_counter() - t)
        assert rep.ok, format_report(rep)
        text = format_report(rep)
    return best, rep.views, text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=250)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--recompute", type=int, default=2000, help="views re-run by the teacher in the second set")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cores", type=int, default=16, help="cores of the machine in the ImageNet projection")
    p.add_argument("--work", default=None)
    return p


def report(r: dict) -> str:
    """The table and findings of a verify_scale results file."""
    runs, im = r["runs"], r["imagenet"]
    images = im.get("images", IMAGENET_IMAGES)  # files from before it was recorded: the constant
    recompute = max(x["recompute"] for x in runs)
    small_recompute = min(recompute, 2 * r["per_shard"])
    base = {x["recompute"]: x["steady_views_per_s"] for x in runs if x["workers"] == 1}
    rows = [[x["workers"], x["recompute"] or "-", x["big"]["views"], f"{x['big']['wall_s']:.2f}",
             f"{x['views_per_s']:.0f}", f"{x['small']['wall_s']:.2f}", f"{x['steady_views_per_s']:.0f}",
             f"{x['steady_views_per_s'] / base[x['recompute']]:.2f}x"] for x in runs]
    start = {x["workers"]: x["small"]["wall_s"] for x in runs if not x["recompute"]}
    most = max(start)
    return "\n".join([
        f"usi verify on {r['images']} Fashion-MNIST images, V = {r['views']}, {r['shards']} shards of "
        f"{r['per_shard']}, teacher test_resnet at 32 px (--recompute {recompute}; {small_recompute} "
        f"on the 2-shard cache); best of {r['repeats']} runs each",
        "",
        table(["workers", "--recompute", "views checked", "wall s", "views/s (wall)", "2-shard cache wall s",
               "views/s without fixed costs", "vs 1 worker"], rows),
        "",
        "wall: the whole `verify_cache` call (starting the worker processes, the cache-wide checks, every shard); "
        "without fixed costs: (views of the cache - views of the 2-shard cache) / (their wall-time difference)",
        "",
        f"* reports identical across worker counts: {'yes' if r['reports_identical'] else 'NO'}",
        f"* per view (1 worker, no re-run, without fixed costs): {r['ms_per_view_1_worker']:.3f} ms",
        f"* the 2-shard cache takes {start[most] - start[1]:.1f} s longer with {most} workers than with 1: "
        "starting the workers" if most > 1 else "* one worker count only: no start-up cost measured",
        f"* ImageNet ({images:,} images × V = {im['views'] // images} = {im['views']:,} views), checks without "
        f"--recompute: {im['hours_one_process']:.2f} h in one process; {im['hours_linear_scaling'] * 60:.1f} min with "
        f"--workers {im['cores']} on one {im['cores']}-core machine, ASSUMING linear scaling up to the core count "
        f"(measured here only up to {max(x['workers'] for x in runs)} workers); a --recompute run adds the "
        "teacher's own time per re-run view",
    ])


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="usi-bench-"))
    # the cache, and a 2-shard one: the difference of their wall times is the per-view rate without
    # the fixed costs (starting the worker processes, the cache-wide checks)
    caches = {}
    for name, n in (("big", a.images), ("small", 2 * a.per_shard)):
        shards, _ = fmnist_shards(work / f"fmnist-{n}", n, 1, per_shard=a.per_shard)
        cache = work / f"cache-{n}.zarr"
        if not (cache / "zarr.json").is_file():
            run_cache(cache_config(shards, cache, "test_resnet", views=a.views, topk=10, workers=1, random_teacher=True),
                      progress=False)
        caches[name] = (cache, shards)
    layout = schema.Layout.from_attrs(schema.open_cache(caches["big"][0])[1])

    runs, reports = [], {}
    for recompute in (0, a.recompute):
        for w in [int(x) for x in a.workers.split(",")]:
            r = {"workers": w, "recompute": recompute}
            for name, (cache, shards) in caches.items():
                wall, views, text = timed_verify(cache, shards, w, min(recompute, 2 * a.per_shard), a.repeats)
                r[name] = {"views": views, "wall_s": wall}
                if name == "big":
                    reports.setdefault(recompute, set()).add(text)
            r["views_per_s"] = r["big"]["views"] / r["big"]["wall_s"]
            r["steady_views_per_s"] = ((r["big"]["views"] - r["small"]["views"])
                                       / (r["big"]["wall_s"] - r["small"]["wall_s"]))
            runs.append(r)
            print(f"workers {w}, recompute {recompute}: {r['big']['views']} views in {r['big']['wall_s']:.2f} s, "
                  f"{r['small']['views']} in {r['small']['wall_s']:.2f} s", flush=True)
    identical = all(len(texts) == 1 for texts in reports.values())

    one = next(r["steady_views_per_s"] for r in runs if r["workers"] == 1 and not r["recompute"])
    imagenet_views = IMAGENET_IMAGES * IMAGENET_VIEWS
    imagenet = {"images": IMAGENET_IMAGES, "views": imagenet_views, "hours_one_process": imagenet_views / one / 3600,
                "cores": a.cores, "hours_linear_scaling": imagenet_views / (one * a.cores) / 3600}
    path = publish("verify_scale", {"args": vars(a), "images": a.images, "views": a.views,
                                    "per_shard": a.per_shard, "shards": layout.num_shards, "repeats": a.repeats,
                                    "runs": runs, "reports_identical": identical, "ms_per_view_1_worker": 1e3 / one,
                                    "imagenet": imagenet}, report)
    path.with_suffix(".txt").write_text(report(json.loads(path.read_text())) + "\n")


if __name__ == "__main__":
    main()
