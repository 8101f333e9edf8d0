"""Fidelity audit: what keeping only the top k of the teacher's C logits costs, measured.

The teacher is re-run with its FULL logits on N seeded views replayed from the cache's own
stored view parameters (the same replay as stage 2 and `usi verify`), and for every
k in {1, 2, 5, 10, 20, 50, 100} ∩ [1, C] the audit records

* mean tail mass r = 1 − Σ_{i≤k} p_(i) (the teacher mass a top-k cache leaves out);
* mean KL(p ‖ p̂_k), p the full teacher distribution, p̂_k its k+1-bucket reconstruction: the k
  classes exactly, the rest mass r spread evenly over the C − k other classes (the spread of
  largest entropy; the bucket KD of stage2/loss.py never needs the spread, this one makes the lost
  information a number). 0 at k = C;
* top-1 agreement between the re-run teacher and the cache's stored top-1 class (the same for
  every k: it measures the replay, not the truncation);
* bytes per view a cache with that k would hold, uncompressed, from the schema's dtypes.

For an ensemble cache every member is re-run and p is the mixture the cache stores the top-k of.
The result is stored in the cache's attributes (`schema.set_audit`) and shown by `usi inspect`.
Paired caches are audited on their mixed views (each rebuilt with its partner, as the teacher saw it).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from usi_cache import cache_format as schema

AUDIT_KS = (1, 2, 5, 10, 20, 50, 100)
BATCH = 64  # views per teacher batch


def audit_ks(num_classes: int) -> list[int]:
    """The audited k: AUDIT_KS within [1, C], and C itself when it is below 100 (no tail)."""
    ks = [k for k in AUDIT_KS if k <= num_classes]
    return ks + ([num_classes] if num_classes < AUDIT_KS[-1] and num_classes not in ks else [])


def bucket_fidelity(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tail mass r (N,) and KL(p ‖ p̂_k) (N,) in nats, float64, from full logits (N, C).

    p = softmax(logits) in float64; p̂_k keeps the k largest p_i and spreads r evenly over the
    other C − k classes. KL = Σ_tail p_j log(p_j (C − k) / r), 0 log 0 = 0; 0 when k ≥ C.
    """
    log_p = torch.log_softmax(logits.double(), dim=1)
    C = log_p.shape[1]
    sorted_lp = log_p.sort(dim=1, descending=True).values
    if k >= C:
        zero = torch.zeros(log_p.shape[0], dtype=torch.float64)
        return zero, zero
    tail_lp = sorted_lp[:, k:]
    log_r = torch.logsumexp(tail_lp, dim=1)  # log of the tail mass, without 1 − Σ cancellation
    kl = (tail_lp.exp() * (tail_lp - log_r[:, None] + np.log(C - k))).sum(1)
    return log_r.exp(), kl.clamp_min(0.0)


def fidelity_table(logits: torch.Tensor, cached_top1: torch.Tensor, layout: schema.Layout) -> dict:
    """The audit table from re-run full logits (N, C) and the cache's stored top-1 classes (N,)."""
    agree = float((logits.argmax(1) == cached_top1.long()).double().mean())
    rows = []
    for k in audit_ks(layout.num_classes):
        tail, kl = bucket_fidelity(logits, k)
        rows.append({"k": k, "tail_mass": float(tail.mean()), "kl": float(kl.mean()),
                     "top1_agreement": agree, "bytes_per_view": layout.value_bytes(k)})
    return {"views": int(logits.shape[0]), "cached_k": layout.topk, "rows": rows}


def run_audit(group, attrs: dict, manifest, teacher, n: int, seed: int = 0) -> dict:
    """Re-run `teacher` (a models.ensemble.Ensemble) on n seeded replayed views of the cache;
    store and return the table. For an ensemble the full distribution is the mixture's."""
    from usi_cache.checks.replay import replayed_views
    from usi_cache.models.ensemble import run_views
    layout = schema.Layout.from_attrs(attrs)
    images, top1, _ = replayed_views(group, attrs, layout, manifest, n, seed, teacher.sizes)
    if not images:
        raise schema.CacheError("audit: no committed, valid view to re-run")
    logits = run_views(teacher, images, BATCH)  # an ensemble: the mixture's logits
    table = fidelity_table(logits, top1, layout)
    table.update(seed=seed, precision=teacher.precision)
    schema.set_audit(group, table)
    return table


def audit_cache(path: str | Path, *, teacher_checkpoint: str | None, n: int, seed: int = 0,
                shards_dir: str | None = None, device: str | None = None) -> dict:
    """`usi audit`: load the cache's teacher (its checkpoint must match the recorded sha256)
    at the recorded precision, audit n views and store the table in the cache."""
    from usi_cache.checks.common import shards_for
    from usi_cache.models.ensemble import load_cache_ensemble
    group, attrs = schema.open_cache(path, mode="r+")
    teacher, mismatch = load_cache_ensemble(attrs, teacher_checkpoint, device)
    if mismatch:
        raise schema.CacheError(mismatch)
    return run_audit(group, attrs, shards_for(attrs, shards_dir), teacher, n, seed)
