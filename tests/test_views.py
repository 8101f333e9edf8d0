"""View sampling, replay and RandAugment: determinism, bounds, encoding, and timm parity."""
from __future__ import annotations

import math
import multiprocessing as mp
import random

import numpy as np
import pytest
from PIL import Image

from usi_cache.config.stages import ViewSpec
from usi_cache.views.randaugment import (GEOMETRIC_OPS, OP_IDS, OP_NAMES, RAND_INCREASING_TRANSFORMS, SIGNED_OPS,
                                         apply_op, parse_policy)
from usi_cache.views.randaugment import AugOp
from usi_cache.views.sampling import (ViewParams, decode_view, encode_ops, op_slots, replay_array, replay_view,
                                      sample_view, view_rng)

SPEC = ViewSpec()  # USI defaults: rand-m7-mstd0.5-inc1, bicubic


def _image(h: int = 48, w: int = 64, seed: int = 0) -> Image.Image:
    """A smooth RGB test image with structure (gradients + noise), so every op has work to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % 256], axis=-1)
    noisy = base * 0.8 + rng.integers(0, 50, size=(h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def _params(seed: int, key: str, view: int, h: int = 300, w: int = 400, spec: ViewSpec = SPEC) -> ViewParams:
    return sample_view(view_rng(seed, key, view), h, w, spec)


# ---- the op table is part of the cache format

def test_op_table_is_frozen():
    assert OP_NAMES == (
        "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "PosterizeIncreasing", "Solarize",
        "SolarizeIncreasing", "SolarizeAdd", "Color", "ColorIncreasing", "Contrast", "ContrastIncreasing",
        "Brightness", "BrightnessIncreasing", "Sharpness", "SharpnessIncreasing", "ShearX", "ShearY",
        "TranslateXRel", "TranslateYRel",
    )


# ---- seeding

def test_same_triple_same_params():
    for view in range(20):
        assert _params(42, "n01440764_10026", view) == _params(42, "n01440764_10026", view)


def test_different_triple_different_params():
    base = [_params(42, f"key{i}", v) for i in range(10) for v in range(5)]
    assert len(set(base)) == len(base)  # all distinct across keys and view indices
    other_seed = [_params(43, f"key{i}", v) for i in range(10) for v in range(5)]
    assert sum(a != b for a, b in zip(base, other_seed)) == len(base)
    # The encoding is unambiguous: ("a1", 2) vs ("a", 12) and seed/key boundaries differ.
    triples = [(1, "a1", 2), (1, "a", 12), (11, "a", 2), (1, "1a", 2)]
    draws = {view_rng(s, k, v).random() for s, k, v in triples}
    assert len(draws) == 4


def test_independent_of_call_order():
    pairs = [(f"k{i}", v) for i in range(20) for v in range(4)]
    forward = {p: _params(7, *p) for p in pairs}
    shuffled = list(pairs)
    random.Random(0).shuffle(shuffled)
    assert {p: _params(7, *p) for p in shuffled} == forward


# ---- crop box

def _fallback_box(height: int, width: int, ratio) -> tuple[int, int, int, int]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height,width",
                         [(28, 28), (224, 224), (375, 500), (500, 375), (7, 300), (300, 7), (1, 1)])
def test_box_inside_image_and_within_spec(height, width):
    spec = ViewSpec(randaugment="")
    lo_s, hi_s = spec.scale
    lo_r, hi_r = spec.ratio
    for view in range(300):
        top, left, h, w = sample_view(view_rng(0, f"{height}x{width}", view), height, width, spec).box
        assert 0 <= top and 0 <= left and h >= 1 and w >= 1
        assert top + h <= height and left + w <= width
        if (top, left, h, w) == _fallback_box(height, width, spec.ratio):
            continue
        # w = round(sqrt(A r)), h = round(sqrt(A / r)) with A/area in scale, r in ratio: allow the
        # rounding of +-0.5 pixel on each side.
        area = height * width
        assert (w - 0.5) * (h - 0.5) <= hi_s * area * (1 + 1e-9)
        assert (w + 0.5) * (h + 0.5) >= lo_s * area * (1 - 1e-9)
        assert (w - 0.5) / (h + 0.5) <= hi_r * (1 + 1e-9)
        assert (w + 0.5) / (h - 0.5) >= lo_r * (1 - 1e-9)


@pytest.mark.parametrize("height,width", [(10, 1000), (1000, 10)])
def test_box_fallback_matches_torchvision(height, width):
    # With these extreme shapes no attempt fits, so both algorithms must take the same centre crop.
    from torchvision.transforms import RandomResizedCrop

    spec = ViewSpec(scale=(0.9, 1.0), randaugment="")
    ours = sample_view(view_rng(0, "x", 0), height, width, spec).box
    blank = Image.new("RGB", (width, height))
    theirs = RandomResizedCrop.get_params(blank, list(spec.scale), list(spec.ratio))
    assert ours == tuple(theirs) == _fallback_box(height, width, spec.ratio)


# ---- cache encoding

def test_encode_decode_round_trip():
    n = op_slots(SPEC)
    assert n == 2
    seen_ops = 0
    for view in range(500):
        params = _params(1, f"s{view % 37}", view, h=28 + view, w=28 + 2 * view)
        op_ids, levels, resamples = encode_ops(params, n)
        assert (op_ids.dtype, levels.dtype, resamples.dtype) == (np.int8, np.float16, np.uint8)
        assert op_ids.shape == levels.shape == resamples.shape == (n,)
        unused = slice(len(params.ops), n)
        assert (op_ids[unused] == -1).all() and (levels[unused] == 0).all() and (resamples[unused] == 0).all()
        box = np.asarray(params.box, dtype=np.int32)
        assert decode_view(box, np.uint8(params.flip), op_ids, levels, resamples) == params
        seen_ops += len(params.ops)
    assert seen_ops > 300


def test_encode_rejects_bad_input():
    params = ViewParams(box=(0, 0, 1, 1), flip=False, ops=(AugOp(3, 7.0, 3), AugOp(2, 7.0, 0)))
    with pytest.raises(ValueError, match="slots"):
        encode_ops(params, 1)
    with pytest.raises(ValueError, match="float16"):
        encode_ops(ViewParams(box=(0, 0, 1, 1), flip=False, ops=(AugOp(3, 0.1, 3),)), 2)
    with pytest.raises(ValueError, match="op ids"):
        decode_view((0, 0, 1, 1), 0, np.array([-1, 3], np.int8), np.zeros(2, np.float16),
                    np.zeros(2, np.uint8))
    assert op_slots(ViewSpec(randaugment="")) == 0
    assert op_slots(ViewSpec(randaugment="rand-m9-n3")) == 3


# ---- replay

def test_replay_is_deterministic():
    image = _image(120, 160)
    for view in range(30):
        params = _params(5, "img", view, 120, 160)
        a, b = replay_array(image, params, 64, SPEC), replay_array(image, params, 64, SPEC)
        assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
        assert a.tobytes() == b.tobytes()


def test_replay_in_spawned_process_is_bit_identical():
    image = _image(120, 160)
    jobs = [(image, _params(5, "img", view, 120, 160), 48, SPEC) for view in range(12)]
    assert any(job[1].ops for job in jobs)
    local = [replay_array(*job).tobytes() for job in jobs]
    with mp.get_context("spawn").Pool(1) as pool:
        remote = [a.tobytes() for a in pool.starmap(replay_array, jobs)]
    assert remote == local


def test_replay_crop_resize_flip_matches_torchvision():
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode

    image = _image(90, 70)
    spec = ViewSpec(randaugment="")
    for view in range(10):
        params = _params(3, "tv", view, 90, 70, spec)
        expected = F.resized_crop(image, *params.box, [32, 32], InterpolationMode.BICUBIC)
        if params.flip:
            expected = F.hflip(expected)
        assert replay_array(image, params, 32, spec).tobytes() == np.asarray(expected).tobytes()


def test_replay_rejects_box_outside_image():
    with pytest.raises(ValueError, match="outside"):
        replay_view(_image(20, 20), ViewParams(box=(10, 0, 11, 5), flip=False, ops=()), 8, SPEC)


def test_replay_converts_grayscale():
    gray = _image(40, 40).convert("L")
    out = replay_view(gray, _params(0, "g", 0, 40, 40), 16, SPEC)
    assert out.mode == "RGB" and out.size == (16, 16)


def test_non_affine_filter_records_bicubic_for_geometric_ops():
    spec = ViewSpec(interpolation="lanczos", randaugment="rand-m7-n4-p1.0-inc1")
    ops = [op for v in range(50) for op in _params(0, "l", v, spec=spec).ops]
    resamples = {op.resample for op in ops if op.op in GEOMETRIC_OPS}
    assert resamples == {int(Image.Resampling.BICUBIC)}


# ---- RandAugment ops

@pytest.mark.parametrize("name", OP_NAMES)
def test_every_op_applies_at_all_levels(name):
    image = _image()
    op = OP_IDS[name]
    for level in (0.0, 5.0, -5.0, 10.0, -10.0, 15.0):
        out = apply_op(image, op, level, int(Image.Resampling.BICUBIC), (0, 0, 0))
        assert out.mode == "RGB" and out.size == image.size
    for level in ((8.0, -8.0) if op in SIGNED_OPS else (8.0,)):  # only signed ops see negative levels
        out = np.asarray(apply_op(image, op, level, int(Image.Resampling.BICUBIC), (0, 0, 0)))
        assert not np.array_equal(out, np.asarray(image)), (name, level)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        # timm's non-increasing enhance: factor = level / 10 * 1.8 + 0.1, so level 5 is the identity.
        assert np.array_equal(np.asarray(apply_op(image, op, 5.0, 0, (0, 0, 0))), np.asarray(image))


def test_op_special_cases():
    image = _image()
    arr = np.asarray(image)
    assert np.array_equal(np.asarray(apply_op(image, OP_IDS["Invert"], 0.0, 0, (0, 0, 0))), 255 - arr)
    # 0 bits kept (Posterize at level 0, PosterizeIncreasing at level 10) -> black; Pillow 13 refuses 0.
    for name, level in (("Posterize", 0.0), ("PosterizeIncreasing", 10.0), ("PosterizeIncreasing", 15.0)):
        out = apply_op(image, OP_IDS[name], level, 0, (0, 0, 0))
        assert out.mode == "RGB" and not np.asarray(out).any()
    # Level 0 of a geometric op is the identity.
    assert np.array_equal(np.asarray(apply_op(image, OP_IDS["Rotate"], 0.0, 3, (0, 0, 0))), arr)
    # The fill colour reaches rotated corners.
    corner = np.asarray(apply_op(image, OP_IDS["Rotate"], 10.0, 3, (10, 20, 30)))[0, 0]
    assert tuple(corner) == (10, 20, 30)
    with pytest.raises(ValueError, match="op id"):
        apply_op(image, len(OP_NAMES), 0.0, 0, (0, 0, 0))


@pytest.mark.parametrize("name", OP_NAMES)
def test_ops_match_timm(name, monkeypatch):
    """Our op at a signed level == timm's AugmentOp at that magnitude with the sign forced."""
    aa = pytest.importorskip("timm.data.auto_augment")
    image = _image(40, 56)
    fill = (0, 0, 0)
    hparams = dict(translate_const=100, img_mean=fill, interpolation=Image.Resampling.BICUBIC)
    for magnitude in (2.5, 5.0, 7.0, 9.5):
        for negate in ((False, True) if OP_IDS[name] in SIGNED_OPS else (False,)):
            if name == "PosterizeIncreasing" and 4 - int(magnitude / 10 * 4) < 1:
                continue  # timm would call Pillow with 0 bits, which Pillow 13 refuses
            if name == "Posterize" and int(magnitude / 10 * 4) < 1:
                continue
            # timm's _randomly_negate: `-v if random.random() > 0.5 else v`.
            monkeypatch.setattr(aa.random, "random", lambda: 0.75 if negate else 0.25)
            timm_op = aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
            expected = np.asarray(timm_op(image))
            level = -magnitude if negate else magnitude
            ours = np.asarray(apply_op(image, OP_IDS[name], level, int(Image.Resampling.BICUBIC), fill))
            assert np.array_equal(ours, expected), (name, level)


