"""Stage 2: train a timm student with the USI recipe against a cache, labels or an online teacher.

`train()` sets a run up once (target source, TrainState, epoch plan, persistent loaders), then per
epoch: `train_epoch` (a `train_step` per batch, no CPU-GPU sync but every CHECK_EVERY steps),
raw and EMA weights evaluated in one pass over the validation data, a log.jsonl record, best.pth
and last.pth. What the targets are is the target source's business (targets.py).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from usi_cache import cache_format as schema, storage
from usi_cache.config.stages import TrainConfig
from usi_cache.config.parser import to_dict
from usi_cache.dist import World, barrier, close_world, gather_objects, init_world, on_main
from usi_cache.stage2.plan import PlanError, PlanSpec, copy_stats, stable_seed, summarize
from usi_cache.stage2.evaluate import Evaluator
from usi_cache.stage2.run_log import RunLog
from usi_cache.shards.class_spread import check_training_shards
from usi_cache.shards.manifest import ShardError, load_manifest
from usi_cache.stage2.targets import LabelTargets, resolve_targets
from usi_cache.stage2.loss import soft_cross_entropy, usi_loss
from usi_cache.stage2.data import TrainStream, TrainStreamSpec, valid_counts
from usi_cache.stage2.state import TrainError, TrainState, load_checkpoint, restore_rng, rng_state, save_atomic

__all__ = ["run_train", "train", "train_epoch", "train_step"]

log = logging.getLogger(__name__)

CHECK_EVERY = 20  # steps between CPU-GPU syncs (finite-loss check, step records, progress bar)


@dataclass(frozen=True)
class Loop:
    """What every step of a run uses, set up once."""

    cfg: TrainConfig
    world: World
    source: LabelTargets  # turns a batch into (x, ground truth, teacher targets)
    loader: DataLoader  # persistent workers; its TrainStream's set_epoch picks the epoch
    steps: int  # per epoch, the same on every rank
    forward: Callable  # the student as trained: DDP-wrapped under torchrun, compiled with --compile
    mean: torch.Tensor  # (1, 3, 1, 1) input normalisation of the student
    std: torch.Tensor
    amp: bool  # bf16 autocast (CUDA)
    runlog: RunLog
    progress: bool  # a tqdm bar per epoch on rank 0


def run_train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Train as `cfg` says (under torchrun: DDP); returns {"last": epoch record, "best": ...}."""
    world = init_world()
    runlog = None
    try:
        runlog = RunLog(cfg.out, main=world.is_main, tensorboard=cfg.tensorboard)
        return train(cfg, world, runlog, resume=resume, progress=progress)
    finally:
        if runlog is not None:
            runlog.close()
        close_world(world)


