"""The teacher: a timm model with its checkpoint (built by build.py, read by checkpoints.py),
input normalisation and batched inference at its precision (precision.py).

`build_model` (build.py) makes any timm model and loads a checkpoint into it *strictly*, after the
model's own timm `checkpoint_filter_fn` (found through the module that defines the model's
class). That filter is what converts foreign key layouts: the official USI teacher
`tresnet_l_v2_83_9.pth` is stored in the original TResNet / InplaceABN layout
(`body.conv1.0.weight`, `...conv2.0.1.weight`, signed InplaceABN scales) and loads into timm's
`tresnet_v2_l` only through `timm.models.tresnet.checkpoint_filter_fn`, which
`timm.create_model(checkpoint_path=...)` does not apply.

Checkpoint files are read (checkpoints.py) with `torch.load(weights_only=True)`: a pickle that needs arbitrary
code is refused. Accepted containers, first match wins:

    bare state_dict | {'state_dict': sd} | {'model': sd} | {'state_dict_ema': sd} | {'model_ema': sd}

Raw weights come before EMA weights because every common saver (timm, DeiT, torchvision, USI)
stores the weights it means by "the model" under 'state_dict'/'model'; USI's saver already
writes the better of EMA and raw there. A file with only EMA weights still loads. `.safetensors`
files are read with safetensors. A leading 'module.' (DDP) prefix is stripped.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace

import timm
import timm.data
import timm.models
import torch

from usi_cache.models.build import build_model, resolve_model_name
from usi_cache.models.checkpoints import sha256_file
from usi_cache.models.errors import TeacherError
from usi_cache.models.precision import autocast, resolve_precision

log = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------------------------------
# Checkpoint files


# ---------------------------------------------------------------------------------------------
# Models


# ---------------------------------------------------------------------------------------------
# Inference


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
                 compile: bool = False, precision: str = "auto", seed: int = 0) -> tuple[Teacher, TeacherInfo]:
    """Build the teacher and describe it. mean/std/input_size default to the model's config.

    Without a checkpoint and without `pretrained`, weights are random but seeded (`seed`: 0, or
    an ensemble member's index), so that every rank and every resumed run gets the same teacher
    (demo, tests and benchmarks only).
    """
    if checkpoint is None and not pretrained:
        log.warning("teacher %s: no checkpoint and not pretrained: random weights (seed %d)", name, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
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


def _triple(field: str, value) -> tuple[float, float, float]:
    v = tuple(float(x) for x in value)
    if len(v) != 3:
        raise TeacherError(f"teacher {field}: expected 3 values (RGB), got {list(v)}")
    return v
