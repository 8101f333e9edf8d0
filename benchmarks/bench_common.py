"""Shared by the benchmarks: data made on the spot, configs, machine description, JSON output
and the markdown helpers of their `report()` functions."""
from __future__ import annotations

import io
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from usi_cache.config.parser import to_dict, upgrade_saved
from usi_cache.config.stages import CacheConfig, MixConfig, TrainConfig, ViewSpec
from usi_cache.shards.fashion_mnist import FMNIST_CLASSES, FMNIST_DIR, samples_from_fashion_mnist
from usi_cache.shards.manifest import MANIFEST
from usi_cache.shards.tars import Sample, write_shards

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("USI_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))
DEMO_VIEW = ViewSpec(scale=(0.35, 1.0))  # the demo recipe's view (configs/demo-fmnist.yaml)


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), torch {torch.__version__}"


def fmnist_shards(root: Path, n_train: int, n_test: int, per_shard: int = 500) -> tuple[Path, Path]:
    """Fashion-MNIST subsets as shards under root (reused when present)."""
    for split, n in (("train", n_train), ("test", n_test)):
        if not (root / split / MANIFEST).is_file():
            write_shards(samples_from_fashion_mnist(FMNIST_DIR, split, n), FMNIST_CLASSES, root / split,
                         per_shard=per_shard, seed=0, progress=False)
    return root / "train", root / "test"


def synthetic_shards(root: Path, n: int, classes: int, size: int, per_shard: int, seed: int = 0) -> Path:
    """n random JPEG images of size×size in `classes` classes (throughput/size benchmarks)."""
    if (root / MANIFEST).is_file():
        return root
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        samples.append(Sample(f"syn{i:07d}", "jpg", buf.getvalue(), int(i % classes)))
    write_shards(samples, [f"c{i}" for i in range(classes)], root, per_shard=per_shard, seed=seed, progress=False)
    return root


def cache_config(shards: Path, out: Path, teacher: str, **kw) -> CacheConfig:
    base = dict(shards=str(shards), out=str(out), teacher=teacher, views=4, topk=10, input_size=32,
                batch_size=256, workers=1, view=DEMO_VIEW)
    base.update(kw)
    return CacheConfig(**base)


def train_config(train: Path, val: Path, out: Path, model: str, **kw) -> TrainConfig:
    """The demo recipe (configs/demo-fmnist.yaml) with overrides."""
    base = dict(model=model, train_shards=str(train), val_shards=str(val), out=str(out), epochs=10,
                cooldown_epochs=0, warmup_epochs=1, lr=2e-3, batch_size=128, input_size=32,
                mix=MixConfig(mode="batch", prob=0.5), ema_decay=0.99, workers=1, view=DEMO_VIEW)
    base.update(kw)
    return TrainConfig(**base)


def read_log(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    return [r for r in records if "step" not in r]  # epoch records only


def same_config(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "out"} == {k: v for k, v in b.items() if k != "out"}


REUSED_FROM = "reused_from.txt"  # in a run folder holding a copied log: the folder that holds the weights


def train_run(row: str, seed: int, cfg, reuse: list[Path], train: bool = True) -> dict | None:
    """One stage-2 run, or a finished one with the same config (this folder, or one of `reuse`);
    None when there is none and `train` is off. `run` names the folder that holds its weights; a
    folder without weights or a pointer to them is passed over. Configs are compared, caches by
    path: after a cache is rebuilt with other contents at the same path, remove the runs."""
    from usi_cache.stage2.loop import run_train  # the training stack only where a benchmark trains
    out, want = Path(cfg.out), to_dict(cfg)
    total = cfg.epochs + cfg.cooldown_epochs
    for src in [out, *reuse]:
        log = read_log(src)
        has_weights = (src / "best.pth").is_file() or (src / REUSED_FROM).is_file()
        if has_weights and (src / "config.json").is_file() and len(log) == total and same_config(
                upgrade_saved(TrainConfig, json.loads((src / "config.json").read_text())), want):
            if src != out:  # keep every (row, seed) log in the benchmark's folder, for the curves
                out.mkdir(parents=True, exist_ok=True)
                for f in ("config.json", "log.jsonl"):
                    shutil.copy(src / f, out / f)
                (out / REUSED_FROM).write_text(str(src))  # the weights stay there
            elif (out / REUSED_FROM).is_file():
                src = Path((out / REUSED_FROM).read_text())
            print(f"  {row} seed {seed}: reusing {src}", flush=True)
            wall = None
            break
    else:
        if not train:
            print(f"  {row} seed {seed}: no finished run, left out (--no-train)", flush=True)
            return None
        t = time.perf_counter()
        run_train(cfg, progress=False)
        wall, log, src = time.perf_counter() - t, read_log(out), out
    last = log[-1]
    print(f"  {row} seed {seed}: top-1 {last['val_top1']:.2f}"
          + (f" (EMA {last['val_top1_ema']:.2f})" if last["val_top1_ema"] is not None else "")
          + (f", {wall:.0f} s" if wall else ""), flush=True)
    return {"seed": seed, "top1": last["val_top1"], "top1_ema": last["val_top1_ema"], "wall_s": wall,
            "curve": [r["val_top1"] for r in log], "val_images": last["val_count"], "run": str(src)}


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), **payload}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def publish(name: str, payload: dict, report: Callable[[dict], str]) -> Path:
    """Write results/NAME.json, then print the script's tables rendered from that file by `report`:
    the same function renders them in docs/benchmarks.md (benchmarks/report.py). Rendering the
    reloaded file, not the payload, keeps the two identical (JSON turns int keys into strings)."""
    path = write_result(name, payload)
    print(report(json.loads(path.read_text())))
    print(f"written {path}")
    return path


NOT_RECORDED = "not recorded in this results file"


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------- memory of a command's process tree
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


def memory_findings(runs: list[dict], ratio: float, goal: float, imagenet_images: int) -> list[str]:
    """The findings of a peak-RSS benchmark over growing inputs (runs with images and peak_mib):
    how much higher the peak is for the largest run, against `goal`, and the growth per image
    projected to ImageNet's size."""
    if len(runs) < 2:
        return []
    first, last = runs[0], runs[-1]
    grew = (last["peak_mib"] - first["peak_mib"]) * 2**20 / (last["images"] - first["images"])
    return ["", f"* the peak is {100 * (ratio - 1):.0f} % higher for {last['images'] / first['images']:.0f}× "
                f"the images (goal: at most {100 * (goal - 1):.0f} %, {'met' if ratio <= goal else 'NOT met'})",
            f"* it grew {last['peak_mib'] - first['peak_mib']:.1f} MiB, {grew:.0f} bytes per added image: "
            f"{grew * imagenet_images / 2**30:.2f} GiB at ImageNet's {imagenet_images:,} images"]


def publish_memory(name: str, a, sizes: list[int], runs: list[dict], report: Callable[[dict], str]) -> Path:
    """Publish a peak-RSS benchmark (its args `a`, sizes and runs) and write its report beside it."""
    payload = {"args": vars(a), "sizes": sizes, "classes": a.classes, "image_size": a.image_size,
               "per_shard": a.per_shard, "workers": a.workers,
               "runs": [{k: v for k, v in r.items() if k != "stdout"} for r in runs],
               "peak_ratio": runs[-1]["peak_mib"] / runs[0]["peak_mib"]}
    path = publish(name, payload, report)
    path.with_suffix(".txt").write_text(report(json.loads(path.read_text())) + "\n")
    return path