def train(cfg: TrainConfig, world: World, runlog: RunLog, *, resume: bool, progress: bool) -> dict:
    train_m, val_m = load_manifests(cfg)
    on_main(world, lambda: check_training_shards(train_m.root, len(train_m.classes), cfg.batch_size,
                                                 cfg.shuffle_buffer, allow_ordered=cfg.allow_ordered))
    source = resolve_targets(cfg, world, train_m)
    state = TrainState.create(cfg, len(train_m.classes), world.device, world.rank)
    plan = make_plan(cfg, world, train_m, source)
    start_run(state, cfg, world, runlog, resume, plan.steps, source.views)
    data_cfg = timm.data.resolve_model_data_config(state.model)
    mean = torch.tensor(data_cfg["mean"], device=world.device).view(1, 3, 1, 1)
    std = torch.tensor(data_cfg["std"], device=world.device).view(1, 3, 1, 1)
    amp = world.device.type == "cuda" and cfg.amp
    ddp = DistributedDataParallel(state.model) if world.distributed else state.model
    loop = Loop(cfg, world, source, train_loader(cfg, world, train_m, source, plan), plan.steps,
                torch.compile(ddp) if cfg.compile else ddp,  # the training forward only: eval runs eager
                mean, std, amp, runlog, progress)
    evaluate = Evaluator(val_m, cfg, world, mean, std, amp)
    total = cfg.epochs + cfg.cooldown_epochs  # cooldown: the cosine has ended at min_lr
    log.info(f"training {cfg.model} ({source.mode} targets) on {world.size} process(es), {plan.steps} "
             f"steps/epoch of {cfg.batch_size} per process, epochs {state.epoch + 1}..{total - 1}")
    log.info(f"epoch plan: {summarize(plan).describe(plan)}")
    summary = {}
    for epoch in range(state.epoch + 1, total):
        t0 = time.perf_counter()
        state.scheduler.step(epoch)
        loop.loader.dataset.set_epoch(epoch)  # reaches persistent workers: shared memory
        stats = train_epoch(loop, state, epoch)
        usage = gather_usage(stats.pop("sids"), world, cfg.repeated_aug)
        train_s = time.perf_counter() - t0
        val = evaluate({"raw": state.model} | ({"ema": state.ema.module} if state.ema is not None else {}))
        raw, ema = val["raw"], val.get("ema")
        record = {
            "epoch": epoch, "lr": state.optimizer.param_groups[0]["lr"], "train_loss": stats["loss"],
            **{f"train_{k}": v for k, v in stats["parts"].items()},
            "img_per_s": stats["img_per_s"], "train_s": train_s,
            "val_top1": raw["top1"], "val_top5": raw["top5"],
            "val_top1_ema": ema["top1"] if ema else None, "val_top5_ema": ema["top5"] if ema else None,
            "val_count": raw["count"], **usage, "view": source.view_of(epoch),
            "ranks": world.size, "rank_weights_equal": weights_in_sync(state.model, world),
            "time_s": time.perf_counter() - t0,
        }
        state.epoch = epoch
        end_epoch(state, cfg, world, runlog, record, val, source.views)
        summary = {"last": record, "best": state.best}
    return summary


def load_manifests(cfg: TrainConfig):
    train_m, val_m = load_manifest(cfg.train_shards), load_manifest(cfg.val_shards)
    if val_m.classes != train_m.classes:
        raise ShardError(f"{cfg.val_shards}: class names differ from the train shards {cfg.train_shards}")
    return train_m, val_m


def make_plan(cfg: TrainConfig, world: World, manifest, source: LabelTargets) -> PlanSpec:
    """The epoch plan; rank 0 reads which slots hold a trainable sample (the cache's labels)."""
    counts = on_main(world, lambda: valid_counts(
        manifest, schema.open_cache(cfg.cache)[0] if cfg.cache else None, source.layout))
    plan = PlanSpec(counts=counts, seed=cfg.seed, world=world.size, workers=cfg.workers, batch=cfg.batch_size,
                    repeats=cfg.repeated_aug, max_steps=cfg.max_steps)
    try:
        plan.steps
    except PlanError as e:
        raise TrainError(f"{cfg.train_shards}: {e}") from None
    return plan


def start_run(state: TrainState, cfg: TrainConfig, world: World, runlog: RunLog, resume: bool,
              steps: int, cache_views: int | None) -> None:
    """Resume from last.pth when asked and present, else start a fresh run folder."""
    last = storage.join(cfg.out, "last.pth")
    if resume and storage.is_file(last):
        ckpt = load_checkpoint(last, cfg, world.device, world.size, cache_views)
        state.load(ckpt, steps)
        restore_rng(ckpt, world.rank, world.size, world.device.type == "cuda")
        log.info(f"resuming from {last} at epoch {state.epoch + 1}")
        runlog.start(state.epoch, state.step)
    elif world.is_main:
        if not storage.is_url(cfg.out):
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
        storage.write_bytes(storage.join(cfg.out, "config.json"), (json.dumps(to_dict(cfg), indent=1) + "\n").encode())
        runlog.start(None, 0)
    barrier(world)


