"""The embedded demo: Fashion-MNIST end to end, the whole system on 2 CPU cores.

shards -> a teacher trained label-only -> its cache (V views, k = 10) -> two students of a
smaller model, same epochs and seed: labels only, and distilled from the cache -> a table.

Each stage records a key (a hash of its config and of the stages it reads) in
`stage.json`; a rerun reuses a stage only when its key is unchanged, and recomputes it
(and everything after it) otherwise.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import click

from .config import CacheConfig, TrainConfig, load_stage_config, to_dict
from .shards import FMNIST_CLASSES, FMNIST_DIR, samples_from_fashion_mnist, write_shards

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo-fmnist.yaml"
TRAIN_IMAGES = 4000  # subset sizes that keep the demo within 15 minutes on 2 CPU cores
TEST_IMAGES = 1000
PER_SHARD = 500
TEACHER_MODEL = "test_resnet"  # timm's 0.37 M-parameter test ResNet
TEACHER_EPOCHS = 15
STUDENT_MODEL = "test_efficientnet"  # timm's 0.10 M-parameter test EfficientNet
VIEWS = 10  # = the students' epochs: every epoch sees a fresh cached view


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stage(folder: Path, key: str, name: str, fn) -> dict:
    """Run `fn()` unless `folder/stage.json` holds a result with the same key."""
    marker = folder / "stage.json"
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("key") == key:
            click.echo(f"[{name}] reusing {folder} (key {key})")
            return saved["result"]
        click.echo(f"[{name}] config changed since the last run: recomputing {folder}")
    click.echo(f"[{name}] running -> {folder}")
    t = time.perf_counter()
    result = fn()
    result["wall_s"] = time.perf_counter() - t
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"key": key, "result": result}, indent=1) + "\n")
    return result


def _shards(out: Path) -> dict:
    info = {}
    for split, limit in (("train", TRAIN_IMAGES), ("test", TEST_IMAGES)):
        samples = samples_from_fashion_mnist(FMNIST_DIR, split, limit)
        m = write_shards(samples, FMNIST_CLASSES, out / split, per_shard=PER_SHARD, seed=0)
        info[split] = {"samples": m.num_samples, "shards": len(m.shards), "fingerprint": m.fingerprint}
    return info


def _train(cfg: TrainConfig) -> dict:
    from .train import run_train
    s = run_train(cfg, resume=False)
    last = s["last"]
    return {"top1": last["val_top1"], "top1_ema": last["val_top1_ema"], "best_top1": s["best"]["top1"],
            "img_per_s": last["img_per_s"], "epochs": last["epoch"] + 1}


def run_demo(out: str | Path) -> dict:
    from .cache import run_cache
    out = Path(out)
    t0 = time.perf_counter()
    click.echo(f"demo: Fashion-MNIST subset {TRAIN_IMAGES} train / {TEST_IMAGES} test images at 32 px, "
               f"teacher {TEACHER_MODEL} ({TEACHER_EPOCHS} epochs, labels only), cache V = {VIEWS}, k = 10, "
               f"students {STUDENT_MODEL}; recipe {CONFIG}")
    shard_dir = out / "shards"
    shard_key = _key(TRAIN_IMAGES, TEST_IMAGES, PER_SHARD)
    shards = _stage(shard_dir, shard_key, "shards", lambda: _shards(shard_dir))
    base = {"train_shards": str(shard_dir / "train"), "val_shards": str(shard_dir / "test")}

    t_cfg = load_stage_config(TrainConfig, "train", CONFIG, {
        **base, "model": TEACHER_MODEL, "epochs": TEACHER_EPOCHS, "out": str(out / "teacher")})
    t_key = _key(shard_key, to_dict(t_cfg))
    teacher = _stage(out / "teacher", t_key, "teacher", lambda: _train(t_cfg))

    c_cfg = load_stage_config(CacheConfig, "cache", CONFIG, {
        "shards": base["train_shards"], "out": str(out / "cache.zarr"), "teacher": TEACHER_MODEL,
        "teacher_checkpoint": str(out / "teacher" / "best.pth"), "views": VIEWS, "topk": 10})
    c_key = _key(t_key, to_dict(c_cfg))
    c_cfg = dataclasses.replace(c_cfg, overwrite=True)  # a changed key means the old cache is stale
    cache = _stage(out / "cache-stage", c_key, "cache", lambda: run_cache(c_cfg))

    results = {"shards": shards, "teacher": teacher, "cache": cache}
    for name, extra, upstream in (("labels", {}, shard_key), ("cached-kd", {"cache": c_cfg.out}, c_key)):
        s_cfg = load_stage_config(TrainConfig, "train", CONFIG, {
            **base, **extra, "model": STUDENT_MODEL, "epochs": VIEWS, "out": str(out / f"student-{name}")})
        results[name] = _stage(out / f"student-{name}", _key(upstream, to_dict(s_cfg)), f"student {name}",
                               lambda: _train(s_cfg))
    results["total_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    click.echo("\n" + format_table(results))
    return results


def format_table(r: dict) -> str:
    c = r["cache"]
    rows = [
        ("teacher", f"{TEACHER_MODEL}, labels only", r["teacher"]),
        ("student", f"{STUDENT_MODEL}, labels only", r["labels"]),
        ("student", f"{STUDENT_MODEL}, cached KD", r["cached-kd"]),
    ]
    lines = ["| run | model, targets | epochs | top-1 (raw) | top-1 (EMA) | wall time |",
             "|---|---|---|---|---|---|"]
    for run, what, x in rows:
        ema = "-" if x["top1_ema"] is None else f"{x['top1_ema']:.2f}"
        lines.append(f"| {run} | {what} | {x['epochs']} | {x['top1']:.2f} | {ema} | {x['wall_s']:.0f} s |")
    lines.append(f"| cache | V = {c['views'] // max(c['samples'], 1)}, k = 10, {c['samples']} images | - | - | - | "
                 f"{c['wall_s']:.0f} s |")
    lines.append("")
    stages = sum(x["wall_s"] for x in (r["shards"], r["teacher"], c, r["labels"], r["cached-kd"]))
    lines.append(f"cache: {c['bytes_on_disk'] / 1e6:.2f} MB on disk, {c['bytes_per_view']:.1f} bytes per view")
    lines.append(f"stage wall times add up to {stages:.0f} s; this run took {r['total_s']:.0f} s "
                 f"(reused stages cost nothing)")
    return "\n".join(lines)
