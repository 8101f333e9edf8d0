"""One way to build a view's pixels: from the decoded image(s) and the view's parameters.

Stage 1 renders the views it has just drawn; stage 2, `usi verify`, `usi inspect` and the audit
render the views a cache stores (`stored_view` reads them). All of them call `render`, so a
plain view and a paired (mixed) view are built by the same code everywhere:

    crop box -> resize to the stage's input size -> flip -> RandAugment ops as recorded
    (sampling.replay_array), then for a paired view the partner's view (same view index) rendered
    the same way and mixed in with the stored kind, lambda and box (mixing.mix_pixels).
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from usi_cache.config.stages import ViewSpec
from usi_cache.views.mixing import NO_MIX, PairParams, PartnerImages, mix_pixels
from usi_cache.shards.manifest import ShardError
from usi_cache.shards.tars import read_shard
from usi_cache.views.sampling import ViewParams, decode_view, replay_array


@dataclass(frozen=True)
class Partner:
    """The other image of a paired view and how it is mixed in."""

    image: Image.Image
    params: ViewParams  # the partner's own view (same view index)
    pair: PairParams


def render(image: Image.Image, params: ViewParams, size: int, spec: ViewSpec,
           partner: Partner | None = None) -> np.ndarray:
    """The view's pixels (size, size, 3) uint8; mixed with `partner` for a paired view."""
    pixels = replay_array(image, params, size, spec)
    if partner is None:
        return pixels
    return mix_pixels(pixels, replay_array(partner.image, partner.params, size, spec), partner.pair)


@dataclass(frozen=True)
class StoredView:
    """One (slot, view) as a cache stores it."""

    params: ViewParams
    pair: PairParams | None  # None: plain cache, or a paired cache's view drawn without a partner
    partner_params: ViewParams | None  # the partner's view, same view index

    @property
    def partner_position(self) -> int | None:
        """The partner's position in the shard (pair.partner), when the view is mixed."""
        return None if self.pair is None else self.pair.partner


def _array(arrays, name: str):
    """`arrays` is a schema.ShardBlock or a dict of arrays with the same names."""
    if isinstance(arrays, Mapping):
        return arrays.get(name)
    return getattr(arrays, name, None)


def _params(arrays, at: tuple) -> ViewParams:
    return decode_view(tuple(_array(arrays, "boxes")[at]), bool(_array(arrays, "flips")[at]),
                       _array(arrays, "aug_ops")[at], _array(arrays, "aug_levels")[at],
                       _array(arrays, "aug_resample")[at])


def stored_view(arrays, pos: int, view: int | None, first_slot: int, slots_per_shard: int) -> StoredView:
    """Read (position `pos`, `view`) of one shard's stored arrays.

    arrays: the shard's block, either with the view axis (then `view` picks it) or one view's
    block (`view` None). first_slot: the shard's first slot (mix_partner holds slots); a
    partner outside the shard is a ValueError."""
    at = (pos,) if view is None else (pos, view)
    params = _params(arrays, at)
    kinds = _array(arrays, "mix_kind")
    if kinds is None or int(kinds[at]) == NO_MIX:
        return StoredView(params, None, None)
    q = int(_array(arrays, "mix_partner")[at]) - first_slot
    if not 0 <= q < slots_per_shard:
        raise ValueError(f"stored partner slot {q + first_slot} is outside the shard (slots {first_slot}.."
                         f"{first_slot + slots_per_shard - 1})")
    pair = PairParams(q, int(kinds[at]), float(_array(arrays, "mix_lam")[at]),
                      tuple(float(x) for x in _array(arrays, "mix_box")[at]))
    return StoredView(params, pair, _params(arrays, (q,) if view is None else (q, view)))


def render_stored(view: StoredView, image: Image.Image, partner_image: Callable[[int], Image.Image | None],
                  size: int, spec: ViewSpec) -> np.ndarray:
    """The pixels the teacher saw for a stored view. partner_image(position) decodes the
    partner (None when it does not decode: a ValueError naming the position)."""
    if image is None:
        raise ValueError("the image does not decode")
    partner = None
    if view.pair is not None:
        other = partner_image(view.pair.partner)
        if other is None:
            raise ValueError(f"partner position {view.pair.partner} does not decode")
        partner = Partner(other, view.partner_params, view.pair)
    return render(image, view.params, size, spec, partner)


def shard_images(path: str, wanted: Collection[int], paired: bool, keys=None) -> PartnerImages:
    """The images of one shard by position, decoded on demand, to render its stored views: the
    encoded bytes of the `wanted` positions (of every position in a paired cache: a partner may
    lie anywhere in the shard). With `keys` (the cache's keys by position), a wanted position
    holding another sample is a ShardError."""
    last = max(wanted, default=-1)
    encoded = []
    for p, sample in enumerate(read_shard(path)):
        if keys is not None and p in wanted and sample.key != keys[p]:
            raise ShardError(f"{path}: position {p} holds {sample.key!r}, the cache has {keys[p]!r}")
        encoded.append(sample.data if paired or p in wanted else b"")
        if not paired and p >= last:
            break  # nothing further is rendered
    return PartnerImages(encoded)