def train_loader(cfg: TrainConfig, world: World, manifest, source: LabelTargets, plan: PlanSpec) -> DataLoader:
    """One DataLoader for the run: its workers persist from epoch to epoch."""
    stream = TrainStream(TrainStreamSpec(
        manifest=manifest, cache=cfg.cache, layout=source.layout, spec=source.spec, size=cfg.input_size,
        plan=plan, rank=world.rank, shuffle_buffer=cfg.shuffle_buffer))
    # its own generator: the loader's seed draw must not move the global generator that drives
    # dropout/drop-path (a resumed run creates its loader at another point of that stream)
    generator = torch.Generator().manual_seed(stable_seed("loader", cfg.seed, world.rank) % 2**63)
    return DataLoader(stream, batch_size=cfg.batch_size, num_workers=cfg.workers,
                      pin_memory=world.device.type == "cuda", prefetch_factor=4 if cfg.workers else None,
                      persistent_workers=cfg.workers > 0, generator=generator)


def train_epoch(loop: Loop, state: TrainState, epoch: int) -> dict:
    """`loop.steps` train_steps. Loss sums and the first non-finite step stay on the device: reading
    them is a CPU-GPU sync point, done every CHECK_EVERY steps and at the end, not every step."""
    cfg, world = loop.cfg, loop.world
    bar = None
    if loop.progress and world.is_main:
        from tqdm import tqdm
        bar = tqdm(total=loop.steps, desc=f"epoch {epoch}", unit="step", dynamic_ncols=True, leave=False)
    loss_sum, parts_sum = torch.zeros((), device=world.device), {}
    first_bad = torch.full((), -1, dtype=torch.int64, device=world.device)
    recent_keys: dict[int, list[str]] = {}  # batch keys since the last check, for the error message
    sids = []  # which samples this rank trained on, step by step (CPU tensors from the loader)
    lr = state.optimizer.param_groups[0]["lr"]  # the scheduler steps per epoch
    n_steps, t_first = 0, None
    for step, batch in enumerate(loop.loader):
        sids.append(batch["sid"])
        recent_keys[step] = batch["key"][:4]
        x, gt, teacher = loop.source(batch, epoch, step)
        loss, parts = train_step(loop, state, x, gt, teacher)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        loss_sum += loss
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v
        n_steps += 1
        if cfg.log_every and state.step % cfg.log_every == 0:
            loop.runlog.step(state.step, epoch, loss, lr)  # read at the next check: no sync here
        if (step + 1) % CHECK_EVERY == 0 or step + 1 == loop.steps:
            check_finite(first_bad, recent_keys, epoch, world)
            recent_keys.clear()
            loop.runlog.flush_steps()
            if bar is not None:  # the check synced: reading the loss costs nothing more
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if bar is not None:
            bar.update(1)
        if n_steps == 1:  # throughput excludes the first step (worker start-up, allocator warm-up)
            t_first = time.perf_counter()
    if bar is not None:
        bar.close()
    if n_steps != loop.steps:
        raise TrainError(f"rank {world.rank} ran {n_steps} steps, expected {loop.steps}")
    elapsed = time.perf_counter() - t_first if n_steps > 1 else 0.0
    return {"loss": float(loss_sum) / n_steps, "parts": {k: float(v) / n_steps for k, v in parts_sum.items()},
            "img_per_s": (n_steps - 1) * cfg.batch_size * world.size / elapsed if elapsed > 0 else 0.0,
            "sids": torch.stack(sids).numpy() if sids else np.zeros((0, cfg.batch_size), np.int64)}


def train_step(loop: Loop, state: TrainState, x: torch.Tensor, gt: torch.Tensor, teacher) -> tuple[torch.Tensor, dict]:
    """One optimizer step (and EMA update) on a prepared batch: x (N, 3, H, W) in [0, 1], gt (N, C),
    teacher (P, rest) or None. Returns the detached loss and its parts, on the device: nothing
    here waits for the device."""
    cfg = loop.cfg
    if x.is_cuda and cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=loop.amp):
        logits = loop.forward((x - loop.mean) / loop.std)
    if teacher is None:
        loss, parts = soft_cross_entropy(logits, gt), {}
    else:
        loss, parts = usi_loss(logits, gt, *teacher, alpha=cfg.kd_alpha, temperature=cfg.kd_temperature,
                               kd_only=cfg.kd_only)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    if state.ema is not None:
        state.ema.update(state.model)
    state.step += 1
    return loss.detach(), parts


