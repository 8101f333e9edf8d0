"""RandAugment with an explicit generator and a replayable record (timm semantics).

timm's `RandAugment` draws from Python's and NumPy's global RNGs and forgets what it drew, so
a view cannot be replayed. Here sampling (`sample_ops`, explicit `numpy.random.Generator`)
is separated from applying (`apply_op`, a pure function of image, op id, signed level,
resample filter and fill colour). The level -> argument formulas, the policy-string syntax and
its defaults follow `timm/data/auto_augment.py` (timm 1.0); `tests/test_views.py` checks the
pixels against timm's own op functions.

A *signed level* is the magnitude on timm's 0..10 scale (`_LEVEL_DENOM`), after the gaussian
noise and clipping, with the random sign that timm's level functions draw (`_randomly_negate`)
folded in. Ops without a sign store the non-negative magnitude; ops without an argument store
it too (ignored when applied) so the record shows what was drawn.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# The global op table. Its index is the op id stored in every cache (and the list itself goes
# into the cache attributes), so NEVER reorder or remove entries; only append.
OP_NAMES: tuple[str, ...] = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "PosterizeIncreasing",
    "Solarize",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "Color",
    "ColorIncreasing",
    "Contrast",
    "ContrastIncreasing",
    "Brightness",
    "BrightnessIncreasing",
    "Sharpness",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
OP_IDS: dict[str, int] = {name: i for i, name in enumerate(OP_NAMES)}

# timm's op sets, in timm's order (the order decides which op an index draw picks).
RAND_TRANSFORMS: tuple[int, ...] = tuple(OP_IDS[n] for n in (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel"))
RAND_INCREASING_TRANSFORMS: tuple[int, ...] = tuple(OP_IDS[n] for n in (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"))

# Ops whose timm level function calls `_randomly_negate`.
SIGNED_OPS: frozenset[int] = frozenset(OP_IDS[n] for n in (
    "Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"))
# Ops that resample pixels (use the resample filter and the fill colour).
GEOMETRIC_OPS: frozenset[int] = frozenset(OP_IDS[n] for n in (
    "Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"))

_LEVEL_DENOM = 10.0  # timm: magnitude M maps to the fraction M / 10 of each op's range
_TRANSLATE_PCT = 0.45  # timm's default `translate_pct` for TranslateXRel/YRel
# PIL's rotate/transform accept only these three filters.
AFFINE_FILTERS = (Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class AugOp:
    """One RandAugment op as applied.

    op: index into OP_NAMES; level: signed level on the 0..10 scale, exactly representable in
    float16; resample: PIL filter int used by geometric ops (0 for the others).
    """

    op: int
    level: float
    resample: int


@dataclass(frozen=True)
class RandAugmentPolicy:
    """A parsed timm RandAugment policy string (`num_ops == 0`: no RandAugment)."""

    policy: str  # the string it was parsed from
    magnitude: int = 10  # M: mean magnitude on the 0..10 scale
    num_ops: int = 2  # N: ops drawn per image (uniformly, with replacement, as timm does)
    prob: float = 0.5  # P: probability that each drawn op is applied
    magnitude_std: float = 0.0  # gaussian noise on M; inf = uniform in [0, M]
    magnitude_max: float = _LEVEL_DENOM  # clip the magnitude to [0, mmax]
    increasing: bool = False  # use timm's "increasing severity" op set

    @property
    def ops(self) -> tuple[int, ...]:
        """Op ids this policy draws from, in timm's order."""
        return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


# Value parsers per policy key; timm parses m, n and mmax as ints.
_POLICY_KEYS = {"m": int, "n": int, "p": float, "mstd": float, "mmax": int, "inc": int}


