"""The embedded demo: Fashion-MNIST end to end, the whole system on 2 CPU cores.

The story it tells: distillation pays off when the teacher knows more than the student's data
can teach. So the teacher is trained label-only on all 60,000 training images; the students
only get a subset of them (the first few thousand). Stage 1 caches the teacher's top-k on V
augmented views of that subset (V = the students' epochs: a fresh view every epoch), and two
students of a smaller model, same recipe, epochs and seed, train on the subset: labels only,
and distilled from the cache. Everything is evaluated on all 10,000 test images.

Each stage records a key (a hash of its config and of the stages it reads) in
`stage.json`; a rerun reuses a stage only when its key is unchanged, and recomputes it
(and everything after it) otherwise.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path


from usi_cache.config.stages import CacheConfig, TrainConfig
from usi_cache.config.errors import ConfigError
from usi_cache.config.parser import load_stage_config, recipe_path, to_dict
from usi_cache.shards.fashion_mnist import FMNIST_CLASSES, FMNIST_DIR, samples_from_fashion_mnist
from usi_cache.shards.tars import write_shards

CONFIG = recipe_path("demo-fmnist.yaml")  # packaged with usi_cache (the repository's configs/)
SUBSET = 4000  # the students' training images: the first SUBSET of the 60,000
PER_SHARD = 500  # subset and test shards (the cache is chunked per shard)
FULL_PER_SHARD = 5000  # the teacher's 60,000 images
TEACHER_MODEL = "test_resnet"  # timm's 0.37 M-parameter test ResNet
# The teacher's recipe: the demo YAML's train section with these overrides. 60,000 images make
# the teacher's epochs 15x as long as a student's, so it must converge in a few: light
# augmentation (milder crops, no RandAugment), no mixing, no EMA (not worth it over 4 epochs).
TEACHER_EPOCHS = 4
TEACHER_RECIPE = {"epochs": TEACHER_EPOCHS, "warmup_epochs": 0, "mix": {"mixup": 0.0, "cutmix": 0.0, "prob": 0.0},
                  "ema_decay": 0.0, "view": {"scale": [0.64, 1.0], "randaugment": "", "hflip": 0.5}}
STUDENT_MODEL = "test_efficientnet"  # timm's 0.10 M-parameter test EfficientNet
VIEWS = 10  # = the students' epochs (the YAML's train.epochs): every epoch sees a fresh cached view


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Settings added to the configs after a demo folder was made, at the value that behaves as before:
# left out of the stage keys, so that an upgrade does not recompute a finished demo for nothing.
UNKEYED_DEFAULTS = {"kd_tail": "bucket"}


def _keyed(cfg) -> dict:
    """The part of a stage's config its key hashes."""
    return {k: v for k, v in to_dict(cfg).items() if k not in UNKEYED_DEFAULTS or v != UNKEYED_DEFAULTS[k]}


def _stage(folder: Path, key: str, name: str, fn) -> dict:
    """Run `fn()` unless `folder/stage.json` holds a result with the same key."""
    marker = folder / "stage.json"
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("key") == key:
            print(f"[{name}] reusing {folder} (key {key})", flush=True)
            return saved["result"]
        print(f"[{name}] config changed since the last run: recomputing {folder}", flush=True)
    print(f"[{name}] running -> {folder}", flush=True)
    t = time.perf_counter()
    result = fn()
    result["wall_s"] = time.perf_counter() - t
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"key": key, "result": result}, indent=1) + "\n")
    return result


def _shards(out: Path) -> dict:
    """Three shard sets: all 60,000 training images (the teacher's), the first SUBSET of them
    (the students'; same keys) and all 10,000 test images."""
    info = {}
    train = samples_from_fashion_mnist(FMNIST_DIR, "train")
    for name, samples, per_shard in (("train-full", train, FULL_PER_SHARD), ("train", train[:SUBSET], PER_SHARD),
                                     ("test", samples_from_fashion_mnist(FMNIST_DIR, "test"), PER_SHARD)):
        m = write_shards(samples, FMNIST_CLASSES, out / name, per_shard=per_shard, seed=0)
        info[name] = {"samples": m.num_samples, "shards": len(m.shards), "fingerprint": m.fingerprint}
    return info


def _train(cfg: TrainConfig) -> dict:
    from usi_cache.stage2.loop import run_train
    s = run_train(cfg, resume=False)
    last = s["last"]
    return {"top1": last["val_top1"], "top1_ema": last["val_top1_ema"], "best_top1": s["best"]["top1"],
            "img_per_s": last["img_per_s"], "epochs": last["epoch"] + 1, "val_images": last["val_count"]}


def student_config(out: Path, run: Path, **extra) -> TrainConfig:
    """The demo's student recipe (configs/demo-fmnist.yaml) on the subset shards of the demo
    folder `out`, writing to the run folder `run`."""
    shards = Path(out) / "shards"
    return load_stage_config(TrainConfig, "train", CONFIG, {
        "train_shards": str(shards / "train"), "val_shards": str(shards / "test"), "model": STUDENT_MODEL,
        "out": str(run), **extra})


def teacher_config(out: Path, run: Path, **extra) -> TrainConfig:
    """The demo's teacher recipe (the YAML's train section with TEACHER_RECIPE) on all 60,000
    training images of the demo folder `out`, writing to the run folder `run`."""
    shards = Path(out) / "shards"
    return load_stage_config(TrainConfig, "train", CONFIG, {
        "train_shards": str(shards / "train-full"), "val_shards": str(shards / "test"), "model": TEACHER_MODEL,
        "out": str(run), **TEACHER_RECIPE, **extra})


