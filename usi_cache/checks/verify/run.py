"""`usi verify`: check that a cache belongs to its shards and that every value in it is sane.

Every check runs on every shard, and every problem is recorded with its shard and check name:
verification never stops at the first damaged chunk. The checks are small named functions in
two ordered lists: the cache-wide ones (cache_checks.py) and `SHARD_CHECKS`
(shard_checks.py), which this driver runs on every shard as `shard_data.load_shard` read it.
The shards are checked in parallel (`--workers` processes, torchrun ranks) and rank 0 merges
their results in shard order, so the report does not depend on the split. The checks, in
report order:

* attributes  — the `usi_cache` attribute is self-consistent (its dataset fingerprint matches
                the dataset fields it summarises, C / k / V / op table agree) and fits the arrays.
* fingerprint — the cache's dataset is these shards: classes, samples per shard, and every
                shard's name, sample count and sha256.
* complete    — every shard's block is committed (its commit marker was written).
* chunk files — every committed shard has the chunk file of every array. Zarr does not write a
                chunk that holds only fill values, so a missing file is a problem only when the
                block cannot be all fill values (e.g. flips are legitimately absent with hflip 0).
* checksums   — every chunk reads back: each chunk ends in a CRC32C, and a damaged one raises on
                read; the damaged views are named.
* keys        — every key is in place (cache row = tar position) and the counts agree.
* labels      — labels equal the shards' classes; -1 exactly for the undecodable images, which
                are the cache's invalid list.
* finite, class range, sorted, top-k mass — logits and lse are finite, class indices are < C
                and distinct per view, the stored values descend, and sum_i p_i <= 1 up to the
                float16 rounding of what is stored (log-probabilities from schema 3 on, raw
                logits z in schema 1-2: p_i = exp(z_i - lse)).
* boxes       — crop boxes lie inside the images (sizes read from the shards' image headers).
* view params — boxes, flips and RandAugment records (and a paired cache's pairings) equal what
                the seeded sampler draws for (seed, key, view): the views really are the
                cache's replayable views.
* replay      — this machine re-renders the cache's fingerprint views bit for bit.
* recompute   — (`--recompute N`) the teacher (every member of an ensemble, then their mixture)
                re-run (at the cache's recorded precision) on N
                random replayed views reproduces the cached top-k and log-probabilities
                (tolerances in recompute.py).
"""
from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

from usi_cache import cache_format as schema, storage
from usi_cache.checks.verify import shard_checks as verify_checks
from usi_cache.dist import World, init_world, map_shards, on_main
from usi_cache.checks.common import PROGRESS_MIN_SHARDS
from usi_cache.checks.verify.cache_checks import check_attributes, check_fingerprint, check_invalid_list, check_replay
from usi_cache.checks.verify.report import CHECKS, VerifyReport, recompute_counts
from usi_cache.checks.verify.shard_data import VerifyContext, load_shard, open_context
from usi_cache.checks.common import pick_views

__all__ = ["verify_cache"]


def verify_cache(path: str | Path, shards_dir: str | Path, *, recompute: int = 0,
                 teacher_checkpoint: str | None = None, device: str | None = None, atol: float = 1e-3,
                 rtol: float = 1e-3, seed: int = 0, progress: bool = True, workers: int = 1,
                 world: World | None = None) -> VerifyReport | None:
    """Run every check; returns the report (its `.ok` is the verdict) on rank 0, None on others.

    The shards are checked by `workers` processes on each torchrun rank (`dist.map_shards`); the
    cache-wide checks run once, on rank 0, which merges the per-shard results in shard order, so
    the report is the same whatever the worker count or world size (the --recompute views are
    drawn from `seed` alone, before the shards are split)."""
    world = world or init_world()
    rep, ctx = on_main(world, functools.partial(_prepare, path, shards_dir, recompute, teacher_checkpoint,
                                                device, atol, rtol, seed))
    if ctx is None:
        return rep  # the arrays cannot be interpreted: nothing more to check
    n = ctx.layout.num_shards
    parts = map_shards(_check_one_shard, range(n),
                       functools.partial(open_context, replace(ctx, device=_rank_device(ctx.device, world))),
                       world=world, workers=workers, progress=progress and n >= PROGRESS_MIN_SHARDS,
                       desc="verifying")
    if not world.is_main:
        return None
    stored_invalid: set[str] = set()
    for part, undecodable in parts:  # in shard order
        rep.merge(part)
        stored_invalid |= undecodable
    # after the shards: what needs all of them
    all_committed = rep.complete == n
    if all_committed:
        _file(rep, "labels", check_invalid_list(ctx.invalid, stored_invalid))
    found, rep.replay = check_replay(schema.open_cache(path)[0], ctx.attrs, ctx.manifest, all_committed)
    _file(rep, "replay", found)
    if rep.recompute is not None and rep.recompute["views"] == 0:
        rep.add("recompute", None, "no view could be re-run (no committed, intact sample)")
    return rep


