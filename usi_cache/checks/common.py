"""What the checks (`usi verify`, `usi inspect`, `usi audit`) share, so that none of them
imports another: when to show progress, finding a cache's own shards, the audit table's text,
and the one (slot, view) sampler.

The sampler (`pick_views`) is behind `usi verify --recompute N`, `usi inspect --sample-views N`
and `usi audit --views N`: the population is every view of every valid sample (label >= 0) of
the committed shards, numbered shard by shard, slot by slot, view by view; N distinct numbers
are drawn from `numpy.random.default_rng(seed)`, so the picks depend on (seed, N, which shards
are committed and valid) only, never on the worker count or world size of the check that uses
them. (Drawing a view's augmentation is `views/sampling.py`'s `sample_view`.)
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from usi_cache import cache_format as schema
from usi_cache import storage
from usi_cache.shards.manifest import Manifest, load_manifest

# Show a progress bar when reading at least this many shards: below it the bar only flickers.
PROGRESS_MIN_SHARDS = 8


def shards_for(attrs: dict, shards_dir: str | Path | None) -> Manifest:
    """The shard folder's manifest (default: the folder the cache recorded), refused (naming
    the field) unless it is the cache's dataset."""
    if shards_dir is None:
        shards_dir = attrs["dataset"].get("root")
        if shards_dir is None:
            raise schema.CacheError("the cache's attributes do not record where its shards are: "
                                    "give --shards DIR")
        if not storage.is_dir(shards_dir):
            raise schema.CacheError(f"the cache's shards were at {shards_dir}, which is gone: give --shards DIR")
    manifest = load_manifest(shards_dir)
    diff = schema.attrs_difference(attrs["dataset"], manifest.to_dict(), "dataset.")
    if diff:
        raise schema.CacheError(f"{shards_dir}: these shards are not the cache's dataset: {diff}")
    return manifest


def format_audit(a: dict) -> str:
    """The audit table as text."""
    lines = [f"fidelity audit: teacher re-run with full logits on {a['views']} replayed views "
             f"({a.get('precision', '?')}, seed {a.get('seed', '?')}); top-1 agreement with the cache "
             f"{100 * a['rows'][0]['top1_agreement']:.1f} %",
             f"  {'k':>4}  {'tail mass':>10}  {'KL(full||k+1)':>13}  {'bytes/view':>10}"]
    for r in a["rows"]:
        mark = "  <- this cache" if r["k"] == a["cached_k"] else ""
        lines.append(f"  {r['k']:>4}  {r['tail_mass']:>10.4g}  {r['kl']:>13.4g}  {r['bytes_per_view']:>10}{mark}")
    return "\n".join(lines)


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
