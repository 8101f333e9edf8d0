"""Seeded view sampling and exact replay: crop box, flip and RandAugment ops.

A view is a pure function of (seed, sample key, view index): `view_rng` seeds a generator from
a stable hash of that triple, `sample_view` draws the parameters from it, and `replay_view`
turns (decoded image, parameters) into pixels with no randomness at all. Stage 1 stores the
parameters in the cache (`encode_ops`); stage 2 decodes them (`decode_view`) and replays, so
both stages see bit-identical pixels whatever process, worker or rank does the work.
"""
from __future__ import annotations

import hashlib
import math
import operator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from usi_cache.config.stages import ViewSpec
from usi_cache.views.randaugment import AFFINE_FILTERS, OP_NAMES, AugOp, apply_op, parse_policy, sample_ops

__all__ = [
    "ViewParams", "view_rng", "sample_view", "replay_view", "replay_array", "op_slots", "encode_ops", "decode_view",
    "pil_filter",
]

_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# Domain tag of the view hash: changing the encoding below must change this tag.
_RNG_DOMAIN = b"usi_cache.view_rng.v1"


@dataclass(frozen=True)
class ViewParams:
    """Everything needed to replay one view.

    box: crop (top, left, height, width) in decoded-image pixels; flip: horizontal flip after
    the resize; ops: the RandAugment ops actually applied, in application order.
    """

    box: tuple[int, int, int, int]
    flip: bool
    ops: tuple[AugOp, ...]


def pil_filter(name: str) -> int:
    """PIL resampling filter int for a ViewSpec interpolation name."""
    try:
        return int(_FILTERS[name])
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r} (known: {', '.join(_FILTERS)})") from None


def view_rng(seed: int, key: str, view: int) -> np.random.Generator:
    """The generator of view `view` of sample `key` under `seed`.

    Seeded from blake2b of a length-prefixed encoding of the triple (so ("a1", 2) and ("a", 12)
    cannot collide), never from Python's hash() (salted per process) or worker/rank state.
    PCG64 is named explicitly because default_rng's bit generator may change between releases.
    """
    seed, view = operator.index(seed), operator.index(view)
    if not isinstance(key, str):
        raise TypeError(f"view_rng: key must be a str, got {type(key).__name__}")
    if view < 0:
        raise ValueError(f"view_rng: view index must be >= 0, got {view}")
    h = hashlib.blake2b(_RNG_DOMAIN, digest_size=32)
    for part in (str(seed).encode(), key.encode("utf-8"), str(view).encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return np.random.Generator(np.random.PCG64(int.from_bytes(h.digest(), "little")))


def _sample_box(rng: np.random.Generator, height: int, width: int,
                scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from `rng`; returns (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback to a central crop clamped to the ratio range (torchvision's exact rule).
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_view(rng: np.random.Generator, height: int, width: int, spec: ViewSpec) -> ViewParams:
    """Draw one view of a `height` x `width` image: crop box, flip, RandAugment ops. Pure.

    Draw order: box, flip, then ops. Geometric ops record spec.interpolation as their filter;
    PIL's affine ops only support nearest/bilinear/bicubic, so other filters record bicubic.
    """
    if height < 1 or width < 1:
        raise ValueError(f"sample_view: image size must be positive, got {height}x{width}")
    box = _sample_box(rng, height, width, spec.scale, spec.ratio)
    flip = bool(rng.random() < spec.hflip)
    resample = pil_filter(spec.interpolation)
    if resample not in AFFINE_FILTERS:
        resample = int(Image.Resampling.BICUBIC)
    ops = sample_ops(rng, parse_policy(spec.randaugment), resample)
    return ViewParams(box=box, flip=flip, ops=ops)


def replay_view(image: Image.Image, params: ViewParams, size: int, spec: ViewSpec) -> Image.Image:
    """Replay a view: crop box -> resize to (size, size) -> flip -> RandAugment ops as recorded.

    `image` is the decoded image the box refers to (non-RGB is converted with convert("RGB"),
    the same in every stage). Returns an RGB image of size x size; deterministic, no RNG.
    The crop + resize is torchvision's F.resized_crop on PIL (crop, then Image.resize).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    top, left, h, w = params.box
    if not (top >= 0 and left >= 0 and h > 0 and w > 0 and top + h <= image.height
            and left + w <= image.width):
        raise ValueError(f"replay_view: box {params.box} (top, left, h, w) is outside the "
                         f"{image.height}x{image.width} image; wrong image for these parameters?")
    img = image.crop((left, top, left + w, top + h)).resize((size, size), pil_filter(spec.interpolation))
    if params.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for op in params.ops:
        img = apply_op(img, op.op, op.level, op.resample, spec.fill)
    return img


def replay_array(image: Image.Image, params: ViewParams, size: int, spec: ViewSpec) -> np.ndarray:
    """replay_view as a (size, size, 3) uint8 array (HWC, RGB)."""
    return np.array(replay_view(image, params, size, spec), dtype=np.uint8)  # writable: torch wraps it


def op_slots(spec: ViewSpec) -> int:
    """n: RandAugment op slots per view in the cache (the policy's N; 0 without RandAugment)."""
    return parse_policy(spec.randaugment).num_ops


def encode_ops(params: ViewParams, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pack the applied ops into n slots: (op ids int8 (n,), levels float16 (n,), resample uint8 (n,)).

    Unused slots hold op id -1, level 0 and resample 0. Levels must already be float16 values
    (sample_view quantises them), so that decode_view gives back exactly the same ViewParams.
    """
    if len(params.ops) > n:
        raise ValueError(f"encode_ops: {len(params.ops)} ops do not fit in {n} slots")
    op_ids = np.full(n, -1, dtype=np.int8)
    levels = np.zeros(n, dtype=np.float16)
    resamples = np.zeros(n, dtype=np.uint8)
    for i, op in enumerate(params.ops):
        if float(np.float16(op.level)) != op.level:
            raise ValueError(f"encode_ops: level {op.level!r} of op {OP_NAMES[op.op]} is not a float16 value")
        op_ids[i], levels[i], resamples[i] = op.op, op.level, op.resample
    return op_ids, levels, resamples


def decode_view(box, flip, op_ids, levels, resamples) -> ViewParams:
    """Inverse of (box, flip, encode_ops): cache row values -> ViewParams.

    box: 4 ints (top, left, height, width); flip: bool-like; op_ids/levels/resamples: the (n,)
    arrays of encode_ops. Used slots must come first; unknown op ids raise ValueError.
    """
    box = tuple(int(v) for v in np.asarray(box).reshape(-1))
    if len(box) != 4:
        raise ValueError(f"decode_view: box must have 4 values (top, left, height, width), got {box}")
    ops = []
    ended = False
    for op, level, resample in zip(np.asarray(op_ids).tolist(), np.asarray(levels, dtype=np.float16).tolist(),
                                   np.asarray(resamples).tolist()):
        if op == -1:
            ended = True
            continue
        if ended or not 0 <= op < len(OP_NAMES):
            raise ValueError(f"decode_view: bad op ids {np.asarray(op_ids).tolist()} (used slots first, "
                             f"ids in [0, {len(OP_NAMES)}), -1 = unused)")
        ops.append(AugOp(op=int(op), level=float(level) + 0.0, resample=int(resample)))
    return ViewParams(box=box, flip=bool(flip), ops=tuple(ops))
