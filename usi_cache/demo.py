"""The embedded demo: Fashion-MNIST shards -> a teacher cache -> its summary."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import click

from .config import CacheConfig, load_stage_config
from .shards import FMNIST_CLASSES, FMNIST_DIR, MANIFEST, samples_from_fashion_mnist, write_shards

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo-fmnist.yaml"
TRAIN_IMAGES = 4000  # subset sizes that keep the demo within minutes on 2 CPU cores
TEST_IMAGES = 1000
PER_SHARD = 500
TEACHER = "resnet18"


def _shards(out: Path) -> None:
    for split, limit in (("train", TRAIN_IMAGES), ("test", TEST_IMAGES)):
        if (out / split / MANIFEST).is_file():
            click.echo(f"[shards] {out / split}: reusing")
            continue
        samples = samples_from_fashion_mnist(FMNIST_DIR, split, limit)
        m = write_shards(samples, FMNIST_CLASSES, out / split, per_shard=PER_SHARD, seed=0)
        click.echo(f"[shards] {out / split}: {m.num_samples} images in {len(m.shards)} shards")


def run_demo(out: str | Path) -> None:
    from .cache import format_summary, run_cache
    out = Path(out)
    click.echo(f"demo: Fashion-MNIST, {TRAIN_IMAGES} train / {TEST_IMAGES} test images, "
               f"teacher {TEACHER} (random weights until stage 2 can train one), config {CONFIG}")
    t = time.perf_counter()
    _shards(out / "shards")
    cfg = load_stage_config(CacheConfig, "cache", CONFIG, {
        "shards": str(out / "shards" / "train"), "out": str(out / "cache.zarr"), "teacher": TEACHER})
    cfg = dataclasses.replace(cfg)
    summary = run_cache(cfg)
    click.echo(format_summary(summary))
    click.echo(f"demo finished in {time.perf_counter() - t:.1f} s")
