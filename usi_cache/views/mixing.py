"""Batch-mode Mixup/CutMix with an explicit generator (timm's semantics, replayable).

In batch mode every sample n is mixed with sample N-1-n (the flipped batch) using one lambda
for the whole batch, as timm's `Mixup(mode='batch')` does. With a cache, the targets are mixed
linearly too (`stage2/loss.py`'s `mix_targets`): an approximation, since the teacher's output on a mixed
image is not the mix of its outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class MixParams:
    kind: str  # "none", "mixup" or "cutmix"
    lam: float  # weight of the original sample (after cutmix's area correction)
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # cutmix (top, left, bottom, right), pixels


def sample_mix(rng: np.random.Generator, height: int, width: int, *, mixup: float, cutmix: float,
               prob: float, switch: float) -> MixParams:
    """Draw one batch's mixing (alphas of 0 switch a method off)."""
    if (mixup <= 0 and cutmix <= 0) or rng.random() >= prob:
        return MixParams("none", 1.0)
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < switch)
    if not use_cutmix:
        return MixParams("mixup", float(rng.beta(mixup, mixup)))
    lam = float(rng.beta(cutmix, cutmix))
    cut = np.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = int(np.clip(cy - ch // 2, 0, height)), int(np.clip(cy + ch // 2, 0, height))
    left, right = int(np.clip(cx - cw // 2, 0, width)), int(np.clip(cx + cw // 2, 0, width))
    lam = 1.0 - (bottom - top) * (right - left) / float(height * width)  # area actually pasted
    return MixParams("cutmix", lam, (top, left, bottom, right))


def apply_mix(x: torch.Tensor, mix: MixParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a batch x (N, C, H, W) with its flip; returns (mixed x, partner index per sample)."""
    perm = torch.arange(x.shape[0] - 1, -1, -1, device=x.device)
    if mix.kind == "mixup":
        return x * mix.lam + x.flip(0) * (1.0 - mix.lam), perm
    if mix.kind == "cutmix":
        top, left, bottom, right = mix.box
        out = x.clone()
        out[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
        return out, perm
    return x, perm


# ---------------------------------------------------------------------------------------------
# Paired mixing: the teacher sees the mixed image (exact), stored per (sample, view) in the cache.

NO_MIX, MIXUP, CUTMIX = 0, 1, 2  # values of the cache's mix_kind array


@dataclass(frozen=True)
class PairParams:
    """How one view is mixed with a partner from the same shard.

    `box` holds (top, left, bottom, right) as fractions of the view's side (float32), so the
    same box applies at the teacher's and the student's input size; `lam` (float32) is the
    weight of the sample itself, for cutmix corrected to the pasted area at the teacher's size.
    """

    partner: int  # position of the partner in the same shard; -1 = not mixed
    kind: int  # NO_MIX, MIXUP or CUTMIX
    lam: float
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)


def pair_rng(seed: int, key: str, view: int) -> np.random.Generator:
    """The generator of the pairing of view `view` of `key`: independent of the view's own draws."""
    from usi_cache.views.sampling import view_rng
    return view_rng(seed, key + "\x00pair", view)  # tar keys cannot hold NUL: no collision


def box_pixels(box: tuple[float, float, float, float], size: int) -> tuple[int, int, int, int]:
    """A fractional box in pixels of a size×size view."""
    return tuple(int(round(float(np.float32(f)) * size)) for f in box)


def sample_pair(rng: np.random.Generator, position: int, count: int, size: int, *, mixup: float,
                cutmix: float, prob: float, switch: float) -> PairParams:
    """Draw the partner (another position among `count` in the shard) and the mixing of one view.

    The recipe's probabilities apply per view (mixup alpha, cutmix alpha, prob, switch); the
    cutmix box is drawn in pixels of the teacher's `size` and stored as fractions.
    """
    if count < 2:
        return PairParams(-1, NO_MIX, 1.0)
    partner = int(rng.integers(count - 1))
    partner += partner >= position  # any position but the sample's own
    mix = sample_mix(rng, size, size, mixup=mixup, cutmix=cutmix, prob=prob, switch=switch)
    if mix.kind == "none":
        return PairParams(-1, NO_MIX, 1.0)
    if mix.kind == "mixup":
        return PairParams(partner, MIXUP, float(np.float32(mix.lam)))
    top, left, bottom, right = mix.box
    box = tuple(float(np.float32(v / size)) for v in (top, left, bottom, right))
    t, l, b, r = box_pixels(box, size)
    lam = float(np.float32(1.0 - (b - t) * (r - l) / float(size * size)))
    return PairParams(partner, CUTMIX, lam, box)


def mix_pixels(a: np.ndarray, b: np.ndarray, pair: PairParams) -> np.ndarray:
    """The mixed view: a, b uint8 (H, W, 3) replayed views of the sample and its partner.

    Mixup is computed in float32 and rounded to uint8, so stage 1 and stage 2 build
    bit-identical pixels; cutmix pastes b's box into a.
    """
    if pair.kind == MIXUP:
        lam = np.float32(pair.lam)
        out = lam * a.astype(np.float32) + (np.float32(1) - lam) * b.astype(np.float32)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if pair.kind == CUTMIX:
        top, left, bottom, right = box_pixels(pair.box, a.shape[0])
        out = a.copy()
        out[top:bottom, left:right] = b[top:bottom, left:right]
        return out
    return a


class PartnerImages:
    """Decoded images of one shard's samples by position, decoded on demand with a small LRU.

    A paired view needs its partner's pixels, and the partner may lie anywhere in the shard;
    holding the shard's *encoded* samples (bounded by the shard's size on disk) and at most
    `capacity` decoded images bounds a worker's memory without random access across shards.
    """

    def __init__(self, encoded: list[bytes], capacity: int = 32):
        from collections import OrderedDict
        self.encoded, self.capacity = encoded, capacity
        self.decoded: "OrderedDict[int, object]" = OrderedDict()

    def get(self, position: int):
        """The RGB PIL image at `position`, or None when it does not decode or is not in the shard."""
        from usi_cache.shards.images import decode_image
        if not 0 <= position < len(self.encoded):
            return None
        if position in self.decoded:
            self.decoded.move_to_end(position)
            return self.decoded[position]
        try:
            image = decode_image(self.encoded[position])
        except ValueError:
            image = None
        self.decoded[position] = image
        if len(self.decoded) > self.capacity:
            self.decoded.popitem(last=False)
        return image
