"""Validation: exact top-1/top-5 of several models (raw and EMA weights) in one pass over every
val image, counted once across all ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from usi_cache.shards.manifest import Manifest
from usi_cache.stage2.eval_data import EvalStream


class Evaluator:
    """Decodes the validation shards once per evaluation and runs every model on each batch.

    The DataLoader is built once; its workers persist between evaluations (the stream has no
    epoch). `mean`/`std` are (1, 3, 1, 1) tensors on the device."""

    def __init__(self, manifest: Manifest, cfg, world, mean: torch.Tensor, std: torch.Tensor, amp: bool):
        stream = EvalStream(manifest, cfg.input_size, cfg.eval_crop, cfg.view.interpolation, world.rank, world.size)
        workers = min(cfg.workers, len(range(world.rank, len(manifest.shards), world.size)))
        # its own generator: a loader draws a seed when its workers start, and the global generator
        # (dropout, drop-path) must not depend on when that happens (a resumed run starts them later)
        self.loader = DataLoader(stream, batch_size=cfg.batch_size, num_workers=workers,
                                 persistent_workers=workers > 0, pin_memory=world.device.type == "cuda",
                                 generator=torch.Generator().manual_seed(0))
        self.world, self.mean, self.std, self.amp = world, mean, std, amp

    @torch.no_grad()
    def __call__(self, models: dict[str, torch.nn.Module]) -> dict[str, dict]:
        """{name: {"top1", "top5" (percent), "count"}}; counts are summed over ranks, not averaged."""
        dev = self.world.device
        was_training = {name: m.training for name, m in models.items()}
        for m in models.values():
            m.eval()
        counts = torch.zeros(len(models), 3, dtype=torch.float64, device=dev)  # correct@1, correct@5, images
        for batch in self.loader:
            x = (batch["image"].to(dev, non_blocking=True).float().div_(255) - self.mean) / self.std
            y = batch["label"].to(dev, non_blocking=True)
            for i, model in enumerate(models.values()):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                    logits = model(x)
                top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
                hit = top == y[:, None]
                counts[i, 0] += hit[:, 0].sum()
                counts[i, 1] += hit.any(1).sum()
                counts[i, 2] += len(y)  # a Python number: no host-to-device copy
        if self.world.distributed:
            dist.all_reduce(counts)
        for name, m in models.items():
            m.train(was_training[name])
        return {name: {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "count": int(n)}
                for name, (c1, c5, n) in zip(models, counts.tolist())}
