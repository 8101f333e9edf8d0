"""The `usi` command line: shards, cache, train, inspect, verify, demo.

Every expected failure (bad config, missing file, mismatched cache) is turned into a
one-line error by `one_line_errors`, never a traceback.
"""
from __future__ import annotations

import functools
import json
import sys

import click

from .config import ConfigError

EXPECTED_ERRORS = (ConfigError,)


def _expected_errors() -> tuple[type[Exception], ...]:
    from .schema import CacheError
    from .shards import ShardError
    from .teacher import TeacherError
    return (ConfigError, CacheError, ShardError, TeacherError, FileNotFoundError)


def one_line_errors(fn):
    """Turn the project's expected errors into `Error: <message>` and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _expected_errors() as e:
            raise click.ClickException(str(e)) from None
    return wrapper


def _floats3(ctx, param, value):
    if value is None:
        return None
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected three comma-separated numbers, got {value!r}") from None
    if len(parts) != 3:
        raise click.BadParameter(f"expected three comma-separated numbers, got {value!r}")
    return parts


@click.group()
@click.version_option(package_name="usi-cache")
def main():
    """usi-cache: build a reusable teacher cache, train students against it, inspect it."""


# ---------------------------------------------------------------- shards
@main.group()
def shards():
    """Make WebDataset shards (+ dataset.json) from images."""


@shards.command("from-folder")
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--per-shard", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Samples per shard (the last may be short).")
@click.option("--seed", default=0, show_default=True, help="Seed of the shuffle across shards.")
@one_line_errors
def shards_from_folder(src, out, per_shard, seed):
    """Shard an ImageNet-style folder SRC/<class>/<image>, keeping the original bytes."""
    from .shards import samples_from_folder, write_shards
    samples, classes, rejected = samples_from_folder(src)
    if rejected:
        click.echo(f"warning: left out {len(rejected)} file(s):", err=True)
        for r in rejected[:20]:
            click.echo(f"  {r.path}: {r.reason}", err=True)
        if len(rejected) > 20:
            click.echo(f"  ... and {len(rejected) - 20} more", err=True)
    m = write_shards(samples, classes, out, per_shard=per_shard, seed=seed)
    click.echo(f"{out}: {m.num_samples} samples, {len(m.classes)} classes, {len(m.shards)} shards, "
               f"fingerprint {m.fingerprint[:12]}")


@shards.command("fashion-mnist")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--source", default=None, type=click.Path(file_okay=False),
              help="Folder with the Fashion-MNIST .gz files [default: /usr/share/datasets/fashion-mnist].")
@click.option("--per-shard", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, help="Seed of the shuffle across shards.")
@click.option("--limit-train", default=None, type=click.IntRange(min=1), help="Keep the first N training images.")
@click.option("--limit-test", default=None, type=click.IntRange(min=1), help="Keep the first N test images.")
@one_line_errors
def shards_fashion_mnist(out, source, per_shard, seed, limit_train, limit_test):
    """Shard Fashion-MNIST into OUT/train and OUT/test (PNG)."""
    from pathlib import Path

    from .shards import FMNIST_CLASSES, FMNIST_DIR, samples_from_fashion_mnist, write_shards
    for split, limit in (("train", limit_train), ("test", limit_test)):
        samples = samples_from_fashion_mnist(source or FMNIST_DIR, split, limit)
        m = write_shards(samples, FMNIST_CLASSES, Path(out) / split, per_shard=per_shard, seed=seed)
        click.echo(f"{Path(out) / split}: {m.num_samples} samples, {len(m.shards)} shards, "
                   f"fingerprint {m.fingerprint[:12]}")


# ---------------------------------------------------------------- cache (stage 1)
@click.command("cache")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Recipe YAML (sections view, cache).")
@click.option("--shards", help="Folder with dataset.json and the tar shards.")
@click.option("--teacher", help="timm model name (USI names such as tresnet_l_v2 accepted).")
@click.option("--teacher-checkpoint", help="Teacher state_dict file.")
@click.option("--pretrained/--no-pretrained", default=None, help="Use timm's pretrained weights (downloads).")
@click.option("--views", type=int, help="V: augmented views per image.")
@click.option("--topk", type=int, help="k: logits kept per view.")
@click.option("--out", help="The Zarr cache to create or resume.")
@click.option("--seed", type=int, help="View seed.")
@click.option("--input-size", type=int, help="Teacher input size [default: the model's].")
@click.option("--mean", callback=_floats3, help="Normalisation mean, e.g. 0.485,0.456,0.406 [default: the model's].")
@click.option("--std", callback=_floats3, help="Normalisation std [default: the model's].")
@click.option("--batch-size", type=int, help="Teacher batch size (views).")
@click.option("--workers", type=int, help="Decode/augment worker processes per rank.")
@click.option("--compile/--no-compile", default=None, help="torch.compile the teacher (CUDA).")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing cache.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@one_line_errors
def cache_command(config_path, as_json, **overrides):
    """Stage 1: cache the teacher's top-k logits over V augmented views of every image."""
    from .cache import format_summary, run_cache
    from .config import CacheConfig, load_stage_config
    cfg = load_stage_config(CacheConfig, "cache", config_path, overrides)
    summary = run_cache(cfg)
    import os
    if os.environ.get("RANK", "0") == "0":
        click.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))


main.add_command(cache_command)


# ---------------------------------------------------------------- train (stage 2)
@click.command("train", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train_command(args):
    """Stage 2: train a student against the cache (not available in this version yet)."""
    raise click.ClickException("stage 2 (train_student.py / usi train) is not available yet in this version")


main.add_command(train_command)


# ---------------------------------------------------------------- demo
@main.command("demo")
@click.option("--out", default="runs/demo", show_default=True, help="Folder for every demo artefact.")
@one_line_errors
def demo_command(out):
    """Fashion-MNIST end to end: shards, a teacher cache, its summary."""
    from .demo import run_demo
    run_demo(out)


if __name__ == "__main__":
    sys.exit(main())
