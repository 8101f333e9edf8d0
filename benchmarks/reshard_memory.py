"""Reshard memory: peak RSS of `usi shards reshard` at two dataset sizes.

Writes class-ordered tars (`--classes` classes of small JPEGs, one class after another, as a
simple script over an ImageFolder writes them) per size in a temp dir, runs the real command on
each as a subprocess, and samples the RSS of its whole process tree (the command and its
workers, summed) from /proc every few milliseconds (bench_common.run_measured). The reshard
streams: a pass-1 worker holds one source shard, a pass-2 worker one sample plus a read buffer
per spill it has open, so the peak should not grow with the dataset: the goal is in the
findings. The class spread is the prediction of shards/class_spread.py (stage 2's batch of 128, shuffle
buffer 1,000) from the source's and the output's per-shard class counts.

    .venv/bin/python benchmarks/reshard_memory.py [--sizes 2000,20000] [--workers 2]

Interpretation:
What the peak grows by is the per-sample state: each worker's global permutation and its
inverse (16 bytes per sample, 20 MB per worker at 1.28 M samples) and the parent's plan. The
processes are the command, its workers and multiprocessing's resource tracker. The images are
small, so a source shard is small: with full-size images a pass-1 worker holds one shard of
them more, the same at any dataset size. With 2,000 images (20 per class) a
source shard of 500 already spans 25 classes, so the source is not class-ordered for a buffer
of 1,000, and the buffer holds half the dataset: a batch drawn from it without replacement
holds slightly more classes than random sampling's independent draws. Timings on a shared
machine move: the images/s are indicative only.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench_common import memory_findings, publish_memory, run_measured, table
from usi_cache.shards.class_spread import measure, read_class_counts
from usi_cache.shards.tars import Sample, scan_shard, write_tar

GOAL = 1.10  # peak RSS at the largest size / at the smallest, at most
IMAGENET_IMAGES = 1_281_167


def ordered_tars(root: Path, n: int, classes: int, size: int, per_shard: int, seed: int = 0) -> int:
    """n JPEGs of size×size, class by class, as tars of `per_shard`; returns their image bytes."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, size)[None, :, None]
    root.mkdir(parents=True)
    total, chunk, shard = 0, [], 0
    for i in range(n):
        c = i * classes // n  # class by class
        arr = np.clip(ramp + rng.normal(0, 25, (size, size, 3)) + c % 50, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=85)
        chunk.append(Sample(f"c{c:03d}_{i:07d}", "jpg", buf.getvalue(), c))
        total += len(buf.getvalue())
        if len(chunk) == per_shard or i == n - 1:
            write_tar(str(root / f"ordered-{shard:06d}.tar"), chunk)
            chunk, shard = [], shard + 1
    return total


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="2000,20000", help="images per run, comma-separated")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--image-size", type=int, default=64, help="JPEG side in pixels")
    p.add_argument("--per-shard", type=int, default=500, help="samples per source and per output shard")
    p.add_argument("--workers", type=int, default=2, help="--workers of the command")
    p.add_argument("--work", default=None, help="folder for the tars [default: a temp dir]")
    return p


def report(r: dict) -> str:
    """The table and findings of a reshard_memory results file."""
    runs, ratio = r["runs"], r["peak_ratio"]
    first, last = runs[0], runs[-1]
    rows = [[x["images"], f"{x['data_mib']:.0f}", f"{x['peak_mib']:.0f}", x["processes"], f"{x['wall_s']:.1f}",
             f"{x['img_per_s']:.0f}", f"{x['before']:.1f}", f"{x['after']:.1f}", f"{x['random']:.1f}"]
            for x in runs]
    lines = [f"usi shards reshard, {r['classes']} classes of {r['image_size']}px JPEGs written class by class, "
             f"--per-shard {r['per_shard']}, --workers {r['workers']}", "",
             table(["images", "data MiB", "peak RSS MiB (tree)", "processes", "wall s", "images/s",
                    "classes/batch before", "after", "random sampling"], rows), "",
             f"peak RSS ratio {last['images']} / {first['images']} images: {ratio:.3f} (goal: within {GOAL:.2f})"]
    return "\n".join(lines + memory_findings(runs, ratio, GOAL, IMAGENET_IMAGES))


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="usi-reshard-bench-"))
    sizes = [int(s) for s in a.sizes.split(",")]
    runs = []
    for n in sizes:
        src, out = work / f"ordered-{n}", work / f"resharded-{n}"
        data_bytes = ordered_tars(src, n, a.classes, a.image_size, a.per_shard)
        cmd = [sys.executable, "-m", "usi_cache.cli", "shards", "reshard", str(src), str(out),
               "--per-shard", str(a.per_shard), "--workers", str(a.workers), "--quiet"]
        r = run_measured(cmd)
        before = measure([scan_shard(str(p))[2] for p in sorted(src.glob("*.tar"))], a.classes, 128, 1000)
        after = measure(read_class_counts(str(out)), a.classes, 128, 1000)
        r.update(images=n, data_mib=data_bytes / 2**20, img_per_s=n / r["wall_s"], peak_mib=r["peak_tree_kib"] / 1024,
                 before=before.predicted, after=after.predicted, random=after.random)
        print(f"{n} images ({r['data_mib']:.0f} MiB): peak RSS {r['peak_mib']:.0f} MiB over {r['processes']} "
              f"processes, {r['wall_s']:.1f} s, {r['img_per_s']:.0f} images/s; classes per batch "
              f"{before.predicted:.1f} -> {after.predicted:.1f} (random {after.random:.1f})", flush=True)
        runs.append(r)
    publish_memory("reshard_memory", a, sizes, runs, report)


if __name__ == "__main__":
    main()
