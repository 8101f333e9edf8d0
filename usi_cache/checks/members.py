"""Member agreement of an ensemble cache (`usi inspect --members N`): how its teachers compare.

The cache stores the top-k of the mixture only, so every member is re-run (at its recorded size,
normalisation and precision) on N seeded views replayed from the stored parameters (the audit's
replay, checks/replay.py). Reported, over those views:

* all_agree: the fraction of views on which every member's top-1 class is the same;
* pairwise: for each pair of members, the fraction of views where their top-1 agree;
* accuracy: each member's top-1 against the ground truth (a mixed view of a paired cache: the
  label of the image with the larger weight), beside the mixture's (re-run) and the cache's
  stored top-1 (which must equal the mixture's up to near ties).

A one-teacher cache gets the same table with one member.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from usi_cache import cache_format as schema

BATCH = 64  # views per teacher batch


def member_agreement(group, attrs: dict, manifest, ensemble, n: int, seed: int = 0) -> dict:
    """The agreement table of `ensemble` (models.ensemble.Ensemble, the cache's own teachers) on n
    seeded replayed views of the cache."""
    from usi_cache.checks.replay import replayed_views
    from usi_cache.models.ensemble import mixture_log_probs
    layout = schema.Layout.from_attrs(attrs)
    images, cached_top1, truth = replayed_views(group, attrs, layout, manifest, n, seed, ensemble.sizes)
    if not images:
        raise schema.CacheError("inspect --members: no committed, valid view to re-run")
    per_member: list[list[torch.Tensor]] = [[] for _ in ensemble.members]
    for i in range(0, len(images), BATCH):
        batch = [torch.from_numpy(np.stack([v[j] for v in images[i:i + BATCH]]))
                 for j in range(len(ensemble.sizes))]
        for m, z in enumerate(ensemble.member_logits(batch)):
            per_member[m].append(z)
    logits = [torch.cat(z) for z in per_member]
    top1 = [z.argmax(1) for z in logits]
    mixture = mixture_log_probs(logits, ensemble.weights).argmax(1)
    names = [f"{m.info.name} ({m.weight:.3g})" for m in ensemble.members]
    same = torch.stack(top1).eq(top1[0]).all(0)

    def acc(pred: torch.Tensor) -> float:
        return float((pred == truth).double().mean())

    return {
        "views": len(images), "seed": seed, "members": names,
        "all_agree": float(same.double().mean()),
        "pairwise": [{"a": a, "b": b, "agree": float((top1[a] == top1[b]).double().mean())}
                     for a, b in itertools.combinations(range(len(top1)), 2)],
        "accuracy": {"members": [acc(t) for t in top1], "mixture": acc(mixture), "cached": acc(cached_top1)},
        "cached_equals_mixture": float((cached_top1 == mixture).double().mean()),
    }


def format_agreement(a: dict) -> str:
    """The table as text lines."""
    lines = [f"members on {a['views']} replayed views (seed {a['seed']}): all top-1 agree on "
             f"{100 * a['all_agree']:.1f} %"]
    for name, acc in zip(a["members"], a["accuracy"]["members"]):
        lines.append(f"  {name:<40} top-1 vs ground truth {100 * acc:6.2f} %")
    lines.append(f"  {'mixture (re-run)':<40} top-1 vs ground truth {100 * a['accuracy']['mixture']:6.2f} %")
    lines.append(f"  {'cache (stored top-1)':<40} top-1 vs ground truth {100 * a['accuracy']['cached']:6.2f} % "
                 f"(equals the mixture's on {100 * a['cached_equals_mixture']:.1f} %)")
    for p in a["pairwise"]:
        lines.append(f"  members {p['a']} and {p['b']} agree on {100 * p['agree']:.1f} %")
    return "\n".join(lines)
