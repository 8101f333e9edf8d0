"""Portable replay, checked: does this machine rebuild the pixels the teacher saw?

Bit-identical replay depends on the image decoders and resamplers of the machine: Pillow's
version (Pillow-SIMD resizes differently), its JPEG library (libjpeg vs libjpeg-turbo, and
their versions) and zlib. Stage 1 records that environment in the cache together with a
fingerprint: the sha256 of the rendered pixels of a fixed handful of views (the first few valid
samples of the first shard that has one, at the first and the last view). Stage 2, `usi verify`
and `usi inspect` re-render those views with `render.render_stored` and compare; a mismatch
means the student would be taught with pixels the teacher never saw.
"""
from __future__ import annotations

import hashlib

import numpy as np

from usi_cache import cache_format as schema
from usi_cache.views.render import render_stored, shard_images, stored_view
from usi_cache.shards.manifest import Manifest

SAMPLES = 4  # samples of the fingerprint (x up to 2 views each)


def decoder_env() -> dict:
    """The libraries that turn encoded bytes into the replayed pixels, with their versions."""
    import PIL
    from PIL import features
    return {"pillow": PIL.__version__, "jpeg": features.version("jpg"),
            "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")), "zlib": features.version("zlib")}


def describe(env: dict) -> str:
    jpeg = f"{'libjpeg-turbo' if env.get('libjpeg_turbo') else 'libjpeg'} {env.get('jpeg')}"
    return f"Pillow {env.get('pillow')}, {jpeg}, zlib {env.get('zlib')}"


def pick(group, layout: schema.Layout) -> list[list[int]]:
    """The fingerprint's [slot, view] pairs: the first SAMPLES valid samples of the first shard
    holding one, at the first and the last view (none when no sample decoded)."""
    labels = schema.read_array(group, "labels", slice(0, layout.slots)).reshape(layout.num_shards, -1)
    usable = np.flatnonzero((labels >= 0).any(axis=1))
    if not len(usable):
        return []
    shard = int(usable[0])
    first = shard * layout.slots_per_shard
    return [[first + int(p), v] for p in np.flatnonzero(labels[shard] >= 0)[:SAMPLES]
            for v in sorted({0, layout.views - 1})]


def fingerprint(group, attrs: dict, manifest: Manifest, views: list[list[int]] | None = None) -> dict:
    """{"env", "views": [[slot, view], ...], "sha256"} for this machine's rendering of `views` (by
    default `pick`'s); no sha256 when there is nothing to render. A view that cannot be rendered
    here (an image this machine's decoders refuse) raises ValueError."""
    layout = schema.Layout.from_attrs(attrs)
    views = pick(group, layout) if views is None else views
    if not views:
        return {"env": decoder_env(), "views": [], "sha256": None}
    shard = views[0][0] // layout.slots_per_shard
    first = shard * layout.slots_per_shard
    if any(slot // layout.slots_per_shard != shard or not 0 <= v < layout.views for slot, v in views):
        raise ValueError(f"the recorded fingerprint views {views[:2]}... are not views of one shard of this cache")
    positions = sorted({slot - first for slot, _ in views})
    rows = layout.rows(shard)  # only what rendering reads (a damaged logits chunk is verify's to report)
    block = {name: schema.read_array(group, name, rows)
             for name in schema.VIEW_PARAMS + (schema.MIX_ARRAYS if layout.paired else ())}
    images = shard_images(manifest.path(shard), set(positions), layout.paired)
    digest = hashlib.sha256()
    spec, size = schema.view_spec(attrs), schema.view_size(attrs)
    for slot, v in views:
        p = slot - first
        pixels = render_stored(stored_view(block, p, v, first, layout.slots_per_shard), images.get(p),
                               images.get, size, spec)
        digest.update(np.ascontiguousarray(pixels).tobytes())
    return {"env": decoder_env(), "views": [list(v) for v in views], "sha256": digest.hexdigest()}


def record(group, attrs: dict, manifest: Manifest) -> dict:
    """Stage 1, once every shard is committed: store this machine's fingerprint in the cache."""
    replay = fingerprint(group, attrs, manifest)
    schema.set_replay(group, replay)
    return replay


def mismatch(group, attrs: dict, manifest: Manifest) -> str | None:
    """None when this machine re-renders the recorded views bit for bit (or the cache predates
    the record); otherwise a one-line explanation naming both environments."""
    recorded = attrs.get("replay")
    if not recorded or not recorded["sha256"]:
        return None
    here = decoder_env()
    try:
        now = fingerprint(group, attrs, manifest, recorded["views"])["sha256"]
    except ValueError as e:
        now, why = None, f"this machine cannot rebuild the fingerprint views ({e})"
    if now == recorded["sha256"]:
        return None
    if now is not None:
        why = f"replayed pixels differ from the ones the teacher saw ({len(recorded['views'])} fingerprint views)"
    made = describe(recorded["env"])
    if recorded["env"] == here:
        return f"{why}, although this machine reports the same decoders ({made})"
    return f"{why}: the cache was made with {made}, this machine has {describe(here)}"


def refuse_mixed(envs: list[dict], what: str) -> None:
    """Ranks of one run must decode alike: a ValueError naming the first two that differ."""
    for rank, env in enumerate(envs):
        if env != envs[0]:
            raise ValueError(f"{what}: rank 0 has {describe(envs[0])}, rank {rank} has {describe(env)}; "
                             f"every rank must render views alike")


def replayed_views(group, attrs: dict, layout: schema.Layout, manifest, n: int, seed: int,
                   sizes: tuple[int, ...] | None = None):
    """Pixels of n seeded (slot, view) pairs replayed from the stored view parameters, each a
    tuple of (S, S, 3) uint8 renders, one per size of `sizes` (default: the teachers' sizes), and
    their stored top-1 classes (N,), and each view's ground truth (N,): the sample's label, or for a
    mixed view of a paired cache the label of the image with the larger weight. One shard's tar is
    read at a time (the audit, `usi inspect --members`)."""
    from usi_cache.checks.common import pick_views
    import torch
    spec = schema.view_spec(attrs)
    sizes = sizes or tuple(sorted({int(m["input_size"]) for m in schema.teacher_members(attrs)}))
    images, top1, truth = [], [], []
    for shard, (slots, views) in pick_views(group, layout, n, seed).items():
        block = schema.read_block(group, layout, shard)
        images_at = shard_images(manifest.path(shard), set(slots.tolist()), layout.paired, block.keys)
        for p, v in zip(slots.tolist(), views.tolist()):
            stored = stored_view(block, p, v, shard * layout.slots_per_shard, layout.slots_per_shard)
            try:
                images.append(tuple(render_stored(stored, images_at.get(p), images_at.get, size, spec)
                                    for size in sizes))
            except ValueError as e:
                raise schema.CacheError(f"{manifest.path(shard)} position {p} view {v}: {e}") from None
            top1.append(int(block.classes[p, v, 0]))
            mine = stored.pair is None or stored.pair.lam >= 0.5
            truth.append(int(block.labels[p if mine else stored.pair.partner]))
    return images, torch.tensor(top1), torch.tensor(truth)