@functools.lru_cache(maxsize=64)  # parsed once per spec, not once per view; the result is frozen
def parse_policy(policy: str) -> RandAugmentPolicy:
    """Parse `rand-m{M}-n{N}-mstd{S}-mmax{X}-p{P}-inc{0|1}` (any order, all optional).

    Defaults are timm's: M=10, N=2, mstd=0, mmax=10, P=0.5, inc=0; mstd > 100 means uniform
    magnitudes (timm). "" disables RandAugment. Anything timm would ignore or assert on, and
    op-set/weight sections (`t...`, `w...`), raise ValueError naming the string and the part.
    """
    if policy == "":
        return RandAugmentPolicy(policy="", num_ops=0)
    sections = policy.split("-")
    if sections[0] != "rand":
        raise ValueError(f"RandAugment policy {policy!r}: must start with 'rand', got {sections[0]!r}")
    values: dict = {}
    for part in sections[1:]:
        def bad(why: str) -> ValueError:
            return ValueError(f"RandAugment policy {policy!r}: bad part {part!r}: {why}")

        if part[:1] in ("t", "w"):
            raise bad("op sets and weighted op choice are not supported (uniform choice only)")
        # timm splits each part at its first digit: key = letters before it, value = the rest.
        match = re.fullmatch(r"([a-z]+)(\d.*)", part)
        if match is None:
            raise bad("expected a key followed by a number, e.g. m9, n2, mstd0.5, mmax10, p0.5, inc1")
        key, text = match.groups()
        if key in values:
            raise bad(f"{key!r} given twice")
        if key not in _POLICY_KEYS:
            raise bad(f"unknown key {key!r} (known: {', '.join(_POLICY_KEYS)})")
        try:
            value = _POLICY_KEYS[key](text)
        except ValueError:
            raise bad(f"{text!r} is not a valid {_POLICY_KEYS[key].__name__} for {key!r}") from None
        if key == "p" and not 0.0 <= value <= 1.0:
            raise bad("probability must be in [0, 1]")
        if key == "mstd" and value > 100:
            value = math.inf  # timm: mstd > 100 means uniform magnitudes in [0, M]
        if key == "mmax" and value < 1:
            # timm's `magnitude_max or 10` would silently turn mmax0 into 10: refuse instead.
            raise bad("mmax must be >= 1")
        if key == "inc" and value not in (0, 1):
            raise bad("inc must be 0 or 1")
        values[key] = value
    return RandAugmentPolicy(
        policy=policy,
        magnitude=values.get("m", 10),
        num_ops=values.get("n", 2),
        prob=values.get("p", 0.5),
        magnitude_std=values.get("mstd", 0.0),
        magnitude_max=float(values.get("mmax", _LEVEL_DENOM)),
        increasing=bool(values.get("inc", 0)),
    )


def sample_ops(rng: np.random.Generator, policy: RandAugmentPolicy, resample: int) -> tuple[AugOp, ...]:
    """Draw one image's RandAugment ops; returns only the applied ones, in application order.

    `resample` is the PIL filter recorded for geometric ops (timm draws bilinear/bicubic at
    random when its interpolation is 'random'; here the caller fixes it and it is recorded).
    Levels are quantised to float16 here, so the cached float16 level is exactly what is applied.
    """
    if policy.num_ops == 0:
        return ()
    if resample not in AFFINE_FILTERS:
        raise ValueError(f"resample filter {resample} is not supported by PIL's affine ops")
    choices = policy.ops
    # timm: np.random.choice(ops, N, replace=True) when no choice weights are given.
    picks = rng.integers(0, len(choices), size=policy.num_ops)
    out = []
    for pick in picks:
        op = choices[int(pick)]
        # timm: `if prob < 1.0 and random() > prob: skip` (no draw at all when prob == 1).
        if policy.prob < 1.0 and not rng.random() < policy.prob:
            continue
        magnitude = float(policy.magnitude)
        if policy.magnitude_std == math.inf:
            magnitude = float(rng.uniform(0.0, magnitude))
        elif policy.magnitude_std > 0:
            magnitude = float(rng.normal(magnitude, policy.magnitude_std))
        magnitude = max(0.0, min(magnitude, policy.magnitude_max))
        if op in SIGNED_OPS and rng.random() < 0.5:  # timm's _randomly_negate, folded into the level
            magnitude = -magnitude
        level = float(np.float16(magnitude)) + 0.0  # + 0.0 turns -0.0 into 0.0
        out.append(AugOp(op=op, level=level, resample=int(resample) if op in GEOMETRIC_OPS else 0))
    return tuple(out)


# ---- applying: timm's level -> argument formulas, written in timm's operation order so the
# float arguments (and hence the pixels) are identical to timm's for the same level and sign.

def _posterize(img: Image.Image, bits: int) -> Image.Image:
    if bits >= 8:
        return img.copy()
    if bits <= 0:
        # Pillow >= 13 rejects 0 bits, which timm's increasing posterize asks for at level 10
        # (and mmax > 10 can go below 0). Keeping 0 bits masks every channel value to 0: black.
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits)


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _solarize_threshold(level: float) -> int:
    return min(256, int((level / _LEVEL_DENOM) * 256))