def end_epoch(state: TrainState, cfg: TrainConfig, world: World, runlog: RunLog, record: dict, val: dict,
              cache_views: int | None) -> None:
    """Keep the better of raw and EMA weights as best.pth when they beat the best so far; log the
    epoch, then save last.pth (the log line first: resume trims lines past the checkpoint)."""
    use_ema = "ema" in val and val["ema"]["top1"] > val["raw"]["top1"]
    better = val["ema" if use_ema else "raw"]
    improved = better["top1"] > state.best["top1"]  # the same on every rank: counts are all-reduced
    if improved:
        state.best = {"top1": better["top1"], "top5": better["top5"], "epoch": state.epoch, "ema": use_ema}
    rng = gather_objects(world, rng_state(world.device.type == "cuda"))  # every rank's generators
    if not world.is_main:
        return
    runlog.epoch(record, state.step)
    if improved:
        save_atomic(state.best_checkpoint(cfg.model), storage.join(cfg.out, "best.pth"))
    save_atomic(state.checkpoint(cfg, rng, world.size, cache_views), storage.join(cfg.out, "last.pth"))
    ema_txt = f", EMA {record['val_top1_ema']:.2f}" if record["val_top1_ema"] is not None else ""
    log.info(f"epoch {state.epoch}: loss {record['train_loss']:.4f}, {record['img_per_s']:.0f} img/s, "
             f"val top-1 {record['val_top1']:.2f}{ema_txt} ({record['val_count']} images), {record['time_s']:.1f} s")


def check_finite(first_bad: torch.Tensor, recent_keys: dict[int, list[str]], epoch: int, world: World) -> None:
    """Stop at a non-finite loss, naming its step and, on the rank that saw it, its batch (a CPU-GPU
    sync point). Every rank checks at the same steps and takes the first bad step of any rank,
    so all ranks stop together."""
    none = torch.iinfo(torch.int64).max
    bad = torch.where(first_bad >= 0, first_bad, torch.full_like(first_bad, none))
    own = int(bad)
    if world.distributed:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
    step = int(bad)
    if step != none:
        keys = recent_keys.get(step) if own == step else None  # another rank's batch: not ours to name
        raise TrainError(f"non-finite loss at epoch {epoch} step {step}"
                         + (f" (batch keys {', '.join(keys)}, ...)" if keys else ""))


def gather_usage(sids: np.ndarray, world: World, repeats: int) -> dict:
    """The epoch's sample accounting over all ranks (`plan.copy_stats`), on rank 0 ({}
    elsewhere), from the slot ids each rank trained on, (steps, batch). Gathered to rank 0 only."""
    gathered = gather_objects(world, sids)
    if gathered is None:
        return {}
    steps, batch = gathered[0].shape
    return copy_stats(np.concatenate([g.ravel() for g in gathered]),
                      np.tile(np.repeat(np.arange(steps), batch), len(gathered)),
                      np.repeat(np.arange(len(gathered)), steps * batch), repeats, len(gathered))


@torch.no_grad()
def weights_in_sync(model, world) -> bool:
    """True when every rank holds bit-identical weights (a float64 checksum per rank)."""
    if not world.distributed:
        return True
    total = torch.zeros(2, dtype=torch.float64, device=world.device)
    for p in model.parameters():
        total[0] += p.double().sum()
        total[1] += (p.double() ** 2).sum()
    gathered = [torch.zeros_like(total) for _ in range(world.size)]
    torch.distributed.all_gather(gathered, total)
    return all(torch.equal(g, gathered[0]) for g in gathered)
