"""Benchmark — how `usi verify` scales with worker processes, and what that means for ImageNet.

A Fashion-MNIST cache (test_resnet teacher, random weights, 32 px) is verified with 1 and 2
worker processes, without and with `--recompute`; each run's wall time includes starting the
workers and the cache-wide checks, and a 2-shard cache verified the same way gives those fixed
costs, so that the per-view rate is also reported without them. The reports of all runs on the
cache must be identical (checked here).
The ImageNet projection (1.28 M images x V = 16) divides those views by the 1-worker rate times
the core count: it *assumes* linear scaling up to the cores of one machine, which the 2-worker
run on this machine only samples.

    .venv/bin/python benchmarks/verify_scale.py                  # 4,000 images, V = 8
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench_common import cache_config, fmnist_shards, machine, table, write_result
from usi_cache import schema
from usi_cache.cache import run_cache
from usi_cache.verify import format_report, verify_cache

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=250)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--recompute", type=int, default=2000, help="views re-run by the teacher in the second set")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cores", type=int, default=16, help="cores of the machine in the ImageNet projection")
    p.add_argument("--work", default=None)
    a = p.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="usi-bench-"))
    # the cache, and a 2-shard one: the difference of their wall times is the per-view rate without
    # the fixed costs (starting the worker processes, the cache-wide checks)
    caches = {}
    for name, n in (("big", a.images), ("small", 2 * a.per_shard)):
        shards, _ = fmnist_shards(work / f"fmnist-{n}", n, 1, per_shard=a.per_shard)
        cache = work / f"cache-{n}.zarr"
        if not (cache / "zarr.json").is_file():
            run_cache(cache_config(shards, cache, "test_resnet", views=a.views, topk=10, workers=1), progress=False)
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

    base = {r["recompute"]: r["steady_views_per_s"] for r in runs if r["workers"] == 1}
    rows = [[r["workers"], r["recompute"] or "-", r["big"]["views"], f"{r['big']['wall_s']:.2f}",
             f"{r['views_per_s']:.0f}", f"{r['small']['wall_s']:.2f}", f"{r['steady_views_per_s']:.0f}",
             f"{r['steady_views_per_s'] / base[r['recompute']]:.2f}x"] for r in runs]
    imagenet_views = IMAGENET_IMAGES * IMAGENET_VIEWS
    one = base[0]
    hours_1 = imagenet_views / one / 3600
    hours_n = imagenet_views / (one * a.cores) / 3600
    text = "\n".join([
        f"usi verify on {a.images} Fashion-MNIST images, V = {a.views}, {layout.num_shards} shards of "
        f"{a.per_shard}, teacher test_resnet at 32 px (--recompute {a.recompute}; {min(a.recompute, 2 * a.per_shard)} "
        f"on the 2-shard cache); {machine()}; best of {a.repeats} runs each",
        "",
        table(["workers", "--recompute", "views checked", "wall s", "views/s (wall)", "2-shard cache wall s",
               "views/s without fixed costs", "vs 1 worker"], rows),
        "",
        "wall: the whole `verify_cache` call (starting the worker processes, the cache-wide checks, every shard); "
        "without fixed costs: (views of the cache - views of the 2-shard cache) / (their wall-time difference)",
        f"reports identical across worker counts: {'yes' if identical else 'NO'}",
        f"per view (1 worker, no re-run, without fixed costs): {1e3 / one:.3f} ms",
        f"ImageNet ({IMAGENET_IMAGES:,} images x V = {IMAGENET_VIEWS} = {imagenet_views:,} views), checks without "
        f"--recompute: {hours_1:.2f} h in one process; {hours_n * 60:.1f} min with --workers {a.cores} on one "
        f"{a.cores}-core machine, ASSUMING linear scaling up to the core count (measured here only up to "
        f"{max(r['workers'] for r in runs)} workers, on this machine's shared cores); a --recompute run adds "
        f"the teacher's own time per re-run view",
    ])
    print(text)
    path = write_result("verify_scale", {"images": a.images, "views": a.views, "per_shard": a.per_shard,
                                         "shards": layout.num_shards, "repeats": a.repeats, "runs": runs,
                                         "reports_identical": identical, "ms_per_view_1_worker": 1e3 / one,
                                         "imagenet": {"views": imagenet_views, "hours_one_process": hours_1,
                                                      "cores": a.cores, "hours_linear_scaling": hours_n}})
    path.with_suffix(".txt").write_text(text + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
