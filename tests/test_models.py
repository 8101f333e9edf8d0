"""Teacher loading: USI/TResNet checkpoints, checkpoint containers, errors, normalisation."""
import hashlib
import os
import re

import pytest
import timm
import torch

from usi_cache.models.teacher import Teacher, load_teacher
from usi_cache.models.errors import TeacherError
from usi_cache.models.build import build_model, resolve_model_name
from usi_cache.models.checkpoints import read_state_dict, sha256_file
from usi_cache.models.precision import resolve_precision

SMALL = "test_resnet"  # timm's 0.4 M-parameter test model: builds in ~30 ms


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x)


def randomise_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics and affine terms, so that a wrongly loaded
    (or sign-flipped) entry changes the outputs. Scales stay >= 0.5, away from InplaceABN's eps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


# --- TResNet: the official USI teacher file layout ---------------------------------------------

def to_original_tresnet(model: torch.nn.Module, seed: int = 1) -> dict:
    """Inverse of timm.models.tresnet.checkpoint_filter_fn: timm `tresnet_v2_l` state_dict ->
    the original TResNet / USI layout (conv2d_iabn = Sequential(Conv2d, InplaceABN)).

    * `X.conv` / `X.bn` of a ConvNormAct -> `X.0` / `X.1`; when the block has an anti-aliasing
      layer the original is Sequential(conv2d_iabn, aa): `X.0.0` / `X.0.1`.
    * `downsample.i.conv` / `.bn` -> `downsample.i.0` / `.1`.
    * InplaceABN uses |w| + eps as its scale, so the stored weight has an arbitrary sign:
      timm's filter computes `w.abs() + 1e-5`; store `±(w - 1e-5)`.
    * InplaceABN has no `num_batches_tracked` buffer.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.endswith("bn.weight"):  # every InplaceABN scale, downsample ones included
            sign = torch.where(torch.rand(v.shape, generator=g) < 0.5, -1.0, 1.0)
            v = sign * (v - 1e-5)
        m = re.fullmatch(r"(.*\.downsample\.\d+)\.(conv|bn)\.(.*)", k)
        if m:
            prefix, part, rest = m.groups()
            k = f"{prefix}.{0 if part == 'conv' else 1}.{rest}"
        elif m := re.fullmatch(r"(.*conv\d+)\.(conv|bn)\.(.*)", k):
            prefix, part, rest = m.groups()
            has_aa = getattr(model.get_submodule(prefix), "aa", None) is not None  # stride-2 conv2
            idx = ("0.0" if has_aa else "0") if part == "conv" else ("0.1" if has_aa else "1")
            k = f"{prefix}.{idx}.{rest}"
        out[k] = v.clone()
    return out


@pytest.mark.slow
def test_usi_tresnet_checkpoint_loads_through_timm_filter(tmp_path):
    torch.manual_seed(0)
    ref = randomise_(timm.create_model("tresnet_v2_l", num_classes=10))
    original = to_original_tresnet(ref)
    # The layout really is the foreign one: no timm key names, signed scales.
    assert "body.conv1.0.weight" in original and "body.conv1.conv.weight" not in original
    assert "body.layer2.0.conv2.0.0.weight" in original and "body.layer2.0.conv2.0.1.weight" in original
    assert "body.layer2.0.downsample.1.0.weight" in original
    assert not any(k.endswith("num_batches_tracked") for k in original)
    assert (original["body.conv1.1.weight"] < 0).any()
    assert (original["body.layer2.0.downsample.1.1.weight"] < 0).any()
    # The reference is exactly what the filter reconstructs: |±(w - eps)| + eps.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bn.weight"):
                p.copy_((p - 1e-5).abs() + 1e-5)
    path = tmp_path / "tresnet_l_v2_83_9.pth"
    torch.save(original, path)

    teacher, info = load_teacher("tresnet_l_v2", str(path), num_classes=10)
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(outputs(teacher.model, x), outputs(ref, x))
    assert info.name == "tresnet_v2_l" and info.requested == "tresnet_l_v2"
    assert info.mean == (0.0, 0.0, 0.0) and info.std == (1.0, 1.0, 1.0)
    assert info.input_size == 224 and info.interpolation == "bilinear" and info.num_classes == 10
    assert info.checkpoint == str(path)
    assert info.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.to_dict()["mean"] == [0.0, 0.0, 0.0]


def test_resolve_model_name():
    assert resolve_model_name("tresnet_l_v2") == "tresnet_v2_l"  # USI repo
    assert resolve_model_name("TResnetL_V2") == "tresnet_v2_l"  # TResNet repo function
    assert resolve_model_name("tresnet_l-v2") == "tresnet_v2_l"  # TResNet model zoo
    assert resolve_model_name("TResnetM") == "tresnet_m"
    assert resolve_model_name("tresnet_m_448") == "tresnet_m.miil_in1k_448"  # timm deprecation
    assert resolve_model_name("tresnet_v2_l.miil_in21k") == "tresnet_v2_l.miil_in21k"
    assert resolve_model_name("resnet18") == "resnet18"
    with pytest.raises(TeacherError, match=r"unknown model 'resnet_18'.*resnet18"):
        resolve_model_name("resnet_18")
    with pytest.raises(TeacherError, match=r"unknown pretrained tag 'bogus' for resnet18; known: .*a1_in1k"):
        resolve_model_name("resnet18.bogus")


# --- Checkpoint containers ---------------------------------------------------------------------

@pytest.fixture
def small(tmp_path):
    torch.manual_seed(0)
    model = randomise_(timm.create_model(SMALL, num_classes=7))
    return model, model.state_dict()


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "state_dict_ema", "model_ema", "ddp",
                                  "ddp_state_dict", "training_checkpoint"])
def test_checkpoint_containers(tmp_path, small, wrap):
    import argparse
    model, sd = small
    ddp = torch.nn.DataParallel(model).state_dict()  # 'module.' keys, module versions kept
    assert all(k.startswith("module.") for k in ddp) and "module" in ddp._metadata
    obj = {"bare": sd, "state_dict": {"state_dict": sd}, "model": {"model": sd},
           "state_dict_ema": {"state_dict_ema": sd}, "model_ema": {"model_ema": sd, "epoch": 3},
           "ddp": ddp, "ddp_state_dict": {"state_dict": ddp, "epoch": 1},
           # what timm's and USI's savers write: epoch, arch, argparse args, metric
           "training_checkpoint": {"epoch": 9, "arch": SMALL, "state_dict": sd, "version": 2,
                                   "args": argparse.Namespace(lr=2e-3, model=SMALL), "metric": 81.5}}[wrap]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    assert set(read_state_dict(path)) == set(sd)
    loaded = build_model(SMALL, num_classes=7, checkpoint=str(path))
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(outputs(loaded, x), outputs(model, x))


def test_raw_weights_win_over_ema(tmp_path, small):
    _, sd = small
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    torch.save({"state_dict_ema": ema, "state_dict": sd}, tmp_path / "c.pth")
    got = read_state_dict(tmp_path / "c.pth")
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_model_own_filter_applied_to_native_checkpoint(tmp_path):
    # vision_transformer has a checkpoint_filter_fn; a native timm checkpoint passes it unchanged.
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=5)
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    loaded = build_model("test_vit", num_classes=5, checkpoint=str(tmp_path / "vit.pth"))
    x = torch.rand(1, 3, 160, 160)
    assert torch.equal(outputs(loaded, x), outputs(model, x))


def test_safetensors(tmp_path, small):
    from safetensors.torch import save_file
    model, sd = small
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "m.safetensors")
    loaded = build_model(SMALL, num_classes=7, checkpoint=str(tmp_path / "m.safetensors"))
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(outputs(loaded, x), outputs(model, x))


# --- Errors -------------------------------------------------------------------------------------

def test_wrong_class_count(tmp_path, small):
    torch.save(small[1], tmp_path / "c.pth")
    with pytest.raises(TeacherError, match=r"c\.pth has 7 classes \(key fc\.weight\), expected 10"):
        build_model(SMALL, num_classes=10, checkpoint=str(tmp_path / "c.pth"))


def test_missing_and_unexpected_keys(tmp_path, small):
    sd = dict(small[1])
    sd.pop("conv1.0.weight")
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(TeacherError, match=r"missing\.pth does not fit ResNet: 1 missing keys \(conv1\.0\.weight\)"):
        build_model(SMALL, num_classes=7, checkpoint=str(tmp_path / "missing.pth"))
    sd = dict(small[1], **{"extra.weight": torch.zeros(3)})
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(TeacherError, match=r"1 unexpected keys \(extra\.weight\)"):
        build_model(SMALL, num_classes=7, checkpoint=str(tmp_path / "extra.pth"))
    torch.save(small[1], tmp_path / "ok.pth")  # right keys, wrong architecture
    with pytest.raises(TeacherError, match=r"ok\.pth: key \S+ has shape \[\d+(, \d+)*\], the model expects"):
        build_model("test_efficientnet", num_classes=7, checkpoint=str(tmp_path / "ok.pth"))


def test_bad_files(tmp_path):
    with pytest.raises(TeacherError, match=r"checkpoint \S*nope\.pth: no such file"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n" * 10)
    with pytest.raises(TeacherError, match=r"notes\.txt: not a PyTorch checkpoint"):
        read_state_dict(tmp_path / "notes.txt")
    (tmp_path / "zeros.pth").write_bytes(bytes(1000))
    with pytest.raises(TeacherError, match=r"zeros\.pth: not a PyTorch checkpoint"):
        read_state_dict(tmp_path / "zeros.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(TeacherError, match=r"list\.pth: holds a list, not a state_dict"):
        read_state_dict(tmp_path / "list.pth")
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "opt.pth")
    with pytest.raises(TeacherError, match=r"opt\.pth: no state_dict found \(top-level keys: epoch, optimizer"):
        read_state_dict(tmp_path / "opt.pth")
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    with pytest.raises(TeacherError, match=r"x\.safetensors: not a safetensors file"):
        read_state_dict(tmp_path / "x.safetensors")


class RunsCode:
    """Unpickling this calls os.system('true'): harmless, but code nonetheless."""

    def __reduce__(self):
        return (os.system, ("true",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    torch.save({"weight": torch.zeros(2), "payload": RunsCode()}, tmp_path / "evil.pth")
    with pytest.raises(TeacherError, match=r"evil\.pth: refused, loading it would run code \(.*system"):
        read_state_dict(tmp_path / "evil.pth")


def test_unknown_model_suggests():
    with pytest.raises(TeacherError, match=r"unknown model 'tresnet_l_v3'; close timm names: .*tresnet"):
        build_model("tresnet_l_v3", num_classes=3, checkpoint=None)


# --- Inference ----------------------------------------------------------------------------------

def test_teacher_call_normalises_uint8_hwc(tmp_path, small):
    model, sd = small
    torch.save(sd, tmp_path / "c.pth")
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)
    teacher, info = load_teacher(SMALL, str(tmp_path / "c.pth"), num_classes=7, mean=mean, std=std,
                                 input_size=48)
    assert (info.mean, info.std, info.input_size) == (mean, std, 48)
    images = torch.randint(0, 256, (3, 48, 48, 3), dtype=torch.uint8)
    logits = teacher(images)
    assert logits.dtype == torch.float32 and logits.shape == (3, 7) and logits.device.type == "cpu"
    x = images.permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(logits, outputs(model, x.contiguous()), rtol=1e-5, atol=1e-5)
    with pytest.raises(TeacherError, match=r"expected uint8 \(N, H, W, 3\), got torch.float32"):
        teacher(images.float())
    with pytest.raises(TeacherError, match=r"expected uint8 \(N, H, W, 3\), got torch.uint8 \(3, 3, 48, 48\)"):
        teacher(images.permute(0, 3, 1, 2))


def test_defaults_from_pretrained_cfg_and_seeded_random_teacher():
    a, info = load_teacher(SMALL, None, num_classes=4)
    assert info.mean == (0.5, 0.5, 0.5) and info.std == (0.5, 0.5, 0.5)
    assert info.input_size == 160 and info.checkpoint is None and info.checkpoint_sha256 is None
    torch.manual_seed(123)  # the global RNG does not matter: every rank gets the same teacher
    b, _ = load_teacher(SMALL, None, num_classes=4)
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert torch.equal(a(images), b(images))
    with pytest.raises(TeacherError, match=r"teacher std: expected positive values"):
        load_teacher(SMALL, None, num_classes=4, std=(1, 0, 1))
    with pytest.raises(TeacherError, match=r"teacher mean: expected 3 values"):
        load_teacher(SMALL, None, num_classes=4, mean=(0.5,))


def test_sha256_file(tmp_path):
    data = os.urandom(3 << 20)  # spans several read blocks
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    with pytest.raises(TeacherError, match=r"checkpoint \S*missing: cannot read"):
        sha256_file(tmp_path / "missing")


def test_teacher_wraps_eval_model():
    model = timm.create_model(SMALL, num_classes=3).train()
    t = Teacher(model, mean=(0, 0, 0), std=(1, 1, 1))
    assert not t.model.training


def test_teacher_precision_resolved_and_applied():
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "cuda") == "fp16"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(TeacherError, match="teacher precision: expected auto, fp32, fp16, bf16, got 'fp8'"):
        resolve_precision("fp8", "cpu")
    model = timm.create_model(SMALL, num_classes=3)
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    full = Teacher(model, mean=(0.5,) * 3, std=(0.25,) * 3)
    half = Teacher(model, mean=(0.5,) * 3, std=(0.25,) * 3, precision="bf16")
    assert (full.precision, half.precision) == ("fp32", "bf16")
    a, b = full(x), half(x)
    assert a.dtype == b.dtype == torch.float32  # widened before anything is computed from it
    assert not torch.equal(a, b)  # bf16 autocast really ran (CPU autocast supports bf16)
    torch.testing.assert_close(b, a, rtol=0.1, atol=0.1 * a.abs().max().item())
    # the online path: normalised input on the device, same precision
    t_in = (x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(half.logits(t_in), b, rtol=0, atol=0)