def _enhance_factor(level: float) -> float:  # range [0.1, 1.9]
    return (level / _LEVEL_DENOM) * 1.8 + 0.1


def _enhance_increasing_factor(level: float) -> float:  # 1 +- 0.9 * level / 10, kept >= 0.1
    return max(0.1, 1.0 + (level / _LEVEL_DENOM) * 0.9)


def _affine(img: Image.Image, matrix: tuple, resample: int, fill: tuple) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def _translate_pixels(level: float, extent: int) -> float:
    return ((level / _LEVEL_DENOM) * _TRANSLATE_PCT) * extent


_APPLY = {
    "AutoContrast": lambda img, lv, rs, fill: ImageOps.autocontrast(img),
    "Equalize": lambda img, lv, rs, fill: ImageOps.equalize(img),
    "Invert": lambda img, lv, rs, fill: ImageOps.invert(img),
    "Rotate": lambda img, lv, rs, fill: img.rotate((lv / _LEVEL_DENOM) * 30.0, resample=rs, fillcolor=fill),
    "Posterize": lambda img, lv, rs, fill: _posterize(img, int((lv / _LEVEL_DENOM) * 4)),
    "PosterizeIncreasing": lambda img, lv, rs, fill: _posterize(img, 4 - int((lv / _LEVEL_DENOM) * 4)),
    "Solarize": lambda img, lv, rs, fill: ImageOps.solarize(img, _solarize_threshold(lv)),
    "SolarizeIncreasing": lambda img, lv, rs, fill: ImageOps.solarize(img, 256 - _solarize_threshold(lv)),
    "SolarizeAdd": lambda img, lv, rs, fill: _solarize_add(img, min(128, int((lv / _LEVEL_DENOM) * 110))),
    "Color": lambda img, lv, rs, fill: ImageEnhance.Color(img).enhance(_enhance_factor(lv)),
    "ColorIncreasing":
        lambda img, lv, rs, fill: ImageEnhance.Color(img).enhance(_enhance_increasing_factor(lv)),
    "Contrast": lambda img, lv, rs, fill: ImageEnhance.Contrast(img).enhance(_enhance_factor(lv)),
    "ContrastIncreasing":
        lambda img, lv, rs, fill: ImageEnhance.Contrast(img).enhance(_enhance_increasing_factor(lv)),
    "Brightness": lambda img, lv, rs, fill: ImageEnhance.Brightness(img).enhance(_enhance_factor(lv)),
    "BrightnessIncreasing":
        lambda img, lv, rs, fill: ImageEnhance.Brightness(img).enhance(_enhance_increasing_factor(lv)),
    "Sharpness": lambda img, lv, rs, fill: ImageEnhance.Sharpness(img).enhance(_enhance_factor(lv)),
    "SharpnessIncreasing":
        lambda img, lv, rs, fill: ImageEnhance.Sharpness(img).enhance(_enhance_increasing_factor(lv)),
    "ShearX": lambda img, lv, rs, fill: _affine(img, (1, (lv / _LEVEL_DENOM) * 0.3, 0, 0, 1, 0), rs, fill),
    "ShearY": lambda img, lv, rs, fill: _affine(img, (1, 0, 0, (lv / _LEVEL_DENOM) * 0.3, 1, 0), rs, fill),
    "TranslateXRel":
        lambda img, lv, rs, fill: _affine(img, (1, 0, _translate_pixels(lv, img.size[0]), 0, 1, 0), rs, fill),
    "TranslateYRel":
        lambda img, lv, rs, fill: _affine(img, (1, 0, 0, 0, 1, _translate_pixels(lv, img.size[1])), rs,
                                          fill),
}
assert tuple(_APPLY) == OP_NAMES, "every op in OP_NAMES needs exactly one apply function"
_APPLY_BY_ID = tuple(_APPLY.values())


def apply_op(img: Image.Image, op: int, level: float, resample: int, fill: tuple[int, ...]) -> Image.Image:
    """Apply op `op` (index into OP_NAMES) at signed `level` (0..10 scale); returns a new image.

    Pure: depends on nothing but its arguments. `resample` (PIL filter int) and `fill` (one value
    per band) are used by geometric ops only.
    """
    if not 0 <= op < len(OP_NAMES):
        raise ValueError(f"unknown RandAugment op id {op} (table has {len(OP_NAMES)} ops)")
    return _APPLY_BY_ID[op](img, float(level), int(resample), tuple(fill))
