"""Teacher loading (timm model + checkpoint), input normalisation and batched inference.

`build_model` makes any timm model and loads a checkpoint into it *strictly*, after the
model's own timm `checkpoint_filter_fn` (found through the module that defines the model's
class). That filter is what converts foreign key layouts: the official USI teacher
`tresnet_l_v2_83_9.pth` is stored in the original TResNet / InplaceABN layout
(`body.conv1.0.weight`, `...conv2.0.1.weight`, signed InplaceABN scales) and loads into timm's
`tresnet_v2_l` only through `timm.models.tresnet.checkpoint_filter_fn`, which
`timm.create_model(checkpoint_path=...)` does not apply.

Checkpoint files are read with `torch.load(weights_only=True)`: a pickle that needs arbitrary
code is refused. Accepted containers, first match wins:

    bare state_dict | {'state_dict': sd} | {'model': sd} | {'state_dict_ema': sd} | {'model_ema': sd}

Raw weights come before EMA weights because every common saver (timm, DeiT, torchvision, USI)
stores the weights it means by "the model" under 'state_dict'/'model'; USI's saver already
writes the better of EMA and raw there. A file with only EMA weights still loads. `.safetensors`
files are read with safetensors. A leading 'module.' (DDP) prefix is stripped.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import io
import json
import logging
import pickle
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import timm
import timm.data
import timm.models
import torch

from . import storage

log = logging.getLogger(__name__)


class TeacherError(ValueError):
    """A teacher name, checkpoint or setting is unusable. One line; names the file/key/field."""


@dataclass(frozen=True)
class TeacherInfo:
    """What identifies the teacher's outputs; stored in the cache's attributes."""

    name: str  # the timm model name actually built (after alias resolution)
    requested: str  # the name the user asked for
    checkpoint: str | None  # checkpoint path as given; None = pretrained or random weights
    checkpoint_sha256: str | None  # hex digest of the checkpoint file
    mean: tuple[float, float, float]  # per-channel mean of [0, 1] inputs (RGB)
    std: tuple[float, float, float]  # per-channel std of [0, 1] inputs (RGB)
    input_size: int  # square input side, pixels
    interpolation: str  # resize filter of the model's pretrained config (informational)
    num_classes: int  # C: logits per image
    precision: str = "fp32"  # the forward's compute precision, resolved (fp32, fp16 or bf16)

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


# ---------------------------------------------------------------------------------------------
# Names

# Names used by the official USI repo (Alibaba-MIIL/Solving_ImageNet, models/tresnet_v2.py
# registers `tresnet_l_v2`) and the TResNet repo (Alibaba-MIIL/TResNet: `TResnetM`, `TResnetL`,
# `TResnetXL`, `TResnetL_V2`; its model zoo writes `tresnet_l-v2`) -> timm names. Looked up after
# lower-casing and '-' -> '_'. timm's own deprecated names (`tresnet_m_448`, ...) are mapped by
# timm's deprecation table in `resolve_model_name`.
ALIASES = {
    "tresnet_l_v2": "tresnet_v2_l",
    "tresnetl_v2": "tresnet_v2_l",
    "tresnet_lv2": "tresnet_v2_l",
    "tresnetm": "tresnet_m",
    "tresnetl": "tresnet_l",
    "tresnetxl": "tresnet_xl",
}


def resolve_model_name(name: str) -> str:
    """Map a user/USI/TResNet model name to the timm name to build (a pretrained tag is kept).

    Unknown names raise TeacherError listing close timm names.
    """
    base, dot, tag = name.partition(".")
    key = base.lower().replace("-", "_")
    if key in ALIASES:
        base = ALIASES[key]
    elif not timm.is_model(base) and timm.is_model(key):
        base = key
    resolved = base + dot + tag
    if not timm.is_model(resolved):
        raise TeacherError(f"unknown model {name!r}; close timm names: {', '.join(_close_names(key)) or 'none'}")
    if tag:
        try:
            timm.models.get_pretrained_cfg(resolved, allow_unregistered=False)
        except RuntimeError:
            tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{base}.*")]
            raise TeacherError(f"unknown pretrained tag {tag!r} for {base}; known: {', '.join(tags) or 'none'}") from None
    # timm builds deprecated names under their new name (with a warning); record the new one.
    return timm.models.get_deprecated_models().get(resolved) or resolved


def _close_names(key: str) -> list[str]:
    names = timm.list_models()
    close = difflib.get_close_matches(key, names, n=5, cutoff=0.6)
    if not close:  # e.g. 'tresnet' is far from every full name but is a prefix of several
        close = [n for n in names if key in n][:5]
    return close


# ---------------------------------------------------------------------------------------------
# Checkpoint files

STATE_DICT_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")  # first match wins
# Training checkpoints of timm and USI also pickle their argparse `args`; a Namespace only
# holds plain values, so allowing it does not let the file run code.
_SAFE_GLOBALS = [argparse.Namespace]


def sha256_file(path) -> str:
    """Hex SHA-256 of a file (a path or URL), read in 1 MiB blocks."""
    h = hashlib.sha256()
    try:
        with storage.errors(str(path), "reading"), storage.open_read(path) as f:
            while block := f.read(1 << 20):
                h.update(block)
    except storage.StorageError:
        raise
    except OSError as e:
        raise TeacherError(f"checkpoint {path}: cannot read ({e.strerror or e})") from None
    return h.hexdigest()


def refused_global(text: str) -> str | None:
    """The line of torch.load(weights_only=True)'s refusal that names the GLOBAL it refused.

    Running code from a pickle always goes through a GLOBAL (a callable to import); the
    weights-only unpickler names the one it refused. None: the failure was just bad bytes.
    """
    return next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "global" in ln), None)


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """Load a state_dict (CPU tensors) from a checkpoint file (a path or URL); see the module doc."""
    if not storage.is_file(path):
        raise TeacherError(f"checkpoint {path}: no such file")
    # a URL's checkpoint is read into memory once (teachers are a few hundred MB at most)
    p = io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else Path(path)
    if str(path).endswith(".safetensors"):
        try:
            from safetensors.torch import load, load_file
            return load(p.getvalue()) if isinstance(p, io.BytesIO) else load_file(str(p), device="cpu")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise TeacherError(f"checkpoint {path}: not a safetensors file ({_first_line(e)})") from None
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = refused_global(str(e))
        if why:
            raise TeacherError(f"checkpoint {path}: refused, loading it would run code ({why[:200]})") from None
        raise TeacherError(f"checkpoint {path}: not a PyTorch checkpoint (unpickling failed)") from None
    except Exception as e:  # torch.load raises RuntimeError/EOFError/... for non-checkpoint bytes
        raise TeacherError(f"checkpoint {path}: not a PyTorch checkpoint ({_first_line(e)})") from None
    return _unwrap(obj, path)


def _unwrap(obj, path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise TeacherError(f"checkpoint {path}: holds a {type(obj).__name__}, not a state_dict")
    if not _is_state_dict(obj):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                log.info("checkpoint %s: using its %r entry", path, key)
                obj = obj[key]
                break
        else:
            raise TeacherError(f"checkpoint {path}: no state_dict found (top-level keys: "
                               f"{', '.join(map(str, list(obj)[:8]))}; expected tensors or one of "
                               f"{', '.join(STATE_DICT_KEYS)})")
        if not _is_state_dict(obj):
            bad = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
            raise TeacherError(f"checkpoint {path}: entry {bad!r} is a {type(obj[bad]).__name__}, not a tensor")
    if obj and all(k.startswith("module.") for k in obj):  # saved from a DDP-wrapped model
        meta = getattr(obj, "_metadata", None)
        obj = type(obj)((k[len("module."):], v) for k, v in obj.items())
        if meta is not None:  # module versions (e.g. BatchNorm's) are keyed by module path
            obj._metadata = type(meta)((k.removeprefix("module.").removeprefix("module"), v)
                                       for k, v in meta.items())
    return obj


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


# ---------------------------------------------------------------------------------------------
# Models


def build_model(name: str, *, num_classes: int, checkpoint: str | None, pretrained: bool = False,
                model_kwargs: dict | None = None) -> torch.nn.Module:
    """Create timm model `name` (aliases resolved) with `num_classes` outputs; load `checkpoint`.

    The checkpoint passes through the model's own timm `checkpoint_filter_fn` (when its module
    has one) and is then loaded strictly: a class-count, shape or key mismatch is a
    TeacherError. `pretrained=True` makes timm download its weights (network).
    """
    resolved = resolve_model_name(name)
    try:
        model = timm.create_model(resolved, pretrained=pretrained, num_classes=num_classes, **(model_kwargs or {}))
    except (TypeError, ValueError) as e:
        if not model_kwargs:
            raise
        # an unknown keyword or a value of the wrong kind, from the user's --model-kwargs
        raise TeacherError(f"model {resolved}: model_kwargs {json.dumps(model_kwargs)[:200]} not accepted "
                           f"({_first_line(e)})") from None
    if checkpoint is not None:
        load_checkpoint(model, read_state_dict(checkpoint), source=str(checkpoint), num_classes=num_classes)
    return model


def load_checkpoint(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str,
                    num_classes: int) -> None:
    """Filter `state` with the model's own timm filter, check it fits, load it strictly."""
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as e:
            raise TeacherError(f"checkpoint {source}: {module.__name__}.checkpoint_filter_fn failed "
                               f"({_first_line(e)})") from None
    own = model.state_dict()
    classifiers = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    for c in ([classifiers] if isinstance(classifiers, str) else classifiers or ()):
        w = state.get(f"{c}.weight")
        if w is not None and w.ndim >= 1 and w.shape[0] != num_classes:
            raise TeacherError(f"checkpoint {source} has {w.shape[0]} classes (key {c}.weight), "
                               f"expected {num_classes}")
    # load_state_dict raises on a shape mismatch even when not strict; report it ourselves.
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise TeacherError(f"checkpoint {source}: key {k} has shape {list(v.shape)}, "
                               f"the model expects {list(own[k].shape)}")
    # Not strict here so that the error can list keys; a fresh model is discarded on error.
    # (BatchNorm fills in a missing num_batches_tracked itself for pre-v2/unversioned files,
    # such as the InplaceABN-layout TResNet ones.)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        for what, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)):
            if keys:
                parts.append(f"{len(keys)} {what} keys ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise TeacherError(f"checkpoint {source} does not fit {type(model).__name__}: {'; '.join(parts)}")


# ---------------------------------------------------------------------------------------------
# Inference


PRECISIONS = ("fp32", "fp16", "bf16")  # the teacher forward's compute precision
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(precision: str, device) -> str:
    """The concrete teacher precision: 'auto' is fp16 on CUDA (USI runs its teacher in fp16
    autocast) and fp32 elsewhere; fp32, fp16 and bf16 are kept. Anything else: TeacherError."""
    if precision == "auto":
        return "fp16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise TeacherError(f"teacher precision: expected auto, {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """The context a teacher forward runs in at `precision` (resolved: fp32, fp16 or bf16).

    fp16/bf16 are autocast (matmuls and convolutions in half precision, reductions such as
    normalisation statistics in float32), as USI runs its teacher; fp32 is no autocast. The
    caller takes softmax/log-sum-exp of the output in float32 or wider (`.float()` first).
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_AUTOCAST[precision])


class Teacher:
    """The eval-mode teacher: uint8 HWC images in, float32 logits out.

    The forward runs at `precision` (see `autocast`; 'auto' = fp16 on CUDA, fp32 on CPU); on
    CUDA channels_last (optionally torch.compile'd; compile is ignored on CPU). The output is
    widened to float32 before anything is computed from it. Inputs must already be at the
    teacher's input size (the view replay resizes them); other sizes are run as given.
    """

    def __init__(self, model: torch.nn.Module, *, mean, std, device="cpu", compile: bool = False,
                 precision: str = "auto") -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.precision = resolve_precision(precision, self.device)
        self.amp = self.precision != "fp32"  # autocast on: read by stage 2's online teacher
        model = model.eval().to(self.device)
        if self.cuda:
            # The HWC uint8 batch permuted to NCHW is already channels_last in memory, so this
            # layout needs no input copy and is the fast one for cuDNN convolutions.
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        if compile and not self.cuda:
            log.info("teacher: torch.compile is applied on CUDA only; running eagerly on %s", self.device)
        self.forward = torch.compile(model) if compile and self.cuda else model
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 (N, H, W, 3) RGB on CPU -> logits float32 (N, C) on CPU."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise TeacherError(f"teacher input: expected uint8 (N, H, W, 3), got {images.dtype} "
                               f"{tuple(images.shape)}")
        # Ship uint8 (4x fewer bytes than float32) and convert on the device.
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = x.div_(255).sub_(self.mean).div_(self.std)
        with autocast(self.precision, self.device):
            logits = self.forward(x)
        return logits.float().cpu()  # .cpu() waits for the device: the batch's one sync point

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float input (N, 3, H, W) on the teacher's device -> float32 logits (N, C)
        on the device, at the teacher's precision (for the online teacher of stage 2)."""
        with torch.no_grad(), autocast(self.precision, self.device):
            return self.forward(x).float()


def load_teacher(name: str, checkpoint: str | None, *, num_classes: int, pretrained: bool = False,
                 input_size: int | None = None, mean=None, std=None, device="cpu",
                 compile: bool = False, precision: str = "auto") -> tuple[Teacher, TeacherInfo]:
    """Build the teacher and describe it. mean/std/input_size default to the model's config.

    Without a checkpoint and without `pretrained`, weights are random but seeded (seed 0), so
    that every rank and every resumed run gets the same teacher (demo and tests only).
    """
    if checkpoint is None and not pretrained:
        log.warning("teacher %s: no checkpoint and not pretrained: random weights (seed 0)", name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_model(name, num_classes=num_classes, checkpoint=None)
    else:
        model = build_model(name, num_classes=num_classes, checkpoint=checkpoint, pretrained=pretrained)
    cfg = timm.data.resolve_model_data_config(model)
    mean = _triple("mean", cfg["mean"] if mean is None else mean)
    std = _triple("std", cfg["std"] if std is None else std)
    if any(s <= 0 for s in std):
        raise TeacherError(f"teacher std: expected positive values, got {list(std)}")
    if input_size is None:
        h, w = cfg["input_size"][-2:]
        if h != w:
            raise TeacherError(f"teacher {name}: default input size {h}x{w} is not square; give input_size")
        input_size = int(h)
    if input_size <= 0:
        raise TeacherError(f"teacher input_size: expected a positive int, got {input_size}")
    info = TeacherInfo(
        name=resolve_model_name(name), requested=name,
        checkpoint=None if checkpoint is None else str(checkpoint),
        checkpoint_sha256=None if checkpoint is None else sha256_file(checkpoint),
        mean=mean, std=std, input_size=int(input_size), interpolation=str(cfg.get("interpolation", "")),
        num_classes=int(getattr(model, "num_classes", num_classes)))
    teacher = Teacher(model, mean=mean, std=std, device=device, compile=compile, precision=precision)
    return teacher, replace(info, precision=teacher.precision)


def load_cache_teacher(attrs: dict, checkpoint: str | None, device: str | None = None) -> tuple[Teacher, str | None]:
    """The teacher a cache was made with, from its `usi_cache` attributes, at the recorded
    precision (caches from before it was recorded ran bf16 autocast on CUDA, fp32 elsewhere), on `device`
    (default CUDA when available). Returns (teacher, None), or (teacher, why) when the
    checkpoint's sha256 is not the recorded one. A checkpoint-made cache needs `checkpoint`."""
    mismatch = cache_teacher_mismatch(attrs, checkpoint)
    t = attrs["teacher"]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher, _ = load_teacher(t["name"], checkpoint, num_classes=int(attrs["num_classes"]),
                              input_size=int(t["input_size"]), mean=t["mean"], std=t["std"], device=device,
                              precision=t.get("precision") or ("bf16" if torch.device(device).type == "cuda" else "fp32"))
    return teacher, mismatch


def cache_teacher_mismatch(attrs: dict, checkpoint: str | None) -> str | None:
    """Why `checkpoint` is not the cache's teacher (its sha256 differs), or None; raises when the
    cache was made from a checkpoint and none is given. Cheap: no model is built."""
    t = attrs["teacher"]
    want = t.get("checkpoint_sha256")
    if want and checkpoint is None:
        raise TeacherError(f"--recompute/--audit need --teacher-checkpoint: the cache's teacher {t['name']} was "
                           f"loaded from a checkpoint (sha256 {want[:12]}…)")
    if checkpoint is not None:
        have = sha256_file(checkpoint)
        if have != want:
            return (f"{checkpoint}: sha256 {have[:12]}… is not the cache's teacher "
                    f"({(want or 'no checkpoint')[:12]})")
    return None


def _triple(field: str, value) -> tuple[float, float, float]:
    v = tuple(float(x) for x in value)
    if len(v) != 3:
        raise TeacherError(f"teacher {field}: expected 3 values (RGB), got {list(v)}")
    return v
