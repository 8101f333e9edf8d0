"""Validation: exact top-1/top-5 over every val image, counted once across all ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .shards import Manifest
from .train_data import EvalStream


@torch.no_grad()
def evaluate(model, manifest: Manifest, cfg, mean, std, world, amp: bool) -> dict:
    """Returns {"top1", "top5" (percent), "count"}; counts are summed over ranks, not averaged."""
    was_training = model.training
    model.eval()
    stream = EvalStream(manifest, cfg.input_size, cfg.eval_crop, cfg.view.interpolation, world.rank, world.size)
    mine = len(range(world.rank, len(manifest.shards), world.size))
    loader = DataLoader(stream, batch_size=cfg.batch_size, num_workers=min(cfg.workers, mine))
    dev = world.device
    counts = torch.zeros(3, dtype=torch.float64, device=dev)  # correct@1, correct@5, images
    for batch in loader:
        x = batch["image"].to(dev, non_blocking=True).float().div_(255)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model((x - mean) / std)
        y = batch["label"].to(dev)
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y[:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(y), device=dev)]).double()
    if world.distributed:
        dist.all_reduce(counts)
    model.train(was_training)
    c1, c5, n = counts.tolist()
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "count": int(n)}
