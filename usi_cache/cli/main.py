"""The `usi` command line: shards, cache, train, inspect, verify, curves, demo.

Every expected failure (bad config, missing file, mismatched cache) is turned into a
one-line error by `one_line_errors`, never a traceback.
"""
from __future__ import annotations

import errno
import functools
import json
import pickle
import re
import sys
import tarfile

import click

from usi_cache.cli.options import config_options, stage_config
from usi_cache.config.stages import CacheConfig, TrainConfig
from usi_cache.config.errors import ConfigError

def _expected_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause: bad config or input files, a refused checkpoint, the environment.

    OSError covers the environment (disk full, permission denied, a file where a folder
    belongs); UnpicklingError a checkpoint that torch.load(weights_only=True) refuses (it would
    run code, or is not a checkpoint); TarError a damaged shard read through WebDataset, which
    lets tarfile's own error through. Anything else is a bug and keeps its traceback.
    """
    from usi_cache.cache_format.spec import CacheError
    from usi_cache.shards.manifest import ShardError
    from usi_cache.models.errors import TeacherError
    from usi_cache.stage2.state import TrainError
    return (ConfigError, CacheError, ShardError, TeacherError, TrainError, OSError,
            pickle.UnpicklingError, tarfile.TarError)


def one_line_errors(fn):
    """Turn the project's expected errors into `Error: <message>` and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _expected_errors() as e:
            raise click.ClickException(_message(e)) from None
    return wrapper


def _message(e: BaseException) -> str:
    """The error's own message on one line, also when a DataLoader worker re-raised it."""
    text = str(e)
    if "Original Traceback" in text:  # torch wraps worker exceptions with the traceback text
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    elif isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    if isinstance(e, pickle.UnpicklingError):
        text = _unpickling_message(text)
    elif isinstance(e, tarfile.TarError):
        text = _tar_message(e, text)
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip()) or type(e).__name__


def _unpickling_message(text: str) -> str:
    """torch.load(weights_only=True)'s many-line refusal -> the line that says why."""
    from usi_cache.models.checkpoints import refused_global
    why = refused_global(text)
    if why:
        return f"checkpoint refused: loading it would run code ({why[:200]})"
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    reason = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(boilerplate)), "")
    return f"not a PyTorch checkpoint (unpickling failed: {reason[:200]})"


def _tar_message(e: tarfile.TarError, text: str) -> str:
    """tarfile's error as WebDataset passes it on: args (reason, stream, url) -> 'url: damaged tar (reason)'."""
    if len(e.args) >= 2 and isinstance(e.args[-1], str):
        url, reason = e.args[-1], str(e.args[0])
    else:  # re-raised from a DataLoader worker: only the repr of those args is left
        m = re.match(r"""\(\s*(['"])(.*?)\1\s*,.*'([^']*)'\)\s*$""", text, re.S)
        url, reason = (m.group(3), m.group(2)) if m else (None, text)
    reason = reason.split(" @ ")[0]  # WebDataset appends ' @ <stream repr>'
    return f"{url}: damaged tar ({reason})" if url else f"damaged tar ({reason})"


@click.group()
@click.version_option(package_name="usi-cache")
def main():
    """usi-cache: build a reusable teacher cache, train students against it, inspect it."""


# ---------------------------------------------------------------- shards
@main.group()
def shards():
    """Make WebDataset shards (+ dataset.json) from images, or index existing ones."""


def _workers_option(fn):
    return click.option("--workers", type=click.IntRange(min=1), default=None,
                        help="Worker processes [default: the CPU cores].")(fn)


def _shard_options(fn):
    """--per-shard, --seed, --workers and --quiet: how the streaming ingest writes its shards."""
    for option in reversed((
            click.option("--per-shard", default=1000, show_default=True, type=click.IntRange(min=1),
                         help="Samples per shard (fewer where images are left out; the last may be short)."),
            click.option("--seed", default=0, show_default=True, help="Seed of the shuffle across shards."),
            _workers_option,
            click.option("--quiet", is_flag=True, help="No progress bar."))):
        fn = option(fn)
    return fn


_TRAIN_DEFAULTS = TrainConfig.__dataclass_fields__


