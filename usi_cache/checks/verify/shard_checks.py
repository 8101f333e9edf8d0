"""The per-shard checks of `usi verify`, each a small function with one concern.

A check takes the shard as `shard_data.load_shard` read it and returns its problems as
messages (an empty list: the check holds). `SHARD_CHECKS` is the ordered list the driver
(run.py) runs on every shard; each problem is reported under the check's name, with the
shard. Slots are named as cache rows (slot = shard x slots per shard + position).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from usi_cache import cache_format as schema
from usi_cache.shards.images import decode_image
from usi_cache.checks.verify.recompute import check_recompute
from usi_cache.checks.verify.shard_data import ShardData


def _first(mask: np.ndarray, shard_base: int) -> str:
    """'N view(s), first at slot S view V' for a (S, V) mask."""
    idx = np.argwhere(mask)
    s, v = idx[0][:2]
    return f"{len(idx)} view(s), first at slot {shard_base + int(s)} view {int(v)}"


def check_complete(d: ShardData) -> list[str]:
    """The shard's block is committed: its commit marker was written."""
    if d.labels is None or d.committed:
        return []  # an unreadable marker is the checksums check's
    return [f"not committed ({schema.COMMIT_ARRAY} chunk missing or never written); rerunning stage 1 resumes it"]


def check_chunk_files(d: ShardData) -> list[str]:
    """Every array has its chunk file, unless its content may legitimately be all fill values."""
    return d.lost


def check_checksums(d: ShardData) -> list[str]:
    """Every chunk reads back (each ends in a CRC32C): the damaged views are named."""
    return d.unreadable


def check_keys(d: ShardData) -> list[str]:
    """Every key is in place (cache row = tar position) and the sample counts agree."""
    if d.tar_problem:
        return [d.tar_problem]
    if d.tar is None or d.arrays.get("keys") is None:
        return []
    S, base, keys = d.layout.slots_per_shard, d.base, d.tar.keys
    out = []
    if len(keys) != d.count:
        out.append(f"the tar holds {len(keys)} samples, the cache's dataset says {d.count}")
    if len(keys) > S:
        out.append(f"the tar holds {len(keys)} samples, more than the {S} slots per shard")
    n = min(len(keys), S)
    stored = [str(k) for k in d.arrays["keys"]]
    wrong = np.flatnonzero(~d.in_place[:n])
    if len(wrong):
        p = wrong[0]
        out.append(f"{len(wrong)} key(s) out of place, first at slot {base + p}: cache has {stored[p]!r}, "
                   f"the tar has {keys[p]!r}")
    extra = [p for p in range(n, S) if stored[p] != "" or d.labels[p] != schema.INVALID]
    if extra:
        out.append(f"{len(extra)} slot(s) past the shard's {n} samples are not empty, first slot {base + extra[0]}")
    return out


def check_labels(d: ShardData) -> list[str]:
    """Labels equal the tar's classes, and -1 marks exactly the images that do not decode (and
    are in the cache's invalid list)."""
    if d.tar is None or d.arrays.get("keys") is None:
        return []
    labels, tar, base = d.labels, d.tar, d.base
    bad_label, bad_invalid = [], []
    for p in np.flatnonzero(d.in_place):
        if labels[p] >= 0:
            if labels[p] != tar.classes[p]:
                bad_label.append(f"slot {base + p}: cache {labels[p]}, tar {tar.classes[p]}")
            elif tar.sizes[p] is None:
                bad_label.append(f"slot {base + p}: labelled {labels[p]} but the image does not decode")
        elif labels[p] == schema.INVALID:
            try:
                decode_image(tar.data[p])
                bad_invalid.append(f"slot {base + p} ({tar.keys[p]}) has label -1 but its image decodes")
            except ValueError:
                if tar.keys[p] not in d.ctx.invalid:
                    bad_invalid.append(f"slot {base + p} ({tar.keys[p]}) has label -1 but is not in the "
                                       "cache's invalid list")
        else:
            bad_label.append(f"slot {base + p}: label {labels[p]} is not a class, -1 or {schema.NOT_WRITTEN}")
    return [f"{len(found)} wrong label(s), first {found[0]}" for found in (bad_label, bad_invalid) if found]


def check_finite(d: ShardData) -> list[str]:
    """The valid views' logits and lse are finite."""
    z, lse, valid, out = d.arrays.get("logits"), d.arrays.get("lse"), d.valid[:, None], []
    if z is not None:
        bad = valid & ~np.isfinite(z.astype(np.float32)).all(-1)
        if bad.any():
            out.append(f"non-finite logits in {_first(bad, d.base)}")
    if lse is not None:
        bad = valid & ~np.isfinite(lse)
        if bad.any():
            out.append(f"non-finite lse in {_first(bad, d.base)}")
    return out