def one_torch_thread() -> None:
    """One torch thread unless OMP_NUM_THREADS says otherwise: on 2 cores the data worker needs
    the other core. Two torch threads fight the worker (and anything else on a shared machine)
    for the cores and spin."""
    if "OMP_NUM_THREADS" not in os.environ:
        import torch
        torch.set_num_threads(1)


def run_demo(out: str | Path) -> dict:
    from usi_cache.stage1.run import run_cache
    out = Path(out)
    t0 = time.perf_counter()
    one_torch_thread()
    print(f"demo: Fashion-MNIST at 32 px; teacher {TEACHER_MODEL} trained label-only on all 60,000 "
          f"training images ({TEACHER_EPOCHS} epochs); cache V = {VIEWS}, k = 10 over the students' "
          f"{SUBSET} images; students {STUDENT_MODEL} on those {SUBSET} images: labels only vs cached KD; "
          f"all evaluated on the 10,000 test images; recipe {CONFIG}", flush=True)
    shard_dir = out / "shards"
    shard_key = _key("v2", SUBSET, PER_SHARD, FULL_PER_SHARD)
    shards = _stage(shard_dir, shard_key, "shards", lambda: _shards(shard_dir))

    t_cfg = teacher_config(out, out / "teacher")
    t_key = _key(shard_key, _keyed(t_cfg))
    teacher = _stage(out / "teacher", t_key, "teacher", lambda: _train(t_cfg))

    c_cfg = load_stage_config(CacheConfig, "cache", CONFIG, {
        "shards": str(shard_dir / "train"), "out": str(out / "cache.zarr"), "teacher": TEACHER_MODEL,
        "teacher_checkpoint": str(out / "teacher" / "best.pth"), "views": VIEWS})
    c_key = _key(t_key, _keyed(c_cfg))
    c_cfg = dataclasses.replace(c_cfg, overwrite=True)  # a changed key means the old cache is stale
    cache = _stage(out / "cache-stage", c_key, "cache", lambda: run_cache(c_cfg))

    results = {"shards": shards, "teacher": teacher, "cache": cache}
    for name, extra, upstream in (("labels", {}, shard_key), ("cached-kd", {"cache": c_cfg.out}, c_key)):
        s_cfg = student_config(out, out / f"student-{name}", **extra)
        if s_cfg.epochs != VIEWS:
            raise ConfigError(f"{CONFIG}: train.epochs = {s_cfg.epochs}, the demo's cache has V = {VIEWS}")
        results[name] = _stage(out / f"student-{name}", _key(upstream, _keyed(s_cfg)), f"student {name}",
                               lambda: _train(s_cfg))
    results["total_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n" + format_table(results), flush=True)
    return results


def _top1(x: dict) -> str:
    return f"{x['top1']:.2f}" if x.get("top1_ema") is None else f"{x['top1']:.2f} (EMA {x['top1_ema']:.2f})"


def format_table(r: dict) -> str:
    c, sh = r["cache"], r["shards"]
    n_full, n_sub = sh["train-full"]["samples"], sh["train"]["samples"]
    rows = [
        ("teacher", f"{TEACHER_MODEL}, labels only", n_full, r["teacher"]),
        ("student", f"{STUDENT_MODEL}, labels only", n_sub, r["labels"]),
        ("student", f"{STUDENT_MODEL}, cached KD", n_sub, r["cached-kd"]),
    ]
    lines = [f"top-1 on the {r['teacher']['val_images']} test images, last epoch",
             "| run | model, targets | train images | epochs | top-1 | wall time |", "|---|---|---|---|---|---|"]
    for run, what, n, x in rows:
        lines.append(f"| {run} | {what} | {n} | {x['epochs']} | {_top1(x)} | {x['wall_s']:.0f} s |")
    views = c["views"] // max(c["samples"], 1)
    lines.append(f"| cache | V = {views}, k = 10 | {c['samples']} | - | - | {c['wall_s']:.0f} s |")
    gain = r["cached-kd"]["top1"] - r["labels"]["top1"]
    lines += ["", f"cached KD - labels only: {gain:+.2f} points (teacher {r['teacher']['top1']:.2f})"]
    # What one cache replaced: an online-KD student runs the teacher on each of its training views.
    per_student = r["cached-kd"]["epochs"] * n_sub
    lines.append(f"cache cost, paid once: {c['wall_s']:.0f} s for {c['views']} teacher forward passes, "
                 f"{c['bytes_on_disk'] / 1e6:.2f} MB on disk, {c['bytes_per_view']:.1f} bytes per view; "
                 f"an online teacher would run {per_student} forward passes ({r['cached-kd']['epochs']} epochs x "
                 f"{n_sub} images) for every student, which the cached student avoided")
    stages = sum(x["wall_s"] for x in (r["shards"], r["teacher"], c, r["labels"], r["cached-kd"]))
    lines.append(f"stage wall times: shards {r['shards']['wall_s']:.0f} s, teacher {r['teacher']['wall_s']:.0f} s, "
                 f"cache {c['wall_s']:.0f} s, students {r['labels']['wall_s']:.0f} + {r['cached-kd']['wall_s']:.0f} s; "
                 f"they add up to {stages:.0f} s; this run took {r['total_s']:.0f} s (reused stages cost nothing)")
    return "\n".join(lines)
