"""A seeded uniform sample of a cache's (slot, view) pairs: the one sampler behind
`usi verify --recompute N`, `usi inspect --sample-views N` and `usi audit --views N`.

Not to be confused with `views.sample_view`, which draws a view's augmentation. Here the
population is every view of every valid sample (label >= 0) of the committed shards, numbered
shard by shard, slot by slot, view by view; N distinct numbers are drawn from
`numpy.random.default_rng(seed)`, so the picks depend on (seed, N, which shards are committed
and valid) only, never on the worker count or world size of the report that uses them.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from . import schema


def valid_positions(group, layout: schema.Layout, shard: int) -> np.ndarray | None:
    """Positions (in the shard) of its valid samples, or None when the shard is not committed.
    An unreadable commit marker raises schema.CacheError."""
    labels = schema.read_array(group, schema.COMMIT_ARRAY, layout.rows(shard))
    if (labels == schema.NOT_WRITTEN).any():
        return None
    return np.flatnonzero(labels >= 0)


def sample_slot_views(valid: Mapping[int, np.ndarray], views: int, n: int,
                      seed: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """n distinct (position, view) pairs drawn uniformly from `valid` (shard -> valid
    positions, in shard order) x range(views): shard -> (positions, views), both sorted by
    (position, view); shards without a pick are left out. n >= the population takes it all."""
    total = sum(len(p) for p in valid.values()) * views
    if n >= total:
        chosen = np.arange(total)
    else:
        chosen = np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
    picks, start = {}, 0
    for shard, positions in valid.items():
        size = len(positions) * views
        mine = chosen[(chosen >= start) & (chosen < start + size)] - start
        if len(mine):
            picks[shard] = (positions[mine // views], mine % views)
        start += size
    return picks


def pick_views(group, layout: schema.Layout, n: int, seed: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """n seeded (position, view) pairs among the valid samples of every committed shard whose
    commit marker reads (a damaged one is left out: `usi verify` reports it on its own)."""
    valid = {}
    for i in range(layout.num_shards):
        try:
            positions = valid_positions(group, layout, i)
        except schema.CacheError:
            continue
        if positions is not None:
            valid[i] = positions
    return sample_slot_views(valid, layout.views, n, seed)