# ---- sampling statistics against the policy

def test_sampling_statistics_match_policy():
    n_views = 2000
    counts, levels, signs, flips, op_hist = [], [], [], 0, {}
    for view in range(n_views):
        params = _params(42, "stats", view, 32, 32)
        counts.append(len(params.ops))
        flips += params.flip
        for op in params.ops:
            assert op.op in RAND_INCREASING_TRANSFORMS  # inc1 -> increasing op set only
            assert float(np.float16(op.level)) == op.level
            assert 0 <= abs(op.level) <= 10
            levels.append(abs(op.level))
            op_hist[op.op] = op_hist.get(op.op, 0) + 1
            if op.op in SIGNED_OPS:
                signs.append(op.level < 0)
            else:
                assert op.level >= 0
            assert op.resample == (int(Image.Resampling.BICUBIC) if op.op in GEOMETRIC_OPS else 0)
    assert abs(np.mean(counts) - 1.0) < 0.08  # 2 ops x p 0.5
    assert max(counts) == 2
    assert abs(np.mean(levels) - 7.0) < 0.1 and 0.4 < np.std(levels) < 0.6  # gauss(7, 0.5)
    assert abs(np.mean(signs) - 0.5) < 0.06
    assert abs(flips / n_views - 0.5) < 0.05
    assert len(op_hist) == len(RAND_INCREASING_TRANSFORMS)  # every op of the set gets drawn


