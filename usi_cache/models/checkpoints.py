"""Loading checkpoints without running code: `read_state_dict` reads safetensors, or a PyTorch
pickle through an unpickler that refuses every global outside a short allow-list
(`refused_global` names the one refused); `load_checkpoint` fits a state dict to a model and
says which keys or shapes do not fit; `sha256_file` is the checksum a cache records.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import logging
import pickle
import sys
from pathlib import Path

import torch

from usi_cache import storage
from usi_cache.models.errors import TeacherError

log = logging.getLogger(__name__)


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
