"""What a stage-2 run carries from step to step, and its checkpoints.

`last.pth` uses timm's keys (`arch`, `state_dict`, `state_dict_ema`, `optimizer`, ...), so timm's
`load_checkpoint(model, path, use_ema=True)` reads either set of weights; `best.pth` holds `arch`
and the better weights (raw or EMA) as `state_dict`. Files of older runs (keys `model`, `ema`)
still resume. Saves are atomic: a kill never leaves a half-written file in place.
"""
from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import timm.optim
import timm.scheduler
import timm.utils
import torch

from usi_cache import storage
from usi_cache.config.stages import TrainConfig
from usi_cache.config.parser import to_dict, upgrade_saved
from usi_cache.stage2.plan import stable_seed
from usi_cache.models.build import build_model
from usi_cache.models.checkpoints import refused_global


class TrainError(RuntimeError):
    """Training cannot go on (non-finite loss, mismatched inputs, an unusable checkpoint)."""


# Settings that may change on --resume without changing which samples each rank trains on in an
# epoch: workers and shuffle_buffer change the order within a rank's batches, compile the
# float rounding; log_every and tensorboard only what is written.
RESUMABLE_CHANGES = ("workers", "shuffle_buffer", "compile", "log_every", "tensorboard")


@dataclass
class TrainState:
    model: torch.nn.Module
    ema: timm.utils.ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: timm.scheduler.CosineLRScheduler
    epoch: int = -1  # the last finished epoch
    step: int = 0  # optimizer steps taken over the run
    best: dict = field(default_factory=lambda: {"top1": -1.0})  # top1, top5, epoch, ema

    @classmethod
    def create(cls, cfg: TrainConfig, num_classes: int, device: torch.device, rank: int) -> TrainState:
        torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
        model = build_model(cfg.model, num_classes=num_classes, checkpoint=cfg.pretrained_checkpoint,
                            model_kwargs=cfg.model_kwargs).to(device)
        # from here on each rank draws its own dropout / drop-path masks (CPU and CUDA generators)
        torch.manual_seed(stable_seed("rank", cfg.seed, rank) % 2**63)
        if device.type == "cuda" and cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        ema = timm.utils.ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
        optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                   betas=cfg.betas, eps=cfg.eps)  # no decay on norm/bias
        scheduler = timm.scheduler.CosineLRScheduler(optimizer, t_initial=cfg.epochs, lr_min=cfg.min_lr,
                                                     warmup_t=cfg.warmup_epochs, warmup_lr_init=cfg.warmup_lr)
        return cls(model, ema, optimizer, scheduler)

    def checkpoint(self, cfg: TrainConfig, rng: list, world_size: int, cache_views: int | None) -> dict:
        """last.pth's content. torch's generators drive dropout/drop-path, one per rank (`rng`);
        every other draw is a pure function of (seed, epoch, step, rank, key)."""
        return {"arch": cfg.model, "state_dict": self.model.state_dict(),
                "state_dict_ema": self.ema.module.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "epoch": self.epoch, "step": self.step, "best": self.best, "config": to_dict(cfg),
                "rng": rng, "world": world_size, "cache_views": cache_views}

    def load(self, ckpt: dict, steps_per_epoch: int) -> None:
        """Put back a checkpoint from `load_checkpoint` (timm's keys, or the older model/ema)."""
        self.model.load_state_dict(ckpt["state_dict"])
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt["state_dict_ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.epoch, self.best = ckpt["epoch"], ckpt["best"]
        # older files have no step count: every epoch runs the same number of steps
        self.step = ckpt.get("step", (self.epoch + 1) * steps_per_epoch)

    def best_checkpoint(self, arch: str) -> dict:
        """best.pth's content: the better weights (raw or EMA, as `best` says) under timm's keys,
        with their top-1/top-5 and epoch."""
        model = self.ema.module if self.best.get("ema") else self.model
        return {"arch": arch, "state_dict": model.state_dict(), **self.best}


def load_checkpoint(path: str, cfg: TrainConfig, device, world_size: int, cache_views: int | None) -> dict:
    """last.pth (a path or URL), checked: readable, complete, and made with the same config.
    Older files' keys (model, ema) come back under timm's (state_dict, state_dict_ema)."""
    try:
        src = io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path
        state = torch.load(src, map_location=device, weights_only=True)
        for old, new in (("model", "state_dict"), ("ema", "state_dict_ema")):
            if new not in state and old in state:
                state[new] = state.pop(old)
        for key in ("state_dict", "optimizer", "scheduler", "epoch", "best", "config"):
            state[key]
    except pickle.UnpicklingError as e:
        why = refused_global(str(e)) or str(e).splitlines()[0]
        raise TrainError(f"{path}: checkpoint refused: loading it would run code ({why[:200]})") from None
    except (RuntimeError, EOFError, OSError, KeyError, TypeError) as e:
        raise TrainError(f"{path}: cannot resume from it ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                         f"move it away to start over") from None
    now, saved = to_dict(cfg), upgrade_saved(TrainConfig, state["config"], f"{path}: config")  # older runs' shape too
    diff = sorted(k for k in set(now) | set(saved) if k not in RESUMABLE_CHANGES and now.get(k) != saved.get(k))
    if diff:
        k = diff[0]
        raise TrainError(f"{path}: made with {k} = {saved.get(k)!r}, this run has {now.get(k)!r}"
                         f"{f' (and {len(diff) - 1} more)' if len(diff) > 1 else ''}; --resume continues the "
                         f"same run: use a new --out to change settings")
    saved_world = state.get("world")
    epochs_left = state["epoch"] + 1 < cfg.epochs + cfg.cooldown_epochs
    if epochs_left and saved_world is not None and saved_world != world_size:
        raise TrainError(f"{path}: made by {saved_world} process(es), this run has {world_size}; the epoch plan "
                         f"(which samples each epoch selects) depends on the world size: resume with "
                         f"{saved_world}, or start a new --out")
    saved_views = state.get("cache_views")  # epoch e uses view e mod V
    if saved_views is not None and cache_views is not None and saved_views != cache_views:
        raise TrainError(f"train.cache: the run began on V = {saved_views} views, the cache now has "
                         f"V = {cache_views} (grown with --add-views): which view each epoch uses "
                         f"would change mid-run; resume on the cache as it was, or start a new --out")
    return state


def save_atomic(obj, path: str) -> None:
    """torch.save so that a kill or a full disk never leaves a half-written file in place of
    the previous one: locally a temp file, fsync, then rename; on object storage one PUT of
    the whole object (atomic for readers)."""
    if storage.is_url(path):
        buf = io.BytesIO()
        torch.save(obj, buf)
        try:
            storage.write_bytes(path, buf.getvalue())
        except storage.StorageError as e:
            raise TrainError(f"{e}; the previous {storage.basename(path)} is kept") from None
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        reason = "No space left on device" if "unexpected pos" in str(e) else str(e).splitlines()[0]
        raise TrainError(f"{path}: cannot write checkpoint ({reason}); the previous {path.name} is kept") from None


def rng_state(cuda: bool) -> dict:
    """This rank's torch generators (dropout, drop-path)."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None}


def restore_rng(ckpt: dict, rank: int, world_size: int, cuda: bool) -> None:
    """Put back this rank's generators from last.pth (one entry per rank)."""
    saved = ckpt.get("rng")
    if saved is None or len(saved) != world_size:  # older checkpoint, or another world size
        return
    torch.set_rng_state(saved[rank]["cpu"].cpu())
    if saved[rank].get("cuda") is not None and cuda:
        torch.cuda.set_rng_state(saved[rank]["cuda"].cpu())