def _file(rep: VerifyReport, check: str, found) -> None:
    """File a cache-wide check's (shard or None, message) problems under its name."""
    for shard, message in found:
        rep.add(check, shard, message)


def _prepare(path, shards_dir, recompute: int, teacher_checkpoint, device, atol, rtol, seed):
    """Rank 0: the cache-wide checks that come first, then (report, the context every process
    checks shards with), or (report, None) when the arrays cannot be interpreted."""
    rep = VerifyReport(cache=str(path), shards_dir=str(shards_dir))
    rep.ran.append("attributes")
    try:
        group, attrs = schema.open_cache(path)
    except schema.CacheError as e:
        rep.add("attributes", None, str(e))
        return rep, None
    found, layout = check_attributes(group, attrs)
    _file(rep, "attributes", found)
    rep.ran.append("fingerprint")
    found, manifest = check_fingerprint(attrs, shards_dir)
    _file(rep, "fingerprint", found)
    if layout is None:
        return rep, None
    rep.shards, rep.samples = layout.num_shards, int(attrs["dataset"]["num_samples"])
    ctx = VerifyContext(path=str(path), stored=set(storage.sizes(path)), attrs=attrs, layout=layout,
                        manifest=manifest, spec=schema.view_spec(attrs), invalid=set(attrs.get("invalid", [])),
                        atol=atol, rtol=rtol)
    if recompute:
        _prepare_recompute(rep, ctx, group, recompute, teacher_checkpoint, device, atol, rtol, seed)
    runs = {name for name, _ in verify_checks.SHARD_CHECKS} | {"replay"}
    rep.ran += [c for c in CHECKS[2:] if c in runs and (c != "recompute" or recompute)]
    return rep, ctx


def _prepare_recompute(rep, ctx: VerifyContext, group, n: int, teacher_checkpoint, device, atol, rtol,
                       seed) -> None:
    """--recompute: the teacher's device and tolerance, and the views to re-run."""
    import torch

    from usi_cache.models.ensemble import cache_ensemble_mismatch
    mismatch = cache_ensemble_mismatch(ctx.attrs, teacher_checkpoint)  # every teacher of an ensemble
    if mismatch:
        rep.add("recompute", None, mismatch)
    ctx.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ctx.checkpoint = teacher_checkpoint
    # a half-precision re-run differs from the original by its own rounding (a batch of another
    # shape may take other kernels): two of its spacings, relative to the logits; caches from
    # before the precision was recorded ran bf16 autocast on CUDA
    fallback = "bf16" if torch.device(ctx.device).type == "cuda" else "fp32"
    for m in schema.teacher_members(ctx.attrs):  # an ensemble: its least precise member's
        ctx.rtol = rtol = max(rtol, {"bf16": 2 ** -7, "fp16": 2 ** -10}.get(m.get("precision") or fallback, 0.0))
    ctx.picks = pick_views(group, ctx.layout, n, seed)
    rep.recompute = {"requested": n, **recompute_counts(), "atol": atol, "rtol": rtol, "device": ctx.device}


def _check_one_shard(ctx: VerifyContext, i: int) -> tuple[VerifyReport, set[str]]:
    """Shard i's part of the report (problems, counts, re-run statistics) and the keys it stores
    with label -1. Every check of SHARD_CHECKS runs, on the shard as read once."""
    part = VerifyReport(cache=ctx.path, shards_dir="")
    if ctx.device is not None:
        part.recompute = recompute_counts()
        if ctx.teacher is None and i in ctx.picks:  # loaded by the processes that re-run views only
            from usi_cache.models.ensemble import load_cache_ensemble
            ctx.teacher, _ = load_cache_ensemble(ctx.attrs, ctx.checkpoint, ctx.device)  # the mismatch is rank 0's
    d = load_shard(ctx, i)
    d.rerun = part.recompute
    for name, check in verify_checks.SHARD_CHECKS:
        for message in check(d):
            part.add(name, i, message)
    if d.committed:
        V = ctx.layout.views
        part.complete += 1
        part.views += int(d.valid.sum()) * V
        part.valid += int(d.valid.sum())
        part.compared += int(d.known.sum())
    return part, d.undecodable


def _rank_device(device: str | None, world: World) -> str | None:
    """Each torchrun rank re-runs the teacher on its own GPU."""
    if device == "cuda" and world.distributed:
        return f"cuda:{world.local_rank}"
    return device
