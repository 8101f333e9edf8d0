"""Batch-mode Mixup/CutMix with an explicit generator (timm's semantics, replayable).

In batch mode every sample n is mixed with sample N-1-n (the flipped batch) using one lambda
for the whole batch, as timm's `Mixup(mode='batch')` does. With a cache, the targets are mixed
linearly too (`targets.mix_targets`): an approximation, since the teacher's output on a mixed
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
