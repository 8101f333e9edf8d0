"""Benchmark 7 — ingest memory: peak RSS of `usi shards from-folder` at two dataset sizes.

Makes a folder of N small JPEGs per size (default 2,000 and 20,000, 100 classes) in a temp
dir, runs the real command on each as a subprocess, and samples the RSS of its whole process
tree (the command and its workers, summed) from /proc every 10 ms. (getrusage's ru_maxrss of
children is no help here: a child forked from this process keeps this process's peak across
exec.) Streaming ingest holds paths,
not bytes, so the peak should not grow with the dataset: the goal is a 20k/2k ratio within 10 %.

    .venv/bin/python benchmarks/ingest_memory.py [--sizes 2000,20000] [--workers 2]
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench_common import RESULTS, table, write_result

ROOT = Path(__file__).resolve().parent.parent


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


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")), 0)
    except OSError:
        return 0


def run_measured(cmd: list[str]) -> dict:
    """Run `cmd`; peak summed RSS of its process tree (sampled) and its wall time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    peak_tree, peak_procs = 0, 0
    while proc.poll() is None:
        tree, todo = [], [proc.pid]
        while todo:
            p = todo.pop()
            tree.append(p)
            todo += _children(p)
        rss = sum(_rss_kib(p) for p in tree)
        peak_tree, peak_procs = max(peak_tree, rss), max(peak_procs, len(tree))
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return {"wall_s": wall, "peak_tree_kib": peak_tree, "processes": peak_procs, "stdout": out.strip()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="2000,20000", help="images per run, comma-separated")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--image-size", type=int, default=64, help="JPEG side in pixels")
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--workers", type=int, default=None, help="--workers of the command [default: its own]")
    p.add_argument("--work", default=None, help="folder for the images and shards [default: a temp dir]")
    a = p.parse_args()
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
    ratio = runs[-1]["peak_mib"] / runs[0]["peak_mib"]
    rows = [[r["images"], f"{r['data_mib']:.0f}", f"{r['peak_mib']:.0f}", r["processes"], f"{r['wall_s']:.1f}",
             f"{r['img_per_s']:.0f}"] for r in runs]
    text = "\n".join([
        f"usi shards from-folder, {a.classes} classes of {a.image_size}px JPEGs, --per-shard {a.per_shard}, "
        f"--workers {a.workers or 'default (CPU cores)'}",
        table(["images", "data MiB", "peak RSS MiB (tree)", "processes", "wall s", "images/s"], rows),
        "",
        f"peak RSS ratio {runs[-1]['images']} / {runs[0]['images']} images: {ratio:.3f} (goal: within 1.10)",
    ])
    print(text)
    payload = {"sizes": sizes, "classes": a.classes, "image_size": a.image_size, "per_shard": a.per_shard,
               "workers": a.workers, "runs": [{k: v for k, v in r.items() if k != "stdout"} for r in runs],
               "peak_ratio": ratio}
    print(f"written {write_result('ingest_memory', payload)}")
    (RESULTS / "ingest_memory.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
