"""The precision a teacher runs at: `resolve_precision` (auto: bf16 on a GPU that has it, fp32
elsewhere) and `autocast` (the context that applies it).
"""
from __future__ import annotations

import contextlib

import torch

from usi_cache.models.errors import TeacherError

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