def _spread_options(fn):
    """The stage-2 settings the class-order check assumes (train.batch_size, train.shuffle_buffer)."""
    for option in reversed((
            click.option("--batch-size", default=_TRAIN_DEFAULTS["batch_size"].default, show_default=True, type=click.IntRange(min=1),
                         help="Class-order check: stage 2's batch per process."),
            click.option("--shuffle-buffer", default=_TRAIN_DEFAULTS["shuffle_buffer"].default, show_default=True, type=click.IntRange(min=1),
                         help="Class-order check: stage 2's shuffle buffer per worker."))):
        fn = option(fn)
    return fn


def _report_ingest(out, m, rejected, what: str = "file(s)") -> None:
    """What a streaming ingest made, and what it left out (the first 20, then a count)."""
    if rejected:
        click.echo(f"warning: left out {len(rejected)} {what}:", err=True)
        for r in rejected[:20]:
            click.echo(f"  {r.path}: {r.reason}", err=True)
        if len(rejected) > 20:
            click.echo(f"  ... and {len(rejected) - 20} more", err=True)
    click.echo(f"{out}: {m.num_samples} samples, {len(m.classes)} classes, {len(m.shards)} shards, "
               f"fingerprint {m.fingerprint[:12]}")


@shards.command("from-folder")
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@_shard_options
@click.option("--allow-empty-classes", is_flag=True,
              help="Keep a class folder without images as a class with no samples (default: an error).")
@one_line_errors
def shards_from_folder(src, out, per_shard, seed, workers, quiet, allow_empty_classes):
    """Shard an ImageNet-style folder SRC/<class>/<image>, keeping the original bytes.

    Streams: holds paths only, workers build whole tars in parallel. Rerun the same command
    after an interruption: finished shards are kept and skipped.
    """
    from usi_cache.shards.folder import shards_from_folder as ingest
    m, rejected = ingest(src, out, per_shard=per_shard, seed=seed, workers=workers,
                         allow_empty_classes=allow_empty_classes, progress=not quiet)
    _report_ingest(out, m, rejected)


@shards.command("from-hf")
@click.argument("dataset", metavar="DATASET_OR_PATH")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--split", default="train", show_default=True, help="The split to shard.")
@click.option("--image-column", default=None, help="[default: image, else img]")
@click.option("--label-column", default=None, help="Integer class indices [default: label, else labels, else cls].")
@click.option("--classes", "classes_file", default=None, type=click.Path(dir_okay=False),
              help="Class names, one per line, in label order [default: the ClassLabel's names, else 0..max].")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Where parquet is converted to Arrow once [default: the datasets cache].")
@_shard_options
@one_line_errors
def shards_from_hf(dataset, out, split, image_column, label_column, classes_file, cache_dir, per_shard, seed,
                   workers, quiet):
    """Shard a split of a Hugging Face dataset (image + label columns), keeping the encoded bytes.

    DATASET_OR_PATH: a folder made by save_to_disk, a folder or glob of parquet files, or a hub
    name already in the local cache (nothing is downloaded). Needs `pip install 'usi-cache[hf]'`.
    Streams like from-folder: workers read rows by index; rerun the same command to resume.
    """
    from usi_cache.shards.hf import shards_from_hf as ingest
    m, rejected = ingest(dataset, out, split=split, image_column=image_column, label_column=label_column,
                         classes_file=classes_file, cache_dir=cache_dir, per_shard=per_shard, seed=seed,
                         workers=workers, progress=not quiet)
    _report_ingest(out, m, rejected, "row(s)")


@shards.command("index")
@click.argument("shards_spec", metavar="SHARDS")
@click.option("--out", default=None, help="Folder (or URL) for dataset.json [default: the shards' folder].")
@click.option("--classes", "classes_file", default=None, type=click.Path(dir_okay=False),
              help="Class names, one per line, in cls order [default: 0..max(cls)].")
@_workers_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_spread_options
@click.option("--allow-ordered", is_flag=True,
              help="Index class-ordered shards anyway (default: refused, see `usi shards reshard`).")
