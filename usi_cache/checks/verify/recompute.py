"""The `recompute` check of `usi verify --recompute N`: the teacher re-run on the picked views.

The picked (slot, view) pairs of a shard are replayed from the stored parameters by the one
render of every stage (`render.stored_view` / `render.render_stored`; a paired view is mixed
with its partner), the teacher re-runs them at the cache's recorded precision, and the result
must reproduce the cached top-k classes exactly, except where near-tied logits swap places,
and the log-probabilities within one float16 spacing of the stored value (its rounding down;
half a spacing for the rounded-to-nearest logits of schema 1-2) + 2 atol + rtol (|z| + |lse|)
(the teacher's own run-to-run noise: a float32 sum's last bits depend on the thread count and
batch shape, a half-precision teacher's on more). The lse is compared within atol + rtol |lse|.
"""
from __future__ import annotations

import contextlib

import numpy as np

from usi_cache import cache_format as schema
from usi_cache.views.mixing import PartnerImages
from usi_cache.views.render import render_stored, stored_view
from usi_cache.checks.verify.shard_data import ShardData

BATCH = 64  # views per teacher forward pass


def check_recompute(d: ShardData) -> list[str]:
    """Re-run the teacher on the shard's picked views and compare with the cache; the re-run
    statistics go to `d.rerun`. Nothing to do without --recompute or without picks here."""
    ctx, layout = d.ctx, d.layout
    if ctx.teacher is None or d.shard not in ctx.picks or not d.committed:
        return []
    rc, x, i, base = d.rerun, d.arrays, d.shard, d.base
    slots, views = ctx.picks[i]
    usable = [(p, v) for p, v in zip(slots.tolist(), views.tolist()) if d.known[p]]
    if d.tar is None or any(x[n] is None for n in schema.PER_VIEW):
        usable = []
    rc["skipped"] += len(slots) - len(usable)
    if not usable:
        return []
    out = []
    at = PartnerImages(d.tar.data)  # the shard's encoded images by position, decoded on demand
    images, rendered = [], []
    for p, v in usable:  # the same render as stages 1 and 2: a paired view is mixed with its partner
        try:
            stored = stored_view(x, p, v, base, layout.slots_per_shard)
            images.append(tuple(render_stored(stored, at.get(p), at.get, size, ctx.spec)
                                for size in ctx.teacher.sizes))  # each teacher's size, once
            rendered.append((p, v))
        except ValueError as e:
            out.append(f"slot {base + p} view {v}: the stored view cannot be rebuilt ({e})")
    if not rendered:
        return out
    return out + _compare(d, rendered, _run_teacher(ctx.teacher, images))


def _run_teacher(teacher, images: list[tuple[np.ndarray, ...]]):
    """The teacher's logits (an ensemble: the mixture's, whose lse is the one stored)."""
    from usi_cache.models.ensemble import run_views
    with _split_independent_threads(teacher.device):
        return run_views(teacher, images, BATCH)


def _compare(d: ShardData, usable: list[tuple[int, int]], logits) -> list[str]:
    """The re-run `logits` (N, C) of the (position, view) pairs `usable` against the cache."""
    import torch
    ctx, layout, x, rc = d.ctx, d.layout, d.arrays, d.rerun
    p_idx, v_idx = np.array(usable).T
    stored = x["logits"][p_idx, v_idx]
    c = torch.from_numpy(x["classes"][p_idx, v_idx].astype(np.int64))
    lse = torch.from_numpy(x["lse"][p_idx, v_idx].astype(np.float64))
    cached = torch.from_numpy(schema.log_probs(stored, x["lse"][p_idx, v_idx], layout).astype(np.float64))
    logits = logits.double()
    rerun_lse = torch.logsumexp(logits, 1)
    vals, idx = torch.topk(logits, layout.topk, dim=1)
    at_cached = logits.gather(1, c)  # the re-run teacher's logits at the cached classes
    noise = 2 * ctx.atol + ctx.rtol * (at_cached.abs() + rerun_lse.abs()[:, None])  # the teacher's own
    # + the float16 rounding: half a spacing (schema 1-2 round to nearest), a whole one (schema 3 rounds down)
    spacing = np.spacing(np.abs(stored)).astype(np.float64) * (1.0 if layout.stores_log_probs else 0.5)
    tol = torch.from_numpy(spacing) + noise
    diff = (at_cached - rerun_lse[:, None] - cached).abs()  # in log-probabilities
    lse_diff = (rerun_lse - lse).abs()
    mismatch = (idx != c).any(1)
    tie = mismatch & ((at_cached - vals).abs() <= noise).all(1)  # order of near-equal logits swapped
    rc["views"] += len(usable)
    rc["max_logit_diff"] = max(rc["max_logit_diff"], float(diff.max()))
    rc["max_lse_diff"] = max(rc["max_lse_diff"], float(lse_diff.max()))
    rc["class_mismatches"] += int(mismatch.sum())
    rc["near_ties"] += int(tie.sum())
    out = []
    hard = torch.nonzero(mismatch & ~tie).flatten().tolist()
    if hard:
        j = hard[0]
        out.append(f"top-k classes differ in {len(hard)} re-run view(s), first slot {d.base + p_idx[j]} view "
                   f"{v_idx[j]}: cache {c[j].tolist()}, teacher {idx[j].tolist()}")
    bad = torch.nonzero((diff > tol).any(1) | (lse_diff > ctx.atol + ctx.rtol * lse.abs())).flatten().tolist()
    if bad:
        j = bad[0]
        out.append(f"log-probabilities or lse differ beyond float16 rounding + atol {ctx.atol}, rtol {ctx.rtol} "
                   f"in {len(bad)} re-run view(s), first slot {d.base + p_idx[j]} view {v_idx[j]} "
                   f"(largest difference {float(diff[j].max()):.4g})")
    return out


@contextlib.contextmanager
def _split_independent_threads(device):
    """One thread for a teacher on the CPU, in every process: a float32 sum's last bits depend on
    the thread count, and the re-run's statistics must not depend on how many processes share
    the shards (--workers, torchrun). The parallelism comes from the processes."""
    import torch
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
