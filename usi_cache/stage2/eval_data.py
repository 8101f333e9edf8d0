"""The validation stream of stage 2: a centre crop of every sample of the validation shards,
split across ranks and loader workers (`EvalStream`, `eval_array`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from usi_cache.shards.images import decode_image
from usi_cache.shards.manifest import Manifest
from usi_cache.shards.tars import read_shard
from usi_cache.views.sampling import pil_filter


def eval_array(image: Image.Image, size: int, crop_pct: float, interpolation: str) -> np.ndarray:
    """Validation transform, timm's `create_transform(size, is_training=False, crop_pct=...)` bit for
    bit: resize the short side to floor(size / crop_pct) (the long side truncated, as torchvision's
    Resize does), then centre-crop size×size at offsets rounded half to even (CenterCrop)."""
    scale = math.floor(size / crop_pct)
    w, h = image.size
    short, long = min(w, h), max(w, h)
    nw, nh = (scale, int(scale * long / short)) if w <= h else (int(scale * long / short), scale)
    if (nw, nh) != (w, h):  # torchvision returns the image untouched at the target size
        image = image.resize((nw, nh), pil_filter(interpolation))
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return np.array(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


class EvalStream(IterableDataset):
    """Every validation image exactly once across ranks and workers (shards are split)."""

    def __init__(self, manifest: Manifest, size: int, crop_pct: float, interpolation: str,
                 rank: int, world: int):
        self.m, self.size, self.crop_pct, self.interp = manifest, size, crop_pct, interpolation
        self.rank, self.world = rank, world

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        shards = list(range(len(self.m.shards)))[self.rank::self.world][worker::workers]
        for shard in shards:
            count = 0
            for sample in read_shard(self.m.path(shard)):
                count += 1
                try:
                    image = decode_image(sample.data)
                except ValueError:
                    continue
                pixels = eval_array(image, self.size, self.crop_pct, self.interp)
                yield {"image": torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), "label": sample.cls}
            self.m.check_count(shard, count)