@one_line_errors
def shards_index(shards_spec, out, classes_file, workers, quiet, batch_size, shuffle_buffer, allow_ordered):
    """Write dataset.json for existing WebDataset tars, without rewriting them.

    SHARDS: a folder or URL prefix (its *.tar), a glob ('/data/train-*.tar') or a brace pattern
    ('/data/train-{000000..001281}.tar'). Each sample needs an image entry and an integer cls.
    Class-ordered tars (a stage-2 batch would hold under half the classes random sampling gives)
    are refused, writing nothing, unless --allow-ordered.
    """
    from usi_cache.shards.class_spread import measure, read_class_counts
    from usi_cache.shards.index import index_shards
    m = index_shards(shards_spec, out=out, classes_file=classes_file, workers=workers, progress=not quiet,
                     allow_ordered=allow_ordered, batch=batch_size, buffer=shuffle_buffer)
    sizes = sorted({s.count for s in m.shards})
    click.echo(f"{m.root}/dataset.json: {m.num_samples} samples, {len(m.classes)} classes, {len(m.shards)} shards "
               f"of {sizes[0]}..{sizes[-1]} samples (per_shard {m.per_shard}), fingerprint {m.fingerprint[:12]}")
    spread = measure(read_class_counts(m.root), len(m.classes), batch_size, shuffle_buffer)
    if not spread.ok:
        click.echo(f"warning: {m.root}: class-ordered shards kept (--allow-ordered): {spread.describe()}", err=True)


@shards.command("reshard")
@click.argument("src", metavar="SRC")
@click.argument("out", metavar="OUT")
@click.option("--per-shard", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Samples per output shard (the last may be short).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the global permutation of the samples.")
@_workers_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--classes", "classes_file", default=None, type=click.Path(dir_okay=False),
              help="Class names, one per line, in cls order [default: SRC's dataset.json, else 0..max(cls)].")
@click.option("--spill-dir", default=None, type=click.Path(file_okay=False),
              help="Local folder for the temporary spill tars [default: OUT/.reshard/spill; for a URL OUT, "
                   "a folder in the temporary directory].")
@_spread_options
@one_line_errors
def shards_reshard(src, out, per_shard, seed, workers, quiet, classes_file, spill_dir, batch_size, shuffle_buffer):
    """Rewrite existing tars SRC into shuffled shards in OUT, keeping every key and its bytes.

    SRC: anything `usi shards index` takes. Streams in two parallel passes with bounded memory
    (one source shard per worker); rerun the same command after an interruption to resume.
    The output depends on SRC, --seed and --per-shard only.
    """
    from usi_cache.shards.reshard import reshard
    r = reshard(src, out, per_shard=per_shard, seed=seed, workers=workers, classes_file=classes_file,
                spill_dir=spill_dir, batch=batch_size, buffer=shuffle_buffer, progress=not quiet)
    m = r.manifest
    click.echo(f"{m.root}: {m.num_samples} samples, {len(m.classes)} classes, {len(m.shards)} shards, "
               f"fingerprint {m.fingerprint[:12]}")
    before = f" (before: ~{r.before.predicted:.1f})" if r.before is not None else ""
    click.echo(f"class spread: {r.after.describe()}{before}")


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
    from usi_cache.storage import join
    from usi_cache.shards.fashion_mnist import FMNIST_CLASSES, FMNIST_DIR, samples_from_fashion_mnist
    from usi_cache.shards.tars import write_shards
    for split, limit in (("train", limit_train), ("test", limit_test)):
        samples = samples_from_fashion_mnist(source or FMNIST_DIR, split, limit)
        m = write_shards(samples, FMNIST_CLASSES, join(out, split), per_shard=per_shard, seed=seed)
        click.echo(f"{m.root}: {m.num_samples} samples, {len(m.shards)} shards, "
                   f"fingerprint {m.fingerprint[:12]}")


# ---------------------------------------------------------------- cache (stage 1)
@click.group("cache", invoke_without_command=True)
@config_options(CacheConfig, "cache")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
@one_line_errors
def cache_command(ctx, as_json, **options):
    """Stage 1: cache the teacher's top-k logits over V augmented views of every image.

    Every key of the recipe's cache and view sections has an option; --set KEY=VALUE sets any
    key as well. Precedence: defaults < --config YAML < options.

    With --add-views N an existing cache grows by views V .. V+N-1 (--views V: its V now); no
    existing file is rewritten, and rerunning the same command resumes a killed grow.

    With --part I/N (or auto) this process computes part I of N as an independent job (a Slurm
    array task, a Kubernetes Indexed Job pod): `usi cache status CACHE` shows what is left.
    """
    if ctx.invoked_subcommand:  # `usi cache status ...`
        return
    from usi_cache.stage1.run import format_summary, run_cache
    cfg = stage_config(CacheConfig, "cache", options)
    try:
        summary = run_cache(cfg)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # The write that failed names no file; stage 1 writes nothing but the cache.
        from usi_cache.cache_format.spec import CacheError
        from usi_cache.cache_format.reader import open_cache
        try:
            open_cache(cfg.out)
            hint = "committed shards are kept: free space and run the same command again to resume"
        except CacheError:  # it failed while creating the cache's metadata
            hint = "the cache was not created: free space and run the same command with --overwrite"
        raise click.ClickException(f"{cfg.out}: {e.strerror} while writing the cache; {hint}") from None
    import os
    if os.environ.get("RANK", "0") == "0":
        click.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))