def test_uniform_and_fixed_magnitudes():
    uniform = ViewSpec(randaugment="rand-m9-mstd101-p1.0")
    levels = [abs(op.level) for v in range(300) for op in _params(0, "u", v, 32, 32, uniform).ops]
    assert min(levels) < 1.5 and max(levels) > 7.5 and max(levels) <= 9
    fixed = ViewSpec(randaugment="rand-m15-p1.0")  # clipped to 10 without mmax
    assert {abs(op.level) for v in range(50) for op in _params(0, "f", v, 32, 32, fixed).ops} == {10.0}
    wide = ViewSpec(randaugment="rand-m15-mmax20-p1.0")
    assert {abs(op.level) for v in range(50) for op in _params(0, "f", v, 32, 32, wide).ops} == {15.0}


# ---- policy parsing

def test_parse_policy_defaults_and_explicit():
    p = parse_policy("rand")
    fields = (p.magnitude, p.num_ops, p.prob, p.magnitude_std, p.magnitude_max, p.increasing)
    assert fields == (10, 2, 0.5, 0.0, 10.0, False)
    p = parse_policy("rand-m7-mstd0.5-inc1")
    assert (p.magnitude, p.num_ops, p.magnitude_std, p.increasing) == (7, 2, 0.5, True)
    assert p.ops == RAND_INCREASING_TRANSFORMS
    p = parse_policy("rand-n3-p0.7-mmax15-m9-mstd101")
    assert (p.magnitude, p.num_ops, p.prob, p.magnitude_max, p.magnitude_std) == (9, 3, 0.7, 15.0, math.inf)
    assert parse_policy("").num_ops == 0


@pytest.mark.parametrize("bad", [
    "foo-m7", "rand-m7-x3", "rand-mfoo", "rand-m7.5", "rand-tweights", "rand-w0", "rand-m7-m8",
    "rand-p1.5", "rand-inc2", "rand--m7", "rand-m7-", "rand-mmax0", "Rand-m7", "rand-mstdx",
])
def test_parse_policy_rejects_bad_strings(bad):
    with pytest.raises(ValueError) as info:
        parse_policy(bad)
    assert repr(bad) in str(info.value)