def check_class_range(d: ShardData) -> list[str]:
    """The valid views' class indices are < C and distinct within a view's top-k."""
    c, valid, out = d.arrays.get("classes"), d.valid[:, None], []
    if c is None:
        return out
    ci = c.astype(np.int64)
    bad = valid & (ci >= d.layout.num_classes).any(-1)
    if bad.any():
        out.append(f"class index >= C = {d.layout.num_classes} in {_first(bad, d.base)}")
    bad = valid & (np.diff(np.sort(ci, -1), axis=-1) == 0).any(-1)
    if bad.any():
        out.append(f"a class repeated within one view's top-k in {_first(bad, d.base)}")
    return out


def check_sorted(d: ShardData) -> list[str]:
    """The valid views' stored values descend (top-1 first)."""
    z = d.arrays.get("logits")
    if z is None:
        return []
    bad = d.valid[:, None] & (np.diff(z.astype(np.float32), axis=-1) > 0).any(-1)
    return [f"logits not descending in {_first(bad, d.base)}"] if bad.any() else []


def check_topk_mass(d: ShardData) -> list[str]:
    """sum_i p_i <= 1 for every valid view, up to the float16 rounding of what is stored
    (log-probabilities from schema 3 on, raw logits z in schema 1-2: p_i = exp(z_i - lse))."""
    z, lse = d.arrays.get("logits"), d.arrays.get("lse")
    if z is None or lse is None:
        return []
    # The smallest each p_i can truly be: the stored float16 value moved at most half a float16
    # spacing (and a raw logit's lse, float32, a relative 2^-24). Even then the mass must not
    # exceed 1.
    with np.errstate(invalid="ignore"):  # spacing of a non-finite value: the finite check's
        z64 = z.astype(np.float64) - np.spacing(np.abs(z)).astype(np.float64) / 2
    l64 = (np.zeros(lse.shape) if d.layout.stores_log_probs else
           lse.astype(np.float64) + np.abs(lse.astype(np.float64)) * 2.0 ** -23 + 1e-7)
    with np.errstate(over="ignore", invalid="ignore"):
        mass = np.exp(z64 - l64[..., None]).sum(-1)
    bad = d.valid[:, None] & ~(mass <= 1 + 1e-9)
    if not bad.any():
        return []
    s, v = np.argwhere(bad)[0]
    return [f"top-k probabilities sum above 1 in {_first(bad, d.base)} (sum {mass[s, v]:.6f})"]


def check_boxes(d: ShardData) -> list[str]:
    """Crop boxes lie inside the images (sizes from the tar's image headers)."""
    boxes = d.arrays.get("boxes")
    if boxes is None or not d.known.any():
        return []
    b = boxes.astype(np.int64)
    hw = np.array([s if s is not None else (0, 0) for s in d.sizes])
    inside = ((b[..., 0] >= 0) & (b[..., 1] >= 0) & (b[..., 2] > 0) & (b[..., 3] > 0)
              & (b[..., 0] + b[..., 2] <= hw[:, None, 0]) & (b[..., 1] + b[..., 3] <= hw[:, None, 1]))
    bad = d.known[:, None] & ~inside
    if not bad.any():
        return []
    s, v = np.argwhere(bad)[0]
    return [f"crop box outside the image in {_first(bad, d.base)} (box {b[s, v].tolist()}, "
            f"image {hw[s, 0]}x{hw[s, 1]})"]


def check_view_params(d: ShardData) -> list[str]:
    """Boxes, flips, RandAugment records (and pairings) equal what the seeded sampler draws for
    (seed, key, view): the views really are the cache's replayable views."""
    S, V = d.layout.slots_per_shard, d.layout.views
    differ, first = [], None
    for name in schema.VIEW_PARAMS + (schema.MIX_ARRAYS if d.layout.paired else ()):
        if d.arrays.get(name) is None or not d.known.any():
            continue
        diff = (d.arrays[name] != d.expected[name]).reshape(S, V, -1).any(-1) & d.known[:, None]
        if diff.any():
            differ.append(f"{name} in {int(diff.sum())} view(s)")
            first = first or _first(diff, d.base).split(", ", 1)[1]
    if not differ:
        return []
    return [f"not the seeded sampler's views (seed {d.ctx.attrs['seed']}): {', '.join(differ)}; {first}"]


# The per-shard checks, in report order; each problem is reported under its check's name.
SHARD_CHECKS: tuple[tuple[str, Callable[[ShardData], list[str]]], ...] = (
    ("complete", check_complete),
    ("chunk files", check_chunk_files),
    ("checksums", check_checksums),
    ("keys", check_keys),
    ("labels", check_labels),
    ("finite", check_finite),
    ("class range", check_class_range),
    ("sorted", check_sorted),
    ("top-k mass", check_topk_mass),
    ("boxes", check_boxes),
    ("view params", check_view_params),
    ("recompute", check_recompute),
)