@cache_command.command("status")
@click.argument("cache", type=click.Path())
@click.option("--parts", type=click.IntRange(min=1), default=None,
              help="N of the --part I/N jobs writing it [default: the N their commits recorded].")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@one_line_errors
def cache_status_command(cache, parts, as_json):
    """Shards committed per view block, views/s and ETA from the commit times, and which parts
    (of `--part I/N` jobs) still have shards: what to resubmit."""
    from usi_cache.stage1.status import cache_status, format_status
    status = cache_status(cache, parts)
    click.echo(json.dumps(status, indent=1) if as_json else format_status(status))


main.add_command(cache_command)


# ---------------------------------------------------------------- train (stage 2)
@click.command("train")
@config_options(TrainConfig, "train")
@click.option("--resume", is_flag=True, help="Continue from RUN_DIR/last.pth.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@one_line_errors
def train_command(resume, quiet, **options):
    """Stage 2: train a timm student with the USI recipe against a cache (or labels, or an online teacher).

    Every key of the recipe's train and view sections has an option; --set KEY=VALUE sets any
    key as well. Precedence: defaults < --config YAML < options.
    """
    from usi_cache.stage2.loop import run_train
    cfg = stage_config(TrainConfig, "train", options)
    run_train(cfg, resume=resume, progress=not quiet)


main.add_command(train_command)


# ---------------------------------------------------------------- inspect, verify
WORKERS_HELP = ("Processes on this machine reading shards in parallel (under torchrun, per rank: "
                "ranks take disjoint shards). The report does not depend on it.")

@main.command("inspect")
@click.argument("cache", type=click.Path())
@click.option("--key", help="Show one sample by its key.")
@click.option("--slot", type=click.IntRange(min=0), help="Show one sample by its slot (row).")
@click.option("--shards", "shards_dir", type=click.Path(file_okay=False),
              help="Shard folder (default: where the cache recorded them): for the replay check and a sample's plot.")
@click.option("--shard-range", help="Statistics over shards A:B only (B exclusive).")
@click.option("--sample-views", type=click.IntRange(min=1), help="Statistics over a random sample of N views.")
@click.option("--seed", default=0, show_default=True, help="Seed of --sample-views.")
@click.option("--no-stats", is_flag=True, help="Summary only: skip the teacher statistics.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG figure (one sample, or the statistics).")
@click.option("--label-issues", is_flag=True, help="Rank the samples whose label the teacher rejects "
              "(confident learning over all views).")
@click.option("--top", default=100, show_default=True, type=click.IntRange(min=1), help="Label issues listed.")
@click.option("--issues-csv", type=click.Path(dir_okay=False), help="Write the ranked label issues as CSV.")
@click.option("--html", type=click.Path(file_okay=False),
              help="Write a self-contained report (index.html + images) to this folder; needs the shards.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help=WORKERS_HELP)
@click.option("--members", default=0, show_default=True, type=click.IntRange(min=0),
              help="Re-run the cache's teachers (every member of an ensemble) on N replayed views: how often "
                   "their top-1 agree, each one's accuracy beside the mixture's.")
@click.option("--teacher-checkpoint", help="For --members: the teachers' checkpoints, comma-separated, in order.")
@one_line_errors
def inspect_command(cache, no_stats, **kwargs):
    """Summarise a cache, its teacher's statistics, label issues, or one sample's views; --html
    writes it all as a page (torchrun: rank 0 prints)."""
    from usi_cache.dist import close_world, init_world
    from usi_cache.checks.inspect.run import run_inspect, validate_request
    try:  # options that do not make one report are a usage error (exit status 2)
        validate_request(stats=not no_stats, **{k: kwargs[k] for k in ("key", "slot", "shard_range", "sample_views",
                                                                         "plot", "label_issues", "html", "issues_csv")})
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    world = init_world()
    try:
        text = run_inspect(cache, stats=not no_stats, world=world, **kwargs)
    finally:
        close_world(world)
    if world.is_main:
        click.echo(text)


@main.command("verify")
@click.argument("cache", type=click.Path())
@click.option("--shards", "shards_dir", required=True, type=click.Path(file_okay=False),
              help="The shard folder the cache was made from.")
@click.option("--recompute", default=0, show_default=True, type=click.IntRange(min=0),
              help="Re-run the teacher on N random replayed views.")
@click.option("--teacher-checkpoint", help="The teacher's checkpoint (for --recompute); an ensemble's, "
              "comma-separated, in order.")
@click.option("--device", default=None, help="Device for --recompute [default: cuda if available, else cpu].")
@click.option("--atol", default=1e-3, show_default=True, help="--recompute: logit tolerance, absolute part.")
@click.option("--rtol", default=1e-3, show_default=True, help="--recompute: logit tolerance, relative part.")
@click.option("--seed", default=0, show_default=True, help="Seed of the --recompute sample.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help=WORKERS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (every problem, none left out).")
@one_line_errors
def verify_command(cache, shards_dir, as_json, **kwargs):
    """Check a cache against its shards; exit status 0 only when every check holds (torchrun: rank 0
    prints the report and exits with the verdict)."""
    from usi_cache.dist import close_world, init_world
    from usi_cache.checks.verify.report import format_report, report_dict
    from usi_cache.checks.verify.run import verify_cache
    world = init_world()
    try:
        report = verify_cache(cache, shards_dir, world=world, **kwargs)
    finally:
        close_world(world)
    if report is None:
        return  # not rank 0
    click.echo(json.dumps(report_dict(report), indent=1) if as_json else format_report(report))
    if not report.ok:
        sys.exit(1)


@main.command("audit")
@click.argument("cache", type=click.Path())
@click.option("--teacher-checkpoint", help="The cache's teacher checkpoint (its sha256 must match); an "
              "ensemble's, comma-separated, in order.")
@click.option("--views", "n", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Re-run the teacher with full logits on N seeded replayed views.")
@click.option("--seed", default=0, show_default=True, help="Seed of the view sample.")
@click.option("--shards", "shards_dir", type=click.Path(file_okay=False),
              help="The cache's shard folder [default: where the cache recorded it].")
@click.option("--device", default=None, help="[default: cuda if available, else cpu].")
@one_line_errors
def audit_command(cache, **kwargs):
    """Top-k fidelity of a cache: tail mass, KL and bytes per view for k = 1 ... 100; stored in the cache."""
    from usi_cache.checks.audit import audit_cache
    from usi_cache.checks.common import format_audit
    click.echo(format_audit(audit_cache(cache, **kwargs)))


# ---------------------------------------------------------------- curves
@main.command("curves")
@click.argument("groups", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The PNG to write.")
@click.option("--key", default="val_top1", show_default=True, help="The log.jsonl field to plot per epoch.")
@click.option("--title", default="", help="Figure title.")
@one_line_errors
def curves_command(groups, out, key, title):
    """Plot a log field per epoch from training runs' log.jsonl: one line per GROUP (mean over
    its runs, band from min to max). GROUP is LABEL=GLOB, GLOB matching run folders, e.g.
    'labels only=runs/fidelity/labels-s*'."""
    import glob
    from usi_cache.stage2.curves import plot_curves, read_curve
    data = {}
    for g in groups:
        label, sep, pattern = g.rpartition("=")
        if not sep or not label:
            raise click.UsageError(f"{g!r}: expected LABEL=GLOB")
        runs = sorted(glob.glob(pattern))
        if not runs:
            raise click.UsageError(f"{pattern!r}: matches no run folder")
        data[label] = [read_curve(r, key) for r in runs]
        lengths = sorted({len(c) for c in data[label]})
        click.echo(f"{label}: {len(runs)} run(s), last epoch: " + ", ".join(f"{c[-1]:.2f}" for c in data[label])
                   + (f" (runs of {lengths} epochs: cut to {lengths[0]})" if len(lengths) > 1 else ""))
    ylabel = {"val_top1": "val top-1 (%)", "val_top1_ema": "val top-1, EMA weights (%)"}.get(key, key)
    click.echo(f"written {plot_curves(data, out, title=title, ylabel=ylabel)}")


# ---------------------------------------------------------------- demo
@main.command("demo")
@click.option("--out", default="runs/demo", show_default=True, help="Folder for every demo artefact.")
@one_line_errors
def demo_command(out):
    """Fashion-MNIST end to end: shards, a teacher cache, its summary."""
    from usi_cache.demo import run_demo
    run_demo(out)


if __name__ == "__main__":
    sys.exit(main())
