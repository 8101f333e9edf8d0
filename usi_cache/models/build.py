"""Building a timm model by name, for both stages (the teacher in stage 1 and online KD, the
student in stage 2): `resolve_model_name` (aliases, close-name hints) and `build_model`
(architecture, optional checkpoint or timm pretrained weights).
"""
from __future__ import annotations

import difflib
import json

import timm
import timm.data
import timm.models
import torch

from usi_cache.models.checkpoints import _first_line, load_checkpoint, read_state_dict
from usi_cache.models.errors import TeacherError

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
