"""Benchmark 3 — cache cost: bytes per view on disk for several k, per-shard read time in
stage 2, and the peak memory of a stage-2 data worker.

Uses 100 classes so that k up to 50 is meaningful (a random-weight teacher: its logits are
as hard to compress as a trained one's; class indices of a trained teacher compress better).

    .venv/bin/python benchmarks/cache_cost.py
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import cache_config, synthetic_shards, table, write_result
from usi_cache import schema
from usi_cache.cache import run_cache

WORKER_PROBE = r"""
import json, resource, sys
from usi_cache import schema
from usi_cache.shards import load_manifest
from usi_cache.epoch_plan import PlanSpec
from usi_cache.train_data import TrainStream, TrainStreamSpec, valid_counts
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
group, attrs = schema.open_cache(sys.argv[1])
layout = schema.Layout.from_attrs(attrs)
m = load_manifest(sys.argv[2])
plan = PlanSpec(counts=valid_counts(m, group, layout), seed=42, world=1, workers=0, batch=64)
s = TrainStream(TrainStreamSpec(manifest=m, cache=sys.argv[1], layout=layout, spec=schema.view_spec(attrs),
                size=int(sys.argv[3]), plan=plan, rank=0, shuffle_buffer=int(sys.argv[4])))
n = sum(1 for _ in s)
print(json.dumps({"samples": n, "base_kib": base, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--topk", default="5,10,20,50")
    p.add_argument("--size", type=int, default=32, help="student input size for the worker probe")
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--work", default=None)
    a = p.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="usi-bench-"))
    shards = synthetic_shards(work / "shards", a.images, a.classes, 48, per_shard=a.per_shard)
    rows, sizes = [], {}
    for k in [int(x) for x in a.topk.split(",")]:
        out = work / f"cache-k{k}.zarr"
        s = run_cache(cache_config(shards, out, "test_resnet", views=a.views, topk=k, overwrite=True,
                                   workers=1), progress=False)
        usage = schema.disk_usage(out)
        views = s["views"]
        sizes[k] = {name: usage[name] / views for name in usage}
        rows.append([k, f"{usage['total'] / views:.1f}", f"{usage['logits'] / views:.1f}",
                     f"{usage['classes'] / views:.1f}", f"{(usage['total'] - usage['logits'] - usage['classes']) / views:.1f}"])
    print(table(["k", "bytes/view (total)", "logits", "classes", "everything else"], rows))

    # per-shard read: every array, one view, as stage 2 reads it
    k_ref = 10 if 10 in sizes else min(sizes)
    group, attrs = schema.open_cache(work / f"cache-k{k_ref}.zarr")
    layout = schema.Layout.from_attrs(attrs)
    times = []
    for rep in range(3):
        for shard in range(layout.num_shards):
            t = time.perf_counter()
            schema.read_block(group, layout, shard, view=rep % layout.views)
            times.append(time.perf_counter() - t)
    read_ms = statistics.median(times) * 1e3
    print(f"\nper-shard read (all arrays, one view, {layout.slots_per_shard} slots, k = {k_ref}): "
          f"median {read_ms:.1f} ms over {len(times)} reads")

    probe = subprocess.run([sys.executable, "-c", WORKER_PROBE, str(work / f"cache-k{k_ref}.zarr"), str(shards),
                            str(a.size), str(a.shuffle_buffer)], capture_output=True, text=True, check=True)
    mem = json.loads(probe.stdout.strip().splitlines()[-1])
    print(f"stage-2 worker (one process streaming all {mem['samples']} samples, shuffle buffer "
          f"{a.shuffle_buffer}, {a.size}px): peak RSS {mem['peak_kib'] / 1024:.0f} MiB, of which "
          f"{(mem['peak_kib'] - mem['base_kib']) / 1024:.1f} MiB above the {mem['base_kib'] / 1024:.0f} MiB "
          f"after imports")
    path = write_result("cache_cost", {"args": vars(a), "bytes_per_view": sizes, "shard_read_ms": read_ms,
                                       "worker_peak_mib": mem["peak_kib"] / 1024,
                                       "worker_base_mib": mem["base_kib"] / 1024})
    print(f"written {path}")


if __name__ == "__main__":
    main()
