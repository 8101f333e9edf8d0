"""Ingest memory: peak RSS of `usi shards from-folder` at two dataset sizes.

Makes a folder of small JPEGs per size (many classes) in a temp dir, runs the real command on
each as a subprocess, and samples the RSS of its whole process tree (the command and its
workers, summed) from /proc every few milliseconds. (getrusage's ru_maxrss of children is no
help here: a child forked from this process keeps this process's peak across exec.) Streaming
ingest holds paths, not bytes, so the peak should not grow with the dataset: the goal is in the
findings.

    .venv/bin/python benchmarks/ingest_memory.py [--sizes 2000,20000] [--workers 2]

Interpretation:
What the peak grows by is about what the parent's list of paths takes; the images themselves
are streamed, one per worker at a time. The processes are the command, its workers and
multiprocessing's resource tracker. The images are so small that decoding them is cheap, and a
shared machine's timings move: the images/s are indicative only.
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

GOAL = 1.10  # peak RSS at the largest size / at the smallest, at most
IMAGENET_IMAGES = 1_281_167


def make_folder(root: Path, n: int, classes: int, size: int, seed: int = 0) -> int:
    """n JPEGs of size×size (smooth gradients plus noise: a few KiB each); returns their bytes."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, size)[None, :, None]
    total = 0
    for c in range(classes):
        (root / f"class{c:03d}").mkdir(parents=True)
    for i in range(n):
        arr = np.clip(ramp + rng.normal(0, 25, (size, size, 3)) + i % 50, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=85)
        (root / f"class{i % classes:03d}" / f"img{i:07d}.JPEG").write_bytes(buf.getvalue())
        total += len(buf.getvalue())
    return total


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="2000,20000", help="images per run, comma-separated")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--image-size", type=int, default=64, help="JPEG side in pixels")
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--workers", type=int, default=None, help="--workers of the command [default: its own]")
    p.add_argument("--work", default=None, help="folder for the images and shards [default: a temp dir]")
    return p


def report(r: dict) -> str:
    """The table and findings of an ingest_memory results file."""
    runs, ratio = r["runs"], r["peak_ratio"]
    first, last = runs[0], runs[-1]
    rows = [[x["images"], f"{x['data_mib']:.0f}", f"{x['peak_mib']:.0f}", x["processes"], f"{x['wall_s']:.1f}",
             f"{x['img_per_s']:.0f}"] for x in runs]
    lines = [f"usi shards from-folder, {r['classes']} classes of {r['image_size']}px JPEGs, "
             f"--per-shard {r['per_shard']}, --workers {r['workers'] or 'default (CPU cores)'}", "",
             table(["images", "data MiB", "peak RSS MiB (tree)", "processes", "wall s", "images/s"], rows), "",
             f"peak RSS ratio {last['images']} / {first['images']} images: {ratio:.3f} (goal: within {GOAL:.2f})"]
    return "\n".join(lines + memory_findings(runs, ratio, GOAL, IMAGENET_IMAGES))


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="usi-ingest-bench-"))
    sizes = [int(s) for s in a.sizes.split(",")]
    runs = []
    for n in sizes:
        src, out = work / f"src-{n}", work / f"shards-{n}"
        data_bytes = make_folder(src, n, a.classes, a.image_size)
        cmd = [sys.executable, "-m", "usi_cache.cli", "shards", "from-folder", str(src), str(out),
               "--per-shard", str(a.per_shard), "--quiet"] + (["--workers", str(a.workers)] if a.workers else [])
        r = run_measured(cmd)
        r.update(images=n, data_mib=data_bytes / 2**20, img_per_s=n / r["wall_s"],
                 peak_mib=r["peak_tree_kib"] / 1024)
        print(f"{n} images ({r['data_mib']:.0f} MiB): peak RSS {r['peak_mib']:.0f} MiB over "
              f"{r['processes']} processes, {r['wall_s']:.1f} s, {r['img_per_s']:.0f} images/s", flush=True)
        runs.append(r)
    publish_memory("ingest_memory", a, sizes, runs, report)


if __name__ == "__main__":
    main()
